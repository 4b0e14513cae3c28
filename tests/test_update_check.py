"""What a device is offered, and what a poll costs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site import presence
from rollouts.models import SessionStatus, UpdateSession
from tests.conftest import DeviceActor
from tests.factories import DeviceGroupFactory, FirmwareFactory


def check(actor: DeviceActor) -> dict:
    reply = actor.client.get(f"/api/v1/devices/{actor.id}/updates")
    assert reply.status_code == 200, reply.content
    return reply.json()


def assign(actor: DeviceActor, version: str | None) -> None:
    device_services.update_device(actor.refresh(), target_version=version)


def test_a_group_assignment_reaches_members(device_a: DeviceActor, published: Firmware) -> None:
    group = DeviceGroupFactory.create(name="lab")
    device_services.update_device(device_a.refresh(), group=group)
    device_services.update_group(group, target_version="1.1.0")
    offer = check(device_a)
    assert offer["update_available"] and offer["version"] == "1.1.0"


def test_the_device_target_wins_over_the_group_target(device_a: DeviceActor, published) -> None:
    firmware_services.publish_firmware(FirmwareFactory.create(version="1.2.0"))
    group = DeviceGroupFactory.create(
        name="lab", target_version="1.2.0", target_set_at=timezone.now()
    )
    device_services.update_device(device_a.refresh(), group=group, target_version="1.1.0")
    assert check(device_a)["version"] == "1.1.0"


def test_unpublished_firmware_is_not_offered_until_published(device_a: DeviceActor) -> None:
    draft = FirmwareFactory.create(version="1.3.0")
    assign(device_a, "1.3.0")
    assert check(device_a)["reason"] == "not_published"
    firmware_services.publish_firmware(draft)  # clears the cached "not published"
    assert check(device_a)["update_available"] is True


def test_firmware_of_another_device_type_is_never_offered(device_a: DeviceActor) -> None:
    firmware_services.publish_firmware(
        FirmwareFactory.create(version="1.4.0", device_type="board-b")
    )
    assign(device_a, "1.4.0")
    assert check(device_a)["update_available"] is False


def test_up_to_date_devices_get_nothing(device_a: DeviceActor, published) -> None:
    Device.objects.filter(pk=device_a.id).update(current_version="1.1.0")
    assign(device_a, "1.1.0")
    assert check(device_a)["reason"] == "up_to_date"
    assert not UpdateSession.objects.exists()


def test_min_version_is_a_prerequisite(device_a: DeviceActor) -> None:
    firmware_services.publish_firmware(
        FirmwareFactory.create(version="3.0.0", metadata={"min_version": "2.0.0"})
    )
    assign(device_a, "3.0.0")  # device_a runs 1.0.0
    assert check(device_a)["reason"] == "below_min_version"


def test_a_lower_assigned_version_is_offered_as_a_permitted_rollback(device_a) -> None:
    firmware_services.publish_firmware(FirmwareFactory.create(version="0.9.0"))
    assign(device_a, "0.9.0")
    offer = check(device_a)
    assert offer["update_available"] and offer["is_rollback"] is True
    assert UpdateSession.objects.get().is_rollback


def test_a_failed_update_is_not_offered_again_until_reassigned(
    device_a: DeviceActor, published
) -> None:
    assign(device_a, "1.1.0")
    session = check(device_a)["session_id"]
    device_a.client.post(
        "/api/v1/status",
        {"session_id": session, "status": "failed", "error_message": "disk full"},
        format="json",
    )
    assert check(device_a) == {
        **check(device_a),
        "update_available": False,
        "reason": "already_failed",
    }
    assign(device_a, "1.1.0")  # repeating the same assignment (a PUT of the record) is no retry
    assert check(device_a)["reason"] == "already_failed"
    device_services.retry_update(device_a.refresh())  # the operator retries on purpose
    offer = check(device_a)
    assert offer["update_available"] and offer["session_id"] != session
    assert UpdateSession.objects.count() == 2


def test_changing_the_assignment_cancels_the_open_session(device_a, published) -> None:
    firmware_services.publish_firmware(FirmwareFactory.create(version="1.2.0"))
    assign(device_a, "1.1.0")
    first = check(device_a)["session_id"]
    assign(device_a, "1.2.0")
    second = check(device_a)
    assert second["version"] == "1.2.0" and second["session_id"] != first
    assert UpdateSession.objects.get(uuid=first).status == SessionStatus.CANCELLED


def test_clearing_the_assignment_cancels_the_open_session(device_a, published) -> None:
    assign(device_a, "1.1.0")
    first = check(device_a)["session_id"]
    assign(device_a, None)
    assert check(device_a)["update_available"] is False
    assert UpdateSession.objects.get(uuid=first).status == SessionStatus.CANCELLED


@pytest.mark.usefixtures("patient_redis")
def test_the_poll_buffers_last_seen_and_the_flush_writes_it(device_a: DeviceActor, settings):
    settings.DEVICE_LAST_SEEN_INTERVAL = 60
    # No round trip to Redis of the request's own (no rate limit, no answer cache lookup): the
    # poll itself records the sighting, when its last_seen is due.
    settings.POLL_ANSWER_CACHE_SECONDS = 0
    old = timezone.now() - timedelta(minutes=5)
    Device.objects.filter(pk=device_a.id).update(last_seen=old)
    check(device_a)
    # Buffered in Redis (ota_site.presence), not written by the poll.
    assert Device.objects.get(pk=device_a.id).last_seen == old
    assert str(device_a.id) in presence.take()
    assert device_services.flush_last_seen() == 1
    seen = Device.objects.get(pk=device_a.id).last_seen
    assert seen is not None and seen > old
    check(device_a)  # fresh now: nothing is buffered again
    assert device_services.flush_last_seen() == 0
    assert Device.objects.get(pk=device_a.id).last_seen == seen


def test_without_the_buffer_the_poll_writes_last_seen_once_a_minute(
    device_a: DeviceActor, settings
) -> None:
    settings.DEVICE_LAST_SEEN_BUFFER = False
    settings.DEVICE_LAST_SEEN_INTERVAL = 60
    old = timezone.now() - timedelta(minutes=5)
    Device.objects.filter(pk=device_a.id).update(last_seen=old)
    check(device_a)
    seen = Device.objects.get(pk=device_a.id).last_seen
    assert seen is not None and seen > old
    check(device_a)
    assert Device.objects.get(pk=device_a.id).last_seen == seen  # not written again


@pytest.mark.django_db(transaction=True)
class TestQueryBudget:
    """The poll is the hot path: at most 2 SQL queries (DESIGN.md, Performance model).

    Transactional, as in production: inside a test transaction every write would add savepoints.
    Live rollouts and published firmware come from caches that every poll shares (Redis); the
    tests warm them as the previous poll of any device would.
    """

    @pytest.fixture(autouse=True)
    def _warm(self, db) -> None:
        from rollouts import targeting

        targeting.live_specs()

    def test_no_assignment(self, device_a, django_assert_max_num_queries) -> None:
        Device.objects.filter(pk=device_a.id).update(last_seen=timezone.now() - timedelta(hours=1))
        with django_assert_max_num_queries(2):
            check(device_a)

    def test_first_offer_creates_the_session(
        self, device_a, published, django_assert_max_num_queries
    ) -> None:
        assign(device_a, "1.1.0")
        firmware_services.published_firmware("board-a", "1.1.0")  # warm: cached for an hour
        with django_assert_max_num_queries(2):
            offer = check(device_a)
        assert offer["update_available"]

    def test_repeated_offer(self, device_a, published, django_assert_max_num_queries) -> None:
        assign(device_a, "1.1.0")
        check(device_a)
        Device.objects.filter(pk=device_a.id).update(last_seen=timezone.now() - timedelta(hours=1))
        with django_assert_max_num_queries(2):
            assert check(device_a)["reason"] == "in_progress"

    def test_cold_cache(self, device_a, published, django_assert_max_num_queries) -> None:
        """Even with an empty cache the no-write path stays within budget."""
        with django_assert_max_num_queries(2):
            check(device_a)

    def test_the_check_by_token(self, device_a, published, django_assert_max_num_queries) -> None:
        assign(device_a, "1.1.0")
        firmware_services.published_firmware("board-a", "1.1.0")
        with django_assert_max_num_queries(2):
            reply = device_a.client.get("/api/v1/updates/check")
        assert reply.json()["update_available"]


def test_a_device_cannot_check_for_another(device_a: DeviceActor, device_b: DeviceActor) -> None:
    reply = device_a.client.get(f"/api/v1/devices/{device_b.id}/updates")
    assert reply.status_code == 403 and reply.json()["code"] == "not_your_device"


def test_operators_cannot_use_the_device_check(operator_api: APIClient, device_a) -> None:
    assert operator_api.get(f"/api/v1/devices/{device_a.id}/updates").status_code in (401, 403)


@pytest.mark.parametrize(
    "authorization",
    ["Bearer", "Bearer a b", "Bearer not-a-jwt", "Basic Zm9vOmJhcg==", "Bearer \u00e9"],
)
def test_bad_tokens_are_401(api: APIClient, device_a, authorization: str) -> None:
    api.credentials(HTTP_AUTHORIZATION=authorization)
    reply = api.get("/api/v1/updates/check")
    assert reply.status_code == 401, reply.content
    assert reply.json()["code"] in {"token_invalid", "not_authenticated", "authentication_failed"}


def test_an_expired_token_is_401_token_expired(device_a: DeviceActor, settings) -> None:
    import time

    import jwt

    claims = {
        "iss": "ota-server",
        "aud": "ota-device",
        "sub": str(device_a.id),
        "typ": "board-a",
        "gen": 1,
        "iat": int(time.time()) - 2000,
        "exp": int(time.time()) - 1000,
    }
    token = jwt.encode(claims, settings.DEVICE_JWT_SECRET, algorithm="HS256")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    reply = client.get("/api/v1/updates/check")
    assert reply.status_code == 401 and reply.json()["code"] == "token_expired"


def test_a_token_signed_with_another_key_is_refused(device_a: DeviceActor) -> None:
    import time

    import jwt

    claims = {
        "iss": "ota-server",
        "aud": "ota-device",
        "sub": str(device_a.id),
        "iat": int(time.time()),
        "exp": int(time.time()) + 100,
    }
    for token in (
        jwt.encode(claims, "a-guessed-key-that-is-long-enough-for-hs256", algorithm="HS256"),
        jwt.encode(claims, "", algorithm="none"),
    ):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        assert client.get("/api/v1/updates/check").status_code == 401


def test_retry_endpoint(operator_api: APIClient, device_a: DeviceActor, published) -> None:
    reply = operator_api.post(f"/api/v1/devices/{device_a.id}/retry")
    assert reply.status_code == 409 and reply.json()["code"] == "no_assignment"
    group = DeviceGroupFactory.create(name="lab")
    device_services.update_device(device_a.refresh(), group=group)
    device_services.update_group(group, target_version="1.1.0")
    session = check(device_a)["session_id"]
    device_a.client.post(
        "/api/v1/status", {"session_id": session, "status": "failed"}, format="json"
    )
    assert operator_api.post(f"/api/v1/devices/{device_a.id}/retry").status_code == 200
    assert device_a.refresh().target_version == "1.1.0"  # pinned to the group's version
    assert check(device_a)["session_id"] != session


def test_a_reset_device_is_locked_out_at_its_next_poll(device_a: DeviceActor) -> None:
    device_services.reset_credentials(device_a.refresh())
    reply = device_a.client.get("/api/v1/updates/check")
    assert reply.status_code == 401 and reply.json()["code"] == "credentials_reset"
    reply = device_a.client.post(
        f"/api/v1/devices/{device_a.id}/heartbeat", {"current_version": "1.0.0"}, format="json"
    )
    assert reply.status_code == 401


def test_finished_sessions_read_back_from_sqlite_compare_as_utc() -> None:
    from rollouts.poll import _parse_latest

    latest = _parse_latest(
        {
            "id": 1,
            "uuid": "0" * 32,
            "status": "failed",
            "firmware_id": "1" * 32,
            "rollout_id": None,
            "is_rollback": 0,
            "started_at": "2026-11-27 18:00:00.123456",
        }
    )
    assert latest is not None and latest.started_at is not None
    assert latest.started_at.utcoffset() == timedelta(0)
