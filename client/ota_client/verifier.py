"""Is an offer trustworthy and meant for this device, and is the downloaded image the signed one?

Checked before the first byte is downloaded (``verify_offer``):

- the offer names a signing key the device trusts (``key_id``), and the Ed25519 signature over the
  UTF-8 bytes of ``manifest`` is valid under that key;
- every field of the offer that the manifest also carries (id, version, device_type, size,
  sha256, min_version) equals the signed value, so nothing unsigned can steer the install;
- the image is for this device type;
- the version is higher than the installed one, unless the server marks the offer as a rollback
  (an operator-approved downgrade); the same version is never installed again;
- the installed version is at least the manifest's ``min_version``.

Checked after the download (``verify_image``): the size and sha256 of the file equal the signed
manifest's.

Known limit: ``is_rollback`` itself is not part of the signed manifest, so whoever can change the
server's answers (no TLS, or a compromised server) can make the device accept an older, validly
signed image. TUF metadata and a release counter close that gap (the security issue).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ota_client.system import atomic_write_json
from ota_client.versions import InvalidVersion, Version

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class VerificationError(Exception):
    """The offer or the image must not be installed; ``str(error)`` is the reason we report."""


@dataclass(frozen=True)
class Offer:
    """An update the server offered, as the agent keeps it in its state."""

    session_id: str
    firmware_id: str
    version: str
    device_type: str
    url: str
    size: int
    sha256: str
    signature: str
    key_id: str
    manifest: str
    min_version: str | None = None
    is_rollback: bool = False
    action_id: int | None = None

    @classmethod
    def from_check(cls, body: Mapping[str, Any]) -> Offer:
        """The offer in an update-check answer; VerificationError when it is malformed."""
        try:
            size = body["size"]
            if isinstance(size, bool) or not isinstance(size, int):
                raise VerificationError("the offer's size is not an integer")
            action_id = body.get("action_id")
            return cls(
                session_id=str(body["session_id"]),
                firmware_id=str(body.get("firmware_id") or ""),
                version=str(body["version"]),
                device_type=str(body["device_type"]),
                url=str(body["url"]),
                size=size,
                sha256=str(body["sha256"]).lower(),
                signature=str(body["signature"]),
                key_id=str(body["key_id"]),
                manifest=str(body["manifest"]),
                min_version=body.get("min_version") or None,
                is_rollback=bool(body.get("is_rollback", False)),
                action_id=action_id if isinstance(action_id, int) else None,
            )
        except KeyError as exc:
            raise VerificationError(f"the offer has no {exc.args[0]!r}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offer:
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- Trusted keys ----------------------------------------------------------------------------


def key_id_of(public_key_b64: str) -> str:
    """The server's key id: the first 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:16]


def load_trusted_keys(path: Path) -> dict[str, str]:
    """``{key_id: base64 raw Ed25519 public key}`` from a JSON file; {} when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise VerificationError(f"{path} must map key ids to base64 public keys")
    return data


def save_trusted_keys(path: Path, keys: Mapping[str, str]) -> None:
    atomic_write_json(path, dict(keys))


def keys_from_server(listing: list[dict[str, Any]]) -> dict[str, str]:
    """Keys from ``GET /api/v1/firmware/keys``, keeping only those whose id matches the key
    (a key listed under another key's id is a server bug or an attack; skip it)."""
    keys: dict[str, str] = {}
    for item in listing:
        key_id, public = item.get("key_id"), item.get("public_key")
        if not isinstance(key_id, str) or not isinstance(public, str):
            continue
        try:
            _public_key(public)  # a valid Ed25519 key, or skip it
            if key_id_of(public) == key_id:
                keys[key_id] = public
        except (binascii.Error, ValueError):
            continue
    return keys


def _public_key(public_b64: str) -> Ed25519PublicKey:
    raw = base64.b64decode(public_b64, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


# --- Checks -----------------------------------------------------------------------------------


def verify_signature(offer: Offer, trusted_keys: Mapping[str, str]) -> dict[str, Any]:
    """Check the manifest's signature; return the signed manifest."""
    public_b64 = trusted_keys.get(offer.key_id)
    if public_b64 is None:
        raise VerificationError(f"the firmware is signed with an unknown key {offer.key_id!r}")
    try:
        public = _public_key(public_b64)
        signature = base64.b64decode(offer.signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"the signature or the trusted key is malformed: {exc}") from exc
    try:
        public.verify(signature, offer.manifest.encode("utf-8"))
    except InvalidSignature as exc:
        raise VerificationError(
            f"bad signature: the manifest is not signed by key {offer.key_id!r}"
        ) from exc
    try:
        manifest = json.loads(offer.manifest)
    except ValueError as exc:
        raise VerificationError("the signed manifest is not JSON") from exc
    if not isinstance(manifest, dict):
        raise VerificationError("the signed manifest is not a JSON object")
    return manifest


def verify_offer(
    offer: Offer,
    *,
    trusted_keys: Mapping[str, str],
    device_type: str,
    installed_version: str,
) -> None:
    """Raise VerificationError unless the offer may be downloaded and installed here."""
    manifest = verify_signature(offer, trusted_keys)
    expected = {
        "id": offer.firmware_id,
        "version": offer.version,
        "device_type": offer.device_type,
        "size": offer.size,
        "sha256": offer.sha256,
        "min_version": offer.min_version,
    }
    for name, value in expected.items():
        signed = manifest.get(name)
        if name == "min_version":
            signed = signed or None
        if name == "id" and not value:
            continue  # an offer without firmware_id: the signed id is all we have
        if signed != value:
            raise VerificationError(
                f"the offer's {name} {value!r} differs from the signed manifest's {signed!r}"
            )
    if not _SHA256.match(offer.sha256) or offer.size <= 0:
        raise VerificationError("the manifest's sha256 or size is not valid")
    if offer.device_type != device_type:
        raise VerificationError(
            f"the firmware is for device type {offer.device_type!r}, this is a {device_type!r}"
        )
    try:
        offered = Version.parse(offer.version)
    except InvalidVersion as exc:
        raise VerificationError(f"the offered version is not valid: {exc}") from exc
    try:
        installed = Version.parse(installed_version)
    except InvalidVersion as exc:
        raise VerificationError(f"the installed version is not valid: {exc}") from exc
    if offered == installed:
        raise VerificationError(f"version {offer.version} is already installed")
    if offered < installed and not offer.is_rollback:
        raise VerificationError(
            f"version {offer.version} is lower than the installed {installed_version} "
            "and the server did not mark it as a rollback"
        )
    if offer.min_version:
        try:
            minimum = Version.parse(offer.min_version)
        except InvalidVersion as exc:
            raise VerificationError(f"the manifest's min_version is not valid: {exc}") from exc
        if installed < minimum:
            raise VerificationError(
                f"version {offer.version} needs at least {offer.min_version} installed, "
                f"this device runs {installed_version}"
            )


def verify_image(offer: Offer, *, sha256: str, size: int) -> None:
    """Raise VerificationError unless a downloaded image is the one the manifest describes."""
    if size != offer.size:
        raise VerificationError(f"the download has {size} bytes, the manifest says {offer.size}")
    if sha256 != offer.sha256:
        raise VerificationError(
            f"the download's sha256 {sha256} differs from the manifest's {offer.sha256}"
        )
