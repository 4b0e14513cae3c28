"""The cache as an optimisation only: when Redis is away, callers fall back to the database."""

from __future__ import annotations

import logging
from typing import Any

from django.core.cache import cache

logger = logging.getLogger(__name__)
MISSING = object()


def get(key: str) -> Any:
    try:
        return cache.get(key, MISSING)
    except Exception:  # a cache outage must not fail a device poll
        logger.warning("cache get failed for %s", key, exc_info=True)
        return MISSING


def set(key: str, value: Any, timeout: int) -> None:
    try:
        cache.set(key, value, timeout)
    except Exception:
        logger.warning("cache set failed for %s", key, exc_info=True)


def delete(key: str) -> None:
    try:
        cache.delete(key)
    except Exception:
        # A stale entry outlives the outage by at most its timeout; log loudly.
        logger.error("cache delete failed for %s", key, exc_info=True)
