"""Every state change of firmware: upload, publish, delete; and the cached published lookup."""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any, TypedDict

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.utils import timezone
from django.utils.text import get_valid_filename

from firmware import key_chains, signing, swu, tuf_repo
from firmware.models import Firmware
from ota_site import cache
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import actor_of, created, record_event
from ota_site.models import EventKind
from ota_site.versions import InvalidVersion, Version

logger = logging.getLogger(__name__)


class PublishedFirmware(TypedDict):
    """What the device poll needs about a published firmware; cached, since it never changes."""

    id: str
    version: str
    device_type: str
    size: int
    sha256: str
    signature: str
    key_id: str
    manifest: str
    min_version: str | None
    # Devices refuse a counter below the one they store; entries cached before it existed lack
    # it (read with .get: absent means 0).
    release_counter: int
    # The TUF target path the device looks up in the repository's targets metadata.
    tuf_target: str


# --- Upload ---------------------------------------------------------------------------------


def _storage_name(firmware_id: uuid.UUID, device_type: str, version: str, filename: str) -> str:
    safe = (
        get_valid_filename(filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1])[:120] or "firmware.bin"
    )
    return f"firmware/{get_valid_filename(device_type)}/{firmware_id}/{safe}"


def upload_firmware(
    *,
    file: UploadedFile,
    hashes: dict[str, str],
    version: str | None,
    device_type: str,
    release_notes: str = "",
    min_version: str | None = None,
    dependencies: list[str] | None = None,
    release_counter: int | None = None,
    actor: Any = None,
) -> Firmware:
    """Store an uploaded image (already hashed while it streamed in) and record it as a draft.

    The bytes are written to storage before the row exists and removed again if the row cannot be
    written, so an interrupted upload leaves neither a half firmware nor an orphan row.

    A SWUpdate image (firmware.swu.looks_like_swu) has its sw-description read: its version is
    used when ``version`` is None and must equal ``version`` otherwise (400
    ``swu_version_mismatch``), and its version, hardware compatibility and description are kept
    in ``metadata["swu"]``. A .swu whose sw-description cannot be read is refused (400
    ``invalid_swu``). Other images need ``version``.
    """
    swu_info = swu.read_upload(file)  # reads the first cpio member only, then seeks back
    version = _upload_version(version, swu_info)
    parsed = Version.parse(version)
    if release_counter is None:
        # Inherit the type's highest counter: a new image never re-admits older ones by accident.
        release_counter = highest_release_counter(device_type)
    elif isinstance(release_counter, bool) or release_counter < 0:
        raise ServiceError(
            "The release counter must be a whole number of 0 or more.", code="invalid_counter"
        )
    if Firmware.objects.filter(device_type=device_type, version_key=parsed.sort_key).exists():
        raise StateConflict(
            f"Firmware {version} for {device_type} exists.", code="duplicate_version"
        )
    firmware = Firmware(
        id=uuid.uuid4(),
        version=version,
        version_key=parsed.sort_key,
        device_type=device_type,
        filename=(file.name or "firmware.bin")[:255],
        file_size=file.size or 0,
        checksum=hashes["sha256"],
        sha1=hashes["sha1"],
        md5=hashes["md5"],
        metadata={
            "release_notes": release_notes,
            "min_version": min_version or None,
            "dependencies": dependencies or [],
            **({"swu": swu_info.as_metadata()} if swu_info is not None else {}),
        },
        created_by=actor if isinstance(actor, User) else None,
        release_counter=release_counter,
    )
    name = _storage_name(firmware.id, device_type, version, firmware.filename)
    stored = firmware.file.storage.save(name, file, max_length=300)
    firmware.file.name = stored
    try:
        with transaction.atomic():
            firmware.save(force_insert=True)
            record_event(
                EventKind.FIRMWARE_UPLOADED,
                actor=actor_of(actor),
                firmware_id=firmware.id,
                data={"version": version, "device_type": device_type, "size": firmware.file_size},
                changes=created(
                    {
                        "version": version,
                        "device_type": device_type,
                        "size": firmware.file_size,
                        "sha256": firmware.checksum,
                        "filename": firmware.filename,
                    }
                ),
            )
    except IntegrityError as exc:
        firmware.file.storage.delete(stored)
        raise StateConflict(
            f"Firmware {version} for {device_type} exists.", code="duplicate_version"
        ) from exc
    except BaseException:
        firmware.file.storage.delete(stored)
        raise
    return firmware


