"""The admin tests' cast: a fleet with a group, devices, a token, firmware, a rollout and a
session; and helpers to reach admin pages."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from django.utils import timezone

from devices import services as device_services
from devices.models import Device, DeviceGroup, EnrollmentToken
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts.models import Rollout, RolloutStage, UpdateSession

DEVICE_TYPE = "admin-board"
TOKEN_RE = re.compile(r"ota_enroll_[0-9a-f]{12}_[A-Za-z0-9_-]+")


@pytest.fixture(autouse=True)
def _private_storage(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media")},
        },
        # The manifest storage needs collectstatic, which tests do not run.
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    settings.FIRMWARE_SIGNING_KEY_PATH = tmp_path / "key.pem"


def upload(version: str, content: bytes | None = None) -> Firmware:
    data = content or hashlib.sha256(version.encode()).digest() * 512
    return firmware_services.upload_firmware(
        file=SimpleUploadedFile("image.bin", data),
        hashes={
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha1": hashlib.sha1(data).hexdigest(),
            "md5": hashlib.md5(data).hexdigest(),
        },
        version=version,
        device_type=DEVICE_TYPE,
    )


def make_device(hardware_id: str, group: DeviceGroup | None = None) -> Device:
    device = Device(
        hardware_id=hardware_id,
        device_type=DEVICE_TYPE,
        group=group,
        secret_hash=device_services.hash_secret("unused"),
        last_seen=timezone.now(),
    )
    device.set_current_version("1.0.0")
    device.save()
    return device


@dataclass
class Fleet:
    group: DeviceGroup
    devices: list[Device]
    token: EnrollmentToken
    published: Firmware
    draft: Firmware
    rollout: Rollout
    session: UpdateSession


@pytest.fixture
def fleet(db: Any) -> Fleet:
    group = device_services.create_group(name="lab")
    devices = [make_device(f"dev-{i}", group) for i in range(3)]
    token, _ = device_services.create_enrollment_token(name="factory", device_type=DEVICE_TYPE)
    published = firmware_services.publish_firmware(upload("1.1.0"))
    draft = upload("1.2.0")
    rollout = Rollout.objects.create(
        name="to 1.1.0", firmware=published, device_type=published.device_type
    )
    rollout.target_groups.add(group)
    RolloutStage.objects.create(rollout=rollout, position=1, name="canary", percentage=5)
    session = UpdateSession.objects.create(
        device=devices[0], firmware=published, rollout=rollout, from_version="1.0.0"
    )
    device_services.update_device(devices[1], target_version="1.1.0")
    return Fleet(group, devices, token, published, draft, rollout, session)


def url(model: type[Any], view: str, *args: Any) -> str:
    opts = model._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_{view}", args=args)


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def events(kind: EventKind) -> list[Event]:
    return list(Event.objects.filter(kind=kind).order_by("id"))
