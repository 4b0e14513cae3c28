"""manage.py demo_setup: the data behind `make demo`; safe to run twice."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone

from devices import services as device_services
from devices.models import Device, DeviceGroup
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.errors import ServiceError, StateConflict
from ota_site.versions import Version
from rollouts import lifecycle
from rollouts.lifecycle import Definition, StageSpec
from rollouts.models import LIVE_ROLLOUT_STATUSES, Rollout

ACTOR = "manage.py demo_setup"
DEVICE_TYPE = "demo-board"
GROUPS = ("lab", "field-eu", "field-us")
VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
LAB_TARGET = "1.2.0"
IMAGE_SIZE = 256 * 1024
FLEET_PREFIX = "demo-"
SIM_GROUP = "simulated"
SIM_ROLLOUT_VERSION = "1.1.0"


def demo_image(version: str) -> bytes:
    """The same bytes for the same version on every run and machine."""
    return hashlib.shake_256(f"{DEVICE_TYPE} {version}".encode()).digest(IMAGE_SIZE)


class Command(BaseCommand):
    help = (
        "Prepare a demo: an 'admin' superuser with a new random password, device groups, "
        f"published {DEVICE_TYPE} firmware {', '.join(VERSIONS)}, a fresh enrollment token and a "
        "fleet of demo devices for the console. Running it again keeps what exists, resets the "
        "admin password and prints a new token."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Host shown in the console URL.")
        parser.add_argument("--port", type=int, default=8000, help="Port shown in the console URL.")
        parser.add_argument(
            "--devices",
            type=int,
            default=200,
            help="Size of the demo fleet created when none exists (default: 200).",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the result as one JSON object."
        )
        parser.add_argument(
            "--sim-token-file",
            help="Write an enrollment token for simulated devices (group 'simulated') to this "
            "file, and start a staged rollout of 1.1.0 to that group, so `ota-client simulate` "
            "shows a living fleet.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["devices"] < 0:
            raise CommandError("--devices cannot be negative.")
        try:
            password = self._admin_user()
            groups, new_groups = self._groups()
            firmware, new_firmware = self._firmware()
            token, plaintext = device_services.create_enrollment_token(
                name="demo", device_type=DEVICE_TYPE, actor=ACTOR
            )
            fleet_created = self._fleet(options["devices"], groups)
            lab = groups["lab"]
            if lab.target_version != LAB_TARGET:
                device_services.update_group(lab, target_version=LAB_TARGET, actor=ACTOR)
            simulated = (
                self._simulated_fleet(Path(options["sim_token_file"]), firmware)
                if options["sim_token_file"]
                else ""
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc

        console = f"http://{options['host']}:{options['port']}/admin/"
        fleet_total = Device.objects.filter(hardware_id__startswith=FLEET_PREFIX).count()
        if options["json"]:
            result = {
                "console_url": console,
                "username": "admin",
                "password": password,
                "groups": list(groups),
                "groups_created": new_groups,
                "firmware": [
                    {"id": str(fw.id), "version": fw.version, "published": fw.is_published}
                    for fw in firmware
                ],
                "firmware_uploaded": new_firmware,
                "enrollment_token": plaintext,
                "enrollment_token_id": str(token.id),
                "devices_created": fleet_created,
                "devices_total": fleet_total,
                "lab_target_version": LAB_TARGET,
                "simulated_fleet": simulated,
            }
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write(f"Console: {console}  login: admin  password: {password}")
        self.stdout.write(
            f"Groups: {', '.join(groups)}"
            + (f" (created {', '.join(new_groups)})" if new_groups else "")
        )
        self.stdout.write(
            f"Firmware {DEVICE_TYPE}: {', '.join(VERSIONS)} published"
            + (f" (uploaded {', '.join(new_firmware)})" if new_firmware else "")
        )
        self.stdout.write(f"Enrollment token for {DEVICE_TYPE} (shown once): {plaintext}")
        if fleet_created:
            self.stdout.write(f"Demo fleet: {fleet_created} devices created.")
        else:
            self.stdout.write(f"Demo fleet: {fleet_total} devices exist already; left as they are.")
        self.stdout.write(f"Group lab targets {LAB_TARGET}.")
        if simulated:
            self.stdout.write(simulated)

    def _simulated_fleet(self, token_file: Path, firmware: list[Firmware]) -> str:
        """A token for simulated devices, and a rollout of 1.1.0 to them (unless one is live)."""
        group = DeviceGroup.objects.filter(name=SIM_GROUP).first() or device_services.create_group(
            name=SIM_GROUP, description="Devices of `ota-client simulate` (make demo).", actor=ACTOR
        )
        _, plaintext = device_services.create_enrollment_token(
            name="simulated fleet", device_type=DEVICE_TYPE, group=group, actor=ACTOR
        )
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(plaintext)
        token_file.chmod(0o600)
        # The TUF root the simulated devices ship with (`ota-client simulate --tuf-root`).
        # Taken from the server at setup: trust on first use, acceptable for a simulator only.
        root = firmware_services.tuf_root()
        if root is not None:
            (token_file.parent / "tuf-root.json").write_bytes(root)
        live = Rollout.objects.filter(
            status__in=LIVE_ROLLOUT_STATUSES, target_groups=group
        ).exists()
        target = next(fw for fw in firmware if fw.version == SIM_ROLLOUT_VERSION)
        if not live:
            rollout = lifecycle.create_rollout(
                Definition(
                    name=f"{DEVICE_TYPE} {SIM_ROLLOUT_VERSION} to the simulated fleet",
                    firmware=target,
                    target_groups=[group],
                    stages=[
                        StageSpec("canary", 10, 20),
                        StageSpec("half", 50, 20),
                        StageSpec("all", 100),
                    ],
                    min_devices=2,
                    rollback_threshold=0.3,
                    success_threshold=0.8,
                    device_timeout=600,
                ),
                actor=ACTOR,
            )
            lifecycle.start_rollout(rollout, actor=ACTOR)
        return (
            f"Simulated fleet: token in {token_file}; rollout of {SIM_ROLLOUT_VERSION} to group "
            f"{SIM_GROUP!r} {'running' if live else 'started'}."
        )

    def _admin_user(self) -> str:
        password = secrets.token_urlsafe(12)
        user, _ = get_user_model().objects.get_or_create(
            username="admin", defaults={"email": "admin@example.com"}
        )
        user.is_staff = True
        user.is_superuser = True
        user.is_active = True
        user.set_password(password)
        user.save()
        return password

    def _groups(self) -> tuple[dict[str, DeviceGroup], list[str]]:
        groups: dict[str, DeviceGroup] = {}
        created: list[str] = []
        for name in GROUPS:
            group = DeviceGroup.objects.filter(name=name).first()
            if group is None:
                try:
                    group = device_services.create_group(name=name, actor=ACTOR)
                    created.append(name)
                except StateConflict:  # created by a concurrent run
                    group = DeviceGroup.objects.get(name=name)
            groups[name] = group
        return groups, created

    def _firmware(self) -> tuple[list[Firmware], list[str]]:
        result: list[Firmware] = []
        uploaded: list[str] = []
        for version in VERSIONS:
            firmware = Firmware.objects.filter(
                device_type=DEVICE_TYPE, version_key=Version.parse(version).sort_key
            ).first()
            if firmware is None:
                data = demo_image(version)
                firmware = firmware_services.upload_firmware(
                    file=SimpleUploadedFile(
                        f"{DEVICE_TYPE}-{version}.bin", data, "application/octet-stream"
                    ),
                    hashes={
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "sha1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
                        "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
                    },
                    version=version,
                    device_type=DEVICE_TYPE,
                    release_notes=f"Demo firmware {version}.",
                    actor=ACTOR,
                )
                uploaded.append(version)
            # Also finishes a previous run that stopped between upload and publish.
            result.append(firmware_services.publish_firmware(firmware, actor=ACTOR))
        return result, uploaded

    def _fleet(self, size: int, groups: dict[str, DeviceGroup]) -> int:
        """Plain rows for the console to show; they never poll, so their secrets are discarded.

        Simulated live devices must enroll with other hardware ids (these ones are taken).
        """
        if size == 0 or Device.objects.filter(hardware_id__startswith=FLEET_PREFIX).exists():
            return 0
        now = timezone.now()
        members = list(groups.values())
        devices = []
        for i in range(1, size + 1):
            device = Device(
                hardware_id=f"{FLEET_PREFIX}{i:04d}",
                device_type=DEVICE_TYPE,
                group=members[i % len(members)],
                metadata={"demo": True},
                secret_hash=device_services.hash_secret(secrets.token_urlsafe(32)),
                # Seven in ten seen within the online window, the rest over the last six hours.
                last_seen=now
                - timedelta(seconds=(i * 37) % 540 if i % 10 < 7 else (i * 7919) % 21600),
            )
            device.set_current_version("1.1.0" if i % 5 == 0 else "1.0.0")
            devices.append(device)
        with transaction.atomic():
            Device.objects.bulk_create(devices, batch_size=1000)
        return size
