"""The poll's answer cache: a device's last "nothing to install" answer, kept in Redis and dropped
by PostgreSQL itself when anything it depends on changes (docs/answer-cache.md).

Most polls of a fleet change nothing and get the same answer as last time. With ``REDIS_URL`` on
PostgreSQL and ``POLL_ANSWER_CACHE_SECONDS`` above 0, such an answer is stored per device, and the
device's next poll is answered from the rate limiter's round trip (``ota_site.ratelimit``, the
same Lua script), before URL resolution, DRF and the database. Only answers that offer nothing
are stored (``rollouts.api.views.UpdateCheckView`` marks them): an offer opens a session, and an
update in progress is watched by its reports.

Invalidation must not miss a change, whichever code or SQL makes it, so it comes from the
database: triggers (``rollouts.answer_cache``) ``NOTIFY`` the id of every device whose row or
sessions changed, and ``*`` for any change to groups, rollouts, stages or firmware. One
``Listener`` (a thread of Celery beat, or ``manage.py answer_cache listen``) receives them:

- a device's entry is overwritten by a tombstone with a fresh nonce;
- a global change moves the *epoch* to "settling": every entry is void at once, nothing is
  stored or served while the caches behind the poll (the live rollouts, published firmware, and
  their per-process copies) catch up, and then a new epoch starts.

An entry is served only under the epoch it was stored in, to a token of the credential
generation it was stored for, on the same path. A poll stores its answer with a compare-and-set
against what its lookup saw, so an answer computed from a row read before a change cannot land
after that change's tombstone. The epoch lives only while its listener renews it (every second,
``EPOCH_SECONDS``): a listener that stops, loses PostgreSQL or loses Redis takes the cache off
within seconds, and polls read the database again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, HttpResponse

from ota_site import ratelimit

logger = logging.getLogger(__name__)

CHANNEL = "ota_poll"  # the triggers' NOTIFY channel
GLOBAL = "*"
# The epoch expires this long after its listener's last renewal (renewed every second).
EPOCH_SECONDS = 5
# A tombstone outlives any poll that could still store over it (see STORE_WITHIN).
TOMBSTONE_SECONDS = 120
# A poll stores its answer only if it was computed within this long of its lookup.
STORE_WITHIN = 10.0
SETTLING = "-"
# A global change settles for CACHE_LOCAL_SECONDS plus this margin (seconds).
SETTLE_MARGIN = 1.0
# Headers the inner middleware and DRF give an update check's answer, which a cached answer
# skips (tests/test_answer_cache.py compares the two).
ANSWER_HEADERS = {"Allow": "GET, HEAD, OPTIONS"}

_vendor: str | None = None


def enabled() -> bool:
    """Whether polls look answers up: Redis, PostgreSQL (the triggers) and a lifetime above 0."""
    global _vendor
    if not settings.REDIS_URL or settings.POLL_ANSWER_CACHE_SECONDS <= 0:
        return False
    if _vendor is None:
        _vendor = connections["default"].vendor
    return _vendor == "postgresql"


def epoch_key() -> str:
    return f"{ratelimit.key_prefix()}:answers:epoch"


def entry_key(device: str) -> str:
    return f"{ratelimit.key_prefix()}:answers:d:{device}"


def _is_live(epoch: str | None) -> bool:
    return bool(epoch) and not epoch.endswith("." + SETTLING)  # type: ignore[union-attr]


@dataclass(frozen=True)
class Answer:
    route: str
    body: bytes


@dataclass
class Lookup:
    """What the limiter's script saw for one poll: the epoch and the device's entry (raw)."""

    device: str
    generation: int
    epoch: str | None
    entry: str | None
    at: float  # monotonic

    def answer(self, path: str) -> Answer | None:
        entry = self.entry
        if not _is_live(self.epoch) or not entry or not entry.startswith("E\n"):
            return None
        # E, epoch, generation, route, path, body (the body last: it is the only free text; the
        # path is percent-encoded, so none of the others holds a newline).
        parts = entry.split("\n", 5)
        if (
            len(parts) != 6
            or parts[1] != self.epoch
            or parts[2] != str(self.generation)
            or parts[4] != path
        ):
            return None
        return Answer(route=parts[3], body=parts[5].encode())


def lookup_keys(device: str) -> tuple[str, str]:
    return epoch_key(), entry_key(device)


def respond(request: HttpRequest, answer: Answer) -> HttpResponse:
    from ota_site.observability import ANSWER_CACHE, UPDATE_CHECKS

    request.ota_route = answer.route  # type: ignore[attr-defined]  # for the request metrics
    ANSWER_CACHE.labels("hit").inc()
    UPDATE_CHECKS.labels("api", "none").inc()  # only answers that offer nothing are kept
    response = HttpResponse(answer.body, content_type="application/json")
    response["Content-Length"] = str(len(answer.body))  # as CommonMiddleware sets it
    for name, value in ANSWER_HEADERS.items():
        response[name] = value
    if settings.X_FRAME_OPTIONS:
        response["X-Frame-Options"] = settings.X_FRAME_OPTIONS
    return response


def mark(response: HttpResponse) -> HttpResponse:
    """Let the middleware keep this answer (a 200 that offers nothing) for the device's next
    polls."""
    response.ota_answer = True  # type: ignore[attr-defined]
    return response


# Set the entry only if the epoch is still live and the one the lookup saw, and the entry is still
# what the lookup saw ('' for none): a tombstone written since then wins.
_STORE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""


def store(request: HttpRequest, lookup: Lookup, response: HttpResponse) -> bool:
    """Keep ``response``'s answer for the device, unless anything changed since the lookup."""
    from ota_site.observability import ANSWER_CACHE

    if not _is_live(lookup.epoch) or time.monotonic() - lookup.at > STORE_WITHIN:
        return False
    match = getattr(request, "resolver_match", None)
    route = (match.view_name if match is not None else "") or "unmatched"
    body = response.content.decode()
    entry = "\n".join(
        ["E", str(lookup.epoch), str(lookup.generation), route, request.get_full_path(), body]
    )
    client = ratelimit.redis_client(settings.REDIS_URL)
    try:
        stored = bool(
            client.register_script(_STORE_SCRIPT)(
                keys=lookup_keys(lookup.device),
                args=[
                    str(lookup.epoch),
                    lookup.entry or "",
                    entry,
                    settings.POLL_ANSWER_CACHE_SECONDS,
                ],
            )
        )
    except redis.RedisError:
        logger.debug("could not store a poll answer", exc_info=True)
        return False
    ANSWER_CACHE.labels("stored" if stored else "refused").inc()
    return stored


