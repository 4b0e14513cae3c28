"""Rate limits: per device and per client address, 429 with Retry-After (docs/security.md).

Every request under ``/api/`` and ``/tuf/`` counts against two buckets: its client address
(``ota_site.proxies.client_ip``, so X-Forwarded-For only from ``TRUSTED_PROXIES``) and, when it
carries a valid device access token, that device. A hawkBit DDI device's requests
(``/{tenant}/controller/v1/...``) count by address. ``RATE_LIMIT_DEVICE`` (default ``10/min``) and
``RATE_LIMIT_IP`` (``100/min``) set the limits as ``N/sec``, ``N/min`` or ``N/hour``; ``0`` or
``off`` turns one off. People (sessions) and API keys carry no device token, so only the address
limit applies to them.

Each bucket is a fixed window that starts with the bucket's first request and lasts the limit's
period. With ``REDIS_URL`` both buckets are counted in one round trip, by an atomic Lua script
(INCR, PTTL and, on a window's first hit, EXPIRE per bucket: the poll is the hot path, see DESIGN.md
"Performance model"); without Redis (the
embedded mode, several gunicorn workers) in a SQLite file under ``OTA_VAR_DIR`` that every process
shares. When Redis cannot be reached the limiter fails open: requests are served and a warning is
logged at most once a minute. An outage of a counter must not take the fleet's update path down,
and nginx's ``limit_req`` stays the hard outer limit in production.

This module is imported by settings.py (for ``parse_rate``), so it must not import DRF or our apps
at module level.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from redis.backoff import NoBackoff
from redis.retry import Retry

from ota_site import proxies

logger = logging.getLogger(__name__)

# Paths that count. Every device-facing route lives under one of these; a new one must be added
# here (the admin, /health and static files are deliberately not limited).
LIMITED_PREFIXES = ("/api/", "/tuf/")
# hawkBit DDI devices (rollouts.ddi) live at /{tenant}/controller/v1/...: their address counts.
LIMITED_INFIX = "/controller/v1/"
UNITS = {"sec": 1, "min": 60, "hour": 3600}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")
# Redis answers in well under a millisecond on a healthy network; anything slower is an outage,
# and a request must not wait seconds for a counter.
REDIS_TIMEOUT = 0.25
# After a Redis failure, skip Redis for this long: a black-holed Redis then costs one timeout per
# process every few seconds, not one per request.
REDIS_BACKOFF = 5.0
WARNING_INTERVAL = 60.0
# The SQLite fallback deletes expired buckets on about one request in this many.
SQLITE_PURGE_EVERY = 500


@dataclass(frozen=True)
class Rate:
    limit: int
    window: int  # seconds


def parse_rate(value: str) -> Rate | None:
    """``"10/min"`` -> Rate(10, 60); ``"0"`` or ``"off"`` -> None (no limit); ValueError else."""
    text = value.strip().lower()
    if text in {"0", "off"}:
        return None
    match = _RATE.match(text)
    if not match or match.group(2) not in UNITS:
        raise ValueError("expected N/sec, N/min or N/hour, or 0 or off to turn it off")
    limit = int(match.group(1))
    return Rate(limit, UNITS[match.group(2)]) if limit > 0 else None


@lru_cache(maxsize=16)
def _rate_of(value: str) -> Rate | None:
    try:
        return parse_rate(value)
    except ValueError:
        # The start-up check (ota.E013) refuses such a value; only an override at run time
        # (a test's settings) gets here. Not limiting beats a 500 on every request.
        logger.error("rate limit %r cannot be parsed; not limiting", value)
        return None


@dataclass(frozen=True)
class Bucket:
    key: str
    rate: Rate


@dataclass(frozen=True)
class Count:
    """A bucket after this request: how many requests its window has seen, and for how long
    (seconds) the window still runs."""

    bucket: Bucket
    count: int
    seconds_left: float

    @property
    def over(self) -> bool:
        return self.count > self.bucket.rate.limit

    @property
    def remaining(self) -> int:
        return max(self.bucket.rate.limit - self.count, 0)

    @property
    def reset(self) -> int:
        """Whole seconds until the window frees (at least 1, so a client never spins)."""
        return max(math.ceil(self.seconds_left), 1)


@dataclass(frozen=True)
class Sighting:
    """A device seen by this request, for ``ota_site.presence``'s hash at ``key``."""

    key: str
    device_id: str
    at: float  # epoch seconds


