"""The live streams: WS /api/v1/stream/devices/<id>, /rollouts/<id> and /fleet (daphne).

The event rows (``ota_site.models.Event``, append-only, ordered by id) are the truth. The
channel-layer message that ``ota_site.events.publish`` sends after commit only *wakes* a consumer,
which then reads the rows after the last id it sent and sends ``Event.as_message()`` for each, so
messages arrive in order, none lost and none twice, across reconnects too (``?after=<id>``). A
timer wakes every consumer as well (``STREAM_POLL_INTERVAL``): in the embedded mode the in-memory
channel layer does not cross processes (gunicorn and Celery publish, daphne holds the sockets),
so the timer is what delivers there, every second; with Redis it is a slow safety net.

Ids are handed out when a row is inserted, not when it commits: on PostgreSQL, event 11 can be
visible while event 10 is still in an open transaction. Sending 11 and remembering "after 11"
would lose 10, so every stream reads only up to the *horizon* (``EventHorizon``): the highest id
below which every id is committed, or was given up after ``STREAM_GAP_GRACE`` seconds (the id of
a rolled-back insert never appears).

Close codes of refused connections (after accepting, since only an open socket carries a code):
4400 malformed request (``after``), 4401 no valid credential, 4403 no role (devices, users without
a role), 4404 unknown device, rollout or stream path. A browser from a foreign origin is refused
at the handshake (HTTP 403, ``ota_site.ws_auth``). 1011: the server failed; the client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Count, Q
from django.utils import timezone

from devices.api.serializers import DeviceSerializer
from devices.models import Device
from ota_site.apikeys import ApiKeyUser
from ota_site.events import FLEET_GROUP, device_group, rollout_group
from ota_site.models import ApiKey, Event
from ota_site.permissions import Role, role_of
from rollouts.api.serializers import SessionSerializer
from rollouts.evaluation import rollout_metrics
from rollouts.models import LIVE_ROLLOUT_STATUSES, OPEN_STATUSES, Rollout, UpdateSession

logger = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_SERVER_ERROR = 1011

# Event rows sent per read: a client resuming far behind gets its backlog in bounded pieces.
BATCH = 200
# Recent events listed in a fleet snapshot or update (the counts cover all of them).
FLEET_LATEST = 20
# While the horizon waits on an uncommitted id, how often to look again.
GAP_RECHECK = 0.2
# The horizon's first scan starts this many ids below the newest row, to find open gaps there.
HORIZON_WINDOW = 1000
HORIZON_SCAN_LIMIT = 5000


class EventHorizon:
    """The highest event id H such that every id <= H is committed, or given up on.

    One per process, shared by its consumers: a wake-up for event N needs H >= N, and one scan
    of the ids above H (a primary-key range read) serves every consumer that waits on it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.safe: int | None = None
        self.pending = False
        self.checked_at = 0.0
        # First id of each hole above ``safe`` -> when it was first seen (time.monotonic()).
        self.holes: dict[int, float] = {}

    async def current(self, wanted: int | None = None, *, force: bool = False) -> tuple[int, bool]:
        """(H, whether H waits on an uncommitted id); rescans unless H already covers
        ``wanted`` (the id that woke the caller) or, for a timer, was read just now. A new
        connection forces a scan: wake-ups sent before it joined its groups never reach it."""
        if self.safe is not None and not force:
            fresh = time.monotonic() - self.checked_at < GAP_RECHECK / 2
            if (wanted is not None and self.safe >= wanted) or (wanted is None and fresh):
                # Also while a hole is pending: consumers rechecking it share one scan.
                return self.safe, self.pending
        await database_sync_to_async(self.scan)()
        assert self.safe is not None
        return self.safe, self.pending

    def scan(self) -> None:
        grace = settings.STREAM_GAP_GRACE
        first_scan = self.safe is None
        if self.safe is None:
            # Start just below the oldest of the newest rows: holes among them are judged, and
            # whatever lies below was settled long ago.
            window = Event.objects.order_by("-id").values_list("id", flat=True)[:HORIZON_WINDOW]
            self.safe = min(window, default=1) - 1
        now, wall = time.monotonic(), timezone.now()
        pending = False
        while not pending:
            rows = list(
                Event.objects.filter(id__gt=self.safe)
                .order_by("id")
                .values_list("id", "created_at")[:HORIZON_SCAN_LIMIT]
            )
            for event_id, created_at in rows:
                start = self.safe + 1
                if event_id > start:  # ids start..event_id-1 are not visible (yet)
                    if first_scan:
                        # The hole is at least as old as the row above it: after a restart, old
                        # holes (rolled-back inserts) need not be waited for again.
                        age = max(0.0, (wall - created_at).total_seconds())
                        self.holes.setdefault(start, now - age)
                    seen = self.holes.setdefault(start, now)
                    if now - seen < grace:
                        pending = True
                        break
                    logger.info("stream horizon: gave up on event ids %s-%s", start, event_id - 1)
                self.safe = event_id
            if len(rows) < HORIZON_SCAN_LIMIT:
                break
        self.holes = {start: seen for start, seen in self.holes.items() if start > self.safe}
        self.pending = pending
        self.checked_at = now


