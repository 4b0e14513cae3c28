"""manage.py commands for operators: firmware upload/publish/list/delete, fleet status, and the
--json option of every operator action (issue 8)."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command, get_commands, load_command_class
from django.core.management.base import CommandError
from django.utils import timezone

from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts.models import SessionStatus, UpdateSession
from tests.factories import DeviceFactory, FirmwareFactory
from tests.rollouts_support import run_device, started
from tests.test_swu_upload import swu_image


def run(*args: str) -> Any:
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    return json.loads(out.getvalue())


def text(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """3 MiB and a bit: more than one copy chunk."""
    path = tmp_path / "rootfs.img"
    path.write_bytes(hashlib.sha256(b"seed").digest() * (3 * 32768 + 5))
    return path


# --- Every operator action has --json ----------------------------------------------------------

OPERATOR_ACTIONS = [
    ("create_enrollment_token", None),
    ("apikey", "create"),
    ("apikey", "list"),
    ("apikey", "revoke"),
    ("firmware", "upload"),
    ("firmware", "publish"),
    ("firmware", "list"),
    ("firmware", "delete"),
    ("firmware", "verify"),
    ("rollout", "create"),
    ("rollout", "start"),
    ("rollout", "pause"),
    ("rollout", "resume"),
    ("rollout", "cancel"),
    ("signing_key", "rotate"),
    ("tuf", "rotate-root"),
    ("tuf", "rotate-online"),
    ("device_ca", "init"),  # init --rotate
    ("keys", "rewrap"),
    ("sessions", "archive"),
    ("events", "prune"),
    ("fleet", "status"),
]


@pytest.mark.parametrize(("name", "action"), OPERATOR_ACTIONS)
def test_every_operator_action_has_help_and_json(name: str, action: str | None) -> None:
    command = load_command_class(get_commands()[name], name)
    parser = command.create_parser("manage.py", name)
    helps = [parser.format_help()]
    if action is not None:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        helps.append(sub.choices[action].format_help())
    assert command.help
    assert any("--json" in h for h in helps)


# --- firmware upload, publish, list, delete ----------------------------------------------------


def test_upload_streams_the_file_and_publishes(db: Any, image: Path) -> None:
    content = image.read_bytes()
    result = run(
        "firmware", "upload", str(image),
        "--device-type", "board-a",
        "--version", "2.0.0",
        "--release-notes", "Faster boot.",
        "--min-version", "1.0.0",
        "--dependency", "bootloader>=2.1",
        "--publish",
    )  # fmt: skip
    assert result["published"] and result["version"] == "2.0.0"
    assert (
        result["size"] == len(content) and result["sha256"] == hashlib.sha256(content).hexdigest()
    )
    assert result["min_version"] == "1.0.0" and result["dependencies"] == ["bootloader>=2.1"]
    firmware = Firmware.objects.get(pk=result["id"])
    assert firmware.md5 == hashlib.md5(content).hexdigest()
    assert firmware.sha1 == hashlib.sha1(content).hexdigest()
    assert (
        firmware.filename == "rootfs.img" and firmware.metadata["release_notes"] == "Faster boot."
    )
    with firmware.file.open("rb") as stored:
        assert stored.read() == content
    offer = firmware_services.published_firmware("board-a", "2.0.0")
    assert offer is not None and offer["id"] == result["id"]
    actors = set(
        Event.objects.filter(
            kind__in=[EventKind.FIRMWARE_UPLOADED, EventKind.FIRMWARE_PUBLISHED]
        ).values_list("actor", flat=True)
    )
    assert actors == {"manage.py firmware"}


def test_draft_publish_list_and_delete(db: Any, image: Path) -> None:
    draft = run("firmware", "upload", str(image), "--device-type", "board-a", "--version", "2.1")
    assert draft["published"] is False and draft["key_id"] is None
    other = FirmwareFactory.create(device_type="board-b", version="1.0.0")
    listed = run("firmware", "list")
    assert [(f["device_type"], f["version"]) for f in listed] == [
        ("board-a", "2.1"),
        ("board-b", "1.0.0"),
    ]
    assert [f["id"] for f in run("firmware", "list", "--device-type", "board-b")] == [str(other.id)]
    assert [f["id"] for f in run("firmware", "list", "--drafts")] == [draft["id"], str(other.id)]

    published = run("firmware", "publish", "board-a:2.1.0")  # by type and version (2.1 == 2.1.0)
    assert published["published"] and published["already_published"] is False
    assert run("firmware", "publish", draft["id"])["already_published"] is True
    assert [f["id"] for f in run("firmware", "list", "--published")] == [draft["id"]]
    assert "published" in text("firmware", "list", "--device-type", "board-a")

    deleted = run("firmware", "delete", str(other.id))
    assert deleted["deleted"] and not Firmware.objects.filter(pk=other.id).exists()
    assert text("firmware", "list", "--device-type", "board-b").strip() == "No firmware."


def test_a_swu_takes_its_version_from_sw_description(db: Any, tmp_path: Path) -> None:
    path = tmp_path / "update.swu"
    path.write_bytes(swu_image())
    result = run("firmware", "upload", str(path), "--device-type", "board-a")
    assert result["version"] == "1.4.0"
    assert Firmware.objects.get(pk=result["id"]).metadata["swu"]["version"] == "1.4.0"
    with pytest.raises(CommandError, match="swu_version_mismatch"):
        call_command("firmware", "upload", str(path), "--device-type", "board-b", "--version", "2")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "1.0"], "Cannot read"),  # the file does not exist (path replaced below)
        (["--device-type", "bad type!", "--version", "1.0"], "--device-type: "),
        ([], "--version: This field is required"),
        (["--version", "not a version"], "--version: "),
        (["--version", "1.0", "--dependency", "???"], "--dependency: item 0: "),
        (["--version", "1.0", "--release-counter", "-1"], "--release-counter: "),
    ],
)
def test_upload_refusals(db: Any, image: Path, args: list[str], message: str) -> None:
    target = str(image.with_name("missing.img")) if message == "Cannot read" else str(image)
    if "--device-type" not in args:
        args = [*args, "--device-type", "board-a"]
    with pytest.raises(CommandError, match=message):
        call_command("firmware", "upload", target, *args)
    assert not Firmware.objects.exists()


def test_upload_refuses_a_duplicate_and_an_oversized_file(
    db: Any, image: Path, settings: Any
) -> None:
    call_command("firmware", "upload", str(image), "--device-type", "board-a", "--version", "3.0")
    with pytest.raises(CommandError, match=r"exists\. \(duplicate_version\)"):
        call_command("firmware", "upload", str(image), "--device-type", "board-a", "--version", "3")
    settings.FIRMWARE_MAX_UPLOAD_SIZE = 1024 * 1024
    with pytest.raises(CommandError, match="larger than FIRMWARE_MAX_UPLOAD_SIZE"):
        call_command("firmware", "upload", str(image), "--device-type", "board-b", "--version", "1")
    assert Firmware.objects.count() == 1


def test_publish_and_delete_refusals(db: Any, v1: Firmware) -> None:
    with pytest.raises(CommandError, match=re.escape("No firmware 'board-a:9.9'")):
        call_command("firmware", "publish", "board-a:9.9")
    with pytest.raises(CommandError, match="No firmware"):
        call_command("firmware", "delete", "not-an-id")
    UpdateSession.objects.create(device=DeviceFactory.create(), firmware=v1)
    with pytest.raises(CommandError, match="firmware_in_use"):
        call_command("firmware", "delete", str(v1.id))
    assert Firmware.objects.filter(pk=v1.id).exists()


# --- fleet status --------------------------------------------------------------------------------


def test_fleet_status(db: Any, v1: Firmware, v2: Firmware, settings: Any) -> None:
    long_ago = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW + 60)
    fleet = [DeviceFactory.create() for _ in range(6)]
    DeviceFactory.create(device_type="board-b", current_version="3.0", last_seen=long_ago)
    DeviceFactory.create(device_type="board-b", current_version="", last_seen=None)
    FirmwareFactory.create(device_type="board-b", version="3.1")  # a draft
    rollout = started(v2, 100, min_devices=10)
    assert [run_device(d, "failed" if d == fleet[0] else "success") for d in fleet] == ["new"] * 6

    status = run("fleet", "status", "--top", "2")

    devices = status["devices"]
    assert devices["total"] == 8 and devices["online"] == 6 and devices["never_seen"] == 1
    assert devices["by_type"] == {"board-a": 6, "board-b": 2}
    assert devices["by_status"] == {"idle": 2, "updating": 0, "failed": 1, "success": 5}
    assert devices["top_versions"] == [
        {"device_type": "board-a", "version": "1.1.0", "devices": 5},
        {"device_type": "board-a", "version": "1.0.0", "devices": 1},
    ]
    assert devices["other_versions"] == 2
    assert status["open_sessions"] == {
        "pending": 0, "downloading": 0, "installing": 0, "validating": 0,
    }  # fmt: skip
    [live] = status["rollouts"]["live"]
    assert live["id"] == str(rollout.id) and live["status"] == "active"
    assert live["targeted_devices"] == 6
    assert live["current_stage"] == {
        "position": 0,
        "name": "100%",
        "percentage": 100,
        "devices": 6,
        "finished": 6,
        "success_rate": 5 / 6,
        "failure_rate": 1 / 6,
    }
    assert status["rollouts"]["by_status"] == {"active": 1}
    assert status["firmware"] == {"total": 3, "published": 2, "drafts": 1, "quarantined": 0}

    # An update in progress shows as an open session.
    UpdateSession.objects.create(device=fleet[0], firmware=v1, status=SessionStatus.DOWNLOADING)
    assert run("fleet", "status")["open_sessions"]["downloading"] == 1

    lines = text("fleet", "status").splitlines()
    assert lines[0].startswith("Devices: 8 (6 online")
    assert any(f"{rollout.id}  active" in line and "success 83.3%" in line for line in lines)
    assert lines[-1] == "Firmware: 3 (2 published, 1 drafts, 0 quarantined)"


def test_fleet_status_refusals(db: Any) -> None:
    with pytest.raises(CommandError, match="--top"):
        call_command("fleet", "status", "--top", "0")
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("fleet", "show")
    assert run("fleet", "status")["devices"]["total"] == 0


# --- apikey revoke --json ------------------------------------------------------------------------


def test_apikey_revoke_json(db: Any) -> None:
    created = run("apikey", "create", "--name", "ci", "--role", "operator")
    revoked = run("apikey", "revoke", created["prefix"])
    assert revoked["state"] == "revoked" and revoked["already_revoked"] is False
    assert run("apikey", "revoke", created["prefix"])["already_revoked"] is True
    with pytest.raises(CommandError, match="No API key"):
        call_command("apikey", "revoke", "ffffffff", "--json")
