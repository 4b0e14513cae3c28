"""Firmware signing keys: Ed25519 custody, signing, rotation by endorsement, retirement.

Custody: a private key exists only sealed in the database (``ota_site.keystore``, purpose
``firmware-signing``), so a database dump or backup holds no usable key without the master key.
The first key is made on first use; the one-current-key constraint makes a second process that
races to make one fail and use the winner's. A key that cannot be opened (master key lost or
changed, envelope damaged) is never replaced silently: signing raises ``SigningUnavailable``
(503, ``signing_key_unavailable``), because a new unendorsed key would be refused by every device.

With ``FIRMWARE_SIGNING_BACKEND=pkcs11`` new keys (the first, and every rotation) are made in a
PKCS#11 token instead (``firmware.hsm``): the row records ``backend="pkcs11"``, no envelope, and
the token's key object is labelled with the key id. Everything that signs goes through a
``Signer`` (``signer_of``), so a sealed key can endorse an HSM key and the reverse; a token key
that is missing or answers wrongly is ``SigningUnavailable`` like a key that cannot be unsealed.

Older installs kept the key unencrypted at ``FIRMWARE_SIGNING_KEY_PATH``; on first use it is
imported (same key id, so devices keep trusting it) and the file may then be deleted.

Rotation: the new key's statement (``endorsement_statement``) is signed by the current key, so a
device that trusts only an older key can follow the chain of endorsements to the new one
(``key_chain``). Retirement: a retired key signs and endorses nothing more; the key that is
current at that moment signs a retirement statement, which lets devices drop the retired key on
the word of a key they trust. Firmware it signed is re-signed with the current key, so every offer
stays verifiable by a device that has dropped the retired key.

This module is the service layer of signing keys: the API, the admin, ``manage.py signing_key``
and ``firmware.services.publish_firmware`` all go through it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework import status

from firmware import hsm, key_chains
from firmware.models import Firmware, SigningKey
from ota_site import keystore
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import actor_of, record_event
from ota_site.models import EventKind

logger = logging.getLogger(__name__)

PURPOSE = "firmware-signing"
ENDORSEMENT_TYPE = "ota-key-endorsement"
RETIREMENT_TYPE = "ota-key-retirement"
_KEY_ID = re.compile(r"[0-9a-f]{1,32}")
# Signed by a token key to prove that it is there and is the key its row names.
PROBE = b"ota-signing-key-probe"


class SigningUnavailable(ServiceError):
    """The current signing key cannot be used; an operator must act (docs/security.md)."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    code = "signing_key_unavailable"


# --- Bytes and keys -----------------------------------------------------------------------------


