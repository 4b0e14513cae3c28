"""manage.py firmware verify: read stored firmware back and compare it with its checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware import services
from firmware.models import Firmware
from ota_site.errors import ServiceError

ACTOR = "manage.py firmware"


class Command(BaseCommand):
    help = (
        "`verify [ID ...] [--all]` re-reads stored firmware and compares its sha256 with the "
        "recorded one; a missing or changed file quarantines the firmware (withdrawn from offers "
        "and device downloads, exit status 1) until `verify ID --restore FILE` puts the right "
        "bytes back (or a later check finds them)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        verify = sub.add_parser("verify", help="Check stored bytes against their checksums.")
        verify.add_argument("ids", nargs="*", help="Firmware ids (default with --all: every one).")
        verify.add_argument("--all", action="store_true", help="Every published firmware.")
        verify.add_argument(
            "--restore",
            metavar="FILE",
            help="Store FILE as the firmware's bytes first (one id; must match its sha256).",
        )
        verify.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        ids: list[str] = options["ids"]
        if options["all"] == bool(ids):
            raise CommandError("Name firmware ids or --all (not both).")
        if options["restore"] and len(ids) != 1:
            raise CommandError("--restore needs exactly one firmware id.")
        try:
            if options["all"]:
                results = services.verify_all_storage(actor=ACTOR)
            else:
                results = [self.verify_one(firmware_id, options["restore"]) for firmware_id in ids]
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        bad = [r for r in results if not r["ok"]]
        if options["json"]:
            self.stdout.write(json.dumps({"results": results, "failed": len(bad)}))
        else:
            for r in results:
                state = "ok" if r["ok"] else f"{r['problem'].upper()}: {r['detail']}"
                quarantine = " (quarantined)" if r["quarantined"] else ""
                self.stdout.write(
                    f"{r['device_type']} {r['version']} {r['firmware_id']}: {state}{quarantine}"
                )
        if bad:
            raise CommandError(f"{len(bad)} of {len(results)} firmware failed verification.")

    def verify_one(self, firmware_id: str, restore: str | None) -> services.StorageCheck:
        try:
            firmware = Firmware.objects.get(pk=firmware_id)
        except (Firmware.DoesNotExist, ValidationError, ValueError) as exc:
            raise CommandError(f"No firmware {firmware_id!r}.") from exc
        if restore is None:
            return services.verify_storage(firmware, actor=ACTOR)
        try:
            with Path(restore).open("rb") as handle:
                return services.restore_storage(firmware, File(handle), actor=ACTOR)
        except OSError as exc:
            raise CommandError(f"Cannot read {restore}: {exc}") from exc
