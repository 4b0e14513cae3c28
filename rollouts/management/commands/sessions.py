"""manage.py sessions archive: move old finished update sessions to archive files in storage.

The daily beat task (rollouts.tasks.archive_old_sessions) runs the same function; this command is
for a first large run, a different age, or a dry run. docs/operations.md describes the archive.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ota_site.errors import ServiceError
from rollouts import archive

ACTOR = "manage.py sessions"


class Command(BaseCommand):
    help = (
        "`archive`: write update sessions that finished (success, failed, cancelled) more than "
        "N days ago to gzip JSON Lines files under archive/sessions/ in the firmware storage, "
        "then delete them, in batches of one transaction each (safe to interrupt and rerun). "
        "A device's newest session, its newest successful one, open sessions and sessions of "
        "live rollouts stay."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        run = sub.add_parser("archive", help="Archive and delete old finished sessions.")
        run.add_argument(
            "--older-than-days",
            type=int,
            default=90,
            help="Archive sessions that finished more than this many days ago (default 90).",
        )
        run.add_argument(
            "--batch-size",
            type=int,
            default=archive.DEFAULT_BATCH,
            help=f"Sessions per file and transaction (default {archive.DEFAULT_BATCH}).",
        )
        run.add_argument(
            "--dry-run", action="store_true", help="Count what would be archived; change nothing."
        )
        run.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = archive.archive_sessions(
                older_than_days=options["older_than_days"],
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                actor=ACTOR,
            )
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} ({exc.code})") from exc
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict()))
            return
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(result.by_status.items())) or "none"
        before = result.before.isoformat(timespec="seconds")
        if result.dry_run:
            self.stdout.write(
                f"Would archive {result.sessions} sessions finished before {before} ({statuses})."
            )
            return
        self.stdout.write(
            f"Archived {result.sessions} sessions finished before {before} ({statuses}) "
            f"into {len(result.files)} files, {result.bytes} bytes."
        )
        for name in result.files:
            self.stdout.write(f"  {name}")
