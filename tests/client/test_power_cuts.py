"""Power cuts at every dangerous point of an update, with a real process kill.

`ota-client once` runs as a subprocess with OTA_CLIENT_CRASH_AT set and dies with os._exit(137)
at the checkpoint. A power cut also reboots the device, so by default the simulated bootloader
boots once before the client starts again; some points are also tested with a bare process kill
(no reboot), which takes another path through the recovery. Either way the device must be able to
boot a complete image at every moment, and the second run must finish the update.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from ota_client.faults import CHECKPOINTS, CRASH_STATUS
from ota_client.system import FileSystemInterface
from tests.client.conftest import IMAGES, LiveServer, run_client_once
from tests.client.proxy import Proxy, running_proxy

pytestmark = pytest.mark.e2e

NEW = IMAGES["1.1.0"]
NEW_SHA = hashlib.sha256(NEW).hexdigest()

# The phase state.json holds when the process dies at each checkpoint.
PHASE_AT = {
    "mid-download": "downloading",
    "mid-slot-write": "installing",
    "after-slot-write": "installed",
    "after-arm": "armed",
    "before-validation": "validating",
}


@pytest.fixture
def proxy(ota_server: LiveServer) -> Iterator[Proxy]:
    with running_proxy(ota_server.url) as running:
        yield running


def next_boot_is_complete(system: FileSystemInterface) -> bool:
    """Would the bootloader start a complete image now? The factory slot a is 'complete' as it
    is (an empty file in the simulation); slot b must hold the whole new image."""
    env = system.read_env()
    slot = env.trial if env.trial and env.trial_left > 0 else env.active
    return slot == "a" or system.slot_sha256(slot, len(NEW)) == NEW_SHA


CASES = [(point, True) for point in CHECKPOINTS] + [
    ("after-arm", False),
    ("before-validation", False),
]


@pytest.mark.parametrize(
    ("point", "reboot"),
    CASES,
    ids=[f"{p}-{'power-cut' if r else 'kill'}" for p, r in CASES],
)
def test_power_cut(
    ota_server: LiveServer, make_device: Any, proxy: Proxy, point: str, reboot: bool
) -> None:
    device = make_device(server=proxy.url)
    device.write_toml()
    system = FileSystemInterface(device.config.state_dir / "system")

    crashed = run_client_once(device, crash_at=point)
    assert crashed.returncode == CRASH_STATUS, crashed.stderr
    state = json.loads((device.config.state_dir / "state.json").read_text())
    assert state["phase"] == PHASE_AT[point]
    if point == "mid-slot-write":
        assert 0 < system.slot_path("b").stat().st_size < len(NEW)  # really cut in the middle
    assert next_boot_is_complete(system)
    if reboot:
        system.boot()
        assert next_boot_is_complete(system)

    finished = run_client_once(device)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout) == {"outcome": "idle", "detail": "up_to_date"}

    env = system.read_env()
    assert system.booted_slot() == "b" and env.active == "b" and env.trial == ""
    assert system.slot_sha256("b", len(NEW)) == NEW_SHA
    state = json.loads((device.config.state_dir / "state.json").read_text())
    assert state["phase"] == "idle" and state["last_result"]["outcome"] == "success"
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "success", session
    assert ota_server.device(device.device_id)["current_version"] == "1.1.0"
    if point == "mid-download":
        # The second process went on from the synced part of download.part.
        resumed = [seen for seen in proxy.downloads() if seen.range]
        assert len(proxy.downloads()) == 2 and len(resumed) == 1
        assert resumed[0].status == 206 and resumed[0].range != "bytes=0-"


def test_new_image_that_hangs_before_validation_is_abandoned_by_the_bootloader(
    ota_server: LiveServer, make_device: Any
) -> None:
    device = make_device()
    device.write_toml()
    system = FileSystemInterface(device.config.state_dir / "system")
    crashed = run_client_once(device, crash_at="before-validation")
    assert crashed.returncode == CRASH_STATUS, crashed.stderr
    # Each power cycle boots the trial again until its boots run out; then slot a.
    while system.read_env().trial:
        system.boot()
        assert next_boot_is_complete(system)
    assert system.booted_slot() == "a"

    finished = run_client_once(device)
    assert finished.returncode == 0, finished.stderr
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert session["error_message"].startswith("trial boot failed; device returned to slot a")
    assert ota_server.device(device.device_id)["current_version"] == "1.0.0"
    env = system.read_env()
    assert (system.booted_slot(), env.active, env.trial) == ("a", "a", "")
