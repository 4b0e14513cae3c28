"""What the verifier accepts and refuses, with a signing key made here."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ota_client.verifier import (
    Offer,
    VerificationError,
    key_id_of,
    keys_from_server,
    verify_image,
    verify_offer,
)

IMAGE = b"firmware image" * 100
PRIVATE = Ed25519PrivateKey.generate()
PUBLIC_B64 = base64.b64encode(
    PRIVATE.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
).decode()
KEY_ID = key_id_of(PUBLIC_B64)
KEYS = {KEY_ID: PUBLIC_B64}


def offer(
    version: str = "1.1.0",
    *,
    device_type: str = "board",
    min_version: str | None = None,
    is_rollback: bool = False,
    signer: Ed25519PrivateKey = PRIVATE,
    key_id: str = KEY_ID,
) -> Offer:
    manifest = json.dumps(
        {
            "id": "6f1c1b1e-0000-4000-8000-000000000001",
            "version": version,
            "device_type": device_type,
            "size": len(IMAGE),
            "sha256": hashlib.sha256(IMAGE).hexdigest(),
            "min_version": min_version,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    body: dict[str, Any] = {
        "session_id": "0b0e1c9e-0000-4000-8000-000000000002",
        "firmware_id": "6f1c1b1e-0000-4000-8000-000000000001",
        "version": version,
        "device_type": device_type,
        "url": "http://server/api/v1/firmware/x/download",
        "size": len(IMAGE),
        "sha256": hashlib.sha256(IMAGE).hexdigest(),
        "signature": base64.b64encode(signer.sign(manifest.encode())).decode(),
        "key_id": key_id,
        "manifest": manifest,
        "min_version": min_version,
        "is_rollback": is_rollback,
    }
    return Offer.from_check(body)


def check(candidate: Offer, installed: str = "1.0.0", device_type: str = "board") -> None:
    verify_offer(candidate, trusted_keys=KEYS, device_type=device_type, installed_version=installed)


def test_a_good_offer_passes() -> None:
    check(offer())
    check(offer("2.0.0-rc.1", min_version="1.0.0"))


def test_a_lower_version_is_refused_unless_it_is_a_rollback() -> None:
    with pytest.raises(VerificationError, match=r"lower than the installed 1\.2\.0"):
        check(offer("1.1.0"), installed="1.2.0")
    check(offer("1.1.0", is_rollback=True), installed="1.2.0")


def test_the_installed_version_is_refused_even_as_a_rollback() -> None:
    with pytest.raises(VerificationError, match="already installed"):
        check(offer("1.1.0"), installed="1.1.0")
    with pytest.raises(VerificationError, match="already installed"):
        check(offer("1.1.0", is_rollback=True), installed="v1.1")


def test_min_version_is_a_prerequisite() -> None:
    with pytest.raises(VerificationError, match=r"needs at least 1\.0\.5 installed"):
        check(offer("1.1.0", min_version="1.0.5"), installed="1.0.0")
    check(offer("1.1.0", min_version="1.0.5"), installed="1.0.5")


def test_wrong_device_type() -> None:
    with pytest.raises(VerificationError, match="for device type 'other'"):
        check(offer(device_type="other"))


def test_unknown_key_id() -> None:
    with pytest.raises(VerificationError, match="unknown key 'feedfacefeedface'"):
        check(offer(key_id="feedfacefeedface"))


def test_signature_by_another_key() -> None:
    with pytest.raises(VerificationError, match="bad signature"):
        check(offer(signer=Ed25519PrivateKey.generate()))


def test_unsigned_fields_must_match_the_signed_manifest() -> None:
    good = offer()
    forgeries: tuple[tuple[str, Any], ...] = (
        ("sha256", hashlib.sha256(b"evil").hexdigest()),
        ("size", 1),
        ("version", "9.9.9"),
        ("device_type", "board-x"),
        ("min_version", "0.1.0"),
        ("firmware_id", "another"),
    )
    for field, value in forgeries:
        forged = dataclasses.replace(good, **{field: value})
        with pytest.raises(VerificationError, match="differs from the signed manifest"):
            verify_offer(
                forged,
                trusted_keys=KEYS,
                device_type=forged.device_type,
                installed_version="1.0.0",
            )


def test_a_changed_manifest_breaks_the_signature() -> None:
    good = offer()
    forged = dataclasses.replace(good, manifest=good.manifest.replace("1.1.0", "1.1.1"))
    with pytest.raises(VerificationError, match="bad signature"):
        check(forged)


def test_malformed_offers() -> None:
    with pytest.raises(VerificationError, match="has no 'manifest'"):
        Offer.from_check({k: v for k, v in offer().to_dict().items() if k != "manifest"})
    with pytest.raises(VerificationError, match="size is not an integer"):
        Offer.from_check({**offer().to_dict(), "size": "12"})
    with pytest.raises(VerificationError, match="malformed"):
        check(dataclasses.replace(offer(), signature="not base64!"))


def test_verify_image() -> None:
    good = offer()
    verify_image(good, sha256=hashlib.sha256(IMAGE).hexdigest(), size=len(IMAGE))
    with pytest.raises(VerificationError, match="bytes"):
        verify_image(good, sha256=hashlib.sha256(IMAGE).hexdigest(), size=len(IMAGE) - 1)
    with pytest.raises(VerificationError, match="sha256"):
        verify_image(good, sha256=hashlib.sha256(b"x").hexdigest(), size=len(IMAGE))


def test_keys_from_server_skips_keys_under_a_wrong_id() -> None:
    listing = [
        {"key_id": KEY_ID, "public_key": PUBLIC_B64},
        {"key_id": "0000000000000000", "public_key": PUBLIC_B64},
        {"key_id": "x", "public_key": "not a key"},
    ]
    assert keys_from_server(listing) == {KEY_ID: PUBLIC_B64}
