"""The whole device flow through the API: register, token, heartbeat, check, download (with a
resumed Range download), status reports and validation."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device, DeviceStatus
from firmware.models import Firmware
from ota_site.models import Event
from rollouts.models import SessionStatus, UpdateSession
from tests.conftest import content_of
from tests.factories import firmware_bytes


def test_register_token_heartbeat_check_download_report_validate(
    api: APIClient, operator_api: APIClient, published: Firmware
) -> None:
    _, enrollment = device_services.create_enrollment_token(name="lab", device_type="board-a")

    # Register: the secret is shown once and only its hash is stored.
    reply = api.post(
        "/api/v1/devices/register",
        {
            "enrollment_token": enrollment,
            "hardware_id": "SN-0001",
            "device_type": "board-a",
            "current_version": "1.0.0",
            "metadata": {"region": "eu"},
        },
        format="json",
    )
    assert reply.status_code == 201, reply.content
    device_id, secret = reply.json()["device_id"], reply.json()["device_secret"]
    device = Device.objects.get(pk=device_id)
    assert secret not in device.secret_hash and device.secret_hash == device_services.hash_secret(
        secret
    )

    # Token: the secret buys a short-lived bearer token.
    reply = api.post(
        "/api/v1/devices/token", {"device_id": device_id, "secret": secret}, format="json"
    )
    assert reply.status_code == 200
    assert reply.json()["token_type"] == "Bearer" and 0 < reply.json()["expires_in"] <= 900
    dev = APIClient()
    dev.credentials(HTTP_AUTHORIZATION=f"Bearer {reply.json()['access_token']}")

    # Heartbeat.
    reply = dev.post(
        f"/api/v1/devices/{device_id}/heartbeat",
        {"current_version": "1.0.0", "metadata": {"uptime": 12}},
        format="json",
    )
    assert reply.status_code == 200 and reply.json()["poll_interval"] > 0
    assert Device.objects.get(pk=device_id).metadata == {"region": "eu", "uptime": 12}

    # Nothing assigned yet.
    reply = dev.get(f"/api/v1/devices/{device_id}/updates")
    assert reply.json() == {**reply.json(), "update_available": False, "reason": "no_assignment"}

    # The operator assigns 1.1.0; the device is offered it with a signed manifest.
    reply = operator_api.patch(
        f"/api/v1/devices/{device_id}", {"target_version": "1.1.0"}, format="json"
    )
    assert reply.status_code == 200, reply.content
    offer = dev.get("/api/v1/updates/check").json()
    assert offer["update_available"] is True
    assert offer["version"] == "1.1.0" and offer["size"] == published.file_size
    assert offer["sha256"] == published.checksum and offer["is_rollback"] is False
    keys = dev.get("/api/v1/firmware/keys").json()
    key = next(k for k in keys if k["key_id"] == offer["key_id"])
    Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"])).verify(
        base64.b64decode(offer["signature"]), offer["manifest"].encode()
    )
    assert f'"sha256":"{published.checksum}"' in offer["manifest"]
    session_id = offer["session_id"]
    # Asking again gives the same session.
    assert dev.get(f"/api/v1/devices/{device_id}/updates").json()["session_id"] == session_id

    # Download, cut after 10 000 bytes, and resume with Range + If-Range.
    url = offer["url"]
    head = dev.head(url)
    assert head.status_code == 200 and head["Content-Length"] == str(published.file_size)
    assert head["Accept-Ranges"] == "bytes" and not head.content
    etag = head["ETag"]
    first = dev.get(url, HTTP_RANGE="bytes=0-9999")
    assert first.status_code == 206
    part1 = content_of(first)
    assert len(part1) == 10_000
    dev.post(
        "/api/v1/status",
        {"session_id": session_id, "status": "downloading", "progress": 15},
        format="json",
    )
    rest = dev.get(url, HTTP_RANGE="bytes=10000-", HTTP_IF_RANGE=etag)
    assert rest.status_code == 206
    assert rest["Content-Range"] == f"bytes 10000-{published.file_size - 1}/{published.file_size}"
    image = part1 + content_of(rest)
    assert image == firmware_bytes("1.1.0")
    assert hashlib.sha256(image).hexdigest() == offer["sha256"]

    # Status reports, in order.
    for status, progress in (("downloading", 100), ("installing", None), ("validating", None)):
        body: dict[str, Any] = {"session_id": session_id, "status": status}
        if progress is not None:
            body["progress"] = progress
        reply = dev.post(f"/api/v1/devices/{device_id}/status", body, format="json")
        assert reply.status_code == 200, reply.content
        assert reply.json()["applied"] is True
    assert Device.objects.get(pk=device_id).status == DeviceStatus.UPDATING

    # After the reboot: validation.
    reply = dev.post(
        "/api/v1/validation",
        {"session_id": session_id, "success": True, "version": "1.1.0"},
        format="json",
    )
    assert reply.status_code == 200 and reply.json()["session"]["status"] == "success"
    session = UpdateSession.objects.get(uuid=session_id)
    assert session.status == SessionStatus.SUCCESS and session.completed_at is not None
    assert session.duration is not None and session.progress == 100
    device = Device.objects.get(pk=device_id)
    assert device.current_version == "1.1.0" and device.status == DeviceStatus.SUCCESS

    # Nothing more to do; the history is in the event log.
    reply = dev.get("/api/v1/updates/check").json()
    assert reply["update_available"] is False and reply["reason"] == "up_to_date"
    kinds = list(Event.objects.filter(device_id=device_id).values_list("kind", flat=True))
    assert kinds[0] == "device.registered" and kinds[-1] == "session.finished"
    assert kinds.count("session.progress") == 4  # downloading (and 10%+ steps), installing, …
