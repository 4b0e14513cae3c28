"""Firmware API: upload, duplicates, limits, publish and signature, list, delete, download."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from firmware.models import Firmware
from ota_site.models import Event
from rollouts.models import UpdateSession
from tests.conftest import DeviceActor, content_of, enroll
from tests.factories import FirmwareFactory, firmware_bytes


def upload(client: APIClient, content: bytes = b"x" * 5000, **fields: object):
    data = {"version": "3.0.0", "device_type": "board-a", **fields}
    data["file"] = SimpleUploadedFile("image.bin", content)
    return client.post("/api/v1/firmware", data, format="multipart")


def test_upload_computes_hashes_and_stores_a_draft(operator_api: APIClient) -> None:
    content = firmware_bytes("3.0.0", 300_000)
    reply = upload(
        operator_api,
        content,
        release_notes="Fixes the watchdog.",
        min_version="2.0.0",
        dependencies=json.dumps(["bootloader>=2"]),
    )
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["size"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["sha1"] == hashlib.sha1(content).hexdigest()
    assert body["md5"] == hashlib.md5(content).hexdigest()
    assert body["published"] is False and body["signature"] == ""
    assert body["release_notes"] == "Fixes the watchdog."
    assert body["min_version"] == "2.0.0" and body["dependencies"] == ["bootloader>=2"]
    firmware = Firmware.objects.get(pk=body["id"])
    with firmware.file.open("rb") as stored:
        assert stored.read() == content
    assert Event.objects.filter(kind="firmware.uploaded", firmware_id=firmware.id).exists()


def test_duplicate_version_is_409_and_equal_versions_count_as_duplicates(
    operator_api: APIClient,
) -> None:
    assert upload(operator_api).status_code == 201
    for version in ("3.0.0", "3.0", "v3.0.0"):
        reply = upload(operator_api, version=version)
        assert reply.status_code == 409
        assert reply.json()["code"] == "duplicate_version"
    assert Firmware.objects.count() == 1
    # The same version for another device type is fine.
    assert upload(operator_api, device_type="board-b").status_code == 201


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"version": "latest"}, "version"),
        ({"version": ""}, "version"),
        ({"version": "1.2.3.4.5"}, "version"),
        ({"device_type": "../etc"}, "device_type"),
        ({"device_type": ""}, "device_type"),
        ({"min_version": "soon"}, "min_version"),
        ({"dependencies": "not json"}, "dependencies"),
        ({"release_notes": "x" * 20_001}, "release_notes"),
    ],
)
def test_bad_upload_fields_are_400_and_store_nothing(
    operator_api: APIClient, fields: dict[str, str], field: str
) -> None:
    reply = upload(operator_api, b"x" * 5000, **fields)
    assert reply.status_code == 400, reply.content
    assert reply.json()["code"] == "invalid" and field in reply.json()["errors"]
    assert not Firmware.objects.exists()


def test_missing_or_empty_file_is_400(operator_api: APIClient) -> None:
    reply = operator_api.post(
        "/api/v1/firmware", {"version": "1.0.0", "device_type": "board-a"}, format="multipart"
    )
    assert reply.status_code == 400 and "file" in reply.json()["errors"]
    assert upload(operator_api, b"").status_code == 400
    assert not Firmware.objects.exists()


def test_json_body_is_415(operator_api: APIClient) -> None:
    reply = operator_api.post(
        "/api/v1/firmware", {"version": "1.0.0", "device_type": "a"}, format="json"
    )
    assert reply.status_code == 415 and reply.json()["code"] == "unsupported_media_type"


def test_upload_over_the_limit_is_413_and_stores_nothing(
    operator_api: APIClient, settings, tmp_path
) -> None:
    settings.FIRMWARE_MAX_UPLOAD_SIZE = 100_000
    reply = upload(operator_api, b"y" * 100_001)
    assert reply.status_code == 413 and reply.json()["code"] == "file_too_large"
    assert not Firmware.objects.exists()
    assert not list((tmp_path / "media").rglob("*.bin"))
    assert upload(operator_api, b"y" * 100_000).status_code == 201


def test_declared_length_over_the_limit_is_refused_before_reading(
    operator_api: APIClient, settings
) -> None:
    settings.FIRMWARE_MAX_UPLOAD_SIZE = 1000
    reply = operator_api.generic(
        "POST",
        "/api/v1/firmware",
        "",
        content_type="multipart/form-data; boundary=xyz",
        CONTENT_LENGTH=str(50 * 1024 * 1024),
    )
    assert reply.status_code == 413


def test_people_who_are_not_operators_and_devices_cannot_upload(
    api: APIClient, viewer, device_a: DeviceActor
) -> None:
    assert upload(api).status_code in (401, 403)
    api.force_login(viewer)
    assert upload(api).status_code == 403
    assert upload(device_a.client).status_code in (401, 403)
    assert not Firmware.objects.exists()


def test_publish_signs_the_canonical_manifest(operator_api: APIClient) -> None:
    firmware = FirmwareFactory.create(version="1.2.0", metadata={"min_version": "1.0.0"})
    reply = operator_api.post(f"/api/v1/firmware/{firmware.id}/publish")
    assert reply.status_code == 200, reply.content
    body = reply.json()
    assert body["published"] is True and body["key_id"]
    manifest = json.loads(body["manifest"])
    assert manifest == {
        "id": str(firmware.id),
        "version": "1.2.0",
        "device_type": "board-a",
        "size": firmware.file_size,
        "sha256": firmware.checksum,
        "min_version": "1.0.0",
        "release_counter": 0,
    }
    assert body["manifest"] == json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    key = operator_api.get("/api/v1/firmware/keys").json()[0]
    assert key["key_id"] == body["key_id"]
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    public.verify(base64.b64decode(body["signature"]), body["manifest"].encode())
    # Publishing again is harmless and changes nothing.
    again = operator_api.post(f"/api/v1/firmware/{firmware.id}/publish").json()
    assert again["signature"] == body["signature"]
    assert again["published_at"] == body["published_at"]


def test_publish_refuses_a_stored_file_that_does_not_match(operator_api: APIClient) -> None:
    firmware = FirmwareFactory.create(version="1.2.0")
    with open(firmware.file.path, "r+b") as handle:
        handle.write(b"tampered")
    reply = operator_api.post(f"/api/v1/firmware/{firmware.id}/publish")
    assert reply.status_code == 409 and reply.json()["code"] == "checksum_mismatch"
    firmware.refresh_from_db()
    assert not firmware.is_published


def test_signing_key_is_created_once_sealed_in_the_database(
    operator_api: APIClient, settings
) -> None:
    for version in ("1.0.0", "1.1.0"):
        firmware = FirmwareFactory.create(version=version)
        operator_api.post(f"/api/v1/firmware/{firmware.id}/publish")
    # No key file any more (tests/test_signing_keys.py covers custody).
    assert not settings.FIRMWARE_SIGNING_KEY_PATH.exists()
    assert len({f.signing_key_id for f in Firmware.objects.all()}) == 1


def test_list_filter_and_detail(operator_api: APIClient) -> None:
    FirmwareFactory.create(version="1.9.0")
    FirmwareFactory.create(version="1.10.0")
    FirmwareFactory.create(version="1.0.0", device_type="board-b")
    reply = operator_api.get("/api/v1/firmware?device_type=board-a")
    versions = [f["version"] for f in reply.json()["results"]]
    assert versions == ["1.10.0", "1.9.0"]  # version order, not text order
    assert operator_api.get("/api/v1/firmware?published=true").json()["count"] == 0
    one = reply.json()["results"][0]
    assert operator_api.get(f"/api/v1/firmware/{one['id']}").json()["version"] == "1.10.0"
    missing = operator_api.get("/api/v1/firmware/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


def test_delete_is_refused_while_a_session_refers_to_it(
    admin_api: APIClient, published: Firmware, device_a: DeviceActor
) -> None:
    UpdateSession.objects.create(device=device_a.device, firmware=published)
    reply = admin_api.delete(f"/api/v1/firmware/{published.id}")
    assert reply.status_code == 409 and reply.json()["code"] == "firmware_in_use"
    assert Firmware.objects.filter(pk=published.pk).exists()
    with published.file.open("rb"):
        pass  # the file is still there


def test_delete_removes_row_and_file_after_commit(
    admin_api: APIClient, django_capture_on_commit_callbacks
) -> None:
    firmware = FirmwareFactory.create(version="1.2.0")
    path = Path(firmware.file.path)
    with django_capture_on_commit_callbacks(execute=True):
        assert admin_api.delete(f"/api/v1/firmware/{firmware.id}").status_code == 204
    assert not Firmware.objects.filter(pk=firmware.pk).exists()
    assert not path.exists()


class TestDownload:
    def url(self, firmware: Firmware) -> str:
        return f"/api/v1/firmware/{firmware.id}/download"

    def test_full_download_with_etag(self, device_a: DeviceActor, published: Firmware) -> None:
        reply = device_a.client.get(self.url(published))
        assert reply.status_code == 200
        assert content_of(reply) == firmware_bytes("1.1.0")
        assert reply["ETag"] == f'"{published.checksum}"'
        again = device_a.client.get(self.url(published), HTTP_IF_NONE_MATCH=reply["ETag"])
        assert again.status_code == 304

    @pytest.mark.parametrize(
        ("header", "first", "last"),
        [
            ("bytes=0-0", 0, 0),
            ("bytes=100-", 100, None),
            ("bytes=-10", None, None),
            ("bytes=5-999999999", 5, None),
        ],
    )
    def test_ranges(self, device_a: DeviceActor, published: Firmware, header, first, last) -> None:
        size = published.file_size
        content = firmware_bytes("1.1.0")
        reply = device_a.client.get(self.url(published), HTTP_RANGE=header)
        assert reply.status_code == 206
        body = content_of(reply)
        if first is None:
            first = size - 10
        last = size - 1 if last is None else last
        assert body == content[first : last + 1]
        assert reply["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert reply["Content-Length"] == str(last - first + 1)

    @pytest.mark.parametrize("header", ["bytes=999999-", "bytes=-0"])
    def test_unsatisfiable_range_is_416(self, device_a, published, header) -> None:
        reply = device_a.client.get(self.url(published), HTTP_RANGE=header)
        assert reply.status_code == 416
        assert reply["Content-Range"] == f"bytes */{published.file_size}"

    @pytest.mark.parametrize("header", ["bytes=abc", "items=0-5", "bytes=5-1", "bytes=0-1,4-5"])
    def test_ignored_range_gives_the_whole_file(self, device_a, published, header) -> None:
        reply = device_a.client.get(self.url(published), HTTP_RANGE=header)
        assert reply.status_code == 200
        assert len(content_of(reply)) == published.file_size

    def test_if_range_with_another_etag_gives_the_whole_file(self, device_a, published) -> None:
        reply = device_a.client.get(
            self.url(published), HTTP_RANGE="bytes=10-", HTTP_IF_RANGE='"stale"'
        )
        assert reply.status_code == 200
        assert len(content_of(reply)) == published.file_size

    def test_head_has_headers_and_no_body(self, device_a, published) -> None:
        reply = device_a.client.head(self.url(published), HTTP_RANGE="bytes=0-99")
        assert reply.status_code == 206 and reply["Content-Length"] == "100"
        assert reply.content == b""

    def test_devices_get_only_published_firmware_of_their_type(
        self, device_a: DeviceActor, published: Firmware
    ) -> None:
        draft = FirmwareFactory.create(version="9.0.0")
        other = FirmwareFactory.create(version="1.0.0", device_type="board-b")
        assert device_a.client.get(self.url(draft)).status_code == 404
        assert device_a.client.get(self.url(other)).status_code == 404
        board_b = enroll("device-c", device_type="board-b")
        assert board_b.client.get(self.url(published)).status_code == 404

    def test_anonymous_download_is_401(self, api: APIClient, published: Firmware) -> None:
        reply = api.get(self.url(published))
        assert reply.status_code == 401
        assert reply["WWW-Authenticate"].startswith("Bearer")

    def test_operators_can_download_drafts(self, operator_api, published) -> None:
        draft = FirmwareFactory.create(version="9.0.0")
        assert operator_api.get(self.url(draft)).status_code == 200
