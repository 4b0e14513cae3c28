"""Envelope encryption of secrets at rest (ota_site.keystore)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core import checks

from ota_site import keystore
from ota_site.keystore import KeystoreError


@pytest.fixture(autouse=True)
def _master_key(settings: Any, tmp_path: Path) -> None:
    settings.OTA_MASTER_KEY = ""
    settings.OTA_MASTER_KEY_PATH = tmp_path / "keys" / "master.key"
    settings.OTA_MASTER_KEYS_OLD = []


def test_round_trip_and_no_plaintext_in_the_envelope() -> None:
    secret = b"the private key bytes " * 3
    envelope = keystore.seal(secret, purpose="firmware-signing")
    assert secret not in envelope.encode()
    assert b"private key" not in envelope.encode()
    assert keystore.unseal(envelope, purpose="firmware-signing") == secret


def test_the_embedded_master_key_is_created_once_with_mode_0600(settings: Any) -> None:
    first = keystore.master_key()
    path: Path = settings.OTA_MASTER_KEY_PATH
    assert path.stat().st_mode & 0o777 == 0o600
    assert keystore.master_key() == first


def test_each_seal_uses_a_fresh_data_key() -> None:
    one = json.loads(keystore.seal(b"same", purpose="p"))
    two = json.loads(keystore.seal(b"same", purpose="p"))
    assert one["dek"] != two["dek"] and one["ct"] != two["ct"]


def test_an_envelope_cannot_be_used_for_another_purpose() -> None:
    envelope = keystore.seal(b"ca key", purpose="device-ca")
    with pytest.raises(KeystoreError, match="device-ca"):
        keystore.unseal(envelope, purpose="firmware-signing")
    # Editing the purpose field does not help: it is bound into the authenticated data.
    data = json.loads(envelope)
    data["purpose"] = "firmware-signing"
    with pytest.raises(KeystoreError, match="tampered"):
        keystore.unseal(json.dumps(data), purpose="firmware-signing")


@pytest.mark.parametrize("field", ["dek", "ct"])
def test_tampering_is_detected(field: str) -> None:
    data = json.loads(keystore.seal(b"secret", purpose="p"))
    raw = bytearray(keystore._unb64(data[field]))
    raw[-1] ^= 1
    data[field] = keystore._b64(bytes(raw))
    with pytest.raises(KeystoreError, match="tampered"):
        keystore.unseal(json.dumps(data), purpose="p")


@pytest.mark.parametrize(
    "envelope", ["", "not json", "[]", '{"v": 2}', '{"v": 1, "purpose": "p", "kek": 5}']
)
def test_malformed_envelopes_are_refused(envelope: str) -> None:
    with pytest.raises(KeystoreError):
        keystore.unseal(envelope, purpose="p")


def test_a_different_master_key_cannot_open_it(settings: Any) -> None:
    envelope = keystore.seal(b"secret", purpose="p")
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    with pytest.raises(KeystoreError, match="not configured"):
        keystore.unseal(envelope, purpose="p")


def test_master_key_rotation_with_old_keys_and_rewrap(settings: Any) -> None:
    old = keystore.generate_master_key()
    settings.OTA_MASTER_KEY = old
    envelope = keystore.seal(b"secret", purpose="p")
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    settings.OTA_MASTER_KEYS_OLD = [old]
    assert keystore.unseal(envelope, purpose="p") == b"secret"
    rewrapped = keystore.rewrap(envelope, purpose="p")
    assert keystore.envelope_kek(rewrapped) != keystore.envelope_kek(envelope)
    settings.OTA_MASTER_KEYS_OLD = []
    assert keystore.unseal(rewrapped, purpose="p") == b"secret"
    with pytest.raises(KeystoreError):
        keystore.unseal(envelope, purpose="p")


def test_private_keys_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = keystore.seal_private_key(key, purpose="firmware-signing")
    loaded = keystore.unseal_private_key(envelope, purpose="firmware-signing")
    assert isinstance(loaded, Ed25519PrivateKey)
    assert loaded.public_key() == key.public_key()
    with pytest.raises(KeystoreError, match="private key"):
        keystore.unseal_private_key(keystore.seal(b"junk", purpose="x"), purpose="x")


@pytest.mark.parametrize("value", ["short", "AAAA", "!!!not base64!!!"])
def test_bad_master_keys_fail_the_system_check(settings: Any, value: str) -> None:
    settings.OTA_MASTER_KEY = value
    ids = [message.id for message in checks.run_checks()]
    assert "ota.E011" in ids
    with pytest.raises(ValueError, match="master key"):
        keystore.master_key()