class Hits(NamedTuple):
    counts: list[Count]
    # What the answer lookup found (ota_site.answers: the epoch and the device's entry); None
    # when none was asked for, or the counter cannot look up.
    found: tuple[str | None, str | None] | None = None


class Counter(Protocol):
    def hit(
        self,
        buckets: list[Bucket],
        seen: Sighting | None = None,
        lookup: tuple[str, str] | None = None,
    ) -> Hits:
        """Count one request in each bucket; where the counter can, record the sighting and read
        the ``lookup`` keys. Raises on a backend failure."""
        ...


# --- Redis ----------------------------------------------------------------------------------


class CounterUnavailable(Exception):
    """The counter's backend failed recently and is not tried again yet."""


# One atomic server-side step per request: for each bucket, count the hit, start the window on
# its first hit (or on a key that lost its expiry), and report the time left. A script, rather
# than MULTI with INCR, EXPIRE NX and PTTL per bucket, because it answers with one flat reply
# instead of six, which halves the limiter's cost on the poll (docs/performance.md). Atomic like
# MULTI: an INCR is never left without its EXPIRE, which would lock a device out for good.
_HIT_SCRIPT = """
local buckets = tonumber(ARGV[1])
local out = {}
for i = 1, buckets do
  local key = KEYS[i]
  local count = redis.call('INCR', key)
  local left = redis.call('PTTL', key)
  if left < 0 then
    redis.call('EXPIRE', key, ARGV[i + 2])
    left = tonumber(ARGV[i + 2]) * 1000
  end
  out[2 * i - 1] = count
  out[2 * i] = left
end
local k = buckets
if ARGV[2] == '1' then
  -- A device's sighting (ota_site.presence): device id -> time, flushed to last_seen later.
  k = k + 1
  redis.call('HSET', KEYS[k], ARGV[buckets + 3], ARGV[buckets + 4])
end
if #KEYS > k then
  -- The poll answer cache (ota_site.answers): its epoch and the device's entry.
  out[2 * buckets + 1] = redis.call('GET', KEYS[k + 1])
  out[2 * buckets + 2] = redis.call('GET', KEYS[k + 2])
end
return out
"""


class RedisCounter:
    def __init__(self, url: str) -> None:
        self.client = redis_client(url)
        # EVALSHA, loading the script again if the server has lost it (a restart).
        self.script = self.client.register_script(_HIT_SCRIPT)
        self.skip_until = 0.0

    def hit(
        self,
        buckets: list[Bucket],
        seen: Sighting | None = None,
        lookup: tuple[str, str] | None = None,
    ) -> Hits:
        if time.monotonic() < self.skip_until:
            raise CounterUnavailable(f"Redis failed less than {REDIS_BACKOFF:.0f} s ago")
        keys = [bucket.key for bucket in buckets]
        args: list[Any] = [
            len(buckets),
            "1" if seen is not None else "0",
            *(bucket.rate.window for bucket in buckets),
        ]
        if seen is not None:
            keys.append(seen.key)
            args += [seen.device_id, f"{seen.at:.3f}"]
        if lookup is not None:
            keys += lookup
        try:
            results = self.script(keys=keys, args=args)
        except redis.RedisError:
            self.skip_until = time.monotonic() + REDIS_BACKOFF
            raise
        counts = []
        for index, bucket in enumerate(buckets):
            count, pttl = results[2 * index : 2 * index + 2]
            left = pttl / 1000 if pttl > 0 else float(bucket.rate.window)
            counts.append(Count(bucket, int(count), left))
        found = None
        if lookup is not None:
            found = tuple(
                value.decode() if value is not None else None
                for value in results[2 * len(buckets) : 2 * len(buckets) + 2]
            )
        return Hits(counts, found)  # type: ignore[arg-type]


