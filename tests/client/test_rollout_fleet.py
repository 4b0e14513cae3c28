"""Staged rollouts with the real device client: a fleet of simulated devices (`ota-client
simulate`'s engine) against gunicorn on PostgreSQL, with a real Celery worker and beat on Redis
advancing, completing and rolling back the rollout."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ota_client.simulate import SimulationOptions, Summary, run_simulation
from tests.e2e import (
    celery_worker,
    fresh_database,
    gunicorn,
    manage,
    migrate_with_admin,
    server_env,
)

pytestmark = pytest.mark.e2e

ADMIN = ("fleet-admin", "fleet-password-123")
OPEN_STATUSES = ("pending", "downloading", "installing", "validating")
DEVICE_TYPE = "fleet-board"


class Server:
    def __init__(self, base: str, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.http = requests.Session()
        self.http.auth = ADMIN

    def publish(self, version: str) -> str:
        reply = self.http.post(
            f"{self.base}/api/v1/firmware",
            data={"version": version, "device_type": DEVICE_TYPE},
            files={"file": ("image.bin", version.encode() * 8000)},
            timeout=30,
        )
        reply.raise_for_status()
        firmware = str(reply.json()["id"])
        self.http.post(f"{self.base}/api/v1/firmware/{firmware}/publish", timeout=30)
        return firmware

    def token(self) -> str:
        out = manage(
            self.env,
            "create_enrollment_token",
            "--name",
            f"fleet-{uuid.uuid4().hex}",
            "--device-type",
            DEVICE_TYPE,
            "--json",
        )
        return str(json.loads(out)["token"])

    def start_rollout(self, firmware: str, **fields: Any) -> str:
        body = {"name": "fleet", "firmware": firmware, "device_timeout": 600, **fields}
        reply = self.http.post(f"{self.base}/api/v1/rollouts", json=body, timeout=10)
        assert reply.status_code == 201, reply.text
        rollout = str(reply.json()["id"])
        self.http.post(f"{self.base}/api/v1/rollouts/{rollout}/start", timeout=10)
        return rollout

    def rollout(self, rollout: str) -> dict[str, Any]:
        return dict(self.http.get(f"{self.base}/api/v1/rollouts/{rollout}", timeout=30).json())

    def metrics(self, rollout: str) -> dict[str, Any]:
        reply = self.http.get(f"{self.base}/api/v1/rollouts/{rollout}/metrics", timeout=30)
        return dict(reply.json())


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with fresh_database() as database:
        env = server_env(
            tmp_path,
            DATABASE_URL=database,
            REDIS_URL="redis://127.0.0.1:6379/15",
            CACHE_KEY_PREFIX=f"fleet-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"fleet-{uuid.uuid4().hex[:8]}",
            ROLLOUT_EVALUATION_INTERVAL="0.5",
            ROLLOUT_CACHE_TIMEOUT="1",
        )
        migrate_with_admin(env, ADMIN, "fleet@example.com")
        # The fleet shares two cores with the servers: many sync workers keep downloads from
        # queueing behind polls.
        with gunicorn(env, workers=8) as base, celery_worker(env):
            yield Server(base, env)


def simulate(
    server: Server,
    token: str,
    state_dir: Path,
    devices: int,
    stop: threading.Event | None = None,
    **options: Any,
) -> Summary:
    return run_simulation(
        SimulationOptions(
            devices=devices,
            server=server.base,
            device_type=DEVICE_TYPE,
            enrollment_token=token,
            state_dir=state_dir,
            poll_interval=1.5,
            quiet=True,
            id_prefix="fleet",
            seed=7,
            **options,
        ),
        stop=stop,
        out=io.StringIO(),
    )


def enroll(server: Server, token: str, state_dir: Path, devices: int) -> None:
    """Let the fleet enroll and report in before a rollout starts, as a real fleet would be."""
    summary = simulate(server, token, state_dir, devices, duration=8)
    assert summary.versions == {"1.0.0": devices}, summary


def watch(
    server: Server, rollout: str, until: set[str], stop: threading.Event, seen: list[dict[str, Any]]
) -> None:
    """Record the rollout's (status, stage) changes; stop the fleet once it reaches ``until``.

    A slow answer (a 2-core machine serving the whole simulated fleet and the rest of the suite)
    is retried rather than ending the watch: the fleet would then never be stopped.
    """
    while not stop.is_set():
        try:
            state = server.rollout(rollout)
        except requests.RequestException:
            time.sleep(0.5)
            continue
        step = {"status": state["status"], "stage": state["current_stage"]}
        if not seen or seen[-1] != step:
            seen.append(step)
        if state["status"] in until:
            stop.set()
            return
        time.sleep(0.5)


def test_120_devices_go_through_three_stages_and_the_rollout_completes(
    server: Server, tmp_path: Path
) -> None:
    server.publish("1.0.0")
    token = server.token()
    enroll(server, token, tmp_path / "fleet", 120)
    rollout = server.start_rollout(
        server.publish("1.1.0"),
        min_devices=5,
        stages=[{"percentage": 10}, {"percentage": 50}, {"percentage": 100}],
    )
    seen: list[dict[str, Any]] = []
    watcher = threading.Thread(
        target=watch,
        args=(server, rollout, {"completed", "paused", "rolled_back"}, threading.Event(), seen),
    )
    watcher.start()
    summary = simulate(
        server, server.token(), tmp_path / "fleet", 120, until_version="1.1.0", duration=240
    )
    watcher.join(timeout=30)
    assert summary.versions == {"1.1.0": 120}, summary
    assert seen[-1] == {"status": "completed", "stage": 2}, seen
    # It went stage by stage: never backwards while the watcher looked (a short stage can pass
    # between two looks), and every stage updated devices of its own.
    stages = [step["stage"] for step in seen if step["status"] == "active"]
    assert stages == sorted(stages), seen
    metrics = server.metrics(rollout)
    assert [stage["sessions"]["success"] > 0 for stage in metrics["stages"]] == [True] * 3, metrics
    assert sum(stage["sessions"]["success"] for stage in metrics["stages"]) == 120
    assert metrics["stages"][0]["devices"] < metrics["stages"][1]["devices"]


def test_failing_installs_stop_the_first_stage_and_roll_updated_devices_back(
    server: Server, tmp_path: Path
) -> None:
    server.publish("1.0.0")
    token = server.token()
    enroll(server, token, tmp_path / "fleet", 100)
    rollout = server.start_rollout(
        server.publish("1.1.0"),
        # Half the fleet in the first stage, soaking 30 s as an operator would have it (so it is
        # judged on most of its devices, not on the first ten to finish), and a 10% threshold:
        # with 30% of the images failing, ~50 devices pass 10% with near certainty.
        min_devices=10,
        rollback_threshold=0.1,
        stages=[{"percentage": 50, "min_duration": 30}, {"percentage": 100}],
    )
    stop, seen = threading.Event(), list[dict[str, Any]]()
    watcher = threading.Thread(
        target=watch, args=(server, rollout, {"rolled_back", "completed"}, stop, seen)
    )
    watcher.start()
    # 30% of the devices' new images fail their health check after the reboot; the fleet runs
    # until the rollout stops.
    simulate(
        server, token, tmp_path / "fleet", 100, stop=stop, health_failure_rate=0.3, duration=180
    )
    watcher.join(timeout=10)
    assert seen[-1] == {"status": "rolled_back", "stage": 0}, seen  # never left stage one
    metrics = server.metrics(rollout)
    assert metrics["stages"][1]["sessions"]["success"] == 0
    updated = sum(stage["sessions"]["success"] for stage in metrics["stages"])
    assert updated > 0 and metrics["rollback_sessions"]
    # The same devices again, now healthy: every one that took 1.1.0 is offered 1.0.0 back. A
    # rollback that itself failed its health check while the faults were still on (the device
    # stays on 1.1.0) is recorded as a failed rollback session, never lost.
    # Until every device that took 1.1.0 has finished its rollback, whichever way (a device
    # whose rollback failed stays on 1.1.0, so "until 1.0.0" alone would wait out the duration).
    settled = threading.Event()

    def rollbacks_settled() -> None:
        while not settled.wait(0.5):
            rollbacks = server.metrics(rollout)["rollback_sessions"]
            still_open = sum(rollbacks[status] for status in OPEN_STATUSES)
            if not still_open and rollbacks["success"] + rollbacks["failed"] >= updated:
                settled.set()

    settler = threading.Thread(target=rollbacks_settled)
    settler.start()
    back = simulate(
        server, token, tmp_path / "fleet", 100, stop=settled, until_version="1.0.0", duration=60
    )
    settled.set()
    settler.join(timeout=10)
    metrics = server.metrics(rollout)
    rollbacks = metrics["rollback_sessions"]
    # Each device that took 1.1.0 got one rollback: those whose session succeeded, and those
    # whose session the rollback cancelled while they were installing, who run 1.1.0 all the
    # same (how many depends on timing: more when the machine is loaded).
    cancelled = sum(stage["sessions"]["cancelled"] for stage in metrics["stages"])
    assert updated <= rollbacks["success"] + rollbacks["failed"] <= updated + cancelled, metrics
    stuck = rollbacks["failed"]
    expected = {"1.0.0": 100 - stuck, **({"1.1.0": stuck} if stuck else {})}
    assert back.versions == expected, back
