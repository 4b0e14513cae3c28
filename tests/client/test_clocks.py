"""Devices whose wall clock is wrong, by years (issue 9): the real client in a process whose clock
libfaketime (Debian's faketime) moves; its monotonic clock stays true, as a wrong RTC leaves it.

The client times its token, backoff, download deadline and rate-limit pauses by the monotonic
clock, and the server records every time itself, so a wrong wall clock reaches only what must use
it: TUF's expiry check. A clock behind (an RTC that lost its battery and starts in the past)
updates normally. A clock ahead sees the repository's metadata as expired, which TUF cannot tell
from a freeze attack: the update is refused and reported with that reason, the device keeps
booting its image, and it installs once its clock is right and the update is offered again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ota_client.system import FileSystemInterface
from tests.client.conftest import Device, LiveServer, run_client_once

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("faketime") is None, reason="needs Debian's faketime (make test installs it)"
    ),
]


def state_of(device: Device) -> dict[str, Any]:
    return dict(json.loads((device.config.state_dir / "state.json").read_text()))


def test_a_clock_years_behind_updates_normally(ota_server: LiveServer, make_device: Any) -> None:
    device = make_device()
    device.write_toml()
    probe = subprocess.run(
        ["faketime", "-f", "-5y", sys.executable, "-c", "import time; print(time.time())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(probe.stdout) < datetime.now(UTC).timestamp() - 4 * 365 * 86400  # it is behind

    done = run_client_once(device, clock="-5y")
    assert done.returncode == 0, done.stderr
    assert state_of(device)["last_result"]["outcome"] == "success", state_of(device)
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "success"
    # The server's own times, not the device's.
    started = datetime.fromisoformat(session["started_at"])
    assert abs(datetime.now(UTC) - started) < timedelta(minutes=5), session
    assert ota_server.device(device.device_id)["current_version"] == "1.1.0"


def test_a_clock_years_ahead_is_refused_as_expired_and_recovers(
    ota_server: LiveServer, make_device: Any
) -> None:
    device = make_device()
    device.write_toml()
    system = FileSystemInterface(device.config.state_dir / "system")

    refused = run_client_once(device, clock="+3y")
    assert refused.returncode == 0, refused.stderr
    last = state_of(device)["last_result"]
    assert last["outcome"] == "failed" and "xpired" in last["reason"], last
    # The server's Date header lets the message name the likely cause (it decides nothing).
    assert "clock is 109" in last["reason"] and "days ahead" in last["reason"], last
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed" and "xpired" in session["error_message"], session
    # Nothing was written: the device boots its image as before.
    env = system.read_env()
    assert (system.booted_slot(), env.active, env.trial) == ("a", "a", "")
    assert ota_server.device(device.device_id)["current_version"] == "1.0.0"

    # The clock is put right (NTP) and the operator offers the update again.
    retried = ota_server.operator.post(
        f"{ota_server.url}/api/v1/devices/{device.device_id}/retry",
        headers={"X-CSRFToken": ota_server.operator.cookies.get("csrftoken", "")},
        timeout=10,
    )
    assert retried.status_code == 200, retried.text
    done = run_client_once(device)
    assert done.returncode == 0, done.stderr
    assert ota_server.device(device.device_id)["current_version"] == "1.1.0"
