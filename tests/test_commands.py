"""manage.py commands: create_enrollment_token and demo_setup."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from devices import services as device_services
from devices.management.commands.create_enrollment_token import parse_duration
from devices.models import Device, DeviceGroup, EnrollmentToken
from firmware import signing
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts.management.commands.demo_setup import demo_image

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
    }
    settings.FIRMWARE_SIGNING_KEY_PATH = tmp_path / "key.pem"


def run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


# --- create_enrollment_token ----------------------------------------------------------------------


def test_the_printed_token_registers_a_device(db: Any) -> None:
    output = run("create_enrollment_token", "--name", "line 2", "--device-type", "board-x")
    match = TOKEN_RE.search(output)
    assert match is not None
    device, secret = device_services.register_device(
        enrollment_token=match.group(0), hardware_id="SN-1", device_type="board-x"
    )
    assert device.hardware_id == "SN-1" and secret
    token = EnrollmentToken.objects.get(name="line 2")
    assert token.uses == 1 and match.group(0).split("_")[-1] not in token.token_hash
    [created] = Event.objects.filter(kind=EventKind.ENROLLMENT_TOKEN_CREATED)
    assert created.actor.startswith("manage.py")


def test_json_output(db: Any) -> None:
    group = device_services.create_group(name="field")
    before = timezone.now()
    output = run(
        "create_enrollment_token",
        "--name", "batch",
        "--group", "field",
        "--expires-in", "12h",
        "--max-uses", "3",
        "--json",
    )  # fmt: skip
    result = json.loads(output)
    assert result["name"] == "batch" and result["group"] == "field"
    assert result["max_uses"] == 3 and result["device_type"] is None
    expires = datetime.fromisoformat(result["expires_at"])
    assert before + timedelta(hours=12) <= expires <= timezone.now() + timedelta(hours=12)
    token = EnrollmentToken.objects.get(pk=result["id"])
    assert result["token"].startswith(f"ota_enroll_{token.prefix}_")
    device, _ = device_services.register_device(
        enrollment_token=result["token"], hardware_id="SN-2", device_type="any"
    )
    assert device.group == group


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "nowhere"], "No device group named 'nowhere'"),
        (["--expires-in", "soon"], "--expires-in"),
        (["--expires-in", "0"], "--expires-in"),
        (["--max-uses", "0"], "max_uses must be at least 1"),
        (["--device-type", "bad type!"], "--device-type"),
    ],
)
def test_bad_options_are_command_errors(db: Any, args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        run("create_enrollment_token", "--name", "t", *args)
    assert not EnrollmentToken.objects.exists()


def test_the_name_is_required(db: Any) -> None:
    with pytest.raises(CommandError, match="--name"):
        run("create_enrollment_token")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("3600", 3600)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


# --- demo_setup -----------------------------------------------------------------------------------


def test_demo_setup_is_idempotent(db: Any) -> None:
    first = json.loads(run("demo_setup", "--devices", "20", "--json"))
    second = json.loads(run("demo_setup", "--devices", "20", "--json"))

    assert first["devices_created"] == 20 and second["devices_created"] == 0
    assert second["devices_total"] == 20
    assert set(first["groups_created"]) == {"lab", "field-eu", "field-us"}
    assert second["groups_created"] == [] and second["firmware_uploaded"] == []
    assert DeviceGroup.objects.count() == 3
    assert Device.objects.count() == 20

    firmware = Firmware.objects.filter(device_type="demo-board").order_by("version_key")
    assert [f.version for f in firmware] == ["1.0.0", "1.1.0", "1.2.0"]
    assert all(f.is_published for f in firmware)
    for f in firmware:
        with f.file.open("rb") as handle:
            data = handle.read()
        assert data == demo_image(f.version) and len(data) == 256 * 1024
        assert hashlib.sha256(data).hexdigest() == f.checksum
        assert f.signing_key is not None
        assert signing.verify(f.signing_key.public_key, f.manifest.encode(), f.signature)

    # The admin password is new on every run and the latest one works.
    assert first["password"] != second["password"]
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff
    assert admin.check_password(second["password"])

    # A fresh token each run (the plaintext of the old one cannot be shown again); both work.
    assert EnrollmentToken.objects.filter(name="demo").count() == 2
    for i, result in enumerate((first, second)):
        device_services.register_device(
            enrollment_token=result["enrollment_token"],
            hardware_id=f"sim-{i}",
            device_type="demo-board",
        )

    lab = DeviceGroup.objects.get(name="lab")
    assert lab.target_version == "1.2.0"
    # Set once: a second run must not re-assign (which would retry failed updates).
    assert (
        Event.objects.filter(kind=EventKind.GROUP_CHANGED, data__target_version="1.2.0").count()
        == 1
    )

    demo = Device.objects.filter(hardware_id__startswith="demo-")
    assert set(demo.values_list("current_version", flat=True)) == {"1.0.0", "1.1.0"}
    assert set(demo.values_list("group__name", flat=True)) == {"lab", "field-eu", "field-us"}
    assert all(d.secret_hash and d.last_seen for d in demo)
    assert demo.filter(last_seen__lt=timezone.now() - timedelta(minutes=10)).exists()


def test_demo_setup_text_output(db: Any) -> None:
    output = run("demo_setup", "--devices", "5", "--host", "demo.local", "--port", "9000")
    assert re.search(
        r"^Console: http://demo\.local:9000/admin/  login: admin  password: \S+$", output, re.M
    )
    assert TOKEN_RE.search(output)
    assert "5 devices created" in output
    again = run("demo_setup", "--devices", "5")
    assert "5 devices exist already" in again


def test_demo_setup_refuses_a_negative_fleet(db: Any) -> None:
    with pytest.raises(CommandError, match="--devices"):
        run("demo_setup", "--devices", "-1")
