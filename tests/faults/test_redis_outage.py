"""Redis stopped: the device API keeps serving (the rate limiter fails open, the cache is
bypassed, last_seen is written directly) and carries on when Redis is back."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.faults.conftest import Load, Stack, fleet

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.xdist_group("faults")]


def test_the_device_api_keeps_serving_without_redis(stack: Stack) -> None:
    devices = fleet(stack, 6)
    with psycopg.connect(stack.postgres.url, autocommit=True) as conn:
        conn.execute("UPDATE devices_device SET last_seen = NULL")
    with Load(stack.base, devices) as load:
        time.sleep(1)
        stopped = time.monotonic()
        stack.redis.stop()
        time.sleep(4)
        restarted = time.monotonic()
        stack.redis.start()
        time.sleep(3)

    outage = [a for a in load.answers if stopped + 0.5 < a.at < restarted]
    after = [a for a in load.answers if a.at > restarted + 1]
    assert len(outage) > 50 and after
    for answer in load.answers:
        assert answer.status == 200, (answer.status, answer.body[:500])
    # Polls stayed fast: a Redis that refuses connections costs no timeout per request.
    assert len(outage) / (restarted - stopped - 0.5) > 20
    # Without Redis to buffer them, the sightings were written to the rows directly.
    with psycopg.connect(stack.postgres.url) as conn:
        unseen = conn.execute(
            "SELECT count(*) FROM devices_device WHERE last_seen IS NULL"
        ).fetchone()
    assert unseen == (0,)
