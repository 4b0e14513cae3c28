"""A Celery worker killed in the middle of an evaluation: the next evaluation completes the step,
exactly once.

The worker is caught mid-step for real: the test holds a lock on the row of the stage the
evaluation is about to close, so the worker, having locked the rollout and decided to advance it,
waits inside its transaction. It is killed there (SIGKILL, no clean-up), the lock is released,
and a new worker takes over.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import psycopg
import pytest
import requests

from tests.e2e import celery_worker
from tests.faults.conftest import ADMIN, Stack, firmware_id, fleet, update

pytestmark = [pytest.mark.fault, pytest.mark.e2e, pytest.mark.xdist_group("faults")]


def wait_for(what: str, check: Callable[[], bool], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_worker_killed_mid_evaluation(stack: Stack) -> None:
    devices = fleet(stack, 4, assign=False)
    reply = requests.post(
        f"{stack.base}/api/v1/rollouts",
        auth=ADMIN,
        json={
            "name": "faults",
            "firmware": firmware_id(stack, "2.0.0"),
            "min_devices": 1,
            "stages": [{"percentage": 99}, {"percentage": 100}],
        },
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    rollout = reply.json()["id"]
    reply = requests.post(f"{stack.base}/api/v1/rollouts/{rollout}/start", auth=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    # Stage 0 is done and successful: the next evaluation advances the rollout.
    assert sum(update(stack, device) for device in devices) >= 1

    with (
        psycopg.connect(stack.postgres.url) as blocker,
        psycopg.connect(stack.postgres.url, autocommit=True) as observer,
    ):
        blocker.execute(
            "SELECT 1 FROM rollouts_rolloutstage WHERE rollout_id = %s AND position = 0 FOR UPDATE",
            [rollout],
        )

        def evaluation_waits() -> bool:
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s",
                ["UPDATE %rollouts_rolloutstage%"],
            ).fetchone()
            return bool(row and row[0])

        with celery_worker(stack.env) as worker:
            wait_for("the evaluation to wait on the stage's lock", evaluation_waits)
            # The whole worker at once (beat runs in a child): as when its container dies.
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        blocker.rollback()  # the dead worker's transaction gets the lock, then is rolled back

        state = observer.execute(
            "SELECT current_stage, status FROM rollouts_rollout WHERE id = %s", [rollout]
        ).fetchone()
        assert state == (0, "active"), "the killed evaluation must have changed nothing"

        with celery_worker(stack.env):
            wait_for(
                "the next worker to advance the rollout",
                lambda: (
                    observer.execute(
                        "SELECT current_stage FROM rollouts_rollout WHERE id = %s", [rollout]
                    ).fetchone()
                    == (1,)
                ),
            )
            time.sleep(2)  # more evaluations run: none may advance it again
        advanced = observer.execute(
            "SELECT count(*) FROM ota_site_event WHERE rollout_id = %s AND kind = %s",
            [rollout, "rollout.advanced"],
        ).fetchone()
        stage = observer.execute(
            "SELECT current_stage, status FROM rollouts_rollout WHERE id = %s", [rollout]
        ).fetchone()
    assert advanced == (1,)
    # (Every targeted device has finished already, so the last stage may complete at once.)
    assert stage in ((1, "active"), (1, "completed"))
