"""Staged rollouts: definitions, membership, the poll, evaluation, rollback and the API."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from devices.models import Device
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event
from rollouts import evaluation, lifecycle, poll, services, targeting
from rollouts.buckets import Bucket, bucket
from rollouts.models import Rollout, RolloutStatus, UpdateSession
from tests.factories import DeviceFactory, DeviceGroupFactory, FirmwareFactory
from tests.rollouts_support import definition, evaluate, fleet, run_device, started

# --- Membership ----------------------------------------------------------------------------


def test_sql_and_python_buckets_agree(v2: Firmware) -> None:
    devices = fleet(60)
    rollout = lifecycle.create_rollout(definition(v2))
    in_sql = dict(Device.objects.annotate(b=Bucket("id", rollout.id)).values_list("id", "b"))
    assert in_sql == {d.id: bucket(d.id, rollout.id) for d in devices}


def test_stage_membership_grows_and_is_proportional(v2: Firmware) -> None:
    fleet(400)
    rollout = lifecycle.create_rollout(definition(v2))
    members = [
        set(targeting.in_stage(Device.objects.all(), rollout, p).values_list("id", flat=True))
        for p in (10, 50, 100)
    ]
    assert members[0] <= members[1] <= members[2] and len(members[2]) == 400
    assert 20 <= len(members[0]) <= 65 and 160 <= len(members[1]) <= 240


# --- Definitions ---------------------------------------------------------------------------


def create(api: APIClient, **body: Any):
    return api.post("/api/v1/rollouts", body, format="json")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stages": [{"percentage": 50}, {"percentage": 10}]}, "stages"),
        ({"stages": [{"percentage": 10}, {"percentage": 10}]}, "stages"),
        ({"stages": [{"percentage": 0}]}, "stages"),
        ({"stages": [{"percentage": 101}]}, "stages"),
        ({"stages": []}, "stages"),
        ({"success_threshold": 1.5}, "success_threshold"),
        ({"rollback_threshold": -0.1}, "rollback_threshold"),
        ({"target_groups": ["00000000-0000-0000-0000-000000000000"]}, "target_groups"),
        ({"device_type": "board-b"}, "device_type"),
        ({"start_at": "2001-01-01T00:00:00Z"}, "start_at"),
        ({"from_version_min": "one"}, "from_version_min"),
        ({"metadata_filters": {"bad key": 1}}, "metadata_filters"),
        ({"metadata_filters": {"k": [1, 2]}}, "metadata_filters"),
        ({"device_timeout": 5}, "device_timeout"),
    ],
)
def test_invalid_definitions_are_400_and_save_nothing(
    operator_api: APIClient, v2: Firmware, change: dict, field: str
) -> None:
    body = {"name": "r", "firmware": str(v2.id), "stages": [{"percentage": 10}], **change}
    reply = create(operator_api, **body)
    assert reply.status_code == 400, reply.content
    assert field in reply.json()["errors"]
    assert not Rollout.objects.exists()


def test_unpublished_firmware_is_refused(operator_api: APIClient, db: Any) -> None:
    draft = FirmwareFactory.create(version="3.0.0")
    reply = create(operator_api, name="r", firmware=str(draft.id), stages=[{"percentage": 10}])
    assert reply.status_code == 400 and "firmware" in reply.json()["errors"]


def test_overlapping_rollouts_are_refused_and_disjoint_ones_allowed(
    operator_api: APIClient, v2: Firmware
) -> None:
    eu, us = DeviceGroupFactory.create(name="eu"), DeviceGroupFactory.create(name="us")
    DeviceFactory.create(group=eu)
    DeviceFactory.create(group=us)
    body = {"name": "r", "firmware": str(v2.id), "stages": [{"percentage": 100}]}
    assert create(operator_api, **body, target_groups=[str(eu.id)]).status_code == 201
    reply = create(operator_api, **body)  # everyone: overlaps eu
    assert reply.status_code == 409 and reply.json()["code"] == "rollout_conflict"
    assert create(operator_api, **body, target_groups=[str(us.id)]).status_code == 201


def test_the_api_round_trip(operator_api: APIClient, v2: Firmware) -> None:
    reply = create(
        operator_api,
        name="spring",
        firmware=str(v2.id),
        stages=[{"name": "canary", "percentage": 1, "min_duration": 600}, {"percentage": 100}],
        metadata_filters={"region": "eu"},
        from_version_min="1.0.0",
    )
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["status"] == "scheduled" and body["device_type"] == "board-a"
    assert [s["name"] for s in body["stages"]] == ["canary", "100%"]
    rid = body["id"]
    reply = operator_api.patch(f"/api/v1/rollouts/{rid}", {"name": "spring 2"}, format="json")
    assert reply.status_code == 200 and reply.json()["name"] == "spring 2"
    assert operator_api.post(f"/api/v1/rollouts/{rid}/start").json()["status"] == "active"
    reply = operator_api.patch(
        f"/api/v1/rollouts/{rid}", {"stages": [{"percentage": 100}]}, format="json"
    )
    assert reply.status_code == 409 and reply.json()["code"] == "rollout_running"
    reply = operator_api.post(f"/api/v1/rollouts/{rid}/pause", {"reason": "lunch"}, format="json")
    assert reply.json()["status"] == "paused" and reply.json()["status_reason"] == "lunch"
    assert operator_api.post(f"/api/v1/rollouts/{rid}/pause").status_code == 409
    assert operator_api.post(f"/api/v1/rollouts/{rid}/resume").json()["status"] == "active"
    assert operator_api.post(f"/api/v1/rollouts/{rid}/advance").json()["current_stage"] == 1
    assert operator_api.post(f"/api/v1/rollouts/{rid}/advance").json()["status"] == "completed"
    assert operator_api.post(f"/api/v1/rollouts/{rid}/cancel").status_code == 409
    kinds = list(Event.objects.filter(rollout_id=rid).values_list("kind", flat=True))
    assert kinds == [
        "rollout.created",
        "rollout.updated",
        "rollout.started",
        "rollout.paused",
        "rollout.resumed",
        "rollout.advanced",
        "rollout.completed",
    ]
    assert Event.objects.filter(rollout_id=rid, kind="rollout.paused").get().actor == "user:olivia"


def test_devices_and_viewers_cannot_control_rollouts(api: APIClient, viewer, device_a, v2) -> None:
    rollout = lifecycle.create_rollout(definition(v2))
    api.force_login(viewer)
    assert api.post(f"/api/v1/rollouts/{rollout.id}/start").status_code == 403
    assert device_a.client.post(f"/api/v1/rollouts/{rollout.id}/start").status_code in (401, 403)
    assert Rollout.objects.get().status == RolloutStatus.SCHEDULED


# --- The poll -------------------------------------------------------------------------------


def test_devices_in_the_stage_are_offered_the_rollout(v2: Firmware) -> None:
    devices = fleet(100)
    rollout = started(v2, 20, 100)
    reasons = [run_device(d, "none") for d in devices]
    inside = [d for d in devices if bucket(d.id, rollout.id) < 2000]
    assert reasons.count("new") == len(inside)
    assert reasons.count("waiting_for_stage") == 100 - len(inside)
    session = UpdateSession.objects.filter(rollout=rollout).first()
    assert session is not None and session.stage == 0 and not session.is_rollback


def test_targeting_by_group_version_and_metadata(v2: Firmware) -> None:
    eu = DeviceGroupFactory.create(name="eu")
    wanted = DeviceFactory.create(group=eu, metadata={"hw": "rev2"}, current_version="1.0.0")
    DeviceFactory.create(group=eu, metadata={"hw": "rev1"}, current_version="1.0.0")
    DeviceFactory.create(metadata={"hw": "rev2"}, current_version="1.0.0")
    DeviceFactory.create(group=eu, metadata={"hw": "rev2"}, current_version="0.5.0")
    rollout = started(
        v2, 100, target_groups=[eu], metadata_filters={"hw": "rev2"}, from_version_min="0.9.0"
    )
    for device in Device.objects.all():
        run_device(device, "none")
    assert list(UpdateSession.objects.values_list("device_id", flat=True)) == [wanted.id]
    assert evaluation.rollout_metrics(rollout)["targeted_devices"] == 1


def test_rollouts_never_downgrade_and_skip_up_to_date_devices(v2: Firmware) -> None:
    newer = DeviceFactory.create(current_version="2.0.0")
    same = DeviceFactory.create(current_version="1.1.0")
    started(v2, 100)
    assert run_device(newer, "none") == "newer_installed"
    assert run_device(same, "none") == "up_to_date"


def test_an_explicit_assignment_wins_over_a_rollout(v1: Firmware, v2: Firmware) -> None:
    [device] = fleet(1)
    started(v2, 100)
    Device.objects.filter(pk=device.pk).update(current_version="0.9.0", current_version_key="")
    device.refresh_from_db()
    from devices import services as device_services

    device_services.update_device(device, target_version="1.0.0")
    offer = poll.check_for_update(device.id)
    assert offer.firmware is not None and offer.firmware["version"] == "1.0.0"
    assert offer.rollout_id is None


@pytest.mark.django_db(transaction=True)
def test_the_poll_stays_within_two_queries_with_rollouts(
    django_assert_max_num_queries: Any,
) -> None:
    v2 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    devices = fleet(20)
    started(v2, 100)
    targeting.live_specs()  # warm, as the previous poll of any device would
    for device in devices[:5]:
        with django_assert_max_num_queries(2):
            offer = poll.check_for_update(device.id)
        assert offer.reason == "new"
        with django_assert_max_num_queries(2):
            assert poll.check_for_update(device.id).reason == "in_progress"


# --- manage.py rollout ----------------------------------------------------------------------


def test_the_rollout_command(v2: Firmware, capsys: Any) -> None:
    import json

    from django.core.management import CommandError, call_command

    fleet(10)
    call_command(
        "rollout",
        "--json",
        "create",
        "--name",
        "cli",
        "--firmware",
        "board-a:1.1.0",
        "--stages",
        "10:60,100",
        "--metadata",
        "k=v",
        "--start",
    )
    created = json.loads(capsys.readouterr().out)
    assert created["status"] == "active" and created["firmware"] == "board-a:1.1.0"
    rollout = Rollout.objects.get(pk=created["id"])
    assert rollout.metadata_filters == {"k": "v"} and rollout.stages.count() == 2
    call_command("rollout", "pause", created["id"], "--reason", "checking")
    assert "paused" in capsys.readouterr().out
    call_command("rollout", "--json", "metrics", created["id"])
    assert json.loads(capsys.readouterr().out)["status"] == "paused"
    call_command("rollout", "list")
    assert "cli" in capsys.readouterr().out
    with pytest.raises(CommandError, match="cannot be paused"):
        call_command("rollout", "pause", created["id"])
    with pytest.raises(CommandError, match="No firmware"):
        call_command("rollout", "create", "--name", "x", "--firmware", "board-a:9.9.9")
    with pytest.raises(CommandError, match="increase"):
        call_command(
            "rollout", "create", "--name", "x", "--firmware", "board-a:1.1.0", "--stages", "50,10"
        )
    with pytest.raises(CommandError, match="No device group"):
        call_command(
            "rollout", "create", "--name", "x", "--firmware", "board-a:1.1.0", "--group", "nope"
        )
    assert Event.objects.filter(rollout_id=rollout.id, kind="rollout.paused").get().actor == (
        "manage.py rollout"
    )


def test_devices_that_will_never_update_do_not_hold_a_stage_up(v2: Firmware) -> None:
    waiting = fleet(3)
    DeviceFactory.create(current_version="1.1.0")
    DeviceFactory.create(current_version="1.1.0")
    rollout = started(v2, 100, min_devices=10)
    for device in waiting:
        run_device(device)
    assert evaluate(rollout) == "completed"


def test_resuming_a_rollout_that_could_not_start_starts_it(v2: Firmware) -> None:
    fleet(3)
    rollout = lifecycle.create_rollout(
        definition(v2, 100, start_at=timezone.now() + timedelta(minutes=1))
    )
    Rollout.objects.filter(pk=rollout.pk).update(status=RolloutStatus.PAUSED)
    resumed = lifecycle.resume_rollout(rollout)
    assert resumed.status == RolloutStatus.ACTIVE and resumed.current_stage == 0
    assert resumed.started_at is not None


def test_the_oldest_live_rollout_that_targets_a_device_decides_for_it(v2: Firmware) -> None:
    v3 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.2.0"))
    eu = DeviceGroupFactory.create(name="eu")
    devices = fleet(40, group=eu)
    older = started(v2, 1, target_groups=[eu])
    # A newer rollout that also targets them: creating it is refused, but devices can come to
    # match two rollouts later (a group or metadata change), so build the overlap directly.
    newer = Rollout.objects.create(
        name="newer",
        firmware=v3,
        device_type="board-a",
        status=RolloutStatus.ACTIVE,
        current_stage=0,
        started_at=timezone.now(),
    )
    newer.stages.create(position=0, name="all", percentage=100)
    targeting.forget_live_specs()
    outside = [d for d in devices if bucket(d.id, older.id) >= 100]
    assert poll.check_for_update(outside[0].id).reason == "waiting_for_stage"
    lifecycle.pause_rollout(older)
    assert poll.check_for_update(outside[0].id).reason == "rollout_paused"
    assert not UpdateSession.objects.filter(rollout=newer).exists()


@pytest.mark.parametrize(
    ("actual", "wanted", "equal"),
    [
        ("eu", "eu", True),
        (1, 1.0, True),
        (True, 1, False),
        (1, True, False),
        ("1", 1, False),
        (True, True, True),
        (None, "x", False),
    ],
)
def test_metadata_filters_compare_like_json(actual: Any, wanted: Any, equal: bool) -> None:
    assert targeting.json_equal(actual, wanted) is equal


def test_failures_in_an_earlier_stage_still_roll_back(v1: Firmware, v2: Firmware) -> None:
    devices = fleet(100)
    rollout = started(v2, 50, 100, min_devices=10, rollback_threshold=0.2)
    first = [d for d in devices if bucket(d.id, rollout.id) < 5000]
    for device in first:
        run_device(device, "none")  # offered, reports come later
    for device in first[:10]:
        offer = poll.check_for_update(device.id)
        services.validate_session(
            device.id, offer.session_uuid, success=True, running_version="1.1.0"
        )
    assert evaluate(rollout) == "advanced"
    for device in first[10:]:  # the rest of stage 1 fails after the stage advanced
        offer = poll.check_for_update(device.id)
        services.report_status(device.id, offer.session_uuid, status="failed")
    assert evaluate(rollout) == "rolled_back"
    rollout.refresh_from_db()
    assert "of the rollout failed" in rollout.status_reason


def test_renaming_a_scheduled_rollout_after_its_start_at_passed(
    operator_api: APIClient, v2: Firmware
) -> None:
    rollout = lifecycle.create_rollout(
        definition(v2, 100, start_at=timezone.now() + timedelta(minutes=5))
    )
    Rollout.objects.filter(pk=rollout.pk).update(start_at=timezone.now() - timedelta(seconds=1))
    reply = operator_api.patch(f"/api/v1/rollouts/{rollout.id}", {"name": "renamed"}, format="json")
    assert reply.status_code == 200, reply.content
    reply = operator_api.patch(
        f"/api/v1/rollouts/{rollout.id}", {"start_at": "2001-01-01T00:00:00Z"}, format="json"
    )
    assert reply.status_code == 400


def test_a_rollout_started_before_its_devices_enrolled_waits_for_them(v2: Firmware) -> None:
    rollout = started(v2, 50, 100)
    assert evaluate(rollout) == "advanced"  # an empty first stage does not hold it up
    assert evaluate(rollout) == ""  # but the last one does not complete with nobody in it
    devices = fleet(4)
    for device in devices:
        run_device(device)
    assert evaluate(rollout) == "completed"
