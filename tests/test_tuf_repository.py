"""The TUF repository: initialisation, targets from publishing, root rotation, re-signing by the
beat task, the /tuf/ endpoints, the release counter on upload, and the system checks.

Metadata is checked with the real client (``tuf.ngclient.Updater``) reading /tuf/metadata/
through the Django test client, so what is verified is what devices get."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Targets, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from firmware import services, tasks, tuf_repo, tuf_rotation
from firmware.models import Firmware, TufKey, TufMetadata
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor
from tests.factories import FirmwareFactory


@pytest.fixture(autouse=True)
def _tuf(settings: Any, tmp_path: Path) -> None:
    settings.TUF_AUTO_INIT = True
    settings.TUF_ROOT_KEY_DIR = tmp_path / "tuf-root"
    settings.TUF_METADATA_PUBLIC = False


class ClientFetcher(FetcherInterface):
    """Fetches /tuf/metadata/ through the Django test client, as an authenticated device."""

    def __init__(self, client: APIClient) -> None:
        self.client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.client.get(url.removeprefix("http://testserver"))
        if response.status_code != 200:
            raise tuf_exceptions.DownloadHTTPError(str(response.status_code), response.status_code)
        return iter([response.content])


def updater(client: APIClient, tmp_path: Path, bootstrap: bytes) -> Updater:
    cache = tmp_path / "client-metadata"
    cache.mkdir(exist_ok=True)
    return Updater(
        str(cache),
        "http://testserver/tuf/metadata/",
        fetcher=ClientFetcher(client),
        bootstrap=bootstrap,
    )


def root_v1() -> bytes:
    content = tuf_repo.root_bytes(1)
    assert content is not None
    return content


def publish(version: str, **fields: Any) -> Firmware:
    return services.publish_firmware(FirmwareFactory.create(version=version, **fields))


# --- Initialisation and targets -------------------------------------------------------------


def test_first_publish_initialises_a_repository_that_the_real_client_verifies(
    device_a: DeviceActor, tmp_path: Path, settings: Any
) -> None:
    firmware = publish("1.1.0", release_counter=4)
    [key_file] = Path(settings.TUF_ROOT_KEY_DIR).iterdir()
    assert key_file.stat().st_mode & 0o777 == 0o600
    root = Metadata[Root].from_bytes(root_v1()).signed
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 1
    # Online keys are sealed; the root key is not in the database at all.
    for key in TufKey.objects.all():
        if key.role == "root":
            assert key.private_key == ""
        else:
            assert json.loads(key.private_key)["purpose"] == "tuf-online"

    client = updater(device_a.client, tmp_path, root_v1())
    client.refresh()
    target = client.get_targetinfo(tuf_repo.target_path(firmware))
    assert target is not None
    assert target.path == "board-a/1.1.0/image.bin"
    assert target.length == firmware.file_size
    assert target.hashes == {"sha256": firmware.checksum}
    assert target.custom == {
        "version": "1.1.0",
        "device_type": "board-a",
        "release_counter": 4,
        "firmware_id": str(firmware.id),
    }
    with firmware.file.open("rb") as handle:
        target.verify_length_and_hashes(handle)


def test_each_publish_and_delete_writes_new_targets_snapshot_and_timestamp(
    device_a: DeviceActor, tmp_path: Path
) -> None:
    first = publish("1.0.0")
    versions = {role: tuf_repo.latest(role).version for role in ("targets", "snapshot")}  # type: ignore[union-attr]
    second = publish("1.1.0")
    assert tuf_repo.latest("targets").version == versions["targets"] + 1  # type: ignore[union-attr]
    assert tuf_repo.latest("snapshot").version == versions["snapshot"] + 1  # type: ignore[union-attr]
    services.delete_firmware(first)
    targets = Metadata[Targets].from_bytes(bytes(tuf_repo.latest("targets").content)).signed  # type: ignore[union-attr]
    assert list(targets.targets) == [tuf_repo.target_path(second)]
    # A draft's deletion changes no target and writes nothing.
    before = TufMetadata.objects.count()
    services.delete_firmware(FirmwareFactory.create(version="9.9.9"))
    assert TufMetadata.objects.count() == before
    client = updater(device_a.client, tmp_path, root_v1())
    client.refresh()
    assert client.get_targetinfo(tuf_repo.target_path(first)) is None
    assert client.get_targetinfo(tuf_repo.target_path(second)) is not None


def test_without_auto_init_publishing_writes_no_metadata_and_a_check_warns(
    db: Any, settings: Any
) -> None:
    settings.TUF_AUTO_INIT = False
    firmware = publish("1.0.0")
    assert firmware.is_published
    assert not TufMetadata.objects.exists()
    ids = [m.id for m in tuf_repo.check_repository(databases=["default"])]
    assert ids == ["ota.W030"]
    settings.TUF_AUTO_INIT = True
    assert tuf_repo.check_repository(databases=["default"]) == []


def test_refresh_interval_must_fit_in_half_a_timestamp_lifetime(settings: Any) -> None:
    assert tuf_repo.check_settings() == []
    settings.TUF_REFRESH_INTERVAL = settings.TUF_TIMESTAMP_EXPIRY / 2
    assert [m.id for m in tuf_repo.check_settings()] == ["ota.E030"]


# --- manage.py tuf ---------------------------------------------------------------------------


def run(*args: str) -> str:
    out = StringIO()
    call_command("tuf", *args, stdout=out)
    return out.getvalue()


def test_init_with_a_threshold_of_offline_keys(
    db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    draft = FirmwareFactory.create(version="1.0.0")
    monkeypatch.setenv("TUF_TEST_PASSPHRASE", "correct horse")
    result = json.loads(
        run(
            "init",
            "--root-keys",
            "3",
            "--threshold",
            "2",
            "--out",
            str(tmp_path / "keys"),
            "--passphrase-env",
            "TUF_TEST_PASSPHRASE",
            "--json",
        )
    )
    assert result["root_version"] == 1 and result["threshold"] == 2
    files = [Path(p) for p in result["key_files"]]
    assert len(files) == 3 and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert b"ENCRYPTED PRIVATE KEY" in files[0].read_bytes()
    root = Metadata[Root].from_bytes(root_v1())
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    assert len(root.signatures) == 3
    # The key files need the passphrase.
    with pytest.raises(tuf_repo.TufError):
        tuf_repo.load_key_file(files[0])
    tuf_repo.load_key_file(files[0], "correct horse")

    with pytest.raises(CommandError, match="exists already"):
        run("init", "--out", str(tmp_path / "again"))
    status = json.loads(run("status", "--json"))
    assert status["initialised"] and status["root_threshold"] == 2
    services.publish_firmware(draft)
    assert json.loads(run("status", "--json"))["targets"] == 1


def test_bad_init_arguments_are_refused(db: Any, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="threshold"):
        run("init", "--root-keys", "2", "--threshold", "3", "--out", str(tmp_path))
    with pytest.raises(CommandError, match="not set"):
        run("init", "--out", str(tmp_path), "--passphrase-env", "TUF_NO_SUCH_VARIABLE")
    assert not TufMetadata.objects.exists()
    with pytest.raises(CommandError, match="not initialised"):
        run("refresh")


def test_root_rotation_needs_a_threshold_of_old_and_new_keys(
    device_a: DeviceActor, tmp_path: Path
) -> None:
    old = json.loads(
        run(
            "init", "--root-keys", "3", "--threshold", "2", "--out", str(tmp_path / "old"), "--json"
        )
    )["key_files"]
    new = json.loads(run("keygen", "--count", "2", "--out", str(tmp_path / "new"), "--json"))[
        "key_files"
    ]
    published = publish("1.1.0")
    with pytest.raises(CommandError, match="needs 2 of its keys"):
        run("rotate-root", "--old-key", old[0], "--new-key", *new)
    with pytest.raises(CommandError, match="threshold"):
        run("rotate-root", "--old-key", *old[:2], "--new-key", *new, "--threshold", "3")
    assert tuf_repo.latest("root").version == 1  # type: ignore[union-attr]

    result = json.loads(
        run("rotate-root", "--old-key", *old[:2], "--new-key", *new, "--threshold", "2", "--json")
    )
    assert result["root_version"] == 2 and result["threshold"] == 2
    retired = TufKey.objects.filter(role="root", retired_at__isnull=False).count()
    assert retired == 3
    # A device that shipped with root v1 walks to v2 and still finds its firmware.
    client = updater(device_a.client, tmp_path, root_v1())
    client.refresh()
    assert client.get_targetinfo(tuf_repo.target_path(published)) is not None
    assert (tmp_path / "client-metadata" / "root_history" / "2.root.json").exists()
    # The old keys alone can no longer sign a root.
    with pytest.raises(CommandError, match="needs 2 of its keys"):
        run("rotate-root", "--old-key", *old, "--new-key", *old)
    # export-root writes what devices ship with.
    out = tmp_path / "root.json"
    run("export-root", "--out", str(out))
    assert Metadata[Root].from_bytes(out.read_bytes()).signed.version == 2
    exported = json.loads(run("export-root", "--version", "1", "--out", str(out), "--json"))
    assert exported["version"] == 1 and exported["path"] == str(out)
    assert exported["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def init_keys(tmp_path: Path, count: int = 3, threshold: int = 2) -> list[str]:
    files: list[str] = json.loads(
        run(
            "init",
            "--root-keys",
            str(count),
            "--threshold",
            str(threshold),
            "--out",
            str(tmp_path / "old"),
            "--json",
        )
    )["key_files"]
    return files


def online_versions() -> dict[str, int]:
    return {role: tuf_repo.latest(role).version for role in tuf_repo.ONLINE_ROLES}  # type: ignore[union-attr]


def snapshot_of_state() -> tuple[list[tuple[str, int]], list[tuple[str, bool]]]:
    metadata = sorted(TufMetadata.objects.values_list("role", "version"))
    keys = sorted((k.keyid, k.retired_at is None) for k in TufKey.objects.all())
    return metadata, keys


def test_online_key_rotation_is_walked_by_a_client_from_root_v1(
    device_a: DeviceActor, tmp_path: Path
) -> None:
    old_files = init_keys(tmp_path)
    published = publish("1.1.0")
    root_v1_md = tuf_repo.current_root()
    assert root_v1_md is not None
    old_timestamp = tuf_repo._online_signer("timestamp", root_v1_md.signed)
    old_ids = {r: root_v1_md.signed.roles[r].keyids for r in tuf_repo.ONLINE_ROLES}
    before = online_versions()

    result = json.loads(run("rotate-online", "--root-key", *old_files[:2], "--json"))
    assert result["root_version"] == 2
    assert result["roles"] == ["targets", "snapshot", "timestamp"]
    assert result["versions"] == {role: v + 1 for role, v in before.items()}
    root = tuf_repo.current_root()
    assert root is not None and root.signed.version == 2
    # The root keys and threshold are the same; every online role has a new key.
    assert root.signed.roles["root"].keyids == root_v1_md.signed.roles["root"].keyids
    assert root.signed.roles["root"].threshold == 2 and len(root.signatures) == 2
    for role, ids in old_ids.items():
        [new_id] = root.signed.roles[role].keyids
        assert new_id not in ids and result["keyids"][role] == [new_id]
        new_key = TufKey.objects.get(keyid=new_id)
        assert new_key.retired_at is None and new_key.role == role
        assert json.loads(new_key.private_key)["purpose"] == "tuf-online"
        assert all(k.retired_at is not None for k in TufKey.objects.filter(keyid__in=ids))
    event = Event.objects.filter(kind=EventKind.TUF_ROOT_SIGNED).latest("id")
    assert event.data["what"] == "online keys rotated" and event.data["version"] == 2

    # A device that shipped with root v1 walks to v2 and accepts the newly signed roles.
    client = updater(device_a.client, tmp_path, root_v1())
    client.refresh()
    assert client.get_targetinfo(tuf_repo.target_path(published)) is not None
    assert (tmp_path / "client-metadata" / "root_history" / "2.root.json").exists()
    # The beat task signs with the new keys from now on.
    assert tuf_repo.update_repository(force=True).written == ["snapshot", "timestamp"]
    updater(device_a.client, tmp_path, root_v1()).refresh()

    # A timestamp signed with the old (perhaps stolen) key is refused.
    forged = Timestamp(
        version=tuf_repo.latest("timestamp").version + 1,  # type: ignore[union-attr]
        expires=timezone.now().replace(microsecond=0) + timedelta(days=1),
        snapshot_meta=MetaFile(version=tuf_repo.latest("snapshot").version),  # type: ignore[union-attr]
    )
    signed = Metadata(forged)
    signed.sign(old_timestamp)
    TufMetadata.objects.create(
        role="timestamp",
        version=forged.version,
        content=signed.to_bytes(tuf_repo.SERIALIZER),
        expires=forged.expires,
    )
    (tmp_path / "fresh").mkdir()
    with pytest.raises(tuf_exceptions.UnsignedMetadataError):
        updater(device_a.client, tmp_path / "fresh", root_v1()).refresh()
    # So is it for a device that already trusts the rotated metadata.
    with pytest.raises(tuf_exceptions.UnsignedMetadataError):
        updater(device_a.client, tmp_path, root_v1()).refresh()


def test_rotating_only_the_timestamp_key_resigns_only_the_timestamp(
    db: Any, tmp_path: Path
) -> None:
    [key] = init_keys(tmp_path, 1, 1)
    publish("1.0.0")
    root = tuf_repo.current_root()
    assert root is not None
    targets_ids = root.signed.roles["targets"].keyids
    before = online_versions()
    result = json.loads(run("rotate-online", "--roles", "timestamp", "--root-key", key, "--json"))
    assert result["roles"] == ["timestamp"]
    assert result["versions"] == {**before, "timestamp": before["timestamp"] + 1}
    root = tuf_repo.current_root()
    assert root is not None and root.signed.roles["targets"].keyids == targets_ids
    assert TufKey.objects.filter(role="timestamp", retired_at__isnull=False).count() == 1
    assert TufKey.objects.filter(role="targets", retired_at__isnull=False).count() == 0


def test_online_rotation_works_when_the_old_online_keys_cannot_be_unsealed(
    device_a: DeviceActor, tmp_path: Path
) -> None:
    [key] = init_keys(tmp_path, 1, 1)
    published = publish("1.1.0")
    # The master key that sealed the online keys is lost: no envelope opens any more.
    for record in TufKey.objects.exclude(role="root"):
        envelope = json.loads(record.private_key)
        envelope["kek"] = "lost-master-key"
        record.private_key = json.dumps(envelope)
        record.save()
    with pytest.raises(CommandError, match="cannot be unsealed"):
        run("refresh", "--force")
    # A partial rotation needs the old snapshot key (to list the new targets): refused, clearly.
    state = snapshot_of_state()
    with pytest.raises(CommandError, match="rotate it too"):
        run("rotate-online", "--roles", "targets", "--root-key", key)
    assert snapshot_of_state() == state

    run("rotate-online", "--root-key", key)
    assert tuf_repo.update_repository(force=True).written == ["snapshot", "timestamp"]
    client = updater(device_a.client, tmp_path, root_v1())
    client.refresh()
    assert client.get_targetinfo(tuf_repo.target_path(published)) is not None


def test_online_rotation_refusals_write_nothing(db: Any, tmp_path: Path) -> None:
    [stranger] = json.loads(run("keygen", "--out", str(tmp_path / "stranger"), "--json"))[
        "key_files"
    ]
    with pytest.raises(CommandError, match="not initialised"):
        run("rotate-online", "--root-key", stranger)
    with pytest.raises(tuf_repo.TufError) as refused:
        tuf_rotation.rotate_online([tuf_repo.load_key_file(Path(stranger))])
    assert refused.value.status_code == 409
    assert not TufMetadata.objects.exists()

    old = init_keys(tmp_path)
    publish("1.0.0")
    state = snapshot_of_state()
    events = Event.objects.count()
    with pytest.raises(CommandError, match="needs 2 of its keys; 1 of the given"):
        run("rotate-online", "--root-key", old[0])
    with pytest.raises(CommandError, match="needs 2 of its keys; 1 of the given"):
        run("rotate-online", "--root-key", old[0], old[0])
    with pytest.raises(CommandError, match="needs 2 of its keys; 1 of the given"):
        run("rotate-online", "--root-key", old[0], stranger)
    with pytest.raises(CommandError, match="Unknown online role root"):
        run("rotate-online", "--roles", "targets,root", "--root-key", *old)
    with pytest.raises(CommandError, match="Unknown online role"):
        run("rotate-online", "--roles", ",", "--root-key", *old)
    with pytest.raises(CommandError, match="Cannot load the key"):
        run("rotate-online", "--root-key", str(tmp_path / "missing.pem"))
    with pytest.raises(tuf_repo.TufError) as refused:
        tuf_rotation.rotate_online([tuf_repo.load_key_file(Path(old[0]))], ["snapshot"])
    assert refused.value.status_code == 409 and refused.value.code == "tuf_threshold"
    assert snapshot_of_state() == state
    assert Event.objects.count() == events


# --- Freshness: the beat task ------------------------------------------------------------------


def test_refresh_resigns_only_what_is_past_half_its_lifetime(db: Any, settings: Any) -> None:
    publish("1.0.0")
    assert tasks.refresh_tuf_metadata() == []  # idempotent: nothing due right after a publish
    now = timezone.now()
    half_a_day = now + timedelta(seconds=settings.TUF_TIMESTAMP_EXPIRY / 2 + 60)
    assert tuf_repo.update_repository(now=half_a_day).written == ["timestamp"]
    assert tuf_repo.update_repository(now=half_a_day).written == []
    in_four_days = now + timedelta(days=4)
    assert tuf_repo.update_repository(now=in_four_days).written == ["snapshot", "timestamp"]
    in_seven_months = now + timedelta(days=210)
    assert tuf_repo.update_repository(now=in_seven_months).written == [
        "targets",
        "snapshot",
        "timestamp",
    ]
    timestamp = tuf_repo.latest("timestamp")
    assert timestamp is not None
    assert timestamp.expires > in_seven_months + timedelta(hours=23)


@pytest.mark.django_db(transaction=True)
def test_two_workers_refreshing_at_once_never_write_the_same_version(settings: Any) -> None:
    publish("1.0.0")
    before = tuf_repo.latest("timestamp").version  # type: ignore[union-attr]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        try:
            barrier.wait()
            tuf_repo.update_repository(force=True)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert tuf_repo.latest("timestamp").version == before + 2  # type: ignore[union-attr]


# --- /tuf/metadata/ ----------------------------------------------------------------------------


def test_metadata_endpoints(
    device_a: DeviceActor, api: APIClient, viewer: Any, settings: Any
) -> None:
    publish("1.0.0")
    reply = device_a.client.get("/tuf/metadata/timestamp.json")
    assert reply.status_code == 200
    assert reply["Cache-Control"] == "private, max-age=60"
    assert reply.content == bytes(tuf_repo.latest("timestamp").content)  # type: ignore[union-attr]
    reply = device_a.client.get("/tuf/metadata/1.root.json")
    assert reply.status_code == 200 and "immutable" in reply["Cache-Control"]
    version = tuf_repo.latest("targets").version  # type: ignore[union-attr]
    assert device_a.client.get(f"/tuf/metadata/{version}.targets.json").status_code == 200
    for path in (
        f"/tuf/metadata/{version + 1}.targets.json",
        "/tuf/metadata/0.root.json",
        "/tuf/metadata/99999999999999999999.snapshot.json",
        "/tuf/metadata/1.timestamp.json",
        "/tuf/metadata/snapshot.json",
        "/tuf/targets/board-a/1.0.0/image.bin",
    ):
        reply = device_a.client.get(path)
        assert reply.status_code == 404, path
        assert reply.json()["code"] == "not_found"
    # Not public by default: anonymous callers are refused with the JSON error shape.
    reply = api.get("/tuf/metadata/timestamp.json")
    assert reply.status_code in (401, 403) and "code" in reply.json()
    api.force_authenticate(viewer)
    assert api.get("/tuf/metadata/1.root.json").status_code == 200
    settings.TUF_METADATA_PUBLIC = True
    reply = APIClient().get("/tuf/metadata/timestamp.json")
    assert reply.status_code == 200 and reply["Cache-Control"] == "public, max-age=60"


def test_timestamp_is_404_before_initialisation(device_a: DeviceActor) -> None:
    reply = device_a.client.get("/tuf/metadata/timestamp.json")
    assert reply.status_code == 404 and reply.json()["code"] == "not_found"


# --- The release counter -----------------------------------------------------------------------


def upload(client: APIClient, version: str, **fields: Any) -> Any:
    return client.post(
        "/api/v1/firmware",
        {
            "file": SimpleUploadedFile("image.bin", b"x" * 4000 + version.encode()),
            "version": version,
            "device_type": "board-a",
            **fields,
        },
        format="multipart",
    )


def test_release_counter_on_upload_manifest_and_offer(
    operator_api: APIClient, device_a: DeviceActor
) -> None:
    reply = upload(operator_api, "1.1.0", release_counter=3)
    assert reply.status_code == 201 and reply.json()["release_counter"] == 3
    # Default: the highest counter of the type, never lower by accident.
    reply = upload(operator_api, "1.2.0")
    assert reply.status_code == 201 and reply.json()["release_counter"] == 3
    firmware_id = reply.json()["id"]
    assert operator_api.post(f"/api/v1/firmware/{firmware_id}/publish").status_code == 200
    detail = operator_api.get(f"/api/v1/firmware/{firmware_id}").json()
    assert json.loads(detail["manifest"])["release_counter"] == 3
    device = device_a.refresh()
    device.target_version = "1.2.0"
    device.target_set_at = timezone.now()
    device.save()
    offer = device_a.client.get("/api/v1/updates/check").json()
    assert offer["update_available"], offer
    assert offer["release_counter"] == 3
    stored = str(Firmware.objects.get(pk=firmware_id).file.name)
    assert offer["tuf_target"] == f"board-a/1.2.0/{Path(stored).name}"


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", str(2**40)])
def test_a_bad_release_counter_is_400(operator_api: APIClient, value: str) -> None:
    reply = upload(operator_api, "1.3.0", release_counter=value)
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == "invalid" and "release_counter" in body["errors"]
    assert not Firmware.objects.exists()


def test_the_service_refuses_a_negative_counter(db: Any) -> None:
    with pytest.raises(services.ServiceError):
        services.upload_firmware(
            file=SimpleUploadedFile("a.bin", b"abc"),
            hashes={"sha256": "0" * 64, "sha1": "0" * 40, "md5": "0" * 32},
            version="1.0.0",
            device_type="board-a",
            release_counter=-1,
        )
