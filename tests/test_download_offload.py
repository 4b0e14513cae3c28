"""Firmware bytes in production never pass through Python: with local storage behind nginx the
download views answer with X-Accel-Redirect (nginx sends the file: tests/test_deploy_config.py
and tests/test_prod_local.py); with S3 they redirect to a URL signed for the endpoint devices
reach. The app still decides who may download, and answers 304 and 416 itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from firmware.models import Firmware
from tests.conftest import DeviceActor
from tests.ddi.ddi_support import Target, provision
from tests.factories import FirmwareFactory
from tests.rollouts_support import started
from tests.test_configuration import check

PREFIX = "/_x_accel/firmware/"


@pytest.fixture
def x_accel(settings: Any) -> None:
    settings.FIRMWARE_X_ACCEL_PREFIX = PREFIX


def download(firmware: Firmware) -> str:
    return f"/api/v1/firmware/{firmware.id}/download"


def assert_handed_to_nginx(reply: Any, firmware: Firmware) -> None:
    assert reply.status_code == 200
    assert reply.content == b""
    assert reply["X-Accel-Redirect"] == PREFIX + str(firmware.file.name)
    # What nginx re-sends (ETag, checksum) or keeps (the rest) from this answer.
    assert reply["ETag"] == f'"{firmware.checksum}"'
    assert reply["X-Checksum-Sha256"] == firmware.checksum
    assert reply["Content-Type"] == "application/octet-stream"
    assert reply["Accept-Ranges"] == "bytes"
    assert reply["Content-Disposition"].startswith("attachment; filename=")
    assert "Content-Range" not in reply


@pytest.mark.usefixtures("x_accel")
class TestXAccelRedirect:
    def test_get_and_head_are_handed_to_nginx(
        self, device_a: DeviceActor, published: Firmware
    ) -> None:
        # A range too: nginx answers it from the file (206 + Content-Range).
        assert_handed_to_nginx(
            device_a.client.get(download(published), HTTP_RANGE="bytes=10-19"), published
        )
        assert_handed_to_nginx(device_a.client.head(download(published)), published)

    def test_the_storage_name_is_url_encoded(
        self, device_a: DeviceActor, published: Firmware
    ) -> None:
        Firmware.objects.filter(pk=published.pk).update(file="firmware/board-a/x/my image#1.bin")
        reply = device_a.client.get(download(published))
        assert reply["X-Accel-Redirect"] == PREFIX + "firmware/board-a/x/my%20image%231.bin"

    def test_the_app_still_answers_what_needs_no_bytes(
        self, device_a: DeviceActor, published: Firmware
    ) -> None:
        cached = device_a.client.get(
            download(published), HTTP_IF_NONE_MATCH=f'"{published.checksum}"'
        )
        assert cached.status_code == 304 and "X-Accel-Redirect" not in cached
        beyond = device_a.client.get(download(published), HTTP_RANGE="bytes=999999-")
        assert beyond.status_code == 416 and "X-Accel-Redirect" not in beyond
        assert beyond.json()["code"] == "range_not_satisfiable"

    def test_who_may_download_is_still_decided_by_the_app(
        self, device_a: DeviceActor, api: Any, published: Firmware
    ) -> None:
        draft = FirmwareFactory.create(version="9.0.0")
        refused = device_a.client.get(download(draft))
        assert refused.status_code == 404 and "X-Accel-Redirect" not in refused
        anonymous = api.get(download(published))
        assert anonymous.status_code == 401 and "X-Accel-Redirect" not in anonymous

    def test_ddi_artifacts_are_handed_to_nginx(self, v1: Firmware, v2: Firmware) -> None:
        target: Target = provision("ddi-offload")
        started(v2, 100, min_devices=1)
        target.offered()
        url = f"{target.base}/softwaremodules/{v2.id}/artifacts/{v2.filename}"
        assert_handed_to_nginx(target.client.head(url), v2)
        assert_handed_to_nginx(target.client.get(url, headers={"range": "bytes=0-9"}), v2)
        # The checksum file is a few bytes of text: the app answers it.
        assert "X-Accel-Redirect" not in target.client.get(url + ".MD5SUM")


def test_without_the_prefix_python_sends_the_bytes(
    device_a: DeviceActor, published: Firmware
) -> None:
    reply = device_a.client.get(download(published), HTTP_RANGE="bytes=0-9")
    assert reply.status_code == 206 and "X-Accel-Redirect" not in reply


def test_s3_ignores_the_prefix(settings: Any, device_a: DeviceActor, published: Firmware) -> None:
    s3_storage(settings, public_endpoint_url=None)
    settings.FIRMWARE_X_ACCEL_PREFIX = PREFIX
    reply = device_a.client.get(download(published))
    assert reply.status_code == 302 and "X-Accel-Redirect" not in reply


def s3_storage(settings: Any, **options: Any) -> None:
    settings.STORAGE = "s3"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "ota_site.storage.FirmwareS3Storage",
            "OPTIONS": {
                "bucket_name": "firmware",
                "endpoint_url": "http://minio:9000",
                "access_key": "test-access",
                "secret_key": "test-secret",
                "querystring_expire": 300,
                "region_name": "us-east-1",
                "signature_version": "s3v4",
                **options,
            },
        },
    }


@pytest.mark.parametrize(
    ("public", "host"),
    [("https://files.example.com", "files.example.com"), (None, "minio:9000")],
)
def test_s3_download_urls_are_signed_for_the_public_endpoint(
    settings: Any, device_a: DeviceActor, published: Firmware, public: str | None, host: str
) -> None:
    """Signing is computed locally: no S3 service is contacted."""
    s3_storage(settings, public_endpoint_url=public)
    reply = device_a.client.get(download(published))
    assert reply.status_code == 302
    location = urlsplit(reply["Location"])
    assert location.netloc == host
    assert location.path == f"/firmware/{published.file.name}"
    query = parse_qs(location.query)
    # SigV4 signs the host: a URL made for minio:9000 and rewritten would be refused.
    assert query["X-Amz-SignedHeaders"] == ["host"]
    assert query["X-Amz-Expires"] == ["300"] and query["X-Amz-Signature"][0]


def test_a_bad_prefix_fails_the_checks(tmp_path: Path) -> None:
    result = check(tmp_path, FIRMWARE_X_ACCEL_PREFIX="_x_accel")
    assert result.returncode != 0
    assert "ota.E060" in result.stderr, result.stderr
