"""``ota-client simulate`` against the live server: a fleet of virtual devices in threads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ota_client.simulate import SimulationOptions, run_simulation
from tests.client.conftest import DEVICE_TYPE, LiveServer

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).resolve().parents[2] / "client"


def keys_file(tmp_path: Path, ota_server: LiveServer) -> Path:
    path = tmp_path / "trusted_keys.json"
    path.write_text(json.dumps(ota_server.keys))
    return path


def test_fleet_of_80_updates_to_the_group_target(ota_server: LiveServer, tmp_path: Path) -> None:
    out = io.StringIO()
    started = time.monotonic()
    summary = run_simulation(
        SimulationOptions(
            devices=80,
            server=ota_server.url,
            device_type=DEVICE_TYPE,
            enrollment_token=ota_server.enrollment_token,
            state_dir=tmp_path / "fleet",
            poll_interval=0.2,
            duration=150,
            until_version="1.1.0",
            progress_every=2.0,
            id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
            trusted_keys=keys_file(tmp_path, ota_server),
        ),
        out=out,
    )
    elapsed = time.monotonic() - started
    print(out.getvalue())
    assert summary.reached_target, (summary.to_dict(), out.getvalue()[-2000:])
    assert summary.versions == {"1.1.0": 80}
    assert summary.phases == {"idle": 80}
    # 80 x 1.5 MiB through 16 gunicorn workers on a 2-CPU box: under a minute in practice;
    # the bound is the duration, so a slow CI box is not a failure.
    assert elapsed < 150, elapsed
    assert "versions:" in out.getvalue()
    # The server saw it too: a successful session for a sample of the devices.
    for device_id in summary.device_ids[::20]:
        assert device_id
        assert ota_server.device(device_id)["current_version"] == "1.1.0"
        assert [s["status"] for s in ota_server.sessions(device_id)] == ["success"]


def test_failed_health_checks_roll_every_device_back(
    ota_server: LiveServer, tmp_path: Path
) -> None:
    summary = run_simulation(
        SimulationOptions(
            devices=5,
            server=ota_server.url,
            device_type=DEVICE_TYPE,
            enrollment_token=ota_server.enrollment_token,
            state_dir=tmp_path / "fleet",
            poll_interval=0.2,
            health_failure_rate=1.0,
            duration=6,
            quiet=True,
            id_prefix=f"sim-{uuid.uuid4().hex[:8]}",
            trusted_keys=keys_file(tmp_path, ota_server),
        )
    )
    assert summary.versions == {"1.0.0": 5}, summary.to_dict()
    assert summary.failures["health"] >= 5
    assert summary.failures["sessions_failed"] >= 5
    for device_id in summary.device_ids:
        sessions = ota_server.sessions(device_id)
        assert sessions and all(s["status"] == "failed" for s in sessions), sessions
        assert ota_server.device(device_id)["current_version"] == "1.0.0"


def test_the_command_line_parses() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ota_client.cli", "simulate", "--help"],
        cwd=CLIENT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--health-failure-rate" in result.stdout and "--until-version" in result.stdout
