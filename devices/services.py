"""Every state change of devices, groups and enrollment tokens (views, admin and commands call
these). The device CA, certificates and revocation have their own module, devices.certificates."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import F, ProtectedError, Q
from django.utils import timezone

from devices.models import (
    Device,
    DeviceGroup,
    DeviceStatus,
    EnrollmentToken,
)
from ota_site import presence
from ota_site.auth import issue_device_token
from ota_site.errors import NotAllowed, ServiceError, StateConflict
from ota_site.events import actor_of, created, diff, record_event
from ota_site.models import EventKind

ENROLLMENT_TOKEN_PREFIX = "ota_enroll_"


class AuthenticationError(ServiceError):
    status_code: int = 401
    code = "authentication_failed"


def hash_secret(secret: str) -> str:
    """sha256 of a high-entropy secret (256 random bits): a leaked database leaks no credential."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --- Enrollment tokens ------------------------------------------------------------------------


def create_enrollment_token(
    *,
    name: str,
    device_type: str = "",
    group: DeviceGroup | None = None,
    expires_at: datetime | None = None,
    max_uses: int | None = None,
    actor: Any = None,
) -> tuple[EnrollmentToken, str]:
    """Create a token; return it and its plaintext, which is never shown again."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ServiceError("expires_at is in the past.", code="expired")
    if max_uses is not None and max_uses < 1:
        raise ServiceError("max_uses must be at least 1.")
    with transaction.atomic():
        prefix = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        token = EnrollmentToken.objects.create(
            name=name,
            prefix=prefix,
            token_hash=hash_secret(secret),
            device_type=device_type,
            group=group,
            expires_at=expires_at,
            max_uses=max_uses,
            created_by=actor if isinstance(actor, User) else None,
        )
        record_event(
            EventKind.ENROLLMENT_TOKEN_CREATED,
            actor=actor_of(actor),
            data={"token": str(token.id), "name": name, "prefix": prefix},
        )
    return token, f"{ENROLLMENT_TOKEN_PREFIX}{prefix}_{secret}"


def revoke_enrollment_token(token: EnrollmentToken, *, actor: Any = None) -> None:
    with transaction.atomic():
        updated = EnrollmentToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if updated:
            record_event(
                EventKind.ENROLLMENT_TOKEN_REVOKED,
                actor=actor_of(actor),
                data={"token": str(token.pk), "prefix": token.prefix},
            )
    token.refresh_from_db(fields=["revoked_at"])


def delete_enrollment_token(token: EnrollmentToken, *, actor: Any = None) -> None:
    """Forget a token (revoke it first to keep it on record); devices it enrolled stay."""
    with transaction.atomic():
        record_event(
            EventKind.ENROLLMENT_TOKEN_REVOKED,
            actor=actor_of(actor),
            data={"token": str(token.pk), "prefix": token.prefix, "deleted": True},
        )
        token.delete()


def _find_enrollment_token(text: str) -> EnrollmentToken:
    invalid = AuthenticationError("The enrollment token is not valid.", code="enrollment_invalid")
    if not text.startswith(ENROLLMENT_TOKEN_PREFIX):
        raise invalid
    prefix, _, secret = text.removeprefix(ENROLLMENT_TOKEN_PREFIX).partition("_")
    token = EnrollmentToken.objects.filter(prefix=prefix).select_related("group").first()
    if token is None or not hmac.compare_digest(token.token_hash, hash_secret(secret)):
        raise invalid
    return token


# --- Registration and credentials -------------------------------------------------------------


def register_device(
    *,
    enrollment_token: str,
    hardware_id: str,
    device_type: str,
    current_version: str = "",
    metadata: dict[str, Any] | None = None,
) -> tuple[Device, str]:
    """Enroll a device; return it and its secret (shown once).

    A hardware_id that is already enrolled is refused with 409, so a leaked enrollment token cannot
    take over an existing device. After an operator resets the device's credentials the same
    hardware_id may enroll again and keeps its id and history.
    """
    token = _find_enrollment_token(enrollment_token)
    state = token.state
    if state != "active":
        raise NotAllowed(f"The enrollment token is {state}.", code=f"enrollment_{state}")
    if token.device_type and token.device_type != device_type:
        raise NotAllowed(
            f"The enrollment token is only for devices of type {token.device_type!r}.",
            code="enrollment_scope",
        )
    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        # Count the use with a compare-and-set that re-checks every limit, so concurrent
        # enrollments never exceed max_uses and a token revoked a moment ago enrolls nothing.
        usable = (
            (Q(max_uses__isnull=True) | Q(uses__lt=F("max_uses")))
            & (Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
            & Q(revoked_at__isnull=True)
        )
        if not EnrollmentToken.objects.filter(usable, pk=token.pk).update(uses=F("uses") + 1):
            token.refresh_from_db()
            state = token.state if token.state != "active" else "exhausted"
            raise NotAllowed(f"The enrollment token is {state}.", code=f"enrollment_{state}")
        existing = Device.objects.select_for_update().filter(hardware_id=hardware_id).first()
        if existing is not None:
            if existing.revoked_at is not None:
                raise NotAllowed(
                    "This device was revoked. An admin must delete it before the hardware can "
                    "enroll again.",
                    code="device_revoked",
                )
            if existing.secret_hash or hasattr(existing, "ddi"):
                # A hawkBit DDI device has no secret but is no less enrolled (devices.ddi).
                raise StateConflict(
                    "A device with this hardware_id is already enrolled. An operator can reset "
                    "its credentials to let it enroll again.",
                    code="device_exists",
                )
            if existing.device_type != device_type:
                raise StateConflict(
                    f"This hardware_id is enrolled as a {existing.device_type!r} device.",
                    code="device_type_mismatch",
                )
            device = existing
            kind = "reenrolled"
        else:
            device = Device(hardware_id=hardware_id, device_type=device_type)
            kind = "enrolled"
        device.secret_hash = hash_secret(secret)
        if current_version:
            device.set_current_version(current_version)
        if metadata:
            device.metadata = {**device.metadata, **metadata}
        if token.group is not None:
            device.group = token.group
        device.last_seen = timezone.now()
        try:
            with transaction.atomic():
                device.save()
        except IntegrityError as exc:  # the same hardware_id enrolled concurrently
            raise StateConflict(
                "A device with this hardware_id is already enrolled.", code="device_exists"
            ) from exc
        record_event(
            EventKind.DEVICE_REGISTERED,
            actor=f"device:{device.id}",
            device_id=device.id,
            data={
                "how": kind,
                "hardware_id": hardware_id,
                "enrollment_token": token.prefix,
                "version": device.current_version,
            },
        )
    return device, secret


def authenticate_device(device_id: Any, secret: str) -> Device:
    failed = AuthenticationError("Unknown device or wrong secret.", code="authentication_failed")
    device = (
        Device.objects.filter(pk=device_id)
        .only("id", "device_type", "secret_hash", "credential_generation", "revoked_at")
        .first()
    )
    if device is None or not device.secret_hash or device.revoked_at is not None:
        raise failed
    if not hmac.compare_digest(device.secret_hash, hash_secret(secret)):
        raise failed
    return device


def issue_token(device: Device) -> tuple[str, int]:
    return issue_device_token(device.id, device.device_type, device.credential_generation)


def check_credentials(device: Device, generation: int) -> None:
    """Refuse a token of an older credential generation (reset or revoked) on a row already read.

    Free on every endpoint that reads the device row anyway: such a device is locked out at once
    there, and everywhere else when its token expires (DEVICE_JWT_LIFETIME).
    """
    check_credential_values(device.revoked_at, device.credential_generation, generation)


def check_credential_values(revoked_at: Any, stored_generation: int, generation: int) -> None:
    """check_credentials on the two columns, read by a query that joined them in."""
    if revoked_at is not None:
        raise AuthenticationError("This device has been revoked.", code="device_revoked")
    if stored_generation != generation:
        raise AuthenticationError(
            "The device's credentials were reset; enroll again.", code="credentials_reset"
        )


def check_credentials_current(device_id: Any, generation: int) -> None:
    """check_credentials for endpoints that do not read the device row: one indexed read."""
    row = (
        Device.objects.filter(pk=device_id)
        .values_list("credential_generation", "revoked_at")
        .first()
    )
    if row is None:
        raise AuthenticationError("This device no longer exists.", code="device_not_found")
    check_credential_values(row[1], row[0], generation)


def reset_credentials(device: Device, *, actor: Any = None) -> None:
    """Forget the device's secret so that it (or its replacement board) can enroll again."""
    with transaction.atomic():
        Device.objects.filter(pk=device.pk).update(
            secret_hash="", credential_generation=F("credential_generation") + 1
        )
        record_event(EventKind.DEVICE_CREDENTIALS_RESET, actor=actor_of(actor), device_id=device.id)
    device.refresh_from_db()


