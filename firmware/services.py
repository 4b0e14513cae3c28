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

from firmware import signing
from firmware.models import Firmware
from ota_site import cache
from ota_site.errors import StateConflict
from ota_site.events import actor_of, record_event
from ota_site.models import EventKind
from ota_site.versions import Version

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
    version: str,
    device_type: str,
    release_notes: str = "",
    min_version: str | None = None,
    dependencies: list[str] | None = None,
    actor: Any = None,
) -> Firmware:
    """Store an uploaded image (already hashed while it streamed in) and record it as a draft.

    The bytes are written to storage before the row exists and removed again if the row cannot be
    written, so an interrupted upload leaves neither a half firmware nor an orphan row.
    """
    parsed = Version.parse(version)
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
        },
        created_by=actor if isinstance(actor, User) else None,
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


# --- Publish ----------------------------------------------------------------------------------


def manifest_of(firmware: Firmware) -> dict[str, Any]:
    return {
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
            firmware.delete()
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
    cached = cache.get(key)
    if cached == _NONE:
        return None
    if cached is not cache.MISSING:
        return cached
    firmware = (
        Firmware.objects.filter(
            device_type=device_type, version_key=key_of_version, published_at__isnull=False
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
        )
        .first()
    )
    if firmware is None:
        cache.set(key, _NONE, 60)
        return None
    info = as_published(firmware)
    cache.set(key, info, settings.FIRMWARE_CACHE_TIMEOUT)
    # The poll looks the same firmware up by id while a session is open: fill both entries.
    cache.set(_by_id_key(firmware.id), info, settings.FIRMWARE_CACHE_TIMEOUT)
    return info


def _by_id_key(firmware_id: Any) -> str:
    return f"fw:id:{firmware_id}"


def published_firmware_by_id(firmware_id: Any) -> PublishedFirmware | None:
    """A published firmware by id, cached like published_firmware (it never changes)."""
    key = _by_id_key(firmware_id)
    cached = cache.get(key)
    if cached is not cache.MISSING and cached != _NONE:
        return cached
    firmware = Firmware.objects.filter(pk=firmware_id, published_at__isnull=False).first()
    if firmware is None:
        return None
    info = as_published(firmware)
    cache.set(key, info, settings.FIRMWARE_CACHE_TIMEOUT)
    return info


def remember_published(info: PublishedFirmware) -> None:
    """Warm the by-id entry for firmware another cache already described (live rollouts)."""
    cache.set(_by_id_key(info["id"]), info, settings.FIRMWARE_CACHE_TIMEOUT)


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
    )