_redis_clients: dict[str, redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per process and URL for the per-request Redis work: it
    fails fast and never retries (a retried script could count twice, and a slow answer is worse
    than none)."""
    client = _redis_clients.get(url)
    if client is None:
        client = _redis_clients.setdefault(
            url,
            redis.Redis.from_url(
                url,
                socket_connect_timeout=REDIS_TIMEOUT,
                socket_timeout=REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            ),
        )
    return client


_redis_counters: dict[str, RedisCounter] = {}


def _redis_counter(url: str) -> RedisCounter:
    """One counter per process and URL, made on first use."""
    counter = _redis_counters.get(url)
    if counter is None:
        counter = _redis_counters.setdefault(url, RedisCounter(url))
    return counter


# --- SQLite (the embedded mode) ---------------------------------------------------------------

_UPSERT = """
INSERT INTO hits (key, count, reset_at) VALUES (?, 1, ?)
ON CONFLICT (key) DO UPDATE SET
    count = CASE WHEN hits.reset_at <= ? THEN 1 ELSE hits.count + 1 END,
    reset_at = CASE WHEN hits.reset_at <= ? THEN excluded.reset_at ELSE hits.reset_at END
RETURNING count, reset_at
"""


class SQLiteCounter:
    """Buckets in one SQLite file that every process of the embedded mode opens.

    The embedded mode runs several gunicorn workers and Django's file cache has no atomic
    increment across processes; SQLite's write lock makes each upsert atomic. The counts are
    disposable, so the file is written without fsync.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.local = threading.local()  # sqlite3 connections are per thread

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self.local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=5, isolation_level=None)
            # Switching a new file to WAL does not wait for the busy timeout: two workers that
            # open it at the same moment may be told "database is locked" at once. Retry briefly.
            for attempt in range(50):
                try:
                    connection.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            connection.execute("PRAGMA synchronous=OFF")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS hits "
                "(key TEXT PRIMARY KEY, count INTEGER NOT NULL, reset_at REAL NOT NULL)"
            )
            self.local.connection = connection
        return connection

    def hit(
        self,
        buckets: list[Bucket],
        seen: Sighting | None = None,
        lookup: tuple[str, str] | None = None,
    ) -> Hits:
        # Sightings (ota_site.presence) and answers (ota_site.answers) are Redis's; without Redis,
        # last_seen is written directly.
        connection = self._connection()
        now = time.time()
        counts = []
        connection.execute("BEGIN IMMEDIATE")
        try:
            for bucket in buckets:
                row = connection.execute(
                    _UPSERT, (bucket.key, now + bucket.rate.window, now, now)
                ).fetchone()
                counts.append(Count(bucket, int(row[0]), float(row[1]) - now))
            if random.randrange(SQLITE_PURGE_EVERY) == 0:  # noqa: S311 (not cryptography)
                connection.execute("DELETE FROM hits WHERE reset_at <= ?", (now,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return Hits(counts)


_sqlite_counters: dict[Path, SQLiteCounter] = {}


def counter() -> Counter:
    """The counter the settings ask for: Redis when REDIS_URL is set, else the SQLite file."""
    if settings.REDIS_URL:
        return _redis_counter(settings.REDIS_URL)
    path = Path(settings.VAR_DIR) / "ratelimit.sqlite3"
    found = _sqlite_counters.get(path)
    if found is None:
        found = _sqlite_counters.setdefault(path, SQLiteCounter(path))
    return found


# --- Who is asking ----------------------------------------------------------------------------


def device_subject(request: HttpRequest) -> str | None:
    """The device id of a valid device access token, else None (then only the address counts:
    a forged or expired token must not buy a fresh bucket). Decoding needs no database."""
    scheme, _, token = str(request.META.get("HTTP_AUTHORIZATION", "")).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # Imported here: settings.py imports this module, before DRF can be imported.
    from rest_framework.exceptions import AuthenticationFailed

    from ota_site.auth import decode_device_token

    try:
        identity = decode_device_token(token.strip())
    except AuthenticationFailed:
        return None
    # DeviceJWTAuthentication reuses it instead of decoding the same token again (~85 µs).
    request.ota_device_token = (token.strip(), identity)  # type: ignore[attr-defined]
    return str(identity.id)


def address_subject(request: HttpRequest) -> str:
    """The client address; IPv6 by its /64, which is what one subscriber usually holds."""
    address = proxies.client_ip(request) or "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def key_prefix() -> str:
    # The cache's prefix (CACHE_KEY_PREFIX), so installations sharing a Redis never share
    # buckets, and each test (which gets its own cache prefix) starts from empty buckets.
    prefix = settings.CACHES.get("default", {}).get("KEY_PREFIX")
    return str(prefix or settings.CACHE_KEY_PREFIX)


def buckets_for(request: HttpRequest, device: str | None) -> list[Bucket]:
    buckets = []
    prefix = key_prefix()
    ip_rate = _rate_of(settings.RATE_LIMIT_IP)
    if ip_rate is not None:
        subject = address_subject(request)
        buckets.append(Bucket(f"{prefix}:rl:ip:{ip_rate.window}:{subject}", ip_rate))
    device_rate = _rate_of(settings.RATE_LIMIT_DEVICE)
    if device_rate is not None and device is not None:
        buckets.append(Bucket(f"{prefix}:rl:dev:{device_rate.window}:{device}", device_rate))
    return buckets


# --- Failing open -----------------------------------------------------------------------------

_last_warning = 0.0


def _warn(message: str, *args: object) -> None:
    """A warning at most once a minute per process: an outage must not flood the logs."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= WARNING_INTERVAL:
        _last_warning = now
        logger.warning(message, *args)


class Counted(NamedTuple):
    counts: list[Count]  # [] when no limit applies or the counter is away
    recorded: bool  # whether the sighting was recorded
    found: tuple[str | None, str | None] | None  # the answer lookup's values (Hits.found)


def count(
    request: HttpRequest,
    device: str | None,
    seen: Sighting | None = None,
    lookup: tuple[str, str] | None = None,
) -> Counted:
    """Count the request in its buckets (``device``: its device, from device_subject); and, in
    the same round trip since one is made anyway, record ``seen`` and read the ``lookup`` keys
    (``ota_site.answers``)."""
    buckets = buckets_for(request, device)
    if not buckets and lookup is None:
        return Counted([], False, None)
    try:
        hits = counter().hit(buckets, seen, lookup)
    except (CounterUnavailable, redis.RedisError, sqlite3.Error, OSError) as exc:
        _warn("rate limits are not enforced: the counter failed (%s: %s)", type(exc).__name__, exc)
        return Counted([], False, None)
    return Counted(hits.counts, seen is not None, hits.found)


# --- The middleware ---------------------------------------------------------------------------


def too_many_requests(counts: list[Count]) -> JsonResponse:
    over = [c for c in counts if c.over]
    # Free only when every exceeded bucket is free again.
    retry_after = max(c.reset for c in over)
    response = JsonResponse(
        {
            "code": "rate_limited",
            "detail": f"Too many requests; retry in {retry_after} s.",
            "retry_after": retry_after,
        },
        status=429,
    )
    response["Retry-After"] = str(retry_after)
    return response


def _add_headers(response: HttpResponse, counts: list[Count]) -> None:
    """RateLimit-* (IETF draft) for the bucket closest to its limit."""
    tightest = min(counts, key=lambda c: (c.remaining, -c.reset))
    response["RateLimit-Limit"] = str(tightest.bucket.rate.limit)
    response["RateLimit-Remaining"] = str(tightest.remaining)
    response["RateLimit-Reset"] = str(tightest.reset)


class RateLimitMiddleware:
    """429 with Retry-After over a limit, before any view runs (DRF or not)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if not path.startswith(LIMITED_PREFIXES) and LIMITED_INFIX not in path:
            return self.get_response(request)
        # Imported here: settings.py imports this module (see the module's docstring).
        from ota_site import answers, presence

        limited = _rate_of(settings.RATE_LIMIT_DEVICE) is not None
        buffering = presence.enabled() and isinstance(counter(), RedisCounter)
        device = device_subject(request) if limited or buffering else None
        seen = lookup = None
        if buffering and device is not None:
            seen = Sighting(presence.key(), device, time.time())
            if request.method == "GET" and answers.enabled():
                lookup = answers.lookup_keys(device)
        counts, recorded, found = count(request, device if limited else None, seen, lookup)
        if any(c.over for c in counts):
            response: HttpResponse = too_many_requests(counts)
        else:
            pending = None
            if found is not None and recorded and device is not None:
                pending = answers.Lookup(
                    device,
                    request.ota_device_token[1].generation,  # type: ignore[attr-defined]
                    *found,
                    at=time.monotonic(),
                )
                answer = pending.answer(request.get_full_path())
                if answer is not None:
                    response = answers.respond(request, answer)
                    if counts:
                        _add_headers(response, counts)
                    return response
            # The poll then knows its last_seen is on its way (devices.services.mark_seen).
            with presence.noted(device if recorded else None):
                response = self.get_response(request)
            keep = getattr(response, "ota_answer", False) and response.status_code == 200
            if pending is not None and keep:
                answers.store(request, pending, response)
        if counts:
            _add_headers(response, counts)
        return response