# --- Heartbeat --------------------------------------------------------------------------------


def mark_seen(device_id: Any, last_seen: datetime | None) -> bool:
    """Note that the device was seen now; False when ``last_seen`` (what the caller already
    read) is fresh enough, within DEVICE_LAST_SEEN_INTERVAL.

    With Redis, the sighting goes to ``ota_site.presence``'s buffer (often already there: the
    rate limiter records it on its way) and ``flush_last_seen`` writes it to the row. Without
    Redis, or while Redis fails, the row is written here, and the conditional UPDATE keeps several
    web workers from writing the same minute twice.
    """
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.DEVICE_LAST_SEEN_INTERVAL)
    if last_seen is not None and last_seen >= stale_before:
        return False
    if presence.recorded(device_id) or (presence.enabled() and presence.note(device_id)):
        return True
    Device.objects.filter(
        Q(last_seen__isnull=True) | Q(last_seen__lt=stale_before), pk=device_id
    ).update(last_seen=now)
    return True


# Sightings written per statement by flush_last_seen.
FLUSH_BATCH = 5000


def flush_last_seen() -> int:
    """Write the buffered sightings (``ota_site.presence``) to ``Device.last_seen``; how many.

    One UPDATE per FLUSH_BATCH devices, which never moves ``last_seen`` backwards (a late flush,
    or a heartbeat that wrote the row meanwhile). Safe to run twice at once and after a crash:
    the sightings are dropped from Redis only after every batch is written.
    """
    if not presence.enabled():
        return 0
    written = 0
    for batch in presence.batches(FLUSH_BATCH):
        rows: list[tuple[uuid.UUID, datetime]] = []
        for device_id, seen in batch.items():
            try:
                rows.append((uuid.UUID(device_id), datetime.fromtimestamp(seen, tz=UTC)))
            except (ValueError, OverflowError, OSError):
                continue  # not a device id or a time: nothing of ours wrote it
        if rows:
            _write_last_seen(rows)  # idempotent: a batch written twice changes nothing
            written += len(rows)
    presence.done()
    return written


