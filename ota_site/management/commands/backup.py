"""manage.py backup create|restore: the database and the firmware storage (ota_site.backup).

docs/operations.md, "Backup and restore", says what a backup holds, what it leaves out on purpose
(the master key, the TUF root keys) and how to restore one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ota_site import backup


class Command(BaseCommand):
    help = (
        "`create [--out DIR]`: write the database (pg_dump, or a SQLite copy) and every file of "
        "the firmware storage into a new folder (default: $OTA_VAR_DIR/backups/<UTC time>). "
        "`restore DIR --yes`: check that backup, then replace the database's contents and the "
        "storage's files with it; stop the web servers and workers first."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Write a backup into a new folder.")
        create.add_argument("--out", type=Path, help="The folder (new or empty).")
        create.add_argument("--json", action="store_true", help="Print one JSON object.")
        restore = sub.add_parser("restore", help="Replace everything with a backup.")
        restore.add_argument("folder", type=Path, help="A folder written by `backup create`.")
        restore.add_argument(
            "--yes", action="store_true", help="Confirm: the current data will be replaced."
        )
        restore.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["action"] == "create":
                folder = options["out"] or Path(settings.VAR_DIR) / "backups" / datetime.now(
                    UTC
                ).strftime("%Y%m%dT%H%M%SZ")
                summary = backup.create(folder)
                verb = "Backed up"
            else:
                if not options["yes"]:
                    raise CommandError(
                        "restore replaces the database and the stored files: add --yes."
                    )
                summary = backup.restore(options["folder"])
                verb = "Restored"
        except backup.BackupError as exc:
            raise CommandError(exc.detail) from exc
        if options["json"]:
            self.stdout.write(json.dumps(summary.as_json()))
            return
        self.stdout.write(
            f"{verb} the {summary.engine} database and {summary.files} stored files "
            f"({summary.bytes:,} bytes): {summary.folder}"
        )
