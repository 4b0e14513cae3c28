"""The one helper that records an event and, after commit, wakes the live streams.

Every service that changes state calls ``record_event`` inside its transaction. The row is the
truth (streams replay from it); the channel-layer message sent after commit only wakes consumers,
so a failed publish (Redis down) loses nothing and never fails the caller.

The row is also the audit trail: ``record_event`` adds the actor's kind (from the actor string),
the client address and request id of the HTTP request being served (``ota_site.context``), and
the ``changes`` the service passes as ``{field: [before, after]}`` (``diff`` and ``created`` build
them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, transaction

from ota_site import context
from ota_site.auth import DeviceIdentity
from ota_site.models import ActorKind, Event, EventKind

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
    changes: Mapping[str, Any] | None = None,
) -> Event:
    request = context.current()
    event = Event.objects.create(
        kind=kind,
        actor=actor[:100],
        actor_kind=actor_kind_of(actor),
        ip=request.ip if request else None,
        request_id=request.request_id if request else "",
        device_id=device_id,
        firmware_id=firmware_id,
        rollout_id=rollout_id,
        session_id=session_id,
        data=data or {},
        changes=jsonable(dict(changes)) if changes else {},
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
    if isinstance(layer, InMemoryChannelLayer):
        # The embedded mode's layer lives in this process and its receivers' loop: send inline.
        try:
            async_to_sync(_send_to_groups)(layer, groups, message)
        except Exception:  # the event row is the truth; streams catch up from it
            logger.warning("could not publish event %s", event.id, exc_info=True)
        return
    _publisher().send(layer, groups, message)


async def _send_to_groups(layer: Any, groups: list[str], message: dict[str, Any]) -> None:
    for group in groups:
        await layer.group_send(group, message)


class _Publisher:
    """Sends stream wake-ups from one event loop of its own, in a daemon thread.

    From a sync worker, ``async_to_sync`` would start a new event loop per publish, and the Redis
    channel layer keeps its connections per loop: every event opened a new Redis connection,
    which was most of a device status report's cost (docs/performance.md). This loop keeps its
    connections, and the caller does not wait: a wake-up is a hint (consumers replay from the
    rows and poll on a timer too), so one lost at shutdown or while Redis is away costs nothing.
    At most MAX_PENDING wait; more are dropped while Redis is slow.
    """

    MAX_PENDING = 1000

    def __init__(self) -> None:
        self.pending = 0
        self.lock = threading.Lock()  # pending is changed by the caller's and the loop's threads
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="ota-publish", daemon=True).start()

    def send(self, layer: Any, groups: list[str], message: dict[str, Any]) -> None:
        with self.lock:
            if self.pending >= self.MAX_PENDING:
                logger.warning("stream wake-up dropped: %d still wait for Redis", self.pending)
                return
            self.pending += 1
        future = asyncio.run_coroutine_threadsafe(
            _send_to_groups(layer, groups, message), self.loop
        )
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self.lock:
            self.pending -= 1
        if not future.cancelled() and future.exception() is not None:
            logger.warning("could not publish a stream wake-up: %s", future.exception())


_publishers: dict[int, _Publisher] = {}
_publisher_lock = threading.Lock()


def _publisher() -> _Publisher:
    """This process's publisher (a forked child makes its own: threads do not survive a fork)."""
    pid = os.getpid()
    publisher = _publishers.get(pid)
    if publisher is None:
        with _publisher_lock:
            publisher = _publishers.get(pid)
            if publisher is None:
                publisher = _publishers[pid] = _Publisher()
    return publisher


def actor_of(user: Any) -> str:
    """How an event names whoever acted: ``user:<name>``, ``key:<prefix>`` (an API key),
    ``device:<id>``, or the system (a command's or a task's own name)."""
    if user is None:
        return "system"
    if isinstance(user, DeviceIdentity):
        return str(user)
    audit_name = getattr(user, "audit_name", None)  # API keys (ota_site.apikeys.ApiKeyUser)
    if isinstance(audit_name, str):
        return audit_name
    username = getattr(user, "get_username", None)
    if callable(username):
        return f"user:{username()}"
    return str(user)


_ACTOR_KINDS = {"user": ActorKind.USER, "key": ActorKind.API_KEY, "device": ActorKind.DEVICE}


def actor_kind_of(actor: str) -> ActorKind:
    """The kind named by an ``actor_of`` string; anything else (commands, tasks) is the system."""
    prefix, sep, _ = actor.partition(":")
    return _ACTOR_KINDS.get(prefix, ActorKind.SYSTEM) if sep else ActorKind.SYSTEM


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON: rows by primary key, UUIDs and datetimes as strings."""
    if isinstance(value, models.Model):
        return str(value.pk)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, after]}`` for the fields whose values differ (compared as JSON)."""
    old, new = jsonable(dict(before)), jsonable(dict(after))
    return {name: [old.get(name), new.get(name)] for name in new if old.get(name) != new.get(name)}


def created(fields: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The changes of a creation: every field from nothing to its value."""
    return {name: [None, value] for name, value in jsonable(dict(fields)).items()}
