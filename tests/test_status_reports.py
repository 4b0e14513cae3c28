"""Status reports and validation: idempotent, never backwards, and only for one's own sessions."""

from __future__ import annotations

from typing import Any

import pytest

from devices import services as device_services
from devices.models import Device, DeviceStatus
from firmware.models import Firmware
from ota_site.models import Event
from rollouts.models import SessionStatus, UpdateSession
from tests.conftest import DeviceActor


@pytest.fixture
def session(device_a: DeviceActor, published: Firmware) -> str:
    device_services.update_device(device_a.refresh(), target_version="1.1.0")
    return device_a.client.get("/api/v1/updates/check").json()["session_id"]


def report(actor: DeviceActor, session: str, status: str, **extra: Any):
    return actor.client.post(
        f"/api/v1/devices/{actor.id}/status",
        {"session_id": session, "status": status, **extra},
        format="json",
    )


def state(session: str) -> UpdateSession:
    return UpdateSession.objects.get(uuid=session)


def test_a_repeated_report_changes_nothing(device_a: DeviceActor, session: str) -> None:
    assert report(device_a, session, "downloading", progress=40).json()["applied"] is True
    events = Event.objects.count()
    reply = report(device_a, session, "downloading", progress=40)
    assert reply.status_code == 200 and reply.json()["applied"] is False
    assert Event.objects.count() == events
    assert state(session).progress == 40


def test_a_late_report_never_moves_a_session_backwards(device_a: DeviceActor, session) -> None:
    report(device_a, session, "installing")
    assert report(device_a, session, "downloading", progress=90).json()["applied"] is False
    assert report(device_a, session, "downloading", progress=10).json()["applied"] is False
    assert state(session).status == SessionStatus.INSTALLING
    report(device_a, session, "downloading", progress=50)
    # Progress within a step only grows.
    report(device_a, session, "installing", progress=60)
    assert report(device_a, session, "installing", progress=30).json()["applied"] is False
    assert state(session).progress == 60


def test_a_finished_session_stays_finished(device_a: DeviceActor, session: str) -> None:
    report(device_a, session, "failed", error_message="write error on slot B")
    for status in ("downloading", "success", "failed"):
        assert report(device_a, session, status).json()["applied"] is False
    finished = state(session)
    assert finished.status == SessionStatus.FAILED
    assert finished.error_message == "write error on slot B"
    assert Device.objects.get(pk=device_a.id).status == DeviceStatus.FAILED


def test_steps_may_be_skipped_forwards(device_a: DeviceActor, session: str) -> None:
    assert report(device_a, session, "validating").json()["applied"] is True
    assert report(device_a, session, "success").json()["applied"] is True
    assert Device.objects.get(pk=device_a.id).current_version == "1.1.0"


def test_validation_with_the_old_version_is_a_rollback(device_a: DeviceActor, session) -> None:
    report(device_a, session, "validating")
    reply = device_a.client.post(
        "/api/v1/validation",
        {"session_id": session, "success": True, "version": "1.0.0"},
        format="json",
    )
    assert reply.status_code == 200
    finished = state(session)
    assert finished.status == SessionStatus.FAILED
    assert "booted back" in (finished.error_message or "")
    device = Device.objects.get(pk=device_a.id)
    assert device.current_version == "1.0.0" and device.status == DeviceStatus.FAILED


def test_failed_validation_records_the_reason(device_a: DeviceActor, session: str) -> None:
    reply = device_a.client.post(
        "/api/v1/validation",
        {"session_id": session, "success": False, "error_message": "health check: no network"},
        format="json",
    )
    assert reply.json()["session"]["status"] == "failed"
    assert state(session).error_message == "health check: no network"
    # A duplicate validation is harmless.
    again = device_a.client.post(
        "/api/v1/validation", {"session_id": session, "success": True}, format="json"
    )
    assert again.json()["applied"] is False and state(session).status == SessionStatus.FAILED


def test_another_device_cannot_touch_the_session(
    device_a: DeviceActor, device_b: DeviceActor, session: str
) -> None:
    # Through its own URL: the session is not found for device B.
    reply = report(device_b, session, "failed")
    assert reply.status_code == 404 and reply.json()["code"] == "session_not_found"
    # Through device A's URL: forbidden.
    reply = device_b.client.post(
        f"/api/v1/devices/{device_a.id}/status",
        {"session_id": session, "status": "failed"},
        format="json",
    )
    assert reply.status_code == 403
    reply = device_b.client.post(
        "/api/v1/validation", {"session_id": session, "success": False}, format="json"
    )
    assert reply.status_code == 404
    assert state(session).status == SessionStatus.PENDING


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"status": "downloading"},
        {"session_id": "not-a-uuid", "status": "downloading"},
        {"session_id": "SESSION", "status": "pending"},
        {"session_id": "SESSION", "status": "exploded"},
        {"session_id": "SESSION", "status": "downloading", "progress": 101},
        {"session_id": "SESSION", "status": "downloading", "progress": -1},
        {"session_id": "SESSION", "status": "downloading", "progress": "lots"},
        {"session_id": "SESSION", "status": "failed", "error_message": "x" * 4001},
        {"session_id": "SESSION", "status": ["downloading"]},
    ],
)
def test_bad_reports_are_400_and_change_nothing(
    device_a: DeviceActor, session: str, body: dict
) -> None:
    body = {k: (session if v == "SESSION" else v) for k, v in body.items()}
    reply = device_a.client.post("/api/v1/status", body, format="json")
    assert reply.status_code == 400, reply.content
    assert reply.json()["code"] == "invalid"
    assert state(session).status == SessionStatus.PENDING


def test_unknown_session_is_404(device_a: DeviceActor) -> None:
    reply = report(device_a, "00000000-0000-0000-0000-000000000001", "downloading")
    assert reply.status_code == 404


def test_malformed_json_is_400_and_wrong_content_type_415(device_a: DeviceActor) -> None:
    reply = device_a.client.generic(
        "POST", "/api/v1/status", '{"session_id": ', content_type="application/json"
    )
    assert reply.status_code == 400 and reply.json()["code"] == "parse_error"
    reply = device_a.client.generic(
        "POST", "/api/v1/status", "status=failed", content_type="text/plain"
    )
    assert reply.status_code == 415 and reply.json()["code"] == "unsupported_media_type"
    reply = device_a.client.generic(
        "POST", "/api/v1/status", "[1, 2]", content_type="application/json"
    )
    assert reply.status_code == 400
