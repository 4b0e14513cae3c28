"""Django's Redis cache, keeping one Redis client per connection pool.

Django's ``RedisCacheClient.get_client`` builds a new ``redis.Redis`` around the shared
connection pool on every cache call. Building one costs about 70 µs of Python here (redis-py sets
up its response callbacks, retry and lock per instance), which was a third of a cache read on the
device poll's path (docs/performance.md, "Device API under load"). A client is thread-safe and
holds no connection of its own, so one per pool serves every call of the process.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient
from django.utils.functional import cached_property


class _ReusingClient(RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}

    # (django-stubs do not describe RedisCacheClient's private helpers.)
    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        index = self._get_connection_pool_index(write)  # type: ignore[attr-defined]
        client = self._clients.get(index)
        if client is None:
            pool = self._get_connection_pool(write)  # type: ignore[attr-defined]
            client = self._clients[index] = self._client(connection_pool=pool)  # type: ignore[attr-defined]
        return client


class RedisCache(DjangoRedisCache):
    """``django.core.cache.backends.redis.RedisCache`` with one client per pool (see above)."""

    @cached_property
    def _cache(self) -> RedisCacheClient:
        return _ReusingClient(self._servers, **self._options)  # type: ignore[attr-defined]