# --- The listener -----------------------------------------------------------------------------

# Take or renew the epoch (KEYS[1]) for this listener (ARGV[1], its id): renew only one's own;
# take it only when nobody holds it. Returns the value now held, or false.
_CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '.' then
  return false
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
if not current then return false end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return current
"""
# Drop the epoch if this listener (ARGV[1]) holds it.
_RELEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '.' then
  redis.call('DEL', KEYS[1])
end
return 0
"""


class Listener:
    """Receive the triggers' notifications and keep the cache true to the database.

    ``forget(payloads)`` drops the caches a global change may have made stale (the live rollouts,
    published firmware); it gets the global payloads (``*`` or a firmware's JSON).
    """

    def __init__(self, forget: Callable[[list[str]], None]) -> None:
        self.forget = forget
        self.id = uuid.uuid4().hex[:16]
        self.stopping = threading.Event()
        self.client = redis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2
        )
        self.claim = self.client.register_script(_CLAIM_SCRIPT)
        self.release_script = self.client.register_script(_RELEASE_SCRIPT)
        # Long enough for every process's copies of the cached rollouts and firmware to expire.
        self.settle = max(settings.CACHE_LOCAL_SECONDS, 0.0) + SETTLE_MARGIN
        self.epoch: str | None = None
        self.settled_at = 0.0  # monotonic: when the epoch may go live

    def run(self) -> None:
        """Until ``stop()``: listen, and after any failure release the epoch and start over."""
        while not self.stopping.is_set():
            try:
                self._listen()
            except Standby:
                pass
            except Exception:
                logger.warning("poll answer cache listener failed; restarting", exc_info=True)
            self.release()
            self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()

    def release(self) -> None:
        self.epoch = None
        with contextlib.suppress(redis.RedisError):  # else it expires within EPOCH_SECONDS
            self.release_script(keys=[epoch_key()], args=[self.id])

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(autocommit=True, **connection_params()) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            # Only now may an epoch start: earlier notifications were not heard.
            self._settle([GLOBAL])
            last_renewal = 0.0
            while not self.stopping.is_set():
                payloads = [n.payload for n in conn.notifies(timeout=0.2, stop_after=5000)]
                if payloads:
                    self.apply(payloads)
                now = time.monotonic()
                settling = self.epoch is not None and self.epoch.endswith("." + SETTLING)
                if settling and now >= self.settled_at:
                    self.forget([GLOBAL])  # again: a fill that raced the first forget
                    self._set_epoch(f"{self.id}.{uuid.uuid4().hex[:16]}")
                    last_renewal = now
                if now - last_renewal >= 1.0:
                    self._renew()
                    last_renewal = now

    def apply(self, payloads: Iterable[str]) -> None:
        devices = set()
        changes = []
        for payload in payloads:
            if payload.startswith("d:"):
                devices.add(payload[2:])
            else:
                changes.append(payload)
        if changes:
            self._settle(changes)
        if devices:
            with self.client.pipeline(transaction=False) as pipe:
                for device in devices:
                    pipe.set(entry_key(device), "T\n" + uuid.uuid4().hex[:16], ex=TOMBSTONE_SECONDS)
                pipe.execute()

    def _settle(self, changes: list[str]) -> None:
        self.forget(changes)
        self._set_epoch(f"{self.id}.{SETTLING}")
        self.settled_at = time.monotonic() + self.settle

    def _set_epoch(self, value: str) -> None:
        held = self.claim(keys=[epoch_key()], args=[self.id, value, EPOCH_SECONDS])
        if held is None:
            # Another listener holds the epoch: stand by until it lets go.
            raise Standby
        self.epoch = value

    def _renew(self) -> None:
        if self.epoch is None:
            return
        held = self.claim(keys=[epoch_key()], args=[self.id, "", EPOCH_SECONDS])
        if held is None or held.decode() != self.epoch:
            raise Standby


def connection_params() -> dict[str, Any]:
    """Django's connection settings for a plain psycopg connection of our own (LISTEN)."""
    params = dict(connections["default"].get_connection_params())
    for name in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(name, None)
    return params


class Standby(Exception):
    """Another listener holds the epoch (or this one lost it): start over and wait."""


def status() -> dict[str, Any]:
    """For ``manage.py answer_cache status`` and /health/ready: is a listener keeping an epoch?"""
    if not enabled():
        return {"enabled": False, "live": False, "epoch": None}
    try:
        raw = ratelimit.redis_client(settings.REDIS_URL).get(epoch_key())
    except redis.RedisError as exc:
        return {"enabled": True, "live": False, "epoch": None, "error": str(exc)}
    epoch = raw.decode() if isinstance(raw, bytes) else raw
    return {"enabled": True, "live": _is_live(epoch), "epoch": epoch}


def firmware_payload(raw: str) -> dict[str, Any] | None:
    """A firmware change's payload ``{"id", "device_type", "version_key"}``, or None."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