def _write_last_seen(rows: list[tuple[uuid.UUID, datetime]]) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                """
                UPDATE devices_device AS d SET last_seen = v.seen
                FROM unnest(%s::uuid[], %s::timestamptz[]) AS v(id, seen)
                WHERE d.id = v.id AND (d.last_seen IS NULL OR d.last_seen < v.seen)
                """,
                [[row[0] for row in rows], [row[1] for row in rows]],
            )
        return
    for device_id, seen in rows:  # SQLite with Redis: a small installation
        Device.objects.filter(
            Q(last_seen__isnull=True) | Q(last_seen__lt=seen), pk=device_id
        ).update(last_seen=seen)


def record_heartbeat(
    device: Device, *, current_version: str | None = None, metadata: dict[str, Any] | None = None
) -> Device:
    """A device says it is alive, which version it runs and what it knows about itself.

    Costs one UPDATE when something changed or last_seen is due, else nothing.
    """
    now = timezone.now()
    changed: dict[str, Any] = {}
    if current_version is not None and current_version != device.current_version:
        device.set_current_version(current_version)
        changed["current_version"] = device.current_version
        changed["current_version_key"] = device.current_version_key
    if metadata:
        merged = {**device.metadata, **metadata}
        if merged != device.metadata:
            device.metadata = merged
            changed["metadata"] = merged
    stale_before = now - timedelta(seconds=settings.DEVICE_LAST_SEEN_INTERVAL)
    if changed or device.last_seen is None or device.last_seen < stale_before:
        device.last_seen = now
        changed["last_seen"] = now
    if not changed:
        return device
    with transaction.atomic():
        if "current_version" in changed or "metadata" in changed:
            changed["updated_at"] = now
        Device.objects.filter(pk=device.pk).update(**changed)
        if "current_version" in changed:
            record_event(
                EventKind.DEVICE_UPDATED,
                actor=f"device:{device.id}",
                device_id=device.id,
                data={"current_version": device.current_version},
            )
    return device


# --- Operator changes ---------------------------------------------------------------------------