def canonical_json(data: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: compact JSON, sorted keys, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key (devices compute it too)."""
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:16]


def endorsement_statement(
    *, key_id: str, algorithm: str, public_key: str, endorsed_by: str
) -> bytes:
    """What the endorsing key signs about the key it endorses."""
    return canonical_json(
        {
            "type": ENDORSEMENT_TYPE,
            "key_id": key_id,
            "algorithm": algorithm,
            "public_key": public_key,
            "endorsed_by": endorsed_by,
        }
    )


def retirement_statement(*, key_id: str, retired_by: str) -> bytes:
    """What the current key signs when another key is retired."""
    return canonical_json({"type": RETIREMENT_TYPE, "key_id": key_id, "retired_by": retired_by})


def verify(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(signature_b64), data)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


class Signer(Protocol):
    """What signs for a key: its unsealed Ed25519PrivateKey, or a ``TokenSigner``."""

    def sign(self, data: bytes, /) -> bytes: ...


@dataclass(frozen=True)
class TokenSigner:
    """A key held in the PKCS#11 token; each signature is checked against the row's public key,
    so a different object under the same label (or a faulty token) never signs a manifest."""

    key_id: str
    public_key: str  # base64 of the raw public key, from the row

    def sign(self, data: bytes, /) -> bytes:
        try:
            signature = hsm.sign(self.key_id, data)
        except hsm.KeyMissing as exc:
            raise SigningUnavailable(
                f"Signing key {self.key_id} is not in the PKCS#11 token "
                f"{settings.PKCS11_TOKEN_LABEL!r} ({exc}). Restore the token (or its backup) "
                "that holds it; if it is lost, `manage.py signing_key rotate --unendorsed` "
                "starts a new chain whose public key devices must be given by hand.",
            ) from exc
        except hsm.HsmError as exc:
            raise SigningUnavailable(
                f"Signing key {self.key_id} is in a PKCS#11 token that cannot be used: {exc}. "
                "Check PKCS11_MODULE, PKCS11_TOKEN_LABEL and PKCS11_PIN.",
            ) from exc
        if not verify(self.public_key, data, base64.b64encode(signature).decode()):
            raise SigningUnavailable(
                f"The PKCS#11 token object labelled {self.key_id} is not that key (its "
                "signature does not verify under the recorded public key).",
            )
        return signature


def _sign_with(signer: Signer, data: bytes) -> str:
    return base64.b64encode(signer.sign(data)).decode()


def configured_backend() -> SigningKey.Backend:
    """Where new keys are made (FIRMWARE_SIGNING_BACKEND; a bad value fails check ota.E040)."""
    try:
        return SigningKey.Backend(settings.FIRMWARE_SIGNING_BACKEND)
    except ValueError:
        raise SigningUnavailable(
            f"FIRMWARE_SIGNING_BACKEND={settings.FIRMWARE_SIGNING_BACKEND!r} is not 'sealed' "
            "or 'pkcs11'.",
        ) from None


def signer_of(key: SigningKey) -> Signer:
    """What signs for ``key``, whichever backend holds it; SigningUnavailable if nothing can.

    A token key is looked up when it signs, not here: ``custody_problem`` probes it.
    """
    if key.backend == SigningKey.Backend.PKCS11:
        return TokenSigner(key_id=key.key_id, public_key=key.public_key)
    return private_key_of(key)


def private_key_of(key: SigningKey) -> Ed25519PrivateKey:
    """Unseal a key's private half; SigningUnavailable with the reason if that is impossible.

    A key in the PKCS#11 token has no private half that could be returned: use ``signer_of``.
    """
    if key.backend == SigningKey.Backend.PKCS11:
        raise SigningUnavailable(
            f"Signing key {key.key_id} is held in the PKCS#11 token; its private key never "
            "leaves it.",
        )
    if not key.private_key:
        raise SigningUnavailable(
            f"Signing key {key.key_id} has no private key in the database (an older install "
            "kept it in FIRMWARE_SIGNING_KEY_PATH, which is missing). Restore that file, or make "
            "a new key with `manage.py signing_key rotate --unendorsed` and give devices its "
            "public key.",
        )
    try:
        private = keystore.unseal_private_key(key.private_key, purpose=PURPOSE)
    except keystore.KeystoreError as exc:
        raise SigningUnavailable(
            f"Signing key {key.key_id} cannot be unsealed: {exc}. Configure the master key it "
            "was sealed with (OTA_MASTER_KEY, or OTA_MASTER_KEYS_OLD after a change).",
        ) from exc
    if not isinstance(private, Ed25519PrivateKey) or key_id_of(private.public_key()) != key.key_id:
        raise SigningUnavailable(f"The sealed private key of {key.key_id} is not that key.")
    return private


# --- The current key: created, or imported from an older install, on first use ----------------


def _legacy_key() -> Ed25519PrivateKey | None:
    """The unencrypted key file of an older install, if there is one."""
    path = settings.FIRMWARE_SIGNING_KEY_PATH
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SigningUnavailable(f"FIRMWARE_SIGNING_KEY_PATH={path} cannot be read: {exc}") from exc
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningUnavailable(f"{path} is not an unencrypted PEM private key.") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningUnavailable(f"{path} is not an Ed25519 private key.")
    return loaded


def _adopt_legacy(legacy: Ed25519PrivateKey, current: SigningKey | None) -> SigningKey | None:
    """Seal the legacy key into its row (creating the row if this is the first key)."""
    key_id = key_id_of(legacy.public_key())
    sealed = keystore.seal_private_key(legacy, purpose=PURPOSE)
    if current is not None and current.key_id != key_id:
        return None  # the file is some other key: leave both alone
    with transaction.atomic():
        if current is None:
            if SigningKey.objects.filter(key_id=key_id).exists():
                return None  # an older, no longer current key: nothing to import
            current = SigningKey.objects.create(
                key_id=key_id,
                public_key=base64.b64encode(raw_public(legacy.public_key())).decode(),
                status=SigningKey.Status.CURRENT,
                private_key=sealed,
            )
        else:
            updated = SigningKey.objects.filter(
                pk=key_id, private_key="", backend=SigningKey.Backend.SEALED
            ).update(private_key=sealed)
            current.refresh_from_db()
            if not updated:
                return current
        record_event(EventKind.SIGNING_KEY_IMPORTED, data={"key_id": key_id})
    logger.warning(
        "imported the firmware signing key %s from %s into the database (sealed); the file can "
        "now be deleted",
        key_id,
        settings.FIRMWARE_SIGNING_KEY_PATH,
    )
    return current


@dataclass(frozen=True)
class NewKey:
    """A freshly made key, not yet recorded: the fields of its row."""

    key_id: str
    public_key: str
    backend: SigningKey.Backend
    private_key: str  # the envelope; "" for a token key

    def discard(self) -> None:
        """Remove a token key whose row was never written (a race, a refusal, an error)."""
        if self.backend != SigningKey.Backend.PKCS11:
            return
        try:
            hsm.destroy(self.key_id)
        except hsm.HsmError as exc:
            # Harmless but untidy: an object no row names. Say so, so it can be deleted.
            logger.warning("could not remove the unused token key %s: %s", self.key_id, exc)


def _key_id_of_raw(raw: bytes) -> str:
    return key_id_of(Ed25519PublicKey.from_public_bytes(raw))


def _new_key(backend: SigningKey.Backend) -> NewKey:
    if backend == SigningKey.Backend.PKCS11:
        try:
            key_id, raw = hsm.generate(_key_id_of_raw)
        except hsm.HsmError as exc:
            raise SigningUnavailable(
                f"No signing key can be made in the PKCS#11 token: {exc}. Check PKCS11_MODULE, "
                "PKCS11_TOKEN_LABEL and PKCS11_PIN.",
            ) from exc
        return NewKey(key_id, base64.b64encode(raw).decode(), backend, "")
    private = Ed25519PrivateKey.generate()
    return NewKey(
        key_id_of(private.public_key()),
        base64.b64encode(raw_public(private.public_key())).decode(),
        backend,
        keystore.seal_private_key(private, purpose=PURPOSE),
    )


def _create_first_key(backend: SigningKey.Backend) -> SigningKey:
    new = _new_key(backend)
    try:
        with transaction.atomic():
            key = SigningKey.objects.create(
                key_id=new.key_id,
                public_key=new.public_key,
                status=SigningKey.Status.CURRENT,
                backend=new.backend,
                private_key=new.private_key,
            )
            record_event(
                EventKind.SIGNING_KEY_CREATED,
                data={"key_id": new.key_id, "backend": new.backend},
            )
    except BaseException:
        new.discard()
        raise
    logger.info("created the firmware signing key %s (%s)", new.key_id, new.backend)
    return key


def current_key() -> SigningKey:
    """The current signing key, creating the first one (or importing a legacy one) if needed.

    Never creates a key while one is current: a current key that cannot be opened is an error
    for an operator (``private_key_of``), not a reason to start a new, untrusted chain.
    """
    current = SigningKey.objects.filter(status=SigningKey.Status.CURRENT).first()
    if current is not None and (
        current.private_key or current.backend == SigningKey.Backend.PKCS11
    ):
        return current
    backend = configured_backend()
    legacy = _legacy_key()
    # The master key must work before anything is sealed with it (a bad OTA_MASTER_KEY is a
    # configuration error, reported here rather than as a key nobody can open later). A legacy
    # key is always imported sealed: it has been on disk in the clear, an HSM would not make
    # it any safer; rotate to move into the token.
    if legacy is not None or backend == SigningKey.Backend.SEALED:
        try:
            keystore.master_key()
        except (ValueError, OSError) as exc:
            raise SigningUnavailable(f"The master key is not usable: {exc}") from exc
    try:
        if legacy is not None:
            adopted = _adopt_legacy(legacy, current)
            if adopted is not None:
                return adopted
        if current is None:
            return _create_first_key(backend)
    except IntegrityError:
        # Another process made or imported the first key at the same moment: use the winner's.
        winner = SigningKey.objects.filter(status=SigningKey.Status.CURRENT).first()
        if winner is not None:
            return winner
        raise
    return current  # current without a private half: private_key_of() explains


def signing_key() -> tuple[Ed25519PrivateKey, SigningKey]:
    """The current key's private half and its record (a sealed key only: see ``private_key_of``)."""
    record = current_key()
    return private_key_of(record), record


def current_signer() -> tuple[Signer, SigningKey]:
    """What signs for the current key, and its record, whichever backend holds it."""
    record = current_key()
    return signer_of(record), record


def sign(data: bytes) -> tuple[str, SigningKey]:
    """Sign bytes with the current key; return the base64 signature and the key."""
    signer, record = current_signer()
    signature = _sign_with(signer, data)
    # Warm the chain cache, so the first offer of this firmware stays within the query budget.
    key_chains.chains()
    return signature, record


# --- Rotation, retirement, rewrap ---------------------------------------------------------------


def rotate(
    *, actor: Any = None, unendorsed: bool = False, backend: str | None = None
) -> SigningKey:
    """Make a new current key, endorsed by the current one, which becomes ``previous``.

    ``unendorsed`` is the way out when the current key is lost: the new key starts a new chain
    that devices must be given by hand (docs/security.md). It is refused while the current key
    still works, so it cannot be used by mistake to break the chain.

    ``backend`` (default FIRMWARE_SIGNING_BACKEND) is where the new key is made; the old key
    endorses it wherever the old one is held, which is how an installation moves into an HSM
    without breaking the chain devices follow.
    """
    try:
        chosen = SigningKey.Backend(backend) if backend else configured_backend()
    except ValueError:
        raise ServiceError(
            f"Unknown signing key backend {backend!r}: 'sealed' or 'pkcs11'.", code="invalid"
        ) from None
    new = _new_key(chosen)
    try:
        return _rotate_to(new, actor=actor, unendorsed=unendorsed)
    except BaseException:
        new.discard()
        raise


def _rotate_to(made: NewKey, *, actor: Any, unendorsed: bool) -> SigningKey:
    new_public, new_id = made.public_key, made.key_id
    with transaction.atomic():
        old = (
            SigningKey.objects.select_for_update().filter(status=SigningKey.Status.CURRENT).first()
        )
        if old is None and not unendorsed:
            old = current_key()
            old = SigningKey.objects.select_for_update().get(pk=old.pk)
        endorsement = ""
        if unendorsed:
            if old is not None and not custody_problem(old):
                raise StateConflict(
                    f"The current key {old.key_id} works: rotate with an endorsement.",
                    code="key_usable",
                )
        else:
            assert old is not None
            endorsement = _sign_with(
                signer_of(old),
                endorsement_statement(
                    key_id=new_id,
                    algorithm=SigningKey.Algorithm.ED25519,
                    public_key=new_public,
                    endorsed_by=old.key_id,
                ),
            )
        if old is not None:
            old.status = SigningKey.Status.PREVIOUS
            old.save(update_fields=["status"])
        new = SigningKey.objects.create(
            key_id=new_id,
            public_key=new_public,
            status=SigningKey.Status.CURRENT,
            backend=made.backend,
            private_key=made.private_key,
            endorsed_by=None if unendorsed else old,
            endorsement=endorsement,
        )
        record_event(
            EventKind.SIGNING_KEY_ROTATED,
            actor=actor_of(actor),
            data={
                "key_id": new.key_id,
                "previous": old.key_id if old is not None else None,
                "endorsed": bool(endorsement),
                "backend": new.backend,
            },
        )
        key_chains.forget()
    logger.info("rotated the firmware signing key to %s", new.key_id)
    return new


@dataclass(frozen=True)
class Retired:
    key: SigningKey
    resigned: int  # published firmware re-signed with the current key


def retire(key_id: str, *, actor: Any = None) -> Retired:
    """Retire a previous key: it signs and endorses nothing more.

    The current key signs the retirement statement and re-signs the published firmware that the
    retired key had signed (the same manifest bytes), so devices that drop the retired key can
    still verify every offer. Retiring the current key is refused: rotate first.
    """
    # Key ids are hex; anything else (a NUL byte, say) names no key and must not reach SQL.
    if not _KEY_ID.fullmatch(key_id):
        raise ServiceError(f"No signing key {key_id!r}.", code="not_found", status_code=404)
    with transaction.atomic():
        key = SigningKey.objects.select_for_update().filter(pk=key_id).first()
        if key is None:
            raise ServiceError(f"No signing key {key_id!r}.", code="not_found", status_code=404)
        if key.status == SigningKey.Status.RETIRED:
            return Retired(key=key, resigned=0)
        if key.status == SigningKey.Status.CURRENT:
            raise StateConflict(
                "The current signing key cannot be retired; rotate to a new key first.",
                code="key_is_current",
            )
        current = SigningKey.objects.select_for_update().get(status=SigningKey.Status.CURRENT)
        signer = signer_of(current)
        key.status = SigningKey.Status.RETIRED
        key.is_active = False
        key.retired_at = timezone.now()
        key.retired_by = current
        key.retirement = _sign_with(
            signer, retirement_statement(key_id=key.key_id, retired_by=current.key_id)
        )
        key.save(
            update_fields=[
                "status",
                "is_active",
                "retired_at",
                "retired_by",
                "retirement",
            ]
        )
        resigned = _resign(key, current, signer)
        record_event(
            EventKind.SIGNING_KEY_RETIRED,
            actor=actor_of(actor),
            data={"key_id": key.key_id, "retired_by": current.key_id, "resigned": resigned},
        )
        key_chains.forget()
    logger.info("retired the firmware signing key %s (%s firmware re-signed)", key_id, resigned)
    return Retired(key=key, resigned=resigned)


def _resign(old: SigningKey, current: SigningKey, signer: Signer) -> int:
    # Imported here: services imports this module.
    from firmware import services

    count = 0
    for firmware in Firmware.objects.select_for_update().filter(
        signing_key=old, published_at__isnull=False
    ):
        firmware.signature = _sign_with(signer, firmware.manifest.encode())
        firmware.signing_key = current
        firmware.save(update_fields=["signature", "signing_key"])
        services.forget_published(firmware)
        count += 1
    return count


def rewrap(*, actor: Any = None) -> list[str]:
    """Reseal every private key under the current master key (after a master key change).

    All or nothing: a key that cannot be opened stops the run before anything is written.
    Returns the ids of the keys that were resealed. Keys in the PKCS#11 token have no envelope
    and are left alone.
    """
    current_kek = keystore.kek_id(keystore.master_key())
    changed: list[str] = []
    with transaction.atomic():
        for key in (
            SigningKey.objects.select_for_update()
            .filter(backend=SigningKey.Backend.SEALED)
            .exclude(private_key="")
        ):
            if keystore.envelope_kek(key.private_key) == current_kek:
                continue
            try:
                key.private_key = keystore.rewrap(key.private_key, purpose=PURPOSE)
            except keystore.KeystoreError as exc:
                raise SigningUnavailable(f"Signing key {key.key_id}: {exc}") from exc
            key.save(update_fields=["private_key"])
            changed.append(key.key_id)
        if changed:
            record_event(
                EventKind.SIGNING_KEYS_REWRAPPED,
                actor=actor_of(actor),
                data={"key_ids": changed, "kek": current_kek},
            )
    return changed


# --- Health (for `signing_key list` and the database check) -----------------------------------


def custody_problem(key: SigningKey) -> str:
    """Why this key's private half is unusable, or "" (retired keys need none).

    A token key signs a probe, which shows that the object is there, that the token lets us
    use it, and that it is the key the row names.
    """
    if key.status == SigningKey.Status.RETIRED:
        return ""
    try:
        signer = signer_of(key)
        if isinstance(signer, TokenSigner):
            signer.sign(PROBE)
    except SigningUnavailable as exc:
        return exc.detail
    return ""
