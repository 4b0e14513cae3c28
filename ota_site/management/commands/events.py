"""manage.py events prune: export old events to archive files and delete them, audited.

The event log is append-only; this is its one sanctioned exit (ota_site.archive.prune_events).
docs/operations.md describes when to prune.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ota_site import archive
from ota_site.errors import ServiceError

ACTOR = "manage.py events"


class Command(BaseCommand):
    help = (
        "`prune --older-than-days N`: write events created more than N days ago to gzip JSON "
        "Lines files under archive/events/ in the firmware storage, then delete them, in "
        "batches of one transaction each; every batch records an events.pruned event. "
        f"N below {archive.MIN_EVENT_RETENTION_DAYS} needs --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        prune = sub.add_parser("prune", help="Archive and delete old events.")
        prune.add_argument(
            "--older-than-days",
            type=int,
            required=True,
            help="Prune events created more than this many days ago.",
        )
        prune.add_argument(
            "--force",
            action="store_true",
            help=f"Allow fewer than {archive.MIN_EVENT_RETENTION_DAYS} days (at least 1).",
        )
        prune.add_argument(
            "--batch-size",
            type=int,
            default=archive.DEFAULT_EVENT_BATCH,
            help=f"Events per file and transaction (default {archive.DEFAULT_EVENT_BATCH}).",
        )
        prune.add_argument(
            "--dry-run", action="store_true", help="Count what would be pruned; change nothing."
        )
        prune.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = archive.prune_events(
                older_than_days=options["older_than_days"],
                force=options["force"],
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                actor=ACTOR,
            )
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} ({exc.code})") from exc
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict()))
            return
        before = result.before.isoformat(timespec="seconds")
        span = f" (ids {result.first_id}-{result.last_id})" if result.events else ""
        if result.dry_run:
            self.stdout.write(f"Would prune {result.events} events created before {before}{span}.")
            return
        self.stdout.write(
            f"Pruned {result.events} events created before {before}{span} into "
            f"{len(result.files)} files."
        )
        for name in result.files:
            self.stdout.write(f"  {name}")
