"""The shared cast: an admin, an operator, a viewer, device A and device B (STYLE.md §11)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache.backends.redis import RedisCache
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.permissions import Role
from ota_site.roles import set_role
from tests.factories import FirmwareFactory


@pytest.fixture(autouse=True)
def _isolated(settings: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own storage folder, signing key and cache namespace."""
    # Django's RedisCache.clear() is FLUSHDB: it would wipe the keys of the tests that the other
    # xdist worker and the live servers run on the same Redis database at that moment (buffered
    # sightings, rate-limit buckets, Celery's queues). A test deletes the keys it means instead.
    monkeypatch.setattr(RedisCache, "clear", _no_flush)
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media")},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    settings.FIRMWARE_SIGNING_KEY_PATH = tmp_path / "keys" / "signing.pem"
    # Rate limits are off unless a test turns them on (tests/test_rate_limits.py): the cast makes
    # many requests from one address within a second.
    settings.RATE_LIMIT_DEVICE = settings.RATE_LIMIT_IP = "off"
    caches = {name: dict(config) for name, config in settings.CACHES.items()}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    caches["default"]["KEY_PREFIX"] = f"test:{worker}:{uuid.uuid4().hex[:12]}"
    settings.CACHES = caches


def _no_flush(self: Any) -> None:
    raise AssertionError("cache.clear() empties the shared Redis database; delete your keys")


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def person(username: str, role: Role | None) -> User:
    user = User.objects.create_user(username, password=f"pw-{username}-1")
    set_role(user, role)
    return user


@pytest.fixture
def operator(db: Any) -> User:
    return person("olivia", Role.OPERATOR)


@pytest.fixture
def viewer(db: Any) -> User:
    return person("victor", Role.VIEWER)


@pytest.fixture
def operator_api(operator: User) -> APIClient:
    client = APIClient()
    client.force_login(operator)
    return client


@pytest.fixture
def admin_api(admin_user: User) -> APIClient:
    client = APIClient()
    client.force_login(admin_user)
    return client


@dataclass
class DeviceActor:
    """A registered device with its secret and a client that carries its access token."""

    device: Device
    secret: str
    client: APIClient

    @property
    def id(self) -> uuid.UUID:
        return self.device.id

    def refresh(self) -> Device:
        self.device.refresh_from_db()
        return self.device


def enroll(hardware_id: str, device_type: str = "board-a", version: str = "1.0.0") -> DeviceActor:
    _, token = device_services.create_enrollment_token(name=f"for {hardware_id}")
    device, secret = device_services.register_device(
        enrollment_token=token,
        hardware_id=hardware_id,
        device_type=device_type,
        current_version=version,
    )
    access, _ = device_services.issue_token(device)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    return DeviceActor(device=device, secret=secret, client=client)


@pytest.fixture
def device_a(db: Any) -> DeviceActor:
    return enroll("device-a")


@pytest.fixture
def device_b(db: Any) -> DeviceActor:
    return enroll("device-b")


@pytest.fixture
def published(db: Any) -> Firmware:
    """Firmware 1.1.0 for board-a, published and signed."""
    return firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))


def content_of(response: Any) -> bytes:
    """The body of a (possibly streaming) test-client response."""
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content)
    return bytes(response.content)


@pytest.fixture
def v1(db: Any) -> Firmware:
    """Firmware 1.0.0 for board-a, published (the version rollouts roll back to)."""
    return firmware_services.publish_firmware(FirmwareFactory.create(version="1.0.0"))


@pytest.fixture
def v2(db: Any) -> Firmware:
    """Firmware 1.1.0 for board-a, published (the version rollouts roll out)."""
    return firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))


@pytest.fixture
def patient_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-request Redis client with a 5 s timeout instead of 0.25 s, for tests of what a
    request records in Redis: on a loaded CI machine a 0.25 s stall happens, and the request then
    rightly falls back (the rate limiter fails open, last_seen is written to the row)."""
    from ota_site import ratelimit

    monkeypatch.setattr(ratelimit, "REDIS_TIMEOUT", 5.0)
    monkeypatch.setattr(ratelimit, "_redis_clients", {})
    monkeypatch.setattr(ratelimit, "_redis_counters", {})
