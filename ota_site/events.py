"""The one helper that records an event and, after commit, wakes the live streams.

Every service that changes state calls ``record_event`` inside its transaction. The row is the
truth (streams replay from it); the channel-layer message sent after commit only wakes consumers,
so a failed publish (Redis down) loses nothing and never fails the caller.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from ota_site.auth import DeviceIdentity
from ota_site.models import Event, EventKind

logger = logging.getLogger(__name__)

FLEET_GROUP = "fleet"


def device_group(device_id: uuid.UUID | str) -> str:
    return f"device.{device_id}"


def rollout_group(rollout_id: uuid.UUID | str) -> str:
    return f"rollout.{rollout_id}"


def record_event(
    kind: EventKind,
    *,
    actor: str = "system",
    device_id: uuid.UUID | None = None,
    firmware_id: uuid.UUID | None = None,
    rollout_id: uuid.UUID | None = None,
    session_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    event = Event.objects.create(
        kind=kind,
        actor=actor[:100],
        device_id=device_id,
        firmware_id=firmware_id,
        rollout_id=rollout_id,
        session_id=session_id,
        data=data or {},
    )
    transaction.on_commit(lambda: publish(event))
    return event


def publish(event: Event) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    groups = [FLEET_GROUP]
    if event.device_id:
        groups.append(device_group(event.device_id))
    if event.rollout_id:
        groups.append(rollout_group(event.rollout_id))
    message = {"type": "event.created", "event_id": event.id}
    try:
        for group in groups:
            async_to_sync(layer.group_send)(group, message)
    except Exception:  # the event row is the truth; streams catch up from it
        logger.warning("could not publish event %s", event.id, exc_info=True)


def actor_of(user: Any) -> str:
    """How an event names whoever acted: a user, a device or the system."""
    if user is None:
        return "system"
    if isinstance(user, DeviceIdentity):
        return str(user)
    username = getattr(user, "get_username", None)
    if callable(username):
        return f"user:{username()}"
    return str(user)
