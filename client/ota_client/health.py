"""The health check that decides whether a freshly booted image is kept.

A command (an argv list, run without a shell) that exits 0 when the device works. Without a
command, reaching the check counts as healthy: the new image booted far enough to start the
client, talk to the bootloader environment and run Python, which already rules out the worst
images. Real products should configure one (docs/client.md).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

OUTPUT_TAIL = 500


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    reason: str = ""


HealthCheck = Callable[[], HealthResult]


def command_health_check(argv: Sequence[str], timeout: float) -> HealthCheck:
    command = list(argv)

    def check() -> HealthResult:
        if not command:
            return HealthResult(True, "no health check configured")
        try:
            result = subprocess.run(  # noqa: S603 (an argv from the device's own config)
                command,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return HealthResult(False, f"the health check {command[0]} timed out after {timeout} s")
        except OSError as exc:
            return HealthResult(False, f"the health check {command[0]} could not run: {exc}")
        if result.returncode == 0:
            return HealthResult(True)
        output = (result.stderr.strip() or result.stdout.strip())[-OUTPUT_TAIL:]
        reason = f"the health check {command[0]} exited with status {result.returncode}"
        return HealthResult(False, f"{reason}: {output}" if output else reason)

    return check
