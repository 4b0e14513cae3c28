"""Is an offer trustworthy and meant for this device, and is the downloaded image the signed one?

Checked before the first byte is downloaded (``verify_offer``):

- the offer names a signing key the device trusts (``key_id``), or one that the offer's
  ``key_chain`` of endorsements links to a trusted key (``keys_through_chain``), and the Ed25519
  signature over the UTF-8 bytes of ``manifest`` is valid under that key;
- every field of the offer that the manifest also carries (id, version, device_type, size,
  sha256, min_version, release_counter) equals the signed value, so nothing unsigned can steer
  the install (a manifest signed before release counters existed means counter 0);
- the image is for this device type;
- the version is higher than the installed one, unless the server marks the offer as a rollback
  (an operator-approved downgrade); the same version is never installed again;
- the installed version is at least the manifest's ``min_version``.

Checked after the download (``verify_image``): the size and sha256 of the file equal the signed
manifest's.

``is_rollback`` itself is not part of the signed manifest, so whoever can change the server's
answers could make the device accept an older, validly signed image; the agent's release counter
(never below the highest installed) and TUF metadata (``ota_client.tuf_client``) close that gap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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
    # Endorsements from an older key to ``key_id`` and signed retirements (``trusted_after``).
    key_chain: list[dict[str, Any]] = field(default_factory=list)
    retired_keys: list[dict[str, Any]] = field(default_factory=list)
    #: Signed in the manifest and in the TUF target; the device refuses one below its own.
    release_counter: int = 0
    #: The firmware's path in the TUF targets metadata.
    tuf_target: str | None = None

    @classmethod
    def from_check(cls, body: Mapping[str, Any]) -> Offer:
        """The offer in an update-check answer; VerificationError when it is malformed."""
        try:
            size = body["size"]
            if isinstance(size, bool) or not isinstance(size, int):
                raise VerificationError("the offer's size is not an integer")
            action_id = body.get("action_id")
            counter = body.get("release_counter", 0)
            if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
                raise VerificationError("the offer's release_counter is not a whole number")
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
                key_chain=_dicts(body.get("key_chain")),
                retired_keys=_dicts(body.get("retired_keys")),
                release_counter=counter,
                tuf_target=str(body["tuf_target"]) if body.get("tuf_target") else None,
            )
        except KeyError as exc:
            raise VerificationError(f"the offer has no {exc.args[0]!r}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offer:
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


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
        if item.get("status") == "retired":
            continue  # signs nothing any more: trusting it would only widen the attack surface
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


# --- Key rotation: the endorsement chain and signed retirements ---------------------------------
#
# The server rotates its signing key by having the current key sign ("endorse") the new key's
# statement; an offer signed by a key we do not know carries the chain of endorsements from an
# older key to the signer. We accept the signer only if every link from a key we trust verifies,
# and then trust the new keys too. A key is dropped only on a retirement statement signed by
# another key we trust: the server's unsigned word (or a mirror's) can remove no trust.


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def endorsement_statement(key_id: str, algorithm: str, public_key: str, endorsed_by: str) -> bytes:
    """The bytes an endorsing key signs (the server's firmware.signing.endorsement_statement)."""
    return _canonical(
        {
            "type": "ota-key-endorsement",
            "key_id": key_id,
            "algorithm": algorithm,
            "public_key": public_key,
            "endorsed_by": endorsed_by,
        }
    )


def retirement_statement(key_id: str, retired_by: str) -> bytes:
    return _canonical({"type": "ota-key-retirement", "key_id": key_id, "retired_by": retired_by})


def _signed_by(public_b64: str, data: bytes, signature_b64: Any) -> bool:
    if not isinstance(signature_b64, str):
        return False
    try:
        _public_key(public_b64).verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def keys_through_chain(offer: Offer, trusted_keys: Mapping[str, str]) -> dict[str, str]:
    """The trusted keys plus those the offer's chain links to them; VerificationError when the
    chain is forged (a link that does not verify under the trusted key it names).

    Links older than every key we trust (endorsed by keys we never knew) are skipped: a device
    provisioned after a rotation trusts only the newer key.
    """
    known = dict(trusted_keys)
    if offer.key_id in known:
        return known
    for link in offer.key_chain:
        key_id, public = link.get("key_id"), link.get("public_key")
        endorser = link.get("endorsed_by")
        if not isinstance(key_id, str) or not isinstance(public, str):
            raise VerificationError("the key chain has a malformed link")
        try:
            _public_key(public)  # a valid Ed25519 key
            matches = key_id_of(public) == key_id
        except (binascii.Error, ValueError):
            matches = False
        if not matches:
            raise VerificationError(f"the key chain's key {key_id!r} does not match its id")
        if key_id in known:
            if known[key_id] != public:
                raise VerificationError(f"the key chain lists another public key for {key_id!r}")
            continue
        if not isinstance(endorser, str) or endorser not in known:
            continue  # older than anything we trust
        statement = endorsement_statement(key_id, "ed25519", public, endorser)
        if not _signed_by(known[endorser], statement, link.get("endorsement")):
            raise VerificationError(
                f"the key chain's endorsement of {key_id!r} is not signed by {endorser!r}"
            )
        known[key_id] = public
    if offer.key_id not in known:
        raise VerificationError(
            f"the firmware is signed with an unknown key {offer.key_id!r} that no key this "
            "device trusts has endorsed"
        )
    return known


def trusted_after(offer: Offer, trusted_keys: Mapping[str, str]) -> dict[str, str]:
    """The keys to trust after accepting ``offer``: the chain's new keys added, and the keys
    that a trusted key has signed the retirement of removed (never the offer's own signer)."""
    known = keys_through_chain(offer, trusted_keys)
    for item in offer.retired_keys:
        key_id, retired_by = item.get("key_id"), item.get("retired_by")
        if not isinstance(key_id, str) or not isinstance(retired_by, str):
            continue
        if key_id == retired_by or key_id == offer.key_id or key_id not in known:
            continue
        if retired_by not in known:
            continue  # vouched for by no key we trust: ignore it
        statement = retirement_statement(key_id, retired_by)
        if _signed_by(known[retired_by], statement, item.get("retirement")):
            del known[key_id]
    return known


# --- Checks -----------------------------------------------------------------------------------


def verify_signature(offer: Offer, trusted_keys: Mapping[str, str]) -> dict[str, Any]:
    """Check the manifest's signature (by a trusted key, or one the key chain links to a
    trusted key); return the signed manifest."""
    public_b64 = keys_through_chain(offer, trusted_keys).get(offer.key_id)
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
        "release_counter": offer.release_counter,
    }
    for name, value in expected.items():
        signed = manifest.get(name)
        if name == "min_version":
            signed = signed or None
        if name == "release_counter" and signed is None:
            signed = 0  # signed before the counter existed
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
