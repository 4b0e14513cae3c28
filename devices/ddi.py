"""hawkBit DDI targets: devices that run SWUpdate, rauc-hawkbit-updater or Zephyr's client.

A DDI device is an ordinary Device (same rollouts, console and streams) with a DdiTarget row: its
target token (stored as a sha256, shown once), whether the server wants its attributes, and when
they last came. The protocol itself is rollouts.ddi; this module holds the device-side state
changes, which the API, the console, the admin and manage.py call alike.
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import DdiTarget, Device, DeviceGroup
from devices.services import AuthenticationError, hash_secret
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import actor_of, created, record_event
from ota_site.models import EventKind

ATTRIBUTE_MODES = ("merge", "replace", "remove")


class DeviceUnknown(ServiceError):
    status_code: int = 404
    code = "device_not_found"


# --- Target tokens ------------------------------------------------------------------------------


def issue_target_token(device: Device, *, actor: Any = None) -> str:
    """Give the device a new target token (replacing any earlier one); return it, shown once."""
    if device.revoked_at is not None:
        raise StateConflict("This device has been revoked.", code="device_revoked")
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        DdiTarget.objects.update_or_create(
            device=device,
            defaults={
                "token_hash": hash_secret(token),
                "token_prefix": token[:8],
                "token_created_at": timezone.now(),
            },
        )
        record_event(
            EventKind.DEVICE_TARGET_TOKEN_ISSUED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"token_prefix": token[:8]},
        )
    return token


def revoke_target_token(device: Device, *, actor: Any = None) -> bool:
    """Forget the device's target token; it then authenticates only by gateway token or mTLS."""
    with transaction.atomic():
        changed = (
            DdiTarget.objects.filter(device=device)
            .exclude(token_hash="")
            .update(token_hash="", token_prefix="", token_created_at=None)
        )
        if changed:
            record_event(
                EventKind.DEVICE_TARGET_TOKEN_REVOKED, actor=actor_of(actor), device_id=device.id
            )
    return bool(changed)


def provision_device(
    *,
    controller_id: str,
    device_type: str,
    current_version: str = "",
    group: DeviceGroup | None = None,
    metadata: dict[str, Any] | None = None,
    actor: Any = None,
) -> tuple[Device, str]:
    """Create a DDI device (controllerId = hardware_id) with a target token; return both."""
    with transaction.atomic():
        device = Device(
            hardware_id=controller_id,
            device_type=device_type,
            group=group,
            metadata=metadata or {},
        )
        if current_version:
            device.set_current_version(current_version)
        try:
            with transaction.atomic():
                device.save()
        except IntegrityError as exc:
            raise StateConflict(
                "A device with this controller id (hardware_id) already exists; give it a "
                "target token instead.",
                code="device_exists",
            ) from exc
        record_event(
            EventKind.DEVICE_REGISTERED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"how": "provisioned_ddi", "hardware_id": controller_id},
            changes=created(
                {
                    "hardware_id": controller_id,
                    "device_type": device_type,
                    "current_version": device.current_version,
                    "group": group.name if group else None,
                }
            ),
        )
        token = issue_target_token(device, actor=actor)
    return device, token


# --- Authentication (rollouts.ddi.auth reads the headers) ---------------------------------------


def _find(controller_id: str) -> Device | None:
    return (
        Device.objects.select_related("ddi")
        .filter(hardware_id=controller_id)
        .only(
            "id",
            "hardware_id",
            "device_type",
            "revoked_at",
            "last_seen",
            "metadata",
            "ddi__token_hash",
            "ddi__attributes_requested",
        )
        .first()
    )


def _usable(device: Device) -> Device:
    if device.revoked_at is not None:
        raise AuthenticationError("This device has been revoked.", code="device_revoked")
    return device


