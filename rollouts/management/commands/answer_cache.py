"""manage.py answer_cache: the poll answer cache's listener, and whether one is running.

Celery beat runs the listener already (rollouts.answer_cache); `listen` runs it in the
foreground instead, for an installation that keeps it in a process of its own. Two listeners
never conflict: the second stands by until the first stops. docs/answer-cache.md.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ota_site import answers
from rollouts import answer_cache


class Command(BaseCommand):
    help = (
        "`listen`: run the poll answer cache's listener in the foreground (Celery beat runs one "
        "already). `status`: whether the cache is on and a listener keeps it live."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("listen", help="Run the listener until interrupted (SIGINT or SIGTERM).")
        status = sub.add_parser("status", help="Is the cache on, and is a listener running?")
        status.add_argument("--json", action="store_true", help="Print the status as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "status":
            state = answers.status()
            if options["json"]:
                self.stdout.write(json.dumps(state))
            elif not state["enabled"]:
                self.stdout.write(
                    "off (needs REDIS_URL, PostgreSQL and POLL_ANSWER_CACHE_SECONDS above 0)"
                )
            else:
                self.stdout.write("live" if state["live"] else "on, but no listener is running")
            return
        if not answers.enabled():
            raise CommandError(
                "The poll answer cache is off: it needs REDIS_URL, PostgreSQL and "
                "POLL_ANSWER_CACHE_SECONDS above 0."
            )
        listener = answer_cache.listener()

        def stop(signum: int, frame: Any) -> None:
            listener.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write("Listening for changes; Ctrl-C to stop.")
        self.stdout.flush()
        listener.run()
        listener.release()
