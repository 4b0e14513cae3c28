"""manage.py create_enrollment_token: a token devices register with, printed once."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from devices import services
from devices.models import DeviceGroup
from ota_site.errors import ServiceError
from ota_site.validators import device_type_validator

ACTOR = "manage.py create_enrollment_token"
_DURATION = re.compile(r"^(\d{1,9})([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s' or plain seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 90m or 3600")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds <= 0:
        raise ValueError("the duration must be positive")
    return timedelta(seconds=seconds)


class Command(BaseCommand):
    help = (
        "Create an enrollment token that devices use to register "
        "(POST /api/v1/devices/register). The token is printed once and stored only as a hash: "
        "copy it now."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--name", required=True, help="What the token is for, e.g. 'factory line 2'."
        )
        parser.add_argument(
            "--device-type",
            default="",
            help="Only devices of this type may register with the token (default: any type).",
        )
        parser.add_argument(
            "--group", help="Name of an existing device group that enrolled devices join."
        )
        parser.add_argument(
            "--expires-in",
            help="Lifetime: 30d, 12h, 90m, 45s or a number of seconds (default: never expires).",
        )
        parser.add_argument(
            "--max-uses",
            type=int,
            help="How many devices may register with it (default: unlimited).",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the result as one JSON object."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        device_type: str = options["device_type"] or ""
        if device_type:
            try:
                device_type_validator(device_type)
            except ValidationError as exc:
                raise CommandError(f"--device-type: {exc.messages[0]}") from exc

        group = None
        if options["group"]:
            group = DeviceGroup.objects.filter(name=options["group"]).first()
            if group is None:
                known = ", ".join(DeviceGroup.objects.values_list("name", flat=True)[:20])
                raise CommandError(
                    f"No device group named {options['group']!r}. "
                    + (f"Groups: {known}." if known else "There are no groups yet.")
                )

        expires_at = None
        if options["expires_in"]:
            try:
                expires_at = timezone.now() + parse_duration(options["expires_in"])
            except ValueError as exc:
                raise CommandError(f"--expires-in: {exc}") from exc

        try:
            token, plaintext = services.create_enrollment_token(
                name=options["name"],
                device_type=device_type,
                group=group,
                expires_at=expires_at,
                max_uses=options["max_uses"],
                actor=ACTOR,
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc

        if options["json"]:
            result = {
                "id": str(token.id),
                "name": token.name,
                "prefix": token.prefix,
                "token": plaintext,
                "device_type": token.device_type or None,
                "group": group.name if group else None,
                "expires_at": token.expires_at.isoformat() if token.expires_at else None,
                "max_uses": token.max_uses,
            }
            self.stdout.write(json.dumps(result))
            return
        scope = [f"device type {device_type}" if device_type else "any device type"]
        if group is not None:
            scope.append(f"joins group {group.name}")
        if token.expires_at is not None:
            scope.append(f"expires {token.expires_at.isoformat(timespec='seconds')}")
        if token.max_uses is not None:
            scope.append(f"at most {token.max_uses} uses")
        self.stdout.write(f"Enrollment token {token.name!r} ({', '.join(scope)}):")
        self.stdout.write(plaintext)
        self.stdout.write("It is shown only this once; store it where your devices get it.")
