"""Ed25519 signing of firmware manifests.

The private key is created on first use at FIRMWARE_SIGNING_KEY_PATH (outside the repository,
mode 0600) and its public half is registered as a SigningKey, whose key_id (the first 16 hex digits
of the sha256 of the raw public key) devices use to pick the key they trust. Envelope encryption
of the private key and key rotation arrive with the security issue (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

from firmware.models import SigningKey


def canonical_json(data: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: compact JSON, sorted keys, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            # O_EXCL: two processes creating the key at once keep the first one's.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pem = path.read_bytes()
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return loaded


def signing_key() -> tuple[Ed25519PrivateKey, SigningKey]:
    """The server's signing key and its registered public half."""
    private = _load_or_create(settings.FIRMWARE_SIGNING_KEY_PATH)
    public = private.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record, _ = SigningKey.objects.get_or_create(
        key_id=key_id_of(public),
        defaults={"public_key": base64.b64encode(raw).decode()},
    )
    return private, record


def sign(data: bytes) -> tuple[str, SigningKey]:
    """Sign bytes; return the base64 signature and the key that made it."""
    private, record = signing_key()
    return base64.b64encode(private.sign(data)).decode(), record


def verify(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        public.verify(base64.b64decode(signature_b64), data)
    except InvalidSignature:
        return False
    return True