HORIZON = EventHorizon()


class _FleetCounts:
    """Fleet counts for snapshots and updates, computed at most once per
    ``STREAM_FLEET_COUNTS_TTL`` per process however many fleet streams are open."""

    def __init__(self) -> None:
        self.value: dict[str, Any] | None = None
        self.at = 0.0

    def get(self) -> dict[str, Any]:
        now = time.monotonic()
        if self.value is None or now - self.at >= settings.STREAM_FLEET_COUNTS_TTL:
            self.value = fleet_counts()
            self.at = now
        return self.value


FLEET_COUNTS = _FleetCounts()


def fleet_counts() -> dict[str, Any]:
    """Devices by status and by version, online now, and the live rollouts: set-based counts."""
    online_since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
    devices = Device.objects.order_by()
    totals = devices.aggregate(
        total=Count("id"), online=Count("id", filter=Q(last_seen__gte=online_since))
    )
    by_status = {
        row["status"]: row["n"] for row in devices.values("status").annotate(n=Count("id"))
    }
    versions = [
        {"device_type": row["device_type"], "version": row["current_version"], "devices": row["n"]}
        for row in devices.values("device_type", "current_version")
        .annotate(n=Count("id"))
        .order_by("-n", "device_type", "current_version")[:50]
    ]
    rollouts = [
        {
            "id": str(rollout.id),
            "name": rollout.name,
            "status": rollout.status,
            "version": rollout.firmware.version,
            "device_type": rollout.device_type,
            "current_stage": rollout.current_stage,
        }
        for rollout in Rollout.objects.filter(status__in=LIVE_ROLLOUT_STATUSES)
        .select_related("firmware")
        .order_by("-created_at")[:50]
    ]
    return {
        "devices": totals["total"],
        "online": totals["online"],
        "offline": totals["total"] - totals["online"],
        "by_status": by_status,
        "versions": versions,
        "rollouts": rollouts,
    }


def _messages(events: Any) -> list[dict[str, Any]]:
    return [event.as_message() for event in events]


