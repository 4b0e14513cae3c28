"""Firmware signing keys: custody (sealed, never plain), rotation by endorsement, retirement,
rewrap, the key chain in offers; storage read-back checks; S3 encryption in compose."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from rest_framework.test import APIClient

from firmware import key_chains, services, signing, tasks
from firmware.models import Firmware, SigningKey
from ota_site import keystore
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor, content_of
from tests.factories import FirmwareFactory

ROOT = Path(__file__).resolve().parent.parent


def publish(version: str, device_type: str = "board-a") -> Firmware:
    return services.publish_firmware(
        FirmwareFactory.create(version=version, device_type=device_type)
    )


@pytest.fixture
def admin_api(admin_user: User) -> APIClient:
    client = APIClient()
    client.force_login(admin_user)
    return client


def _raw_private(private: Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


# --- Custody ---------------------------------------------------------------------------------


def test_first_key_is_created_once_and_stored_only_sealed(db: Any, settings: Any) -> None:
    first = publish("1.1.0")
    second = publish("1.2.0")
    assert first.signing_key_id == second.signing_key_id
    [key] = SigningKey.objects.all()
    assert key.status == SigningKey.Status.CURRENT
    assert not settings.FIRMWARE_SIGNING_KEY_PATH.exists()  # no key file any more
    private, _ = signing.signing_key()
    raw = _raw_private(private)
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # No column of the key row holds the private key in any usual encoding.
    row = SigningKey.objects.filter(pk=key.pk).values().get()
    dump = json.dumps(row, default=str)
    for secret in (raw, der):
        for text in (base64.b64encode(secret).decode(), secret.hex()):
            assert text not in dump
    assert json.loads(key.private_key)["purpose"] == "firmware-signing"
    assert Event.objects.filter(kind=EventKind.SIGNING_KEY_CREATED).count() == 1


def test_one_current_key_is_a_database_constraint(db: Any) -> None:
    signing.current_key()
    with pytest.raises(IntegrityError), transaction.atomic():
        SigningKey.objects.create(key_id="0" * 16, public_key="x", status="current")


def test_wrong_master_key_fails_clearly_and_makes_no_new_key(
    db: Any, settings: Any, operator_api: APIClient
) -> None:
    publish("1.1.0")
    settings.OTA_MASTER_KEY = keystore.generate_master_key()  # the old one is lost
    draft = FirmwareFactory.create(version="1.2.0")
    reply = operator_api.post(f"/api/v1/firmware/{draft.id}/publish")
    assert reply.status_code == 503, reply.content
    body = reply.json()
    assert body["code"] == "signing_key_unavailable"
    assert "OTA_MASTER_KEY" in body["detail"]
    assert SigningKey.objects.count() == 1
    draft.refresh_from_db()
    assert not draft.is_published
    with pytest.raises(CommandError, match="cannot be used"):
        call_command("signing_key", "list")


def test_legacy_key_file_is_imported_with_its_key_id(db: Any, settings: Any) -> None:
    legacy = Ed25519PrivateKey.generate()
    path: Path = settings.FIRMWARE_SIGNING_KEY_PATH
    path.parent.mkdir(parents=True)
    path.write_bytes(
        legacy.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    firmware = publish("1.1.0")
    assert firmware.signing_key_id == signing.key_id_of(legacy.public_key())
    key = SigningKey.objects.get()
    assert key.private_key and json.loads(key.private_key)["purpose"] == "firmware-signing"
    assert Event.objects.filter(kind=EventKind.SIGNING_KEY_IMPORTED).count() == 1


def test_older_install_row_without_private_half_adopts_the_file(db: Any, settings: Any) -> None:
    legacy = Ed25519PrivateKey.generate()
    key_id = signing.key_id_of(legacy.public_key())
    raw_public = base64.b64encode(signing.raw_public(legacy.public_key())).decode()
    SigningKey.objects.create(key_id=key_id, public_key=raw_public)  # what 0001 left behind
    # Without the file the key is unusable, and no new key replaces it silently.
    with pytest.raises(signing.SigningUnavailable, match="no private key"):
        signing.sign(b"x")
    assert SigningKey.objects.count() == 1
    path: Path = settings.FIRMWARE_SIGNING_KEY_PATH
    path.parent.mkdir(parents=True)
    path.write_bytes(
        legacy.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signature, key = signing.sign(b"manifest")
    assert key.key_id == key_id
    assert signing.verify(raw_public, b"manifest", signature)
    assert SigningKey.objects.get().private_key


# --- Rotation and retirement -----------------------------------------------------------------


def test_rotation_endorses_the_new_key_with_the_old_one(
    db: Any, admin_api: APIClient, admin_user: User
) -> None:
    old = publish("1.1.0").signing_key
    assert old is not None
    reply = admin_api.post("/api/v1/firmware/keys/rotate")
    assert reply.status_code == 201, reply.content
    new = SigningKey.objects.get(pk=reply.json()["key_id"])
    old.refresh_from_db()
    assert (old.status, new.status) == ("previous", "current")
    assert new.endorsed_by_id == old.key_id
    statement = signing.endorsement_statement(
        key_id=new.key_id, algorithm="ed25519", public_key=new.public_key, endorsed_by=old.key_id
    )
    assert signing.verify(old.public_key, statement, new.endorsement)
    event = Event.objects.filter(kind=EventKind.SIGNING_KEY_ROTATED).get()
    assert event.actor == f"user:{admin_user.username}"
    assert event.data["previous"] == old.key_id
    # New firmware is signed with the new key; the old firmware keeps its signature.
    assert publish("1.2.0").signing_key_id == new.key_id
    listing = {k["key_id"]: k for k in admin_api.get("/api/v1/firmware/keys").json()}
    assert listing[new.key_id]["status"] == "current"
    assert listing[new.key_id]["endorsed_by"] == old.key_id
    assert listing[new.key_id]["endorsement"] == new.endorsement
    assert listing[old.key_id]["status"] == "previous"
    assert "private_key" not in listing[old.key_id]


def test_retirement_refusals_and_re_signing(db: Any, admin_api: APIClient) -> None:
    k1 = signing.current_key()
    firmware = publish("1.1.0")
    reply = admin_api.post(f"/api/v1/firmware/keys/{k1.key_id}/retire")
    assert reply.status_code == 409 and reply.json()["code"] == "key_is_current"
    k2 = signing.rotate()
    reply = admin_api.post("/api/v1/firmware/keys/ffffffffffffffff/retire")
    assert reply.status_code == 404 and reply.json()["code"] == "not_found"
    reply = admin_api.post(f"/api/v1/firmware/keys/{k1.key_id}/retire")
    assert reply.status_code == 200, reply.content
    assert reply.json()["resigned"] == 1
    k1.refresh_from_db()
    assert k1.status == "retired" and not k1.is_active and k1.retired_by_id == k2.key_id
    statement = signing.retirement_statement(key_id=k1.key_id, retired_by=k2.key_id)
    assert signing.verify(k2.public_key, statement, k1.retirement)
    # The firmware k1 signed now carries k2's signature over the same manifest.
    firmware.refresh_from_db()
    assert firmware.signing_key_id == k2.key_id
    assert signing.verify(k2.public_key, firmware.manifest.encode(), firmware.signature)
    info = services.published_firmware("board-a", "1.1.0")
    assert info is not None and info["key_id"] == k2.key_id  # the cache was cleared
    # Retiring twice changes nothing; a retired key is never current again.
    assert admin_api.post(f"/api/v1/firmware/keys/{k1.key_id}/retire").status_code == 200
    assert Event.objects.filter(kind=EventKind.SIGNING_KEY_RETIRED).count() == 1
    assert signing.current_key().key_id == k2.key_id


def test_unendorsed_rotation_only_when_the_current_key_is_lost(db: Any, settings: Any) -> None:
    signing.current_key()
    with pytest.raises(CommandError, match="works"):
        call_command("signing_key", "rotate", "--unendorsed")
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    call_command("signing_key", "rotate", "--unendorsed", "--json")
    new = SigningKey.objects.get(status="current")
    assert new.endorsed_by is None and not new.endorsement
    signature, key = signing.sign(b"data")
    assert key == new and signing.verify(new.public_key, b"data", signature)


@pytest.mark.parametrize("role", ["operator", "viewer", "anonymous", "device"])
def test_only_admins_rotate_and_retire(
    role: str, operator: User, viewer: User, device_a: DeviceActor
) -> None:
    key = signing.current_key()
    client = {"device": device_a.client}.get(role, APIClient())
    if role in ("operator", "viewer"):
        client.force_login(operator if role == "operator" else viewer)
    for url in ("/api/v1/firmware/keys/rotate", f"/api/v1/firmware/keys/{key.key_id}/retire"):
        reply = client.post(url)
        assert reply.status_code in (401, 403), (url, reply.status_code)
        assert "code" in reply.json() and "detail" in reply.json()
    assert SigningKey.objects.count() == 1


def test_key_endpoints_answer_bad_input_with_json(admin_api: APIClient) -> None:
    reply = admin_api.get("/api/v1/firmware/keys/rotate")
    assert reply.status_code == 405 and reply.json()["code"] == "method_not_allowed"
    reply = admin_api.post("/api/v1/firmware/keys/%20%00/retire")
    assert 400 <= reply.status_code < 500 and "code" in reply.json()
    reply = admin_api.post("/api/v1/firmware/keys/rotate", data="{not json", content_type="x/y")
    assert reply.status_code in (201, 415)  # no body is read; never a 500


def test_commands_list_rotate_retire_json(db: Any, capsys: Any) -> None:
    call_command("signing_key", "list", "--json")
    assert json.loads(capsys.readouterr().out) == {"keys": []}
    k1 = signing.current_key()
    call_command("signing_key", "rotate", "--json")
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["endorsed_by"] == k1.key_id and rotated["status"] == "current"
    call_command("signing_key", "retire", k1.key_id, "--json")
    assert json.loads(capsys.readouterr().out)["status"] == "retired"
    with pytest.raises(CommandError, match="rotate"):
        call_command("signing_key", "retire", rotated["key_id"])
    call_command("signing_key", "list", "--json")
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert [k["status"] for k in listed] == ["current", "retired"]
    assert all(k["problem"] is None for k in listed)


def test_rewrap_moves_every_key_to_the_new_master_key(db: Any, settings: Any) -> None:
    old_master = keystore.generate_master_key()
    settings.OTA_MASTER_KEY = old_master
    signing.current_key()
    signing.rotate()
    new_master = keystore.generate_master_key()
    settings.OTA_MASTER_KEY = new_master
    settings.OTA_MASTER_KEYS_OLD = [old_master]
    call_command("signing_key", "rewrap", "--json")
    new_kek = keystore.kek_id(keystore.parse_master_key(new_master))
    assert {keystore.envelope_kek(k.private_key) for k in SigningKey.objects.all()} == {new_kek}
    assert Event.objects.filter(kind=EventKind.SIGNING_KEYS_REWRAPPED).count() == 1
    settings.OTA_MASTER_KEYS_OLD = []  # the old master key can go now
    signature, key = signing.sign(b"after rewrap")
    assert signing.verify(key.public_key, b"after rewrap", signature)
    assert signing.rewrap() == []  # nothing left to do


# --- The chain in the offer ---------------------------------------------------------------------


def test_key_chain_runs_from_the_oldest_non_retired_key(db: Any) -> None:
    k1 = signing.current_key()
    k2 = signing.rotate()
    k3 = signing.rotate()
    assert [link["key_id"] for link in key_chains.key_chain(k3.key_id)] == [
        k1.key_id,
        k2.key_id,
        k3.key_id,
    ]
    signing.retire(k1.key_id)
    chain = key_chains.key_chain(k3.key_id)
    # k1 is left out, but k2's link still names it and carries its endorsement.
    assert [link["key_id"] for link in chain] == [k2.key_id, k3.key_id]
    assert chain[0]["endorsed_by"] == k1.key_id and chain[0]["endorsement"]
    assert key_chains.key_chain(k2.key_id)[-1]["key_id"] == k2.key_id
    [retired] = key_chains.retired_keys()
    assert retired == {
        "key_id": k1.key_id,
        "retired_by": k3.key_id,
        "retirement": retired["retirement"],
    }


def test_update_check_offer_carries_the_key_chain(db: Any, device_a: DeviceActor) -> None:
    k1 = signing.current_key()
    k2 = signing.rotate()
    publish("1.1.0")
    Firmware.objects.update()  # nothing; keeps the flow readable
    device_a.device.target_version = "1.1.0"
    device_a.device.save(update_fields=["target_version"])
    body = device_a.client.get(f"/api/v1/devices/{device_a.id}/updates").json()
    assert body["update_available"], body
    assert body["key_id"] == k2.key_id
    assert [link["key_id"] for link in body["key_chain"]] == [k1.key_id, k2.key_id]
    assert body["key_chain"][1]["endorsed_by"] == k1.key_id
    assert body["retired_keys"] == []


# --- Storage read-back ---------------------------------------------------------------------------


def test_tampered_storage_quarantines_until_the_bytes_are_restored(
    db: Any, device_a: DeviceActor, tmp_path: Path, capsys: Any
) -> None:
    firmware = publish("1.1.0")
    original = Path(firmware.file.path).read_bytes()
    assert services.verify_storage(firmware)["ok"]
    Path(firmware.file.path).write_bytes(b"tampered" + original[8:])
    result = services.verify_storage(firmware)
    assert not result["ok"] and result["problem"] == "checksum_mismatch" and result["quarantined"]
    event = Event.objects.filter(kind=EventKind.FIRMWARE_QUARANTINED).get()
    assert event.firmware_id == firmware.id and event.data["problem"] == "checksum_mismatch"
    # Withdrawn from offers and from device downloads.
    assert services.published_firmware("board-a", "1.1.0") is None
    assert services.published_firmware_by_id(firmware.id) is None
    reply = device_a.client.get(f"/api/v1/firmware/{firmware.id}/download")
    assert reply.status_code == 404
    # A second check writes no second event.
    services.verify_storage(firmware)
    assert Event.objects.filter(kind=EventKind.FIRMWARE_QUARANTINED).count() == 1
    # Wrong bytes are refused as a restore; the right ones lift the quarantine.
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"nope")
    with pytest.raises(CommandError, match="do not match"):
        call_command("firmware", "verify", str(firmware.id), "--restore", str(wrong))
    good = tmp_path / "good.bin"
    good.write_bytes(original)
    call_command("firmware", "verify", str(firmware.id), "--restore", str(good), "--json")
    out = json.loads(capsys.readouterr().out)
    assert out["failed"] == 0 and not out["results"][0]["quarantined"]
    assert Event.objects.filter(kind=EventKind.FIRMWARE_RESTORED).count() == 1
    assert services.published_firmware("board-a", "1.1.0") is not None
    reply = device_a.client.get(f"/api/v1/firmware/{firmware.id}/download")
    assert reply.status_code == 200 and content_of(reply) == original


def test_missing_file_is_found_by_the_daily_task_and_the_command(db: Any, capsys: Any) -> None:
    good = publish("1.1.0")
    lost = publish("1.2.0")
    Path(lost.file.path).unlink()
    assert tasks.verify_firmware_storage() == 1
    lost.refresh_from_db()
    good.refresh_from_db()
    assert lost.quarantined_at is not None and good.quarantined_at is None
    with pytest.raises(CommandError, match="1 of 2"):
        call_command("firmware", "verify", "--all", "--json")
    out = json.loads(capsys.readouterr().out)
    problems = {r["version"]: r["problem"] for r in out["results"]}
    assert problems == {"1.1.0": "", "1.2.0": "missing"}
    with pytest.raises(CommandError, match="No firmware"):
        call_command("firmware", "verify", "not-a-uuid")
    with pytest.raises(CommandError, match="not both"):
        call_command("firmware", "verify")


def test_beat_runs_the_storage_check_daily(settings: Any) -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["verify-firmware-storage"]
    assert entry["task"] == "firmware.tasks.verify_firmware_storage"
    assert entry["schedule"] == 86400.0


# --- S3 encryption in compose ---------------------------------------------------------------------


def test_compose_minio_honours_server_side_encryption() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    minio = compose["services"]["minio"]["environment"]
    assert "MINIO_KMS_SECRET_KEY" in minio and minio["MINIO_KMS_SECRET_KEY"].startswith("${")
    init = " ".join(compose["services"]["minio-init"]["command"])
    assert "mc encrypt set sse-s3" in init
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    )
    assert example["AWS_S3_SSE"] == "AES256"
    name, _, key = example["MINIO_KMS_SECRET_KEY"].partition(":")
    assert name and len(base64.b64decode(key)) == 32
