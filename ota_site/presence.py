"""When each device was last seen, buffered in Redis instead of written to its row per request.

A fleet polling every 15 minutes would otherwise write one UPDATE (and a commit) per poll. With
``REDIS_URL`` set, a device request only records ``device id -> time`` in one Redis hash, and a
Celery beat task (``devices.tasks.flush_last_seen``, every ``DEVICE_LAST_SEEN_FLUSH_INTERVAL``)
writes the whole hash to ``Device.last_seen`` in one statement. The rate limiter records it in
the round trip it makes anyway (``ota_site.ratelimit``, the same Lua script), so a poll's
``last_seen`` costs no round trip of its own (DESIGN.md "Performance model").

Without Redis (the embedded mode), or while Redis fails, ``devices.services.mark_seen`` writes
the row directly, at most once per ``DEVICE_LAST_SEEN_INTERVAL``. A Redis that loses the hash
loses at most one flush interval of sightings; the next request of each device records it again.

Taking the hash is crash-safe: ``batches`` renames it aside (new sightings go to a fresh hash)
and reads it in pieces; only ``done``, after the database writes, deletes it, and a flush that
died in between is taken again by the next one (the UPDATE never moves ``last_seen`` backwards).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from django.conf import settings

from ota_site import ratelimit

logger = logging.getLogger(__name__)

# The device whose sighting this request has already recorded (the rate limiter's script).
_noted: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ota_presence_noted", default=None
)

# Rename the hash aside unless an earlier flush left one there; whether anything is aside.
_SET_ASIDE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
end
return redis.call('EXISTS', KEYS[2])
"""
# The flush reads the hash in pieces of about this many sightings: after a long worker outage it
# may hold the whole fleet.
TAKE_BATCH = 5000
# The flush is no request: it may wait for Redis longer than the per-request client does.
FLUSH_TIMEOUT = 30.0


def enabled() -> bool:
    return bool(settings.REDIS_URL) and settings.DEVICE_LAST_SEEN_BUFFER


def key() -> str:
    """The hash of sightings, under the cache's prefix (installations sharing a Redis, tests)."""
    return f"{ratelimit.key_prefix()}:presence:seen"


def _aside() -> str:
    return f"{key()}:flushing"


def _client() -> redis.Redis:
    return ratelimit.redis_client(settings.REDIS_URL)


@contextmanager
def noted(device_id: str | None) -> Iterator[None]:
    """Within the block, ``recorded(device_id)`` is true (the middleware, around the view)."""
    token = _noted.set(device_id)
    try:
        yield
    finally:
        _noted.reset(token)


def recorded(device_id: Any) -> bool:
    noted_id = _noted.get()
    return noted_id is not None and noted_id == str(device_id)


def note(device_id: Any) -> bool:
    """Record a sighting now (one HSET); False when it could not be buffered."""
    try:
        _client().hset(key(), str(device_id), f"{time.time():.3f}")
    except redis.RedisError as exc:
        logger.warning("device sighting not buffered (%s); writing it directly", exc)
        return False
    return True


def batches(size: int = TAKE_BATCH) -> Iterator[dict[str, float]]:
    """The sightings to write, device id -> epoch seconds, in pieces (the hash is set aside
    first, so sightings recorded meanwhile wait for the next flush). Call ``done()`` once all are
    written; an entry that is not a sighting is skipped (and dropped by ``done``)."""
    client = _flush_client()
    if not client.eval(_SET_ASIDE_SCRIPT, 2, key(), _aside()):
        return
    batch: dict[str, float] = {}
    for device_id, seen in client.hscan_iter(_aside(), count=size):
        try:
            batch[device_id.decode()] = float(seen)
        except (UnicodeDecodeError, ValueError):
            continue
        if len(batch) >= size:
            yield batch
            batch = {}
    if batch:
        yield batch


def take() -> dict[str, float]:
    """All the sightings of ``batches`` at once (small hashes: tests, inspection)."""
    taken: dict[str, float] = {}
    for batch in batches():
        taken.update(batch)
    return taken


def done() -> None:
    _flush_client().delete(_aside())


_flush_clients: dict[str, redis.Redis] = {}


def _flush_client() -> redis.Redis:
    url = settings.REDIS_URL
    client = _flush_clients.get(url)
    if client is None:
        client = _flush_clients[url] = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=FLUSH_TIMEOUT
        )
    return client
