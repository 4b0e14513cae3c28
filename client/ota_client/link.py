"""What the agent tells the server besides the update check: heartbeats and queued reports,
and the signing keys it trusts.

The reports go through the outbox (``ota_client.outbox``): the device keeps installing, rebooting
and validating without the server and delivers them, in order, when it can.
"""

from __future__ import annotations

import logging
from typing import Any

from ota_client import __version__
from ota_client.api import Offline, Refused, ServerClient
from ota_client.config import Config
from ota_client.outbox import STATUS, Outbox, Report
from ota_client.verifier import keys_from_server, load_trusted_keys, save_trusted_keys

FINISHED = ("success", "failed", "cancelled")


class ServerLink:
    def __init__(
        self,
        config: Config,
        server: ServerClient,
        outbox: Outbox,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.config = config
        self.server = server
        self.outbox = outbox
        self.log = log
        self.unreachable = False  # the server failed once in this cycle: stop trying
        self.heartbeat_done = False
        # Set when a report's answer shows the server finished the session being downloaded.
        self.session_closed: str | None = None

    def new_cycle(self) -> None:
        self.unreachable = False

    def trusted_keys(self) -> dict[str, str]:
        path = self.config.trusted_keys_path
        keys = load_trusted_keys(path)
        if not keys and self.config.trust_on_first_use and not path.exists():
            fetched = keys_from_server(self.server.public_keys())
            if fetched:
                self.log.warning(
                    "trusting the server's signing keys on first use: %s", ", ".join(fetched)
                )
                save_trusted_keys(path, fetched)
            keys = fetched
        return keys

    def heartbeat(self, version: str, slot: str, reported_version: str | None) -> bool:
        """Tell the server the running version once per process and whenever it changes.
        Returns True when it was sent."""
        if self.heartbeat_done and reported_version == version:
            return False
        metadata = {**self.config.metadata, "ota_slot": slot, "ota_client": __version__}
        try:
            self.server.heartbeat(version, metadata)
        except Refused as exc:
            # Not a reason to stop updating (bad metadata in the config, say); say it once.
            self.log.warning("the server refused the heartbeat: %s", exc)
        self.heartbeat_done = True
        return True

    def _send(self, report: Report) -> dict[str, Any]:
        if report.kind == STATUS:
            return self.server.report_status(report.body)
        return self.server.report_validation(report.body)

    def flush(self, current_session: str | None, downloading: bool) -> None:
        """Send the queued reports; raises Offline when the server cannot take them now."""
        result = self.outbox.flush(self._send)
        for report, reply in result.sent:
            session = reply.get("session") if isinstance(reply, dict) else None
            status = session.get("status") if isinstance(session, dict) else None
            if report.session_id == current_session and status in FINISHED and downloading:
                self.session_closed = f"the server reports session {current_session} as {status}"

    def flush_best_effort(self, current_session: str | None, downloading: bool) -> None:
        if self.unreachable or not len(self.outbox):
            return
        try:
            self.flush(current_session, downloading)
        except Offline as exc:
            # Keep working without the server; the reports wait in the outbox.
            self.unreachable = True
            self.log.info("reports stay queued (%s): %s", len(self.outbox), exc)
        except Refused as exc:
            self.unreachable = True
            self.log.warning("reports stay queued: %s", exc)