class EventStream(AsyncJsonWebsocketConsumer):
    """One stream: auth and role check on connect, a snapshot or a resume, then live events.

    Subclasses name their subject (``find``), their groups, their events (``event_filter``) and
    their ``snapshot``. Everything a stream sends comes from ``catch_up``, whether a channel-layer
    message or the timer woke it.
    """

    stream = ""
    # Least seconds between two messages (the fleet stream aggregates); 0 sends at once.
    min_interval = 0.0

    async def connect(self) -> None:
        self.cursor = 0
        self.not_before = 0.0
        self.wanted: int | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        refusal = await self.refusal()
        if refusal:
            await self.accept()
            await self.close(code=refusal)
            return
        after = self.after()
        if after == -1:
            await self.accept()
            await self.close(code=CLOSE_BAD_REQUEST)
            return
        # Join before reading anything: a wake-up sent while the snapshot is read is not missed.
        self.groups = [*self.stream_groups()]
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        if after is None:
            self.cursor, _ = await HORIZON.current(force=True)
            snapshot = await database_sync_to_async(self.snapshot)()
            await self.send_json(
                {"type": "snapshot", "stream": self.stream, "id": self.cursor, **snapshot}
            )
        else:
            self.cursor = after
        self.task = asyncio.ensure_future(self.run())

    async def disconnect(self, code: int) -> None:
        if self.task is not None:
            self.task.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Clients only listen; whatever they send is ignored."""

    async def event_created(self, message: dict[str, Any]) -> None:
        """The channel-layer wake-up (``ota_site.events.publish``)."""
        event_id = message.get("event_id")
        if isinstance(event_id, int):
            self.wanted = max(self.wanted or 0, event_id)
        self.wake.set()

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, cls=DjangoJSONEncoder)

    # --- who may listen -------------------------------------------------------------------------

    async def refusal(self) -> int | None:
        if self.scope.get("auth_error"):
            return CLOSE_UNAUTHENTICATED
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return CLOSE_UNAUTHENTICATED
        role = await database_sync_to_async(role_of)(user)
        if role is None or role < Role.VIEWER:
            return CLOSE_FORBIDDEN
        if not await database_sync_to_async(self.find)():
            return CLOSE_NOT_FOUND
        return None

    def still_allowed(self) -> int | None:
        """Re-check, while the stream is open, that its listener may still listen: an API key
        revoked or expired, a user deactivated or left without a role closes the stream (the
        close code, or None to go on). Runs every STREAM_RECHECK_INTERVAL seconds."""
        user = self.scope.get("user")
        if isinstance(user, ApiKeyUser):
            key = ApiKey.objects.filter(pk=user.key_id).first()
            return None if key is not None and key.state == "active" else CLOSE_UNAUTHENTICATED
        user_id = getattr(user, "pk", None)
        if user_id is None:
            return CLOSE_UNAUTHENTICATED
        person = get_user_model().objects.filter(pk=user_id, is_active=True).first()
        if person is None:
            return CLOSE_UNAUTHENTICATED
        role = role_of(person)
        return None if role is not None and role >= Role.VIEWER else CLOSE_FORBIDDEN

    def after(self) -> int | None:
        """``?after=<event id>``: None if absent, -1 if malformed."""
        try:
            query = parse_qs(bytes(self.scope.get("query_string", b"")).decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return -1
        values = query.get("after")
        if not values:
            return None
        value = values[-1]
        if not value.isdigit() or len(value) > 18:
            return -1
        return int(value)

    def find(self) -> bool:
        """Whether the stream's subject exists (loads it)."""
        return True

    def stream_groups(self) -> list[str]:
        return []

    def event_filter(self) -> Q:
        return Q()

    def snapshot(self) -> dict[str, Any]:
        return {}

    # --- delivery -------------------------------------------------------------------------------

    async def run(self) -> None:
        first = True  # a fresh look at once: wake-ups sent before this stream joined are lost
        recheck_at = time.monotonic() + settings.STREAM_RECHECK_INTERVAL
        try:
            while True:
                if time.monotonic() >= recheck_at:
                    code = await database_sync_to_async(self.still_allowed)()
                    if code is not None:
                        await self.close(code=code)
                        return
                    recheck_at = time.monotonic() + settings.STREAM_RECHECK_INTERVAL
                # Aggregating streams wait out their interval; what arrives meanwhile goes into
                # the next message.
                delay = self.not_before - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.wake.clear()
                wanted, self.wanted = self.wanted, None
                pending = await self.catch_up(wanted, force=first)
                first = False
                interval = GAP_RECHECK if pending else settings.STREAM_POLL_INTERVAL
                interval = min(interval, max(recheck_at - time.monotonic(), 0.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("stream %s failed", self.stream)
            await self.close(code=CLOSE_SERVER_ERROR)

    async def catch_up(self, wanted: int | None, *, force: bool = False) -> bool:
        """Send what happened after ``self.cursor`` up to the horizon; True if the horizon is
        held back by an uncommitted id (look again soon)."""
        horizon, pending = await HORIZON.current(wanted, force=force)
        while self.cursor < horizon:
            messages, cursor = await database_sync_to_async(self.read)(self.cursor, horizon)
            for message in messages:
                await self.send_json(message)
            if messages and self.min_interval:
                self.not_before = time.monotonic() + self.min_interval
            self.cursor = cursor
        return pending

    def read(self, after: int, upto: int) -> tuple[list[dict[str, Any]], int]:
        rows = list(
            Event.objects.filter(self.event_filter(), id__gt=after, id__lte=upto).order_by("id")[
                :BATCH
            ]
        )
        cursor = rows[-1].id if len(rows) == BATCH else upto
        return _messages(rows), cursor


class DeviceStream(EventStream):
    """A device's record and open session, then every event about it."""

    stream = "device"

    def find(self) -> bool:
        self.device_id: uuid.UUID = self.scope["url_route"]["kwargs"]["device_id"]
        return Device.objects.filter(pk=self.device_id).exists()

    def stream_groups(self) -> list[str]:
        return [device_group(self.device_id)]

    def event_filter(self) -> Q:
        return Q(device_id=self.device_id)  # event_device_idx (device_id, id)

    def snapshot(self) -> dict[str, Any]:
        device = Device.objects.select_related("group", "ddi").filter(pk=self.device_id).first()
        if device is None:
            return {"device": None, "session": None}
        session = (
            UpdateSession.objects.select_related("firmware")
            .filter(device=device, status__in=OPEN_STATUSES)
            .first()
        )
        return {
            "device": DeviceSerializer(device).data,
            "session": SessionSerializer(session).data if session is not None else None,
        }


class RolloutStream(EventStream):
    """A rollout's metrics (``rollout_metrics``), then every event about it."""

    stream = "rollout"

    def find(self) -> bool:
        self.rollout_id: uuid.UUID = self.scope["url_route"]["kwargs"]["rollout_id"]
        return Rollout.objects.filter(pk=self.rollout_id).exists()

    def stream_groups(self) -> list[str]:
        return [rollout_group(self.rollout_id)]

    def event_filter(self) -> Q:
        return Q(rollout_id=self.rollout_id)  # event_rollout_idx (rollout_id, id)

    def snapshot(self) -> dict[str, Any]:
        rollout = Rollout.objects.filter(pk=self.rollout_id).first()
        if rollout is None:
            return {"rollout": None}
        return {"rollout": {"name": rollout.name, **rollout_metrics(rollout)}}


class FleetStream(EventStream):
    """Fleet counts, then at most one ``fleet.update`` per ``STREAM_FLEET_INTERVAL``: the counts
    and a summary of the events since the last update, however many devices report."""

    stream = "fleet"

    @property
    def min_interval(self) -> float:  # type: ignore[override]
        return float(settings.STREAM_FLEET_INTERVAL)

    def stream_groups(self) -> list[str]:
        return [FLEET_GROUP]

    def snapshot(self) -> dict[str, Any]:
        latest = Event.objects.filter(id__lte=self.cursor).order_by("-id")[:FLEET_LATEST]
        return {"fleet": FLEET_COUNTS.get(), "latest": _messages(reversed(list(latest)))}

    def read(self, after: int, upto: int) -> tuple[list[dict[str, Any]], int]:
        events = Event.objects.filter(id__gt=after, id__lte=upto)
        # A primary-key range, however long the client was away: counted, never loaded whole.
        by_type = {
            row["kind"]: row["n"]
            for row in events.order_by().values("kind").annotate(n=Count("id"))
        }
        if not by_type:
            return [], upto
        latest = list(events.order_by("-id")[:FLEET_LATEST])
        message = {
            "type": "fleet.update",
            "id": upto,
            "after": after,
            "fleet": FLEET_COUNTS.get(),
            "events": {
                "count": sum(by_type.values()),
                "by_type": by_type,
                "latest": _messages(reversed(latest)),
            },
        }
        return [message], upto


class UnknownStream(AsyncJsonWebsocketConsumer):
    """Any other path under the WebSocket router: refused with 4404, never an exception."""

    async def connect(self) -> None:
        await self.accept()
        await self.close(code=CLOSE_NOT_FOUND)
