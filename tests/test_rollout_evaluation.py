"""Rollout evaluation: stages advance, wait, complete, roll back, time out and start on time."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from devices.models import Device
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event
from rollouts import evaluation, lifecycle, poll, services
from rollouts.buckets import bucket
from rollouts.lifecycle import Definition, StageSpec
from rollouts.models import Rollout, RolloutStatus, SessionStatus, UpdateSession
from tests.factories import FirmwareFactory
from tests.rollouts_support import definition, evaluate, fleet, run_device, started

# --- Evaluation --------------------------------------------------------------------------------


def test_a_healthy_rollout_advances_and_completes(v2: Firmware) -> None:
    devices = fleet(120)
    rollout = started(v2, 10, 50, 100, min_devices=3)
    for _ in range(3):
        for device in devices:
            run_device(device)
        evaluate(rollout)
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.COMPLETED, rollout.status_reason
    assert Device.objects.filter(current_version="1.1.0").count() == 120
    metrics = evaluation.rollout_metrics(rollout)
    assert [s["state"] for s in metrics["stages"]] == ["done", "done", "done"]
    assert sum(s["devices"] for s in metrics["stages"]) == 120
    assert sum(s["sessions"]["success"] for s in metrics["stages"]) == 120


def test_a_stage_waits_for_min_devices_and_min_duration(v2: Firmware) -> None:
    devices = fleet(200)
    rollout = lifecycle.start_rollout(
        lifecycle.create_rollout(
            Definition(
                name="r",
                firmware=v2,
                min_devices=5,
                stages=[StageSpec("a", 50, 3600), StageSpec("b", 100)],
            )
        )
    )
    inside = [d for d in devices if bucket(d.id, rollout.id) < 5000]
    for device in inside[:4]:
        run_device(device)
    assert evaluate(rollout) == ""  # 4 finished < min_devices
    for device in inside[4:]:
        run_device(device)
    assert evaluate(rollout) == ""  # soaking for an hour
    Rollout.objects.filter(pk=rollout.pk).update(
        stage_started_at=timezone.now() - timedelta(hours=2)
    )
    assert evaluate(rollout) == "advanced"
    assert evaluate(rollout) == ""  # idempotent: nothing new to judge
    rollout.refresh_from_db()
    assert rollout.current_stage == 1


def test_the_last_stage_completes_only_when_every_device_finished(v2: Firmware) -> None:
    devices = fleet(10)
    rollout = started(v2, 100, min_devices=2)
    for device in devices[:9]:
        run_device(device)
    assert evaluate(rollout) == ""  # one targeted device has not finished yet
    run_device(devices[9])
    assert evaluate(rollout) == "completed"
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.COMPLETED and rollout.completed_at is not None


def test_a_small_stage_is_not_held_up_by_a_device_that_declined(v2: Firmware) -> None:
    """A stage smaller than min_devices waits for all of its devices, but not for one whose
    session was cancelled (a DDI device's "rejected"): the rollout never offers it again."""
    devices = fleet(3)
    rollout = started(v2, 100, min_devices=5)
    for device in devices[:2]:
        run_device(device)
    assert evaluate(rollout) == ""  # the third has not answered yet
    offer = poll.check_for_update(devices[2].id)
    assert offer.session_id is not None
    services.cancel_session(offer.session_id, reason="The device declined.", by_device=True)
    assert poll.check_for_update(devices[2].id).reason == "already_cancelled"
    assert evaluate(rollout) == "completed"


def test_failures_roll_back_the_devices_that_updated(v1: Firmware, v2: Firmware) -> None:
    devices = fleet(200)
    rollout = started(v2, 30, 100, min_devices=10, rollback_threshold=0.2)
    inside = [d for d in devices if bucket(d.id, rollout.id) < 3000]
    outcomes = ["failed" if i % 3 == 0 else "success" for i in range(len(inside))]
    for device, outcome in zip(inside, outcomes, strict=True):
        run_device(device, outcome)
    assert evaluate(rollout) == "rolled_back"
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.ROLLED_BACK and "rollback threshold" in (
        rollout.status_reason
    )
    succeeded = [d for d, o in zip(inside, outcomes, strict=True) if o == "success"]
    rollbacks = UpdateSession.objects.filter(rollout=rollout, is_rollback=True)
    assert rollbacks.count() == len(succeeded)
    assert set(rollbacks.values_list("firmware__version", flat=True)) == {"1.0.0"}
    # Each updated device is offered 1.0.0 as a permitted rollback and goes back.
    for device in succeeded:
        offer = poll.check_for_update(device.id)
        assert offer.firmware is not None and offer.firmware["version"] == "1.0.0"
        assert offer.is_rollback and offer.reason == "in_progress"
        services.validate_session(
            device.id, offer.session_uuid, success=True, running_version="1.0.0"
        )
    assert Device.objects.filter(current_version="1.1.0").count() == 0
    # Devices outside the first stage are never offered the bad firmware.
    outside = [d for d in devices if d not in inside]
    assert all(poll.check_for_update(d.id).firmware is None for d in outside)
    assert evaluation.rollout_metrics(rollout)["rollback_sessions"]["success"] == len(succeeded)


def test_without_auto_rollback_failures_pause_with_a_reason(v2: Firmware) -> None:
    devices = fleet(40)
    rollout = started(v2, 100, min_devices=5, rollback_threshold=0.1, auto_rollback=False)
    for i, device in enumerate(devices):
        run_device(device, "failed" if i % 2 else "success")
    assert evaluate(rollout) == "paused"
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.PAUSED and "failed" in rollout.status_reason
    assert not UpdateSession.objects.filter(is_rollback=True).exists()
    paused = Event.objects.get(rollout_id=rollout.id, kind="rollout.paused")
    assert paused.actor == "system" and paused.data["reason"] == rollout.status_reason


def test_a_stage_short_of_its_success_threshold_waits_then_pauses_once_all_finished(
    v2: Firmware,
) -> None:
    """Rates between the thresholds (under 95% success, yet not over 20% failed) wait while
    devices of the stage may still finish, and pause with a reason once all have: waiting on
    would stall the rollout without a word."""
    devices = fleet(10)
    rollout = started(v2, 100, min_devices=5, rollback_threshold=0.2)
    run_device(devices[0], "failed")
    for device in devices[1:9]:
        run_device(device)
    assert evaluate(rollout) == ""  # 8 of 9 (89%), and one device still to finish
    run_device(devices[9])
    assert evaluate(rollout) == "paused"  # 9 of 10 (90%), and none left
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.PAUSED
    assert "all 10 devices finished and 9 succeeded (90%)" in rollout.status_reason
    paused = Event.objects.get(rollout_id=rollout.id, kind="rollout.paused")
    assert paused.actor == "system" and paused.data["reason"] == rollout.status_reason
    # An operator who accepts the rate lowers the threshold and resumes.
    lifecycle.update_rollout(rollout, {"success_threshold": 0.9})
    lifecycle.resume_rollout(rollout)
    assert evaluate(rollout) == "completed"


def test_stuck_sessions_time_out_and_count_as_failures(v2: Firmware) -> None:
    devices = fleet(10)
    rollout = started(v2, 100, min_devices=5, rollback_threshold=0.3, device_timeout=600)
    for device in devices:
        run_device(device, "none")  # offered, then silent
    UpdateSession.objects.update(started_at=timezone.now() - timedelta(hours=1))
    assert evaluate(rollout) == "rolled_back"
    assert UpdateSession.objects.filter(status=SessionStatus.FAILED).count() == 10
    assert "Timed out" in (UpdateSession.objects.get(device=devices[0]).error_message or "")


def test_quarantined_firmware_pauses_its_rollout_and_nothing_times_out(v2: Firmware) -> None:
    """Storage that lost the firmware's bytes is no failure of the devices: the rollout pauses
    (an engine pause, which alerts), open sessions wait, and it goes on once restored."""
    devices = fleet(6)
    rollout = started(v2, 100, min_devices=5, device_timeout=600)
    for device in devices[:3]:
        run_device(device, "none")  # offered, mid-download
    content = v2.file.read()
    v2.file.close()
    v2.file.storage.delete(str(v2.file.name))
    assert firmware_services.verify_storage(v2)["quarantined"]
    assert evaluate(rollout) == "paused"
    rollout.refresh_from_db()
    assert "quarantined" in rollout.status_reason and str(v2.id) in rollout.status_reason
    UpdateSession.objects.update(started_at=timezone.now() - timedelta(hours=1))
    lifecycle.resume_rollout(rollout)
    assert evaluate(rollout) == "paused"  # still quarantined: paused again, nothing timed out
    assert UpdateSession.objects.filter(status=SessionStatus.FAILED).count() == 0
    assert firmware_services.restore_storage(v2, ContentFile(content))["ok"]
    lifecycle.update_rollout(rollout, {"device_timeout": 7200})
    lifecycle.resume_rollout(rollout)
    for device in devices:
        run_device(device)
    assert evaluate(rollout) == "completed"
    assert UpdateSession.objects.filter(status=SessionStatus.SUCCESS).count() == 6


def test_a_scheduled_rollout_starts_by_itself(v2: Firmware) -> None:
    fleet(5)
    rollout = lifecycle.create_rollout(
        definition(v2, 100, start_at=timezone.now() + timedelta(minutes=5))
    )
    assert evaluate(rollout) == ""
    Rollout.objects.filter(pk=rollout.pk).update(start_at=timezone.now() - timedelta(seconds=1))
    assert evaluation.due_rollout_ids() == [rollout.id]
    assert evaluate(rollout) == "started"
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.ACTIVE and rollout.current_stage == 0


def test_cancel_cancels_open_sessions(operator_api: APIClient, v2: Firmware) -> None:
    devices = fleet(5)
    rollout = started(v2, 100)
    for device in devices:
        run_device(device, "none")
    reply = operator_api.post(
        f"/api/v1/rollouts/{rollout.id}/cancel", {"reason": "bad build"}, format="json"
    )
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    assert UpdateSession.objects.filter(status=SessionStatus.CANCELLED).count() == 5
    assert all(poll.check_for_update(d.id).firmware is None for d in devices)


def test_a_paused_rollout_offers_nothing_new_but_lets_open_sessions_finish(v2: Firmware) -> None:
    first, second = fleet(2)
    rollout = started(v2, 100)
    offer = poll.check_for_update(first.id)
    lifecycle.pause_rollout(rollout)
    assert poll.check_for_update(second.id).firmware is None
    assert poll.check_for_update(first.id).reason == "in_progress"
    assert offer.session_uuid is not None


def test_metrics_endpoint(operator_api: APIClient, v2: Firmware) -> None:
    devices = fleet(30)
    rollout = started(v2, 50, 100)
    for device in devices:
        run_device(device)
    reply = operator_api.get(f"/api/v1/rollouts/{rollout.id}/metrics")
    assert reply.status_code == 200
    body = reply.json()
    assert body["targeted_devices"] == 30
    first = body["stages"][0]
    assert first["state"] == "current" and first["sessions"]["success"] == first["devices"]
    assert first["success_rate"] == 1.0


@pytest.mark.django_db(transaction=True)
def test_two_workers_evaluating_at_once_advance_once() -> None:
    v2 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    devices = fleet(60)
    rollout = started(v2, 10, 50, 100, min_devices=1)
    for device in devices:
        run_device(device)
    results: list[str] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            results.append(evaluation.evaluate_rollout(rollout.id))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rollout.refresh_from_db()
    assert rollout.current_stage == 1, results
    assert results.count("advanced") == 1
    assert Event.objects.filter(rollout_id=rollout.id, kind="rollout.advanced").count() == 1
