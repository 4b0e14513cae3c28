"""PostgreSQL restarted under load: the API answers 503 with Retry-After, never a 500 or a
traceback, recovers by itself, and no status report it acknowledged is lost."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from tests.faults.conftest import Load, Stack, fleet

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.xdist_group("faults")]


def test_postgres_restarted_under_load(stack: Stack) -> None:
    devices = fleet(stack, 8)
    with Load(stack.base, devices) as load:
        time.sleep(1.5)
        started = time.monotonic()
        stack.postgres.stop("fast")  # every connection of every worker is cut
        time.sleep(2)  # requests meanwhile find no database
        stack.postgres.start()
        restarted = time.monotonic()
        # Recovery by itself: polls are answered again, with nothing done to the server.
        deadline = restarted + 30
        while time.monotonic() < deadline:
            time.sleep(0.5)
            recent = [a for a in load.answers if a.at > time.monotonic() - 1.0]
            if recent and all(a.status == 200 for a in recent):
                break
        else:
            statuses = sorted({str(a.status) for a in load.answers if a.at > restarted})
            pytest.fail(f"not recovered 30 s after the restart; answers since: {statuses}")
        time.sleep(1)

    during = [a for a in load.answers if a.at >= started]
    unavailable = [a for a in during if a.status == 503]
    assert unavailable, "no request met the outage: the test did not test anything"
    for answer in load.answers:
        assert answer.status is not None, "gunicorn stopped answering"
        assert answer.status in (200, 503), (answer.status, answer.body[:500])
        assert b"Traceback" not in answer.body
    for answer in unavailable:
        assert answer.headers.get("Retry-After") == "5"
        assert json.loads(answer.body)["code"] == "unavailable"

    # Every report the server acknowledged (200, applied) is in the database.
    assert load.acknowledged
    with psycopg.connect(stack.postgres.url) as conn:
        stored: dict[str, int] = dict(
            conn.execute("SELECT uuid::text, progress FROM rollouts_updatesession").fetchall()
        )
    lost = {s: p for s, p in load.acknowledged.items() if stored.get(s, -1) < p}
    assert not lost, f"acknowledged progress missing from the database: {lost}"
