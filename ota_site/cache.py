"""The cache as an optimisation only: when Redis is away, callers fall back to the database.

Entries read on every device poll (the live rollouts, published firmware) can also be kept in
the process for ``CACHE_LOCAL_SECONDS`` (``get(key, local=True)``), which spares the poll a Redis
round trip. A ``delete`` forgets the key in this process at once; in the other processes the copy
lives out its seconds, so a change made elsewhere reaches their polls that much later (1 s by
default; docs/performance.md "Device API under load").
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache

logger = logging.getLogger(__name__)
MISSING = object()

# key -> (monotonic expiry, value); per process, and per thread-safe dict operation.
_local: dict[str, tuple[float, Any]] = {}


def get(key: str, *, local: bool = False) -> Any:
    if local:
        found = _local.get(_local_key(key))
        if found is not None and found[0] > time.monotonic():
            return found[1]
    try:
        value = cache.get(key, MISSING)
    except Exception:  # a cache outage must not fail a device poll
        logger.warning("cache get failed for %s", key, exc_info=True)
        return MISSING
    if local and value is not MISSING:
        _remember(key, value)
    return value


def set(key: str, value: Any, timeout: int, *, local: bool = False) -> None:
    if local:
        _remember(key, value)
    try:
        cache.set(key, value, timeout)
    except Exception:
        logger.warning("cache set failed for %s", key, exc_info=True)


def delete(key: str) -> None:
    _local.pop(_local_key(key), None)
    try:
        cache.delete(key)
    except Exception:
        # A stale entry outlives the outage by at most its timeout; log loudly.
        logger.error("cache delete failed for %s", key, exc_info=True)


def forget_local() -> None:
    """Drop every process-local copy (tests; a process that must see changes at once)."""
    _local.clear()


def _local_key(key: str) -> str:
    # The cache's own key (its KEY_PREFIX and version): two configurations never share a copy.
    return str(cache.make_key(key))


def _remember(key: str, value: Any) -> None:
    seconds = settings.CACHE_LOCAL_SECONDS
    if seconds > 0:
        _local[_local_key(key)] = (time.monotonic() + seconds, value)
