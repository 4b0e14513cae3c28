"""Envelope encryption of secrets at rest: firmware signing keys, TUF online keys, the device CA.

Each secret is encrypted with its own random 256-bit data key (AES-256-GCM); the data key is
encrypted ("wrapped") with the master key, also AES-256-GCM. The database holds only the
envelope, so a stolen database dump (or backup) reveals no private key without the master key,
which lives outside the database: ``OTA_MASTER_KEY`` (base64 of 32 bytes) or the file named by
``OTA_MASTER_KEY_FILE``. The embedded mode creates one under ``var/keys/`` on first use.

The envelope's ``purpose`` is bound into the authenticated data, so an envelope made for one use
(say ``device-ca``) cannot be swapped in for another (``firmware-signing``). ``kek`` names the
master key that wrapped the data key: a retired master key listed in ``OTA_MASTER_KEYS_OLD`` still
opens old envelopes, and ``rewrap`` moves them to the current one without touching the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings

ENVELOPE_VERSION = 1


class KeystoreError(Exception):
    """An envelope cannot be opened: wrong master key, tampered data, or not an envelope."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise KeystoreError("the envelope is malformed")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeystoreError("the envelope is malformed") from exc


def parse_master_key(text: str) -> bytes:
    """A master key from its base64 text; ValueError unless it is exactly 32 bytes."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a master key must be base64") from exc
    if len(key) != 32:
        raise ValueError("a master key must be 32 bytes (base64 of 32 random bytes)")
    return key


def kek_id(key: bytes) -> str:
    """A short public name for a master key (never the key itself)."""
    return hashlib.sha256(b"ota-kek:" + key).hexdigest()[:16]


def generate_master_key() -> str:
    return _b64(secrets.token_bytes(32))


def _embedded_master_key(path: Path) -> bytes:
    """Read the master key file, creating it (mode 0600, first writer wins) when missing."""
    try:
        return parse_master_key(path.read_text())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return parse_master_key(path.read_text())
    with os.fdopen(fd, "w") as handle:
        handle.write(generate_master_key() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return parse_master_key(path.read_text())


def master_key() -> bytes:
    """The current master key (from the environment, its file, or the embedded key file)."""
    configured = settings.OTA_MASTER_KEY
    if configured:
        return parse_master_key(configured)
    return _embedded_master_key(settings.OTA_MASTER_KEY_PATH)


def _master_keys() -> dict[str, bytes]:
    """Every master key that may open an envelope: the current one and the retired ones."""
    current = master_key()
    keys = {kek_id(current): current}
    for text in settings.OTA_MASTER_KEYS_OLD:
        old = parse_master_key(text)
        keys.setdefault(kek_id(old), old)
    return keys


def seal(secret: bytes, *, purpose: str) -> str:
    """Encrypt ``secret`` for storage; returns the envelope as a JSON string."""
    kek = master_key()
    dek = AESGCM.generate_key(bit_length=256)
    aad = f"ota-envelope:{ENVELOPE_VERSION}:{purpose}".encode()
    dek_nonce, nonce = secrets.token_bytes(12), secrets.token_bytes(12)
    envelope = {
        "v": ENVELOPE_VERSION,
        "alg": "AES-256-GCM",
        "purpose": purpose,
        "kek": kek_id(kek),
        "dek": _b64(dek_nonce + AESGCM(kek).encrypt(dek_nonce, dek, aad)),
        "ct": _b64(nonce + AESGCM(dek).encrypt(nonce, secret, aad)),
    }
    return json.dumps(envelope, sort_keys=True)


def unseal(envelope: str, *, purpose: str) -> bytes:
    """Decrypt an envelope made by ``seal`` for the same purpose; KeystoreError otherwise."""
    try:
        data = json.loads(envelope)
    except (TypeError, ValueError) as exc:
        raise KeystoreError("the envelope is not JSON") from exc
    if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
        raise KeystoreError("the envelope has an unknown format")
    if data.get("purpose") != purpose:
        raise KeystoreError(f"the envelope is for {data.get('purpose')!r}, not {purpose!r}")
    kek = _master_keys().get(str(data.get("kek")))
    if kek is None:
        raise KeystoreError(
            f"the envelope was sealed with master key {data.get('kek')!r}, which is not "
            "configured (OTA_MASTER_KEY, OTA_MASTER_KEYS_OLD)"
        )
    aad = f"ota-envelope:{ENVELOPE_VERSION}:{purpose}".encode()
    wrapped, sealed = _unb64(data.get("dek")), _unb64(data.get("ct"))
    try:
        dek = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], aad)
        return AESGCM(dek).decrypt(sealed[:12], sealed[12:], aad)
    except (InvalidTag, ValueError) as exc:
        raise KeystoreError("the envelope does not decrypt: tampered or wrong master key") from exc


def envelope_kek(envelope: str) -> str | None:
    """The id of the master key that sealed an envelope (to find envelopes to rewrap)."""
    try:
        data = json.loads(envelope)
    except (TypeError, ValueError):
        return None
    return str(data.get("kek")) if isinstance(data, dict) else None


def rewrap(envelope: str, *, purpose: str) -> str:
    """The same secret sealed under the current master key (after a master key rotation)."""
    return seal(unseal(envelope, purpose=purpose), purpose=purpose)


def seal_private_key(key: PrivateKeyTypes, *, purpose: str) -> str:
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return seal(der, purpose=purpose)


def unseal_private_key(envelope: str, *, purpose: str) -> PrivateKeyTypes:
    der = unseal(envelope, purpose=purpose)
    try:
        return serialization.load_der_private_key(der, password=None)
    except ValueError as exc:
        raise KeystoreError("the envelope does not hold a private key") from exc


def rewrap_field(rows: Any, field: str, *, purpose: str) -> list[str]:
    """Reseal ``field`` of every row in ``rows`` (a queryset, locked by the caller's transaction)
    that another master key sealed; returns their primary keys. All or nothing: the first
    envelope that cannot be opened raises KeystoreError, and the caller's transaction rolls back
    whatever was resealed before it."""
    current = kek_id(master_key())
    changed: list[str] = []
    for row in rows.select_for_update().exclude(**{field: ""}):
        envelope = getattr(row, field)
        if envelope_kek(envelope) == current:
            continue
        setattr(row, field, rewrap(envelope, purpose=purpose))
        row.save(update_fields=[field])
        changed.append(str(row.pk))
    return changed
