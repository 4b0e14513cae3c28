"""The server's TUF repository (python-tuf ``tuf.api.metadata``), kept in the database.

Why TUF on top of the signed manifest: a manifest signature proves who built an image, not that
it is the *current* one. TUF's timestamp and snapshot roles add freshness (a frozen or replayed
repository is detected once its metadata expires or its version goes backwards) and consistency
(targets and snapshot of different moments cannot be mixed). docs/security.md "TUF" has the full
picture; in short:

- root: offline Ed25519 keys with a threshold. The server knows only their public halves; the
  private keys live in files (``manage.py tuf init`` writes them) that sign a new root, and the
  next root is signed by a threshold of the old keys AND of the new ones (``tuf rotate-root``).
- targets, snapshot, timestamp: online keys whose private halves are sealed in ``TufKey``
  (``ota_site.keystore``, purpose ``tuf-online``) so that publishing and the Celery beat task can
  sign. ``tuf rotate-online`` replaces them (root N+1 signed by the root keys; the old online
  keys are not needed, so it also recovers from a lost master key). Every published firmware
  is a target ``<device_type>/<version>/<file name>`` with its length, sha256 and custom
  ``{version, device_type, release_counter, firmware_id}``.
- consistent snapshots: snapshot and targets are served as ``N.snapshot.json``/``N.targets.json``
  and never change once written; timestamp is served as ``timestamp.json`` (its newest version).

Every write happens under a row lock on the newest root row (``_lock``), inside the caller's
transaction: two publishes, a publish and the beat task, or two beat workers never write the same
version twice, and a rolled-back publish leaves no metadata behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core import checks
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone
from django.utils.text import get_valid_filename
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from firmware.models import Firmware, TufKey, TufMetadata, TufRole
from ota_site import keystore
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import record_event
from ota_site.models import EventKind

logger = logging.getLogger(__name__)

ONLINE_PURPOSE = "tuf-online"
ONLINE_ROLES = (TufRole.TARGETS, TufRole.SNAPSHOT, TufRole.TIMESTAMP)
# Compact JSON: devices download timestamp.json on every update check.
SERIALIZER = JSONSerializer(compact=True)

S = TypeVar("S", Root, Timestamp, Snapshot, Targets)
AnySigned = Root | Timestamp | Snapshot | Targets


class TufError(ServiceError):
    """A refusal about the TUF repository (not initialised, a key that does not fit, …)."""

    code = "tuf_error"


# --- Keys ---------------------------------------------------------------------------------------


def _public_of(signer: Signer) -> SSlibKey:
    return cast(SSlibKey, signer.public_key)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signer_of(key: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(key)


def write_key_file(directory: Path, key: Ed25519PrivateKey, passphrase: str | None = None) -> Path:
    """Write a root key as PKCS#8 PEM (encrypted when a passphrase is given), mode 0600, never
    overwriting a file; the name carries the key id so an operator can tell the files apart."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyid = _public_of(signer_of(key)).keyid
    path = directory / f"tuf-root-{keyid[:16]}.pem"
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def load_key_file(path: Path, passphrase: str | None = None) -> CryptoSigner:
    """A root key from its file; TufError when it cannot be read or is not Ed25519."""
    try:
        pem = path.read_bytes()
        key = serialization.load_pem_private_key(
            pem, password=passphrase.encode() if passphrase else None
        )
    except (OSError, ValueError, TypeError) as exc:
        raise TufError(f"Cannot load the key {path}: {exc}", code="tuf_bad_key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TufError(f"{path} is not an Ed25519 private key.", code="tuf_bad_key")
    return CryptoSigner(key)


def _online_signer(role: str, root: Root) -> CryptoSigner:
    """The sealed online key of ``role`` that the current root names."""
    keyids = root.roles[role].keyids
    record = TufKey.objects.filter(keyid__in=keyids, role=role, retired_at=None).first()
    if record is None or not record.private_key:
        raise TufError(f"No online key for the {role} role is stored.", code="tuf_no_key")
    private = keystore.unseal_private_key(record.private_key, purpose=ONLINE_PURPOSE)
    return CryptoSigner(private, SSlibKey.from_dict(record.keyid, dict(record.public)))


# --- Reading ------------------------------------------------------------------------------------


def latest(role: str) -> TufMetadata | None:
    return TufMetadata.objects.filter(role=role).order_by("-version").first()


def is_initialised() -> bool:
    return TufMetadata.objects.filter(role=TufRole.ROOT).exists()


def served(role: str, version: int | None = None) -> TufMetadata | None:
    """The metadata row a client asked for; ``version=None`` means the newest (timestamp)."""
    if version is None:
        return latest(role)
    return TufMetadata.objects.filter(role=role, version=version).first()


def _load(row: TufMetadata, kind: type[S]) -> Metadata[S]:
    metadata = Metadata.from_bytes(bytes(row.content))
    if not isinstance(metadata.signed, kind):
        raise TufError(f"{row} does not hold {kind.type} metadata.", code="tuf_corrupt")
    return cast("Metadata[S]", metadata)  # type: ignore[redundant-cast]


def current_root() -> Metadata[Root] | None:
    row = latest(TufRole.ROOT)
    return _load(row, Root) if row is not None else None


# --- Writing ------------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return (now or timezone.now()).astimezone(UTC).replace(microsecond=0)


def _store(signed: AnySigned, signers: Iterable[Signer]) -> TufMetadata:
    metadata: Metadata[Any] = Metadata(signed)
    for signer in signers:
        metadata.sign(signer, append=True)
    return TufMetadata.objects.create(
        role=signed.type,
        version=signed.version,
        content=metadata.to_bytes(SERIALIZER),
        expires=signed.expires,
    )


def _lock() -> TufMetadata | None:
    """Lock the newest root row: every writer of metadata takes this lock first."""
    return (
        TufMetadata.objects.select_for_update()
        .filter(role=TufRole.ROOT)
        .order_by("-version")
        .first()
    )


def target_path(firmware: Firmware) -> str:
    return path_for(firmware.device_type, firmware.version, str(firmware.file.name or ""))


def path_for(device_type: str, version: str, file_name: str) -> str:
    """``<device_type>/<version>/<file name>``: unique, since (device_type, version) is."""
    name = file_name.rsplit("/", 1)[-1]
    safe = get_valid_filename(name)[:120] if name else ""
    return f"{get_valid_filename(device_type)}/{version}/{safe or 'firmware.bin'}"


def target_of(firmware: Firmware) -> TargetFile:
    return TargetFile(
        length=firmware.file_size,
        hashes={"sha256": firmware.checksum},
        path=target_path(firmware),
        unrecognized_fields={
            "custom": {
                "version": firmware.version,
                "device_type": firmware.device_type,
                "release_counter": firmware.release_counter,
                "firmware_id": str(firmware.id),
            }
        },
    )


def _wanted_targets() -> dict[str, TargetFile]:
    # Quarantined firmware (its stored bytes failed a read-back) is no target until restored.
    published = Firmware.objects.filter(
        published_at__isnull=False, quarantined_at__isnull=True
    ).order_by("device_type", "version_key")
    return {target.path: target for target in map(target_of, published)}


def _due(expires: datetime, lifetime: int, now: datetime) -> bool:
    """Re-sign once half of the lifetime is gone: the beat task has the other half to succeed."""
    return expires - now < timedelta(seconds=lifetime / 2)


def _signed_by_root(metadata: Metadata[Any], root: Root, role: str) -> bool:
    try:
        root.verify_delegate(role, metadata.signed_bytes, metadata.signatures)
    except UnsignedMetadataError:
        return False
    return True


@dataclass(frozen=True)
class UpdateResult:
    written: list[str]

    def __bool__(self) -> bool:
        return bool(self.written)


def update_repository(*, now: datetime | None = None, force: bool = False) -> UpdateResult:
    """Bring targets, snapshot and timestamp up to date, in the caller's transaction.

    Writes a new targets version when the published firmware changed, and a new version of any
    role that is past half its lifetime (``force``: timestamp and snapshot anyway); a new
    targets makes a new snapshot, a new snapshot a new timestamp. Idempotent: with nothing to do
    it writes nothing. Returns the roles written; an uninitialised repository writes nothing.
    """
    moment = _now(now)
    with transaction.atomic():
        if _lock() is None:
            return UpdateResult([])
        root_md = current_root()
        assert root_md is not None
        root = root_md.signed
        written: list[str] = []

        targets_row = latest(TufRole.TARGETS)
        assert targets_row is not None
        targets_md = _load(targets_row, Targets)
        wanted = _wanted_targets()
        current = {path: t.to_dict() for path, t in targets_md.signed.targets.items()}
        if (
            current != {path: t.to_dict() for path, t in wanted.items()}
            or _due(targets_md.signed.expires, settings.TUF_TARGETS_EXPIRY, moment)
            or not _signed_by_root(targets_md, root, TufRole.TARGETS)
        ):
            targets = Targets(
                version=targets_md.signed.version + 1,
                expires=moment + timedelta(seconds=settings.TUF_TARGETS_EXPIRY),
                targets=wanted,
            )
            _store(targets, [_online_signer(TufRole.TARGETS, root)])
            written.append(TufRole.TARGETS)
            targets_version = targets.version
        else:
            targets_version = targets_md.signed.version

        snapshot_row = latest(TufRole.SNAPSHOT)
        assert snapshot_row is not None
        snapshot_md = _load(snapshot_row, Snapshot)
        if (
            written
            or force
            or snapshot_md.signed.meta["targets.json"].version != targets_version
            or _due(snapshot_md.signed.expires, settings.TUF_SNAPSHOT_EXPIRY, moment)
            or not _signed_by_root(snapshot_md, root, TufRole.SNAPSHOT)
        ):
            snapshot = Snapshot(
                version=snapshot_md.signed.version + 1,
                expires=moment + timedelta(seconds=settings.TUF_SNAPSHOT_EXPIRY),
                meta={"targets.json": MetaFile(version=targets_version)},
            )
            _store(snapshot, [_online_signer(TufRole.SNAPSHOT, root)])
            written.append(TufRole.SNAPSHOT)
            snapshot_version = snapshot.version
        else:
            snapshot_version = snapshot_md.signed.version

        timestamp_row = latest(TufRole.TIMESTAMP)
        assert timestamp_row is not None
        timestamp_md = _load(timestamp_row, Timestamp)
        if (
            written
            or force
            or timestamp_md.signed.snapshot_meta.version != snapshot_version
            or _due(timestamp_md.signed.expires, settings.TUF_TIMESTAMP_EXPIRY, moment)
            or not _signed_by_root(timestamp_md, root, TufRole.TIMESTAMP)
        ):
            timestamp = Timestamp(
                version=timestamp_md.signed.version + 1,
                expires=moment + timedelta(seconds=settings.TUF_TIMESTAMP_EXPIRY),
                snapshot_meta=MetaFile(version=snapshot_version),
            )
            _store(timestamp, [_online_signer(TufRole.TIMESTAMP, root)])
            written.append(TufRole.TIMESTAMP)
    if written:
        logger.info("TUF metadata re-signed: %s", ", ".join(written))
    return UpdateResult(written)


def firmware_changed() -> None:
    """Called by publish_firmware and delete_firmware inside their transaction.

    Initialises the embedded repository on first use when TUF_AUTO_INIT is on; otherwise an
    uninitialised repository is left alone (system check ota.W030 says so in production).
    """
    if not is_initialised():
        if not settings.TUF_AUTO_INIT:
            logger.debug("TUF repository not initialised; no metadata written")
            return
        auto_initialise()
    update_repository()


# --- Root ---------------------------------------------------------------------------------------


def _check_threshold(count: int, threshold: int) -> None:
    if count < 1:
        raise TufError("At least one root key is needed.", code="tuf_threshold")
    if not 1 <= threshold <= count:
        raise TufError(
            f"The threshold must be between 1 and the number of root keys ({count}).",
            code="tuf_threshold",
        )


def _record_root(root: Root, actor: str, what: str, **extra: Any) -> None:
    data = {
        "version": root.version,
        "keyids": root.roles[TufRole.ROOT].keyids,
        "what": what,
        **extra,
    }
    record_event(EventKind.TUF_ROOT_SIGNED, actor=actor, data=data)
    logger.warning("TUF root %s by %s: %s", what, actor, json.dumps(data))


def initialise(
    root_signers: Sequence[CryptoSigner], *, threshold: int, actor: str = "system"
) -> Metadata[Root]:
    """Create the repository: online keys (sealed), root v1 signed by every root key, and the
    first targets, snapshot and timestamp. Refused (409) when a root exists already."""
    _check_threshold(len(root_signers), threshold)
    moment = _now(None)
    with transaction.atomic():
        if is_initialised():
            raise StateConflict(
                "The TUF repository exists already; rotate its root instead.",
                code="tuf_initialised",
            )
        root = Root(
            version=1,
            expires=moment + timedelta(seconds=settings.TUF_ROOT_EXPIRY),
            consistent_snapshot=True,
        )
        for signer in root_signers:
            public = _public_of(signer)
            root.add_key(public, TufRole.ROOT)
            TufKey.objects.get_or_create(
                keyid=public.keyid, defaults={"role": TufRole.ROOT, "public": public.to_dict()}
            )
        root.roles[TufRole.ROOT].threshold = threshold
        online: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            private = generate_key()
            signer = signer_of(private)
            public = _public_of(signer)
            root.add_key(public, role)
            TufKey.objects.create(
                keyid=public.keyid,
                role=role,
                public=public.to_dict(),
                private_key=keystore.seal_private_key(private, purpose=ONLINE_PURPOSE),
            )
            online[role] = signer
        root_row = _store(root, root_signers)
        expires = {
            TufRole.TARGETS: settings.TUF_TARGETS_EXPIRY,
            TufRole.SNAPSHOT: settings.TUF_SNAPSHOT_EXPIRY,
            TufRole.TIMESTAMP: settings.TUF_TIMESTAMP_EXPIRY,
        }
        first: list[AnySigned] = [
            Targets(version=1, expires=moment + timedelta(seconds=expires[TufRole.TARGETS])),
            Snapshot(version=1, expires=moment + timedelta(seconds=expires[TufRole.SNAPSHOT])),
            Timestamp(version=1, expires=moment + timedelta(seconds=expires[TufRole.TIMESTAMP])),
        ]
        for signed in first:
            _store(signed, [online[signed.type]])
        _record_root(root, actor, "initialised")
        # Firmware published before the repository existed becomes targets v2 at once.
        update_repository(now=moment)
    return _load(root_row, Root)


def auto_initialise() -> None:
    """The embedded mode's repository: one root key, written to TUF_ROOT_KEY_DIR (0600).

    A concurrent initialisation wins the (root, 1) row; ours is then dropped with its key file.
    """
    key = generate_key()
    signer = signer_of(key)
    path = write_key_file(Path(settings.TUF_ROOT_KEY_DIR), key)
    try:
        with transaction.atomic():
            initialise([signer], threshold=1, actor="system:auto-init")
    except (IntegrityError, StateConflict):
        path.unlink(missing_ok=True)
        if not is_initialised():
            raise
        return
    logger.warning(
        "initialised a TUF repository with ONE root key in %s (TUF_AUTO_INIT); production "
        "repositories are created with `manage.py tuf init` and offline keys",
        path,
    )


# --- Status -------------------------------------------------------------------------------------


def status() -> dict[str, Any]:
    """What `manage.py tuf status` and the system check report."""
    roles: dict[str, Any] = {}
    for role in TufRole:
        row = latest(role)
        roles[role.value] = (
            None if row is None else {"version": row.version, "expires": row.expires.isoformat()}
        )
    root = current_root()
    result: dict[str, Any] = {"initialised": root is not None, "roles": roles}
    if root is not None:
        result["root_keyids"] = root.signed.roles[TufRole.ROOT].keyids
        result["root_threshold"] = root.signed.roles[TufRole.ROOT].threshold
        targets_row = latest(TufRole.TARGETS)
        if targets_row is not None:
            result["targets"] = len(_load(targets_row, Targets).signed.targets)
    return result


def root_bytes(version: int | None = None) -> bytes | None:
    """A root as served (the newest by default): what a device ships with as its trust anchor."""
    row = served(TufRole.ROOT, version) if version is not None else latest(TufRole.ROOT)
    return bytes(row.content) if row is not None else None


# --- System checks (registered by firmware.apps) -------------------------------------------------


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The lifetimes must leave the beat task time to re-sign (ota.E030)."""
    errors: list[checks.CheckMessage] = []
    for name in ("TUF_ROOT_EXPIRY", "TUF_TARGETS_EXPIRY", "TUF_SNAPSHOT_EXPIRY"):
        if getattr(settings, name) <= 0:
            errors.append(checks.Error(f"{name} must be positive.", id="ota.E030"))
    interval, timestamp = settings.TUF_REFRESH_INTERVAL, settings.TUF_TIMESTAMP_EXPIRY
    if interval <= 0 or timestamp <= 0 or interval >= timestamp / 2:
        errors.append(
            checks.Error(
                "TUF_REFRESH_INTERVAL must be positive and below half of TUF_TIMESTAMP_EXPIRY: "
                "a role is re-signed once half its lifetime is gone.",
                id="ota.E030",
            )
        )
    return errors


def check_repository(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Warn when production has no TUF repository (ota.W030) or its root expires soon (W031).

    A database check: it runs with ``manage.py check --database default`` and before migrate,
    and stays quiet while the tables do not exist yet.
    """
    if not kwargs.get("databases"):
        return []
    try:
        root = current_root()
    except DatabaseError:
        return []
    if root is None:
        if settings.TUF_AUTO_INIT:
            return []
        return [
            checks.Warning(
                "The TUF repository is not initialised: devices that verify TUF metadata refuse "
                "every update. Run `manage.py tuf init` with offline root keys.",
                id="ota.W030",
            )
        ]
    left = root.signed.expires - timezone.now()
    if left < timedelta(days=30):
        return [
            checks.Warning(
                f"TUF root v{root.signed.version} expires {root.signed.expires:%Y-%m-%d}: sign "
                "a new one with `manage.py tuf rotate-root` (the same keys renew it).",
                id="ota.W031",
            )
        ]
    return []
