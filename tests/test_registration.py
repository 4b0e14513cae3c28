"""Enrollment: tokens with scopes, expiry and usage limits; device secrets and access tokens."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from devices import services
from devices.models import Device, EnrollmentToken
from tests.factories import DeviceGroupFactory


def register(api: APIClient, token: str, **fields: Any):
    body = {"enrollment_token": token, "hardware_id": "SN-1", "device_type": "board-a", **fields}
    return api.post("/api/v1/devices/register", body, format="json")


def test_the_token_scope_sets_the_group(api: APIClient, db: Any) -> None:
    group = DeviceGroupFactory.create(name="field")
    _, token = services.create_enrollment_token(name="t", group=group)
    assert register(api, token).status_code == 201
    assert Device.objects.get(hardware_id="SN-1").group == group


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, 403, "enrollment_expired"),
        ({"revoked_at": timezone.now()}, 403, "enrollment_revoked"),
        ({"max_uses": 1, "uses": 1}, 403, "enrollment_exhausted"),
    ],
)
def test_unusable_tokens_are_refused(api: APIClient, db: Any, change, status, code) -> None:
    record, token = services.create_enrollment_token(name="t")
    EnrollmentToken.objects.filter(pk=record.pk).update(**change)
    reply = register(api, token)
    assert reply.status_code == status and reply.json()["code"] == code
    assert not Device.objects.exists()


@pytest.mark.parametrize(
    "token",
    ["", "nonsense", "ota_enroll_", "ota_enroll_abc_def", "ota_enroll_" + "x" * 180],
)
def test_unknown_tokens_are_refused(api: APIClient, db: Any, token: str) -> None:
    reply = register(api, token)
    assert reply.status_code in (400, 401)
    assert not Device.objects.exists()


def test_a_wrong_secret_for_a_known_prefix_is_refused(api: APIClient, db: Any) -> None:
    _, token = services.create_enrollment_token(name="t")
    reply = register(api, token[:-4] + "AAAA")
    assert reply.status_code == 401 and reply.json()["code"] == "enrollment_invalid"


def test_the_device_type_scope_is_enforced(api: APIClient, db: Any) -> None:
    _, token = services.create_enrollment_token(name="t", device_type="board-b")
    reply = register(api, token)
    assert reply.status_code == 403 and reply.json()["code"] == "enrollment_scope"


def test_usage_limit_counts_successful_enrollments_only(api: APIClient, db: Any) -> None:
    record, token = services.create_enrollment_token(name="t", max_uses=2)
    assert register(api, token, hardware_id="A").status_code == 201
    assert register(api, token, hardware_id="A").status_code == 409  # refused, not counted
    assert register(api, token, hardware_id="B").status_code == 201
    assert register(api, token, hardware_id="C").status_code == 403
    record.refresh_from_db()
    assert record.uses == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_enrollments_never_exceed_the_limit() -> None:
    _, token = services.create_enrollment_token(name="t", max_uses=3)
    results: list[int] = []

    def enroll(n: int) -> None:
        try:
            reply = APIClient().post(
                "/api/v1/devices/register",
                {"enrollment_token": token, "hardware_id": f"C-{n}", "device_type": "board-a"},
                format="json",
            )
            results.append(reply.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=enroll, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results).count(201) == 3
    assert Device.objects.count() == 3


def test_re_registration_is_409_until_credentials_are_reset(api: APIClient, db: Any) -> None:
    _, token = services.create_enrollment_token(name="t")
    first = register(api, token, current_version="1.0.0")
    assert first.status_code == 201
    again = register(api, token)
    assert again.status_code == 409 and again.json()["code"] == "device_exists"
    device = Device.objects.get(hardware_id="SN-1")
    services.reset_credentials(device)
    # The old secret no longer buys a token...
    old = api.post(
        "/api/v1/devices/token",
        {"device_id": first.json()["device_id"], "secret": first.json()["device_secret"]},
        format="json",
    )
    assert old.status_code == 401
    # ...and the same hardware enrolls again, keeping its id.
    third = register(api, token, current_version="1.0.1")
    assert third.status_code == 201
    assert third.json()["device_id"] == first.json()["device_id"]
    assert Device.objects.get(pk=device.pk).current_version == "1.0.1"


def test_re_enrollment_with_another_device_type_is_refused(api: APIClient, db: Any) -> None:
    _, token = services.create_enrollment_token(name="t")
    register(api, token)
    services.reset_credentials(Device.objects.get())
    reply = register(api, token, device_type="board-z")
    assert reply.status_code == 409 and reply.json()["code"] == "device_type_mismatch"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hardware_id", ""),
        ("hardware_id", "has space"),
        ("hardware_id", "../../etc/passwd"),
        ("hardware_id", "x" * 129),
        ("hardware_id", ["SN-1"]),
        ("hardware_id", True),
        ("device_type", "Board A"),
        ("device_type", ""),
        ("current_version", "one"),
        ("metadata", ["not", "an", "object"]),
        ("metadata", {"bad key!": 1}),
        ("metadata", {"big": "x" * 20_000}),
    ],
)
def test_bad_registrations_are_400(api: APIClient, db: Any, field: str, value: Any) -> None:
    _, token = services.create_enrollment_token(name="t")
    reply = register(api, token, **{field: value})
    assert reply.status_code == 400, reply.content
    assert field in reply.json()["errors"]
    assert not Device.objects.exists()
    assert EnrollmentToken.objects.get().uses == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"device_id": "nope", "secret": "x"},
        {"device_id": "00000000-0000-0000-0000-000000000000", "secret": "x"},
    ],
)
def test_bad_token_requests(api: APIClient, db: Any, body: dict) -> None:
    reply = api.post("/api/v1/devices/token", body, format="json")
    assert reply.status_code in (400, 401)
    assert "code" in reply.json()


def test_the_secret_is_never_stored(api: APIClient, db: Any) -> None:
    _, token = services.create_enrollment_token(name="t")
    secret = register(api, token).json()["device_secret"]
    row = Device.objects.values().get()
    assert secret not in str(row)
    # ota_enroll_<prefix>_<secret>: the prefix is hex, the secret may itself contain "_".
    enrollment_secret = token.removeprefix("ota_enroll_").split("_", 1)[1]
    assert enrollment_secret not in str(EnrollmentToken.objects.values().get())
