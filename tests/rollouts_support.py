"""Helpers shared by the rollout tests: a fleet, a definition, a started rollout, a device run."""

from __future__ import annotations

from typing import Any

from devices.models import Device
from firmware.models import Firmware
from rollouts import evaluation, lifecycle, poll, services
from rollouts.lifecycle import Definition, StageSpec
from rollouts.models import Rollout
from tests.factories import DeviceFactory


def fleet(n: int, **fields: Any) -> list[Device]:
    return [DeviceFactory.create(current_version="1.0.0", **fields) for _ in range(n)]


def definition(firmware: Firmware, *percentages: int, **fields: Any) -> Definition:
    stages = [StageSpec(f"{p}%", p) for p in percentages or (10, 50, 100)]
    return Definition(name="to 1.1.0", firmware=firmware, stages=stages, **fields)


def started(firmware: Firmware, *percentages: int, **fields: Any) -> Rollout:
    rollout = lifecycle.create_rollout(definition(firmware, *percentages, **fields))
    return lifecycle.start_rollout(rollout)


def run_device(device: Device, outcome: str = "success") -> str:
    """One device polls and, if offered an update, reports it through to ``outcome``."""
    offer = poll.check_for_update(device.id)
    if offer.firmware is None:
        return offer.reason
    services.report_status(device.id, offer.session_uuid, status="downloading", progress=50)
    if outcome == "success":
        services.validate_session(
            device.id, offer.session_uuid, success=True, running_version=offer.firmware["version"]
        )
    elif outcome == "failed":
        services.report_status(
            device.id, offer.session_uuid, status="failed", error_message="install failed"
        )
    return offer.reason


def evaluate(rollout: Rollout) -> str:
    """One evaluation run of the rollout; what it did ("advanced", "completed", "" …)."""
    return evaluation.evaluate_rollout(rollout.id)
