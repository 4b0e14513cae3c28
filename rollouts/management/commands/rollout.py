"""manage.py rollout: create, list, control and inspect staged rollouts from the shell.

Every subcommand calls the same lifecycle functions as the API, the admin and the Celery task.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.dateparse import parse_datetime

from devices.models import DeviceGroup
from firmware.models import Firmware
from ota_site.errors import ServiceError
from ota_site.versions import InvalidVersion, version_key
from rollouts import evaluation, lifecycle
from rollouts.lifecycle import Definition, StageSpec
from rollouts.models import Rollout

ACTOR = "manage.py rollout"
TRANSITIONS = {
    "start": lifecycle.start_rollout,
    "pause": lifecycle.pause_rollout,
    "resume": lifecycle.resume_rollout,
    "cancel": lifecycle.cancel_rollout,
    "advance": lifecycle.advance_rollout,
}


def parse_stages(text: str) -> list[StageSpec]:
    """'10,50,100' or with soak times in seconds: '1:3600,10:3600,100'."""
    stages = []
    for part in text.split(","):
        percentage, _, duration = part.strip().partition(":")
        try:
            stages.append(StageSpec(f"{int(percentage)}%", int(percentage), int(duration or 0)))
        except ValueError as exc:
            raise CommandError(f"--stages: {part!r} is not PERCENT or PERCENT:SECONDS") from exc
    return stages


def find_firmware(text: str) -> Firmware:
    """A firmware id, or DEVICE_TYPE:VERSION."""
    try:
        return Firmware.objects.get(pk=uuid.UUID(text))
    except (ValueError, Firmware.DoesNotExist):
        pass
    device_type, _, version = text.partition(":")
    try:
        return Firmware.objects.get(device_type=device_type, version_key=version_key(version))
    except (Firmware.DoesNotExist, InvalidVersion) as exc:
        raise CommandError(f"No firmware {text!r} (give an id or DEVICE_TYPE:VERSION).") from exc


class Command(BaseCommand):
    help = "Create, list, start, pause, resume, cancel, advance and inspect staged rollouts."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="Rollouts, newest first.")
        create = sub.add_parser("create", help="Define a rollout (it starts with `start`).")
        create.add_argument("--name", required=True)
        create.add_argument("--firmware", required=True, help="Id or DEVICE_TYPE:VERSION.")
        create.add_argument(
            "--stages",
            default="10,50,100",
            help="Percentages, optionally with soak seconds: 1:3600,10,100.",
        )
        create.add_argument(
            "--group", action="append", default=[], help="Only devices of this group (repeatable)."
        )
        create.add_argument("--from-version-min", default="")
        create.add_argument("--from-version-max", default="")
        create.add_argument(
            "--metadata",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Only devices whose metadata has KEY=VALUE (repeatable).",
        )
        create.add_argument("--success-threshold", type=float, default=0.95)
        create.add_argument("--rollback-threshold", type=float, default=0.05)
        create.add_argument("--min-devices", type=int, default=5)
        create.add_argument("--device-timeout", type=int, default=3600, help="Seconds.")
        create.add_argument("--no-auto-rollback", action="store_true")
        create.add_argument("--start-at", help="ISO 8601 time to start by itself.")
        create.add_argument("--start", action="store_true", help="Start it right away.")
        for name, transition in TRANSITIONS.items():
            action = sub.add_parser(name, help=(transition.__doc__ or name).split("\n")[0])
            action.add_argument("rollout", help="Rollout id.")
            if name in ("pause", "cancel", "advance"):
                action.add_argument("--reason", default="")
        metrics = sub.add_parser("metrics", help="Per-stage counts and rates.")
        metrics.add_argument("rollout", help="Rollout id.")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        try:
            if action == "list":
                result: Any = [self.describe(r) for r in Rollout.objects.select_related("firmware")]
            elif action == "create":
                result = self.describe(self.create(options))
            elif action == "metrics":
                result = evaluation.rollout_metrics(self.find(options["rollout"]))
            else:
                extra = {"reason": options["reason"]} if "reason" in options else {}
                rollout = TRANSITIONS[action](self.find(options["rollout"]), actor=ACTOR, **extra)
                result = self.describe(rollout)
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} ({exc.code})") from exc
        if options["json"]:
            self.stdout.write(json.dumps(result, cls=DjangoJSONEncoder, indent=2))
        elif isinstance(result, list):
            for item in result:
                self.stdout.write(self.line(item))
        elif action == "metrics":
            self.stdout.write(f"{result['status']}  targeted devices: {result['targeted_devices']}")
            for stage in result["stages"]:
                self.stdout.write(
                    f"  {stage['name']:>8} {stage['state']:>8}  devices {stage['devices']:>7}  "
                    f"finished {stage['finished']:>7}  success {stage['sessions']['success']:>7}"
                    f"  failed {stage['sessions']['failed']:>7}"
                )
        else:
            self.stdout.write(self.line(result))

    def create(self, options: dict[str, Any]) -> Rollout:
        groups = []
        for name in options["group"]:
            group = DeviceGroup.objects.filter(name=name).first()
            if group is None:
                raise CommandError(f"No device group named {name!r}.")
            groups.append(group)
        filters: dict[str, Any] = {}
        for item in options["metadata"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--metadata {item!r} is not KEY=VALUE.")
            filters[key] = value
        start_at: datetime | None = None
        if options["start_at"]:
            start_at = parse_datetime(options["start_at"])
            if start_at is None or start_at.tzinfo is None:
                raise CommandError("--start-at needs an ISO 8601 time with a time zone.")
        definition = Definition(
            name=options["name"],
            firmware=find_firmware(options["firmware"]),
            stages=parse_stages(options["stages"]),
            target_groups=groups,
            from_version_min=options["from_version_min"],
            from_version_max=options["from_version_max"],
            metadata_filters=filters,
            success_threshold=options["success_threshold"],
            rollback_threshold=options["rollback_threshold"],
            min_devices=options["min_devices"],
            device_timeout=options["device_timeout"],
            auto_rollback=not options["no_auto_rollback"],
            start_at=start_at,
        )
        rollout = lifecycle.create_rollout(definition, actor=ACTOR)
        if options["start"]:
            rollout = lifecycle.start_rollout(rollout, actor=ACTOR)
        return rollout

    def find(self, text: str) -> Rollout:
        try:
            return Rollout.objects.select_related("firmware").get(pk=uuid.UUID(text))
        except (ValueError, Rollout.DoesNotExist) as exc:
            raise CommandError(f"No rollout {text!r}.") from exc

    @staticmethod
    def describe(rollout: Rollout) -> dict[str, Any]:
        return {
            "id": str(rollout.id),
            "name": rollout.name,
            "status": rollout.status,
            "status_reason": rollout.status_reason,
            "firmware": f"{rollout.device_type}:{rollout.firmware.version}",
            "current_stage": rollout.current_stage,
            "start_at": rollout.start_at,
            "started_at": rollout.started_at,
            "completed_at": rollout.completed_at,
        }

    @staticmethod
    def line(item: dict[str, Any]) -> str:
        stage = "-" if item["current_stage"] is None else item["current_stage"] + 1
        reason = f"  ({item['status_reason']})" if item["status_reason"] else ""
        return (
            f"{item['id']}  {item['status']:<11} stage {stage}  {item['firmware']}  "
            f"{item['name']}{reason}"
        )
