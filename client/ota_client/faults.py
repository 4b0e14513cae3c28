"""A crash hook for tests: kill the process at a named point, as a power cut would.

This is a TEST HOOK, harmless in production: it does nothing unless the environment variable
``OTA_CLIENT_CRASH_AT`` is set. When it equals a checkpoint's name, the process ends at once with
``os._exit(137)`` (the status of a SIGKILL): no ``finally`` blocks, no buffered writes flushed by
Python, no atexit handlers, which is as close to pulling the plug as a process can get. With
``name:N`` the process dies the N-th time it reaches that checkpoint (counted per process).

The checkpoints the client passes (see ``ota_client.agent``):

``mid-download``       after a part of the image was written and synced to download.part
``mid-slot-write``     after the first chunk of the image went into the inactive slot
``after-slot-write``   the slot is written and verified, the trial is not armed yet
``after-arm``          the trial is armed in the boot environment, the reboot has not happened
``before-validation``  after the reboot into the new slot, before the health check and commit

The tests run ``python -m ota_client.cli once`` with the variable set, then run it again without
and check that the device ends on a bootable, correct slot (tests/client/test_power_cuts.py).
"""

from __future__ import annotations

import os
import threading

ENV_VAR = "OTA_CLIENT_CRASH_AT"
CRASH_STATUS = 137

CHECKPOINTS = (
    "mid-download",
    "mid-slot-write",
    "after-slot-write",
    "after-arm",
    "before-validation",
)

_counts: dict[str, int] = {}
_lock = threading.Lock()  # simulated devices run as threads in one process


def _target() -> tuple[str, int] | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    name, _, nth = value.partition(":")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        count = 1
    return name, max(count, 1)


def checkpoint(name: str) -> None:
    """End the process here if OTA_CLIENT_CRASH_AT names this checkpoint (see module docstring)."""
    target = _target()
    if target is None or target[0] != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        reached = _counts[name]
    if reached == target[1]:
        os._exit(CRASH_STATUS)
