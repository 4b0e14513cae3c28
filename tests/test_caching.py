"""The poll's caches: every change an operator makes reaches the next poll, and what a poll costs.

The poll caches published firmware (FIRMWARE_CACHE_TIMEOUT) and the live rollouts
(ROLLOUT_CACHE_TIMEOUT); it reads the device row on every poll (docs/performance.md says why the
device and its eligibility are not cached). Each test warms the caches first, as the fleet's
previous polls would, then makes the change and checks exactly what the next poll answers.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from devices import certificates
from devices import services as device_services
from devices.models import Device
from firmware import services as firmware_services
from firmware import signing
from firmware.models import Firmware
from ota_site import cache
from rollouts import lifecycle, poll, targeting
from rollouts.models import SessionStatus, UpdateSession
from tests.conftest import DeviceActor, enroll
from tests.factories import DeviceGroupFactory, FirmwareFactory
from tests.rollouts_support import fleet, started


def check(actor: DeviceActor) -> dict[str, Any]:
    reply = actor.client.get("/api/v1/updates/check")
    assert reply.status_code == 200, reply.content
    return reply.json()


def reason(device: Device) -> str:
    return poll.check_for_update(device.id).reason


def cached(key: str) -> bool:
    return cache.get(key) is not cache.MISSING


def published_key(firmware: Firmware) -> str:
    return firmware_services._published_key(firmware.device_type, firmware.version_key)


# --- Operator changes to devices and groups --------------------------------------------------


def test_an_assignment_reaches_the_next_poll(
    device_a: DeviceActor, v1: Firmware, v2: Firmware
) -> None:
    assert check(device_a)["reason"] == "no_assignment"
    assert cached(targeting.LIVE_SPECS_KEY)
    device_services.update_device(device_a.refresh(), target_version="1.1.0")
    offer = check(device_a)
    assert (offer["reason"], offer["version"]) == ("new", "1.1.0")
    # Taking it back cancels the open session at the next poll.
    device_services.update_device(device_a.refresh(), target_version=None)
    assert check(device_a)["reason"] == "no_assignment"
    assert UpdateSession.objects.get(device=device_a.device).status == SessionStatus.CANCELLED


def test_a_group_target_change_reaches_members_at_the_next_poll(
    device_a: DeviceActor, v1: Firmware, v2: Firmware
) -> None:
    group = DeviceGroupFactory.create(name="lab")
    device_services.update_device(device_a.refresh(), group=group)
    device_services.update_group(group, target_version="1.0.0")
    assert check(device_a)["reason"] == "up_to_date"
    assert cached(published_key(v1))
    device_services.update_group(group, target_version="1.1.0")
    offer = check(device_a)
    assert (offer["reason"], offer["version"]) == ("new", "1.1.0")
    device_services.update_group(group, target_version="1.0.0")
    assert check(device_a)["reason"] == "up_to_date"


def test_moving_a_device_to_another_group_reaches_the_next_poll(
    device_a: DeviceActor, v2: Firmware
) -> None:
    still = DeviceGroupFactory.create(name="still")
    moving = DeviceGroupFactory.create(name="moving")
    device_services.update_group(moving, target_version="1.1.0")
    device_services.update_device(device_a.refresh(), group=still)
    assert check(device_a)["reason"] == "no_assignment"
    device_services.update_device(device_a.refresh(), group=moving)
    assert check(device_a)["reason"] == "new"


def test_a_retry_reaches_the_next_poll(device_a: DeviceActor, v2: Firmware) -> None:
    device_services.update_device(device_a.refresh(), target_version="1.1.0")
    session = check(device_a)["session_id"]
    reply = device_a.client.post(
        "/api/v1/status", {"session_id": session, "status": "failed"}, format="json"
    )
    assert reply.status_code == 200, reply.content
    assert check(device_a)["reason"] == "already_failed"
    device_services.retry_update(device_a.refresh())
    offer = check(device_a)
    assert offer["reason"] == "new" and offer["session_id"] != session


def test_revoking_a_device_refuses_its_next_poll(device_a: DeviceActor, v2: Firmware) -> None:
    assert check(device_a)["reason"] == "no_assignment"
    certificates.revoke_device(device_a.refresh(), reason="stolen")
    reply = device_a.client.get("/api/v1/updates/check")
    assert reply.status_code == 401 and reply.json()["code"] == "device_revoked"


def test_a_credentials_reset_refuses_the_next_poll(device_a: DeviceActor) -> None:
    assert check(device_a)["reason"] == "no_assignment"
    device_services.reset_credentials(device_a.refresh())
    reply = device_a.client.get("/api/v1/updates/check")
    assert reply.status_code == 401 and reply.json()["code"] == "credentials_reset"


# --- Rollout transitions ---------------------------------------------------------------------


def test_rollout_transitions_reach_the_next_poll(v2: Firmware) -> None:
    first, second, third = fleet(3)
    rollout = lifecycle.create_rollout(
        lifecycle.Definition(name="to 1.1.0", firmware=v2, stages=[lifecycle.StageSpec("all", 100)])
    )
    assert reason(first) == "no_assignment"  # caches "no live rollouts"
    lifecycle.start_rollout(rollout)
    assert reason(first) == "new"
    lifecycle.pause_rollout(rollout)
    assert reason(second) == "rollout_paused"
    assert reason(first) == "in_progress"  # a session already open goes on
    lifecycle.resume_rollout(rollout)
    assert reason(second) == "new"
    lifecycle.cancel_rollout(rollout)
    assert reason(third) == "no_assignment"
    assert reason(first) == "no_assignment"  # its session was cancelled with the rollout
    assert UpdateSession.objects.get(device=first).status == SessionStatus.CANCELLED


def test_advancing_a_stage_reaches_the_next_poll(v2: Firmware) -> None:
    devices = fleet(40)
    rollout = started(v2, 10, 100)
    waiting = [device for device in devices if reason(device) == "waiting_for_stage"]
    assert waiting and cached(targeting.LIVE_SPECS_KEY)
    lifecycle.advance_rollout(rollout)
    assert {reason(device) for device in waiting} == {"new"}


# --- Firmware changes ------------------------------------------------------------------------


def test_publishing_reaches_a_device_waiting_for_its_assignment(device_a: DeviceActor) -> None:
    draft = FirmwareFactory.create(version="1.2.0")
    device_services.update_device(device_a.refresh(), target_version="1.2.0")
    assert check(device_a)["reason"] == "not_published"
    assert cache.get(published_key(draft)) == "none"  # "not published", cached
    firmware_services.publish_firmware(draft)
    offer = check(device_a)
    assert (offer["reason"], offer["version"]) == ("new", "1.2.0")


def test_deleting_reaches_a_device_assigned_to_that_version(v1: Firmware) -> None:
    [device] = fleet(1)
    device_services.update_device(device, target_version="1.0.0")
    assert reason(device) == "up_to_date"  # the lookup cached it; no session refers to it
    assert cached(published_key(v1))
    firmware_services.delete_firmware(v1)
    assert reason(device) == "not_published"


def quarantine(firmware: Firmware) -> bytes:
    """Corrupt the stored bytes and let the read-back check quarantine the firmware."""
    path = Path(firmware.file.path)
    original = path.read_bytes()
    path.write_bytes(b"tampered" + original[8:])
    assert firmware_services.verify_storage(firmware)["quarantined"]
    return original


def restore(firmware: Firmware, original: bytes) -> None:
    Path(firmware.file.path).write_bytes(original)
    assert firmware_services.verify_storage(firmware)["ok"]


def test_quarantine_and_restore_reach_assigned_devices(v2: Firmware) -> None:
    first, second = fleet(2)
    group = DeviceGroupFactory.create(name="lab")
    Device.objects.update(group=group)
    device_services.update_group(group, target_version="1.1.0")
    assert reason(first) == "new"
    assert cached(published_key(v2)) and cached(firmware_services._by_id_key(v2.id))
    original = quarantine(v2)
    assert reason(second) == "not_published"
    # The open session of a withdrawn firmware is cancelled, not continued.
    assert reason(first) == "not_published"
    assert UpdateSession.objects.get(device=first).status == SessionStatus.CANCELLED
    restore(v2, original)
    assert reason(second) == "new"


def test_quarantine_reaches_rollout_offers_before_the_live_rollouts_expire(
    v2: Firmware,
) -> None:
    first, second, third = fleet(3)
    started(v2, 100)
    assert reason(first) == "new"
    original = quarantine(v2)
    assert cached(targeting.LIVE_SPECS_KEY)  # still naming the rollout and its firmware
    assert reason(second) == "no_assignment"
    assert reason(first) == "firmware_unavailable"  # the session it had cannot go on
    restore(v2, original)
    assert reason(third) == "new"


def test_re_signing_on_key_retirement_reaches_the_next_offer(
    device_a: DeviceActor, device_b: DeviceActor, v2: Firmware
) -> None:
    started(v2, 100)
    old_key = str(v2.signing_key_id)
    assert check(device_a)["key_id"] == old_key
    current = signing.rotate()
    signing.retire(old_key)
    v2.refresh_from_db()
    offer = check(device_b)
    assert (offer["reason"], offer["key_id"]) == ("new", current.key_id)
    assert offer["signature"] == v2.signature
    # The device whose session was opened before follows it with the new signature too.
    offer = check(device_a)
    assert (offer["reason"], offer["key_id"]) == ("in_progress", current.key_id)


# --- After commit ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_poll_between_a_pause_and_its_commit_leaves_no_stale_cache() -> None:
    v2 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    rollout = started(v2, 100)
    assert reason(fleet(1)[0]) == "new"

    def poll_elsewhere() -> None:
        # Another web worker's poll reads the live rollouts: it cannot see the pause yet and
        # caches the rollout as active.
        try:
            targeting.live_specs()
        finally:
            connections.close_all()

    with transaction.atomic():
        lifecycle.pause_rollout(rollout)
        other = threading.Thread(target=poll_elsewhere)
        other.start()
        other.join()
        assert cache.get(targeting.LIVE_SPECS_KEY)[0]["status"] == "active"
    # The cache was cleared again after the commit.
    assert not cached(targeting.LIVE_SPECS_KEY)
    assert reason(fleet(1)[0]) == "rollout_paused"


# --- What a poll costs ----------------------------------------------------------------------


# Outside a test transaction, so that opening a session is the lone INSERT it is in production
# (inside one it needs a savepoint around it).
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("patient_redis")
def test_queries_per_poll_with_warm_caches(django_assert_num_queries: Any, settings: Any) -> None:
    for version in ("1.0.0", "1.1.0"):
        firmware_services.publish_firmware(FirmwareFactory.create(version=version))
    device_a = enroll("device-a")
    group = DeviceGroupFactory.create(name="lab")
    device_services.update_device(device_a.refresh(), group=group)
    device_services.update_group(group, target_version="1.0.0")
    check(device_a)  # warms the caches, as the fleet's previous polls do
    firmware_services.offer_keys(str(Firmware.objects.get(version="1.1.0").signing_key_id))
    with django_assert_num_queries(1):  # the device row; nothing is due
        assert check(device_a)["reason"] == "up_to_date"
    device_services.update_group(group, target_version="1.1.0")
    firmware_services.published_firmware("board-a", "1.1.0")  # another member's poll did
    with django_assert_num_queries(2):  # the device row; the INSERT that opens the session
        assert check(device_a)["reason"] == "new"
    with django_assert_num_queries(1):
        assert check(device_a)["reason"] == "in_progress"
    Device.objects.filter(pk=device_a.id).update(last_seen=None)
    with django_assert_num_queries(1):  # last_seen goes to Redis (ota_site.presence)
        assert check(device_a)["reason"] == "in_progress"
    settings.DEVICE_LAST_SEEN_BUFFER = False
    with django_assert_num_queries(2):  # the device row; the coalesced last_seen
        assert check(device_a)["reason"] == "in_progress"


@pytest.mark.django_db(transaction=True)
def test_queries_per_poll_with_a_rollout() -> None:
    v2 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    devices = fleet(20)
    started(v2, 50, 100)
    targeting.live_specs()  # warm, as the fleet's previous polls do
    counts: dict[str, set[int]] = {}
    for device in devices:
        with CaptureQueriesContext(connections["default"]) as queries:
            result = reason(device)
        counts.setdefault(result, set()).add(len(queries))
    # The device row, and for an offer the INSERT that opens the session.
    assert counts == {"new": {2}, "waiting_for_stage": {1}}


# --- The device read -------------------------------------------------------------------------


def test_the_compiled_device_read_returns_what_the_queryset_returns(
    device_a: DeviceActor, device_b: DeviceActor, v2: Firmware
) -> None:
    group = DeviceGroupFactory.create(name="lab", target_version="1.1.0")
    group.target_set_at = timezone.now()
    group.save()
    device_services.update_device(device_a.refresh(), group=group, metadata={"site": "north"})
    assert check(device_a)["reason"] == "new"
    for actor in (device_a, device_b):  # with a group and a session, and with neither
        expected = (
            Device.objects.select_related("group")
            .annotate(latest=poll._latest_session_subquery())
            .get(pk=actor.id)
        )
        found = poll.read_device(actor.id)
        assert found is not None
        device, latest = found
        fields = [field.attname for field in Device._meta.concrete_fields]
        assert [getattr(device, f) for f in fields] == [getattr(expected, f) for f in fields]
        assert device.group == expected.group
        if device.group is not None:
            assert device.group.target_set_at == group.target_set_at
        assert poll._parse_latest(latest) == poll._parse_latest(expected.latest)
    assert poll.read_device(uuid.uuid4()) is None