def _upload_version(version: str | None, swu_info: swu.SwuInfo | None) -> str:
    """The version to record: the one given, checked against the image's sw-description, or
    the sw-description's when none was given."""
    declared = swu_info.version if swu_info is not None else None
    if not version:
        if declared is None:
            detail = "A version is required."
            if swu_info is not None:
                detail = "The image's sw-description has no software.version: give a version."
            raise ServiceError(detail, code="version_required")
        try:
            Version.parse(declared)
        except InvalidVersion as exc:
            raise swu.InvalidSwu(
                f"The image's sw-description version {declared[:80]!r} is not a version the "
                f"server accepts ({exc}); give one.",
            ) from exc
        return declared
    if declared is not None and not _same_version(version, declared):
        raise ServiceError(
            f"The version {version!r} differs from the image's sw-description version "
            f"{declared[:80]!r}.",
            code="swu_version_mismatch",
        )
    return version


def _same_version(given: str, declared: str) -> bool:
    try:
        return Version.parse(given) == Version.parse(declared)
    except InvalidVersion:  # a sw-description version we cannot read equals no valid version
        return False


def tuf_root() -> bytes | None:
    """The newest TUF root as served, for provisioning devices (None: no repository)."""
    return tuf_repo.root_bytes()


def tuf_target_path(device_type: str, version: str, file_name: str) -> str:
    """The TUF target path of a firmware (for callers that read its fields, not the row)."""
    return tuf_repo.path_for(device_type, version, file_name)


def highest_release_counter(device_type: str) -> int:
    value = (
        Firmware.objects.filter(device_type=device_type)
        .order_by("-release_counter")
        .values_list("release_counter", flat=True)
        .first()
    )
    return int(value or 0)


# --- Publish ----------------------------------------------------------------------------------


def manifest_of(firmware: Firmware) -> dict[str, Any]:
    """The signed manifest. ``release_counter`` was added later: a manifest without it means 0
    to devices, so manifests signed before stay valid."""
    return {
        "release_counter": firmware.release_counter,
        "id": str(firmware.id),
        "version": firmware.version,
        "device_type": firmware.device_type,
        "size": firmware.file_size,
        "sha256": firmware.checksum,
        "min_version": firmware.min_version,
    }