def by_target_token(controller_id: str, token: str) -> Device:
    """The device whose target token this is; 401 for an unknown device or a wrong token."""
    refused = AuthenticationError(
        "Unknown controller id or wrong target token.", code="authentication_failed"
    )
    device = _find(controller_id)
    target = getattr(device, "ddi", None) if device is not None else None
    if device is None or target is None or not target.token_hash:
        hmac.compare_digest(hash_secret(token), "0" * 64)  # the same work as a real check
        raise refused
    if not hmac.compare_digest(target.token_hash, hash_secret(token)):
        raise refused
    return _usable(device)


def gateway_token_valid(token: str) -> bool:
    expected = settings.DDI_GATEWAY_TOKEN
    return bool(expected) and hmac.compare_digest(expected.encode(), token.encode())


def by_trusted_identity(controller_id: str) -> Device:
    """The device a gateway token (or a verified certificate) speaks for, created if allowed.

    With DDI_AUTO_CREATE on, a controllerId the server has never seen becomes a device of
    DDI_DEFAULT_DEVICE_TYPE whose attributes are requested at once; otherwise it is a 404.
    """
    device = _find(controller_id)
    if device is not None:
        if getattr(device, "ddi", None) is None:
            DdiTarget.objects.get_or_create(device=device)
            device = _find(controller_id)
            assert device is not None
        return _usable(device)
    if not settings.DDI_AUTO_CREATE:
        raise DeviceUnknown(
            f"No device has the controller id {controller_id!r}, and DDI_AUTO_CREATE is off."
        )
    try:
        with transaction.atomic():
            device = Device.objects.create(
                hardware_id=controller_id,
                device_type=settings.DDI_DEFAULT_DEVICE_TYPE,
                last_seen=timezone.now(),
            )
            DdiTarget.objects.create(device=device)
            record_event(
                EventKind.DEVICE_REGISTERED,
                actor=f"device:{device.id}",
                device_id=device.id,
                data={"how": "ddi_first_poll", "hardware_id": controller_id},
            )
    except IntegrityError:
        pass  # a concurrent first poll of the same device created it
    found = _find(controller_id)
    if found is None:  # pragma: no cover - deleted between the two statements
        raise DeviceUnknown(f"No device has the controller id {controller_id!r}.")
    return _usable(found)


# --- Attributes (configData) --------------------------------------------------------------------


def update_attributes(device: Device, data: dict[str, Any], mode: str = "merge") -> Device:
    """Store the attributes a device sent (configData) in its metadata, and stop asking for them.

    merge adds and overwrites keys, replace makes them the whole metadata, remove deletes the keys
    named. Metadata stays within DEVICE_METADATA_MAX_BYTES, or the device gets a 400.
    """
    if mode not in ATTRIBUTE_MODES:
        raise ServiceError(f"mode must be one of {', '.join(ATTRIBUTE_MODES)}.", code="invalid")
    with transaction.atomic():
        locked = Device.objects.select_for_update().get(pk=device.pk)
        before = dict(locked.metadata)
        if mode == "replace":
            after = dict(data)
        elif mode == "remove":
            after = {key: value for key, value in before.items() if key not in data}
        else:
            after = {**before, **data}
        size = len(json.dumps(after).encode())
        if size > settings.DEVICE_METADATA_MAX_BYTES:
            raise ServiceError(
                f"The attributes make the device's metadata {size} bytes, over the "
                f"{settings.DEVICE_METADATA_MAX_BYTES}-byte limit.",
                code="metadata_too_large",
            )
        if after != before:
            locked.metadata = after
            locked.save(update_fields=["metadata", "updated_at"])
            record_event(
                EventKind.DEVICE_ATTRIBUTES_UPDATED,
                actor=f"device:{device.id}",
                device_id=device.id,
                data={"mode": mode},
                changes={"metadata": [before, after]},
            )
        DdiTarget.objects.filter(device=device).update(
            attributes_requested=False, attributes_updated_at=timezone.now()
        )
    device.metadata = after
    return device


def request_attributes(device: Device, *, actor: Any = None) -> None:
    """Ask the device to send its attributes again on its next poll."""
    with transaction.atomic():
        DdiTarget.objects.update_or_create(device=device, defaults={"attributes_requested": True})
        record_event(
            EventKind.DEVICE_UPDATED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"ddi": "attributes_requested"},
        )
