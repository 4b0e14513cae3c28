"""Rollouts driven by a real Celery worker with beat, on real servers: gunicorn on PostgreSQL with
the Redis broker, and the embedded mode (SQLite, filesystem broker)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e import (
    celery_worker,
    fresh_database,
    gunicorn,
    manage,
    migrate_with_admin,
    server_env,
)

pytestmark = pytest.mark.e2e

ADMIN = ("live-admin", "live-password-123")


class Fleet:
    """Devices speaking the device API over HTTP, each poll a whole (instant) update."""

    def __init__(self, base: str, token: str, size: int, fail_every: int = 0) -> None:
        self.base = base
        self.fail_every = fail_every
        self.devices: list[dict[str, Any]] = []
        for n in range(size):
            reply = requests.post(
                f"{base}/api/v1/devices/register",
                json={
                    "enrollment_token": token,
                    "hardware_id": f"live-{n:04d}",
                    "device_type": "live-board",
                    "current_version": "1.0.0",
                },
                timeout=10,
            )
            reply.raise_for_status()
            body = reply.json()
            self.devices.append(
                {
                    "n": n,
                    "version": "1.0.0",
                    "headers": {"Authorization": f"Bearer {body['access_token']}"},
                }
            )

    def poll_all(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(self.poll, self.devices))

    def poll(self, device: dict[str, Any]) -> None:
        headers = device["headers"]
        offer = requests.get(
            f"{self.base}/api/v1/updates/check", headers=headers, timeout=10
        ).json()
        if not offer["update_available"]:
            return
        session = offer["session_id"]
        requests.post(
            f"{self.base}/api/v1/status",
            headers=headers,
            timeout=10,
            json={"session_id": session, "status": "downloading", "progress": 100},
        )
        failing = (
            self.fail_every and device["n"] % self.fail_every == 0 and not offer["is_rollback"]
        )
        if failing:
            requests.post(
                f"{self.base}/api/v1/status",
                headers=headers,
                timeout=10,
                json={
                    "session_id": session,
                    "status": "failed",
                    "error_message": "flash write error",
                },
            )
            return
        requests.post(
            f"{self.base}/api/v1/validation",
            headers=headers,
            timeout=10,
            json={"session_id": session, "success": True, "version": offer["version"]},
        )
        device["version"] = offer["version"]


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    with fresh_database() as database:
        env = server_env(
            tmp_path,
            DATABASE_URL=database,
            REDIS_URL="redis://127.0.0.1:6379/15",
            CACHE_KEY_PREFIX=f"live-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"live-{uuid.uuid4().hex[:8]}",
            ROLLOUT_EVALUATION_INTERVAL="0.5",
            ROLLOUT_CACHE_TIMEOUT="1",
        )
        prepare(env)
        with gunicorn(env, workers=3) as base, celery_worker(env):
            yield base, env


def prepare(env: dict[str, str]) -> None:
    migrate_with_admin(env, ADMIN, "live@example.com")


def publish(base: str, version: str) -> str:
    reply = requests.post(
        f"{base}/api/v1/firmware",
        auth=ADMIN,
        timeout=30,
        data={"version": version, "device_type": "live-board"},
        files={"file": ("image.bin", version.encode() * 5000)},
    )
    reply.raise_for_status()
    firmware = reply.json()["id"]
    requests.post(
        f"{base}/api/v1/firmware/{firmware}/publish", auth=ADMIN, timeout=30
    ).raise_for_status()
    return str(firmware)


def rollout(base: str, firmware: str, **fields: Any) -> str:
    body = {
        "name": "live",
        "firmware": firmware,
        "min_devices": 2,
        "device_timeout": 600,
        "stages": [{"percentage": 10}, {"percentage": 50}, {"percentage": 100}],
        **fields,
    }
    reply = requests.post(f"{base}/api/v1/rollouts", auth=ADMIN, json=body, timeout=10)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["id"])


def drive(base: str, fleet: Fleet, rollout_id: str, until: set[str], limit: float = 60) -> dict:
    deadline = time.monotonic() + limit
    while True:
        fleet.poll_all()
        state = requests.get(f"{base}/api/v1/rollouts/{rollout_id}", auth=ADMIN, timeout=10).json()
        if state["status"] in until or time.monotonic() > deadline:
            return dict(state)
        time.sleep(0.3)


def test_a_healthy_rollout_goes_through_its_stages_by_itself(live) -> None:
    base, env = live
    token = json.loads(manage(env, "create_enrollment_token", "--name", "live", "--json"))["token"]
    publish(base, "1.0.0")
    fleet = Fleet(base, token, 60)
    rid = rollout(base, publish(base, "1.1.0"))
    requests.post(f"{base}/api/v1/rollouts/{rid}/start", auth=ADMIN, timeout=10)
    state = drive(base, fleet, rid, {"completed", "paused", "rolled_back"})
    assert state["status"] == "completed", state
    assert all(device["version"] == "1.1.0" for device in fleet.devices)
    metrics = requests.get(f"{base}/api/v1/rollouts/{rid}/metrics", auth=ADMIN, timeout=10).json()
    assert [stage["state"] for stage in metrics["stages"]] == ["done", "done", "done"]
    assert sum(stage["sessions"]["success"] for stage in metrics["stages"]) == 60


def test_failing_installs_stop_the_rollout_and_roll_devices_back(live) -> None:
    base, env = live
    token = json.loads(manage(env, "create_enrollment_token", "--name", "live", "--json"))["token"]
    publish(base, "1.0.0")
    # Half the installs fail. With a third, a first stage that happened to draw few failing
    # devices (4 of 24) stayed under the 20% threshold and, short of its success threshold with
    # every device finished, was paused instead: right, but not what this test is about.
    fleet = Fleet(base, token, 60, fail_every=2)
    rid = rollout(
        base,
        publish(base, "1.1.0"),
        rollback_threshold=0.2,
        # The first stage (about 24 devices) is judged on 20 finished devices, not on the first
        # two to finish, which may both have succeeded and let it advance.
        min_devices=20,
        stages=[{"percentage": 40}, {"percentage": 100}],
    )
    requests.post(f"{base}/api/v1/rollouts/{rid}/start", auth=ADMIN, timeout=10)
    state = drive(base, fleet, rid, {"completed", "paused", "rolled_back"})
    assert state["status"] == "rolled_back", state
    assert state["current_stage"] == 0
    # The updated devices take their rollback sessions; a device whose report arrived after the
    # rollback is found by the worker's next sweep, so this converges within a few rounds (a
    # minute at most on a loaded 2-core machine; usually a few seconds).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fleet.poll_all()
        if all(device["version"] == "1.0.0" for device in fleet.devices):
            break
        time.sleep(0.5)
    stuck = [device for device in fleet.devices if device["version"] != "1.0.0"]
    if stuck:
        sessions = requests.get(
            f"{base}/api/v1/sessions?page_size=1000", auth=ADMIN, timeout=10
        ).json()["results"]
        devices = requests.get(
            f"{base}/api/v1/devices?page_size=1000", auth=ADMIN, timeout=10
        ).json()["results"]
        names = {d["id"]: d["hardware_id"] for d in devices}
        bad = {f"live-{d['n']:04d}" for d in stuck}
        detail = [
            (names[s["device"]], s["version"], s["status"], s["is_rollback"], s["error_message"])
            for s in sessions
            if names[s["device"]] in bad
        ]
        raise AssertionError(f"{len(stuck)} devices still on 1.1.0: {detail}")
    metrics = requests.get(f"{base}/api/v1/rollouts/{rid}/metrics", auth=ADMIN, timeout=10).json()
    assert metrics["rollback_sessions"]["success"] > 0
    assert metrics["stages"][1]["sessions"]["success"] == 0  # the second stage never began


def test_start_at_starts_a_rollout_in_the_embedded_mode(tmp_path: Path) -> None:
    """SQLite, the filesystem broker and a worker with beat: what `make demo` runs."""
    env = server_env(tmp_path, ROLLOUT_EVALUATION_INTERVAL="0.5")
    prepare(env)
    with gunicorn(env) as base:
        firmware = publish(base, "1.1.0")
        start_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
        rid = rollout(base, firmware, start_at=start_at)
        with celery_worker(env):
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                state = requests.get(f"{base}/api/v1/rollouts/{rid}", auth=ADMIN, timeout=10).json()
                if state["status"] != "scheduled":
                    break
                time.sleep(0.5)
    assert state["status"] == "active", (tmp_path / "celery.log").read_text()[-3000:]
