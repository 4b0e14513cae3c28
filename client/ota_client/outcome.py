"""What one step of the agent returns, and the per-device log prefix."""

from __future__ import annotations

import enum
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    PROGRESS = "progress"  # a step was taken; call step() again
    IDLE = "idle"  # nothing to do until the next poll
    OFFLINE = "offline"  # the server could not be reached; try again after a backoff
    ERROR = "error"  # the server refused us (not enrolled, ...); try again after a backoff
    REBOOTING = "rebooting"  # a real reboot was requested; the process is about to end


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    detail: str = ""
    retry_after: float | None = None


class DeviceLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the device, so the logs of many simulated devices can be told
    apart."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        device = self.extra["device"] if self.extra else "?"
        return f"[{device}] {msg}", kwargs