def stored_sha256(firmware: Firmware) -> str:
    digest = hashlib.sha256()
    with firmware.file.storage.open(str(firmware.file.name), "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_firmware(firmware: Firmware, *, actor: Any = None) -> Firmware:
    """Verify the stored bytes, sign the manifest and make the firmware available to devices.

    Publishing twice is harmless: the second call changes nothing and returns the firmware.
    """
    if firmware.is_published:
        return firmware
    try:
        actual = stored_sha256(firmware)
    except OSError as exc:
        raise StateConflict(
            "The firmware file cannot be read from storage.", code="storage_unreadable"
        ) from exc
    if actual != firmware.checksum:
        logger.error(
            "firmware %s: stored sha256 %s != recorded %s", firmware.id, actual, firmware.checksum
        )
        raise StateConflict(
            "The stored firmware does not match its recorded checksum; upload it again.",
            code="checksum_mismatch",
        )
    manifest = signing.canonical_json(manifest_of(firmware))
    signature, key = signing.sign(manifest)
    with transaction.atomic():
        locked = Firmware.objects.select_for_update().get(pk=firmware.pk)
        if locked.is_published:
            return locked
        locked.manifest = manifest.decode()
        locked.signature = signature
        locked.signing_key = key
        locked.published_at = timezone.now()
        locked.save(update_fields=["manifest", "signature", "signing_key", "published_at"])
        record_event(
            EventKind.FIRMWARE_PUBLISHED,
            actor=actor_of(actor),
            firmware_id=locked.id,
            data={
                "version": locked.version,
                "device_type": locked.device_type,
                "key_id": key.key_id,
            },
        )
        # The new target, snapshot and timestamp commit (or roll back) with the publish; the
        # repository's row lock serialises concurrent publishes.
        tuf_repo.firmware_changed()
        # Clear a cached "not published" now and again after commit, so a poll that ran in
        # between cannot leave it behind.
        cache_key = _published_key(locked.device_type, locked.version_key)
        cache.delete(cache_key)
        transaction.on_commit(lambda: cache.delete(cache_key))
    return locked


# --- Delete -----------------------------------------------------------------------------------


def delete_firmware(firmware: Firmware, *, actor: Any = None) -> None:
    """Delete a firmware and its file; refused (409) while a rollout or session refers to it."""
    name = str(firmware.file.name)
    try:
        with transaction.atomic():
            record_event(
                EventKind.FIRMWARE_DELETED,
                actor=actor_of(actor),
                firmware_id=firmware.id,
                data={"version": firmware.version, "device_type": firmware.device_type},
            )
            was_published = firmware.is_published
            firmware.delete()
            if was_published:
                tuf_repo.firmware_changed()  # its target goes, in the same transaction
    except ProtectedError as exc:
        raise StateConflict(
            "This firmware is used by a rollout or an update session and cannot be deleted.",
            code="firmware_in_use",
        ) from exc
    storage = firmware.file.storage
    cache_keys = (
        _published_key(firmware.device_type, firmware.version_key),
        _by_id_key(firmware.id),
    )

    def remove_file_and_cache() -> None:
        for cache_key in cache_keys:
            cache.delete(cache_key)
        try:
            storage.delete(name)
        except Exception:  # the row is gone; a leftover file is harmless and logged
            logger.warning("could not delete firmware file %s", name, exc_info=True)

    # After commit: if an outer transaction rolls the delete back, the row keeps its file.
    for cache_key in cache_keys:
        cache.delete(cache_key)
    transaction.on_commit(remove_file_and_cache)


# --- Lookup for the device poll ------------------------------------------------------------------

_NONE = "none"


def _published_key(device_type: str, version_key: str) -> str:
    return f"fw:pub:{device_type}:{version_key}"


def published_firmware(device_type: str, version: str) -> PublishedFirmware | None:
    """The published firmware of this type and version, from the cache when possible.

    Published firmware never changes, so it is cached for FIRMWARE_CACHE_TIMEOUT; publishing or
    deleting clears the entry. "Not published" is cached briefly so a pending assignment does not
    cost a query on every poll.
    """
    try:
        key_of_version = Version.parse(version).sort_key
    except ValueError:
        return None
    key = _published_key(device_type, key_of_version)
    cached = cache.get(key, local=True)
    if cached == _NONE:
        return None
    if cached is not cache.MISSING:
        return cached
    firmware = (
        Firmware.objects.filter(
            device_type=device_type,
            version_key=key_of_version,
            published_at__isnull=False,
            quarantined_at__isnull=True,  # bytes that failed verify_storage are not offered
        )
        .only(
            "id",
            "version",
            "device_type",
            "file_size",
            "checksum",
            "signature",
            "signing_key_id",
            "manifest",
            "metadata",
            "release_counter",
            "file",
            "filename",
        )
        .first()
    )
    if firmware is None:
        cache.set(key, _NONE, 60, local=True)
        return None
    info = as_published(firmware)
    cache.set(key, info, settings.FIRMWARE_CACHE_TIMEOUT, local=True)
    # The poll looks the same firmware up by id while a session is open: fill both entries.
    cache.set(_by_id_key(firmware.id), info, settings.FIRMWARE_CACHE_TIMEOUT, local=True)
    return info


def _by_id_key(firmware_id: Any) -> str:
    return f"fw:id:{firmware_id}"


def published_firmware_by_id(firmware_id: Any) -> PublishedFirmware | None:
    """A published firmware by id, cached like published_firmware (it never changes)."""
    key = _by_id_key(firmware_id)
    cached = cache.get(key, local=True)
    if cached is not cache.MISSING and cached != _NONE:
        return cached
    firmware = Firmware.objects.filter(
        pk=firmware_id, published_at__isnull=False, quarantined_at__isnull=True
    ).first()
    if firmware is None:
        return None
    info = as_published(firmware)
    cache.set(key, info, settings.FIRMWARE_CACHE_TIMEOUT, local=True)
    return info


class OfferKeys(TypedDict):
    """What a device needs to trust a firmware signed by a key it has not seen yet."""

    key_chain: list[key_chains.ChainLink]
    retired_keys: list[key_chains.RetiredKey]


def offer_keys(key_id: str) -> OfferKeys:
    """The endorsement chain up to ``key_id`` and the signed retirements, from the cache."""
    return OfferKeys(key_chain=key_chains.key_chain(key_id), retired_keys=key_chains.retired_keys())


def remember_published(info: PublishedFirmware) -> None:
    """Warm the by-id entry for firmware another cache already described (live rollouts)."""
    cache.set(_by_id_key(info["id"]), info, settings.FIRMWARE_CACHE_TIMEOUT, local=True)


def as_published(firmware: Firmware) -> PublishedFirmware:
    return PublishedFirmware(
        id=str(firmware.id),
        version=firmware.version,
        device_type=firmware.device_type,
        size=firmware.file_size,
        sha256=firmware.checksum,
        signature=firmware.signature,
        key_id=firmware.signing_key_id or "",
        manifest=firmware.manifest,
        min_version=firmware.min_version,
        release_counter=firmware.release_counter,
        tuf_target=tuf_repo.target_path(firmware),
    )


def forget_published_keys(device_type: str, version_key: str, firmware_id: str) -> None:
    """Drop the cached entries of a firmware known by these values (the poll answer cache's
    listener, told by the database of a change made by any code or SQL)."""
    cache.delete(_published_key(device_type, version_key))
    cache.delete(_by_id_key(firmware_id))


def forget_published(firmware: Firmware) -> None:
    """Drop a published firmware's cached entries (re-signed, quarantined or restored), now and
    again after commit so that a poll running in between cannot leave a stale one behind."""
    keys = (_published_key(firmware.device_type, firmware.version_key), _by_id_key(firmware.id))

    def forget() -> None:
        for key in keys:
            cache.delete(key)

    forget()
    transaction.on_commit(forget)


# --- Storage read-back -------------------------------------------------------------------------


class StorageCheck(TypedDict):
    firmware_id: str
    version: str
    device_type: str
    ok: bool
    problem: str  # "", "missing", "unreadable" or "checksum_mismatch"
    detail: str
    quarantined: bool


def verify_storage(firmware: Firmware, *, actor: Any = None) -> StorageCheck:
    """Read the stored bytes back and compare their sha256 with the recorded one.

    Storage can lose or change bytes after publishing (a bad disk, a bucket edited by hand, a
    restore from the wrong backup). A mismatch or a missing file quarantines the firmware: it is
    withdrawn from offers and device downloads, an event is written and an error logged. When a
    later check finds the right bytes again (an operator restored them, e.g. with
    ``manage.py firmware verify --restore``), the quarantine is lifted.
    """
    problem, detail = "", ""
    try:
        actual = stored_sha256(firmware)
    except FileNotFoundError:
        problem, detail = "missing", "the stored file is missing"
    except Exception as exc:  # S3 errors are not OSErrors; a missing object is told apart below
        if _missing(firmware):
            problem, detail = "missing", "the stored file is missing"
        else:
            problem, detail = "unreadable", f"the stored file cannot be read: {exc}"
    else:
        if actual != firmware.checksum:
            problem = "checksum_mismatch"
            detail = f"stored sha256 {actual} != recorded {firmware.checksum}"
    if problem in ("missing", "checksum_mismatch"):
        _quarantine(firmware, problem, detail, actor=actor)
    elif not problem:
        _lift_quarantine(firmware, actor=actor)
    else:
        # Unreadable (storage down, permissions): not evidence that the bytes are wrong.
        logger.error("firmware %s (%s): %s", firmware.id, firmware.version, detail)
    return StorageCheck(
        firmware_id=str(firmware.id),
        version=firmware.version,
        device_type=firmware.device_type,
        ok=not problem,
        problem=problem,
        detail=detail,
        quarantined=firmware.quarantined_at is not None,
    )


def _missing(firmware: Firmware) -> bool:
    try:
        return not firmware.file.storage.exists(str(firmware.file.name))
    except Exception:  # storage unreachable: unknown, so not "missing"
        return False


def _quarantine(firmware: Firmware, problem: str, detail: str, *, actor: Any) -> None:
    logger.error("firmware %s (%s) quarantined: %s", firmware.id, firmware.version, detail)
    now = timezone.now()
    with transaction.atomic():
        # Compare-and-set: two checks at once write one event.
        changed = Firmware.objects.filter(pk=firmware.pk, quarantined_at__isnull=True).update(
            quarantined_at=now
        )
        if changed:
            record_event(
                EventKind.FIRMWARE_QUARANTINED,
                actor=actor_of(actor),
                firmware_id=firmware.id,
                data={"version": firmware.version, "problem": problem, "detail": detail},
            )
            tuf_repo.firmware_changed()  # its TUF target goes at once, not at the next refresh
        forget_published(firmware)
    firmware.refresh_from_db(fields=["quarantined_at"])


def _lift_quarantine(firmware: Firmware, *, actor: Any) -> None:
    if firmware.quarantined_at is None:
        return
    with transaction.atomic():
        changed = Firmware.objects.filter(pk=firmware.pk, quarantined_at__isnull=False).update(
            quarantined_at=None
        )
        if changed:
            record_event(
                EventKind.FIRMWARE_RESTORED,
                actor=actor_of(actor),
                firmware_id=firmware.id,
                data={"version": firmware.version},
            )
            tuf_repo.firmware_changed()
        forget_published(firmware)
    firmware.quarantined_at = None


def restore_storage(firmware: Firmware, content: Any, *, actor: Any = None) -> StorageCheck:
    """Put the right bytes back for a firmware (re-upload) and check them.

    Refused unless ``content`` (a Django File) hashes to the recorded sha256: the signed manifest
    names those bytes, and no others may take their place.
    """
    digest = hashlib.sha256()
    for chunk in content.chunks():
        digest.update(chunk)
    if digest.hexdigest() != firmware.checksum:
        raise StateConflict(
            "These bytes do not match the firmware's recorded sha256.", code="checksum_mismatch"
        )
    content.seek(0)
    storage = firmware.file.storage
    name = str(firmware.file.name)
    try:
        storage.delete(name)
    except OSError:
        logger.warning("could not delete %s before restoring it", name, exc_info=True)
    stored = storage.save(name, content, max_length=300)
    if stored != name:
        Firmware.objects.filter(pk=firmware.pk).update(file=stored)
        firmware.file.name = stored
    return verify_storage(firmware, actor=actor)


def verify_all_storage(*, actor: Any = None) -> list[StorageCheck]:
    """verify_storage over every published firmware (quarantined ones too, to lift it)."""
    return [
        verify_storage(firmware, actor=actor)
        for firmware in Firmware.objects.filter(published_at__isnull=False).order_by(
            "device_type", "version_key"
        )
    ]