def update_device(
    device: Device,
    *,
    actor: Any = None,
    group: DeviceGroup | object | None = ...,
    target_version: str | object | None = ...,
    metadata: dict[str, Any] | object = ...,
) -> Device:
    """Change what an operator may change. Arguments left out (``...``) stay as they are.

    A target_version may name a version that is not published yet: the device is offered it once
    a published firmware of its type has that version.
    """
    fields: list[str] = []
    data: dict[str, Any] = {}
    before = {
        "group": device.group_id,
        "target_version": device.target_version,
        "metadata": device.metadata,
    }
    if group is not ...:
        device.group = group  # type: ignore[assignment]
        fields.append("group")
        data["group"] = str(device.group_id) if device.group_id else None
    if target_version is not ... and (target_version or None) != device.target_version:
        # Only a change restamps the assignment: a PUT that repeats it must not retry a failed
        # update (retry_update does that on purpose).
        device.target_version = target_version or None  # type: ignore[assignment]
        device.target_set_at = timezone.now() if device.target_version else None
        fields += ["target_version", "target_set_at"]
        data["target_version"] = device.target_version
    if metadata is not ...:
        device.metadata = metadata
        fields.append("metadata")
        data["metadata"] = True
    if not fields:
        return device
    with transaction.atomic():
        device.save(update_fields=[*fields, "updated_at"])
        after = {"group": device.group_id, "target_version": device.target_version}
        record_event(
            EventKind.DEVICE_UPDATED,
            actor=actor_of(actor),
            device_id=device.id,
            data=data,
            changes=diff(before, {**after, "metadata": device.metadata}),
        )
    return device


def retry_update(device: Device, *, actor: Any = None) -> Device:
    """Offer the device its assigned version again after a failed or cancelled attempt.

    The device is pinned to the version it is assigned (its own or its group's), stamped now, so
    the next poll opens a new session.
    """
    version = device.effective_target_version
    if not version:
        raise StateConflict("The device has no assigned version to retry.", code="no_assignment")
    with transaction.atomic():
        device.target_version = version
        device.target_set_at = timezone.now()
        device.save(update_fields=["target_version", "target_set_at", "updated_at"])
        record_event(
            EventKind.DEVICE_UPDATED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"target_version": version, "retry": True},
        )
    return device


def delete_device(device: Device, *, actor: Any = None) -> None:
    with transaction.atomic():
        record_event(
            EventKind.DEVICE_DELETED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"hardware_id": device.hardware_id},
        )
        device.delete()


def create_group(
    *, name: str, description: str = "", target_version: str | None = None, actor: Any = None
) -> DeviceGroup:
    with transaction.atomic():
        try:
            with transaction.atomic():
                group = DeviceGroup.objects.create(
                    name=name,
                    description=description,
                    target_version=target_version or None,
                    target_set_at=timezone.now() if target_version else None,
                )
        except IntegrityError as exc:
            raise StateConflict(f"A group named {name!r} exists.", code="duplicate_name") from exc
        record_event(
            EventKind.GROUP_CHANGED,
            actor=actor_of(actor),
            data={"group": str(group.id), "created": name, "target_version": group.target_version},
            changes=created(
                {
                    "name": name,
                    "description": description,
                    "target_version": group.target_version,
                }
            ),
        )
    return group


def update_group(
    group: DeviceGroup,
    *,
    actor: Any = None,
    name: str | None = None,
    description: str | None = None,
    target_version: str | object | None = ...,
) -> DeviceGroup:
    """Rename or describe a group, or assign the version its members should run."""
    before = {
        "name": group.name,
        "description": group.description,
        "target_version": group.target_version,
    }
    if name is not None:
        group.name = name
    if description is not None:
        group.description = description
    if target_version is not ... and (target_version or None) != group.target_version:
        group.target_version = target_version or None  # type: ignore[assignment]
        group.target_set_at = timezone.now() if group.target_version else None
    with transaction.atomic():
        try:
            with transaction.atomic():
                group.save()
        except IntegrityError as exc:
            raise StateConflict(f"A group named {name!r} exists.", code="duplicate_name") from exc
        record_event(
            EventKind.GROUP_CHANGED,
            actor=actor_of(actor),
            data={
                "group": str(group.id),
                "name": group.name,
                "target_version": group.target_version,
            },
            changes=diff(
                before,
                {
                    "name": group.name,
                    "description": group.description,
                    "target_version": group.target_version,
                },
            ),
        )
    return group


def delete_group(group: DeviceGroup, *, actor: Any = None) -> None:
    """Delete a group; its devices stay, without a group.

    Refused while enrollment tokens enroll into it: devices in the field may still use them.
    """
    try:
        with transaction.atomic():
            record_event(
                EventKind.GROUP_CHANGED,
                actor=actor_of(actor),
                data={"group": str(group.id), "deleted": group.name},
            )
            group.delete()
    except ProtectedError as exc:
        raise StateConflict(
            "Enrollment tokens enroll devices into this group; delete them first.",
            code="group_in_use",
        ) from exc


def set_status(device_id: Any, status: DeviceStatus) -> None:
    Device.objects.filter(pk=device_id).exclude(status=status).update(
        status=status, updated_at=timezone.now()
    )
