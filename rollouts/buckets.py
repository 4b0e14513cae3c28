"""Deterministic stage membership: bucket = hash(device id, rollout id) mod 10 000.

A device is in a rollout's current stage once its bucket < percentage x 100, so raising the
percentage only adds devices and a device that is in stays in. The same number is computed in
Python (the device poll) and in SQL (counts over the whole fleet, with no per-device rows), by
one definition: the first 32 bits of md5("<device uuid>:<rollout uuid>") mod 10 000, with both
UUIDs in their canonical lower-case, dashed text form.

PostgreSQL gets the SQL function ``ota_bucket(uuid, uuid)`` from a migration; SQLite gets the
same function registered on every new connection (rollouts.apps).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from django.db.models import Func, IntegerField, UUIDField, Value

BUCKETS = 10_000

POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION ota_bucket(device uuid, rollout uuid) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT ((('x' || substr(md5(device::text || ':' || rollout::text), 1, 8))::bit(32)::bigint)
          % 10000)::integer
$$;
"""


def bucket(device_id: uuid.UUID | str, rollout_id: uuid.UUID | str) -> int:
    text = f"{uuid.UUID(str(device_id))}:{uuid.UUID(str(rollout_id))}"
    return int(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:8], 16) % BUCKETS


def bucket_limit(percentage: int) -> int:
    """Buckets below this number are in a stage of ``percentage`` %."""
    return max(0, min(percentage, 100)) * (BUCKETS // 100)


def _sqlite_bucket(device_id: Any, rollout_id: Any) -> int | None:
    if device_id is None or rollout_id is None:
        return None
    return bucket(device_id, rollout_id)


def register_sqlite_function(connection: Any) -> None:
    connection.connection.create_function("ota_bucket", 2, _sqlite_bucket, deterministic=True)


class Bucket(Func):
    """ota_bucket(<device id expression>, <rollout id>) as an ORM expression."""

    function = "ota_bucket"
    output_field = IntegerField()

    def __init__(self, device_id: Any, rollout_id: uuid.UUID) -> None:
        super().__init__(device_id, Value(rollout_id, output_field=UUIDField()))
