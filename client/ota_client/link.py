"""What the agent tells the server besides the update check: heartbeats and queued reports, the
signing keys it trusts, and the renewal of its certificate.

The reports go through the outbox (``ota_client.outbox``): the device keeps installing, rebooting
and validating without the server and delivers them, in order, when it can.

Rate limits (429): the server is there, only busy with us. So a 429 never marks it unreachable:
best-effort sends pause until its Retry-After has passed and then go on in the same cycle. While a
download stream is open they do not wait for it either (the stream would stall); the reports stay
queued and go with a later progress tick.
"""

from __future__ import annotations

import logging
from typing import Any

from ota_client import __version__
from ota_client.api import Offline, RateLimited, Refused, ServerClient
from ota_client.config import Config
from ota_client.identity import IdentityError
from ota_client.outbox import STATUS, Outbox, Report
from ota_client.verifier import keys_from_server, load_trusted_keys, save_trusted_keys

FINISHED = ("success", "failed", "cancelled")
# A pause after a 429 that named no Retry-After (a proxy's), seconds.
DEFAULT_RATE_LIMIT_PAUSE = 10.0


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
        # Best-effort sends wait until then (server clock, monotonic) after a 429.
        self.paused_until = 0.0

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

    def renew_certificate_if_due(self) -> None:
        """Renew the device certificate when it is due. Only from idle, so never in the middle
        of an update; a failure is logged and tried again next cycle, and never stops the
        update check (the current certificate stays valid until it expires)."""
        try:
            if not self.server.certificate_renewal_due():
                return
            self.server.renew_certificate()
        except (Offline, Refused, IdentityError, OSError) as exc:
            self.log.warning("renewing the device certificate failed (next cycle again): %s", exc)
            return
        self.log.info("renewed the device certificate")

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

    def _send(self, report: Report, *, wait: bool = True) -> dict[str, Any]:
        if report.kind == STATUS:
            return self.server.report_status(report.body, wait=wait)
        return self.server.report_validation(report.body, wait=wait)

    def flush(self, current_session: str | None, downloading: bool, *, wait: bool = True) -> None:
        """Send the queued reports; raises Offline when the server cannot take them now.
        ``wait=False``: do not wait out a 429 (RateLimited is raised instead)."""
        result = self.outbox.flush(lambda report: self._send(report, wait=wait))
        for report, reply in result.sent:
            session = reply.get("session") if isinstance(reply, dict) else None
            status = session.get("status") if isinstance(session, dict) else None
            if report.session_id == current_session and status in FINISHED and downloading:
                self.session_closed = f"the server reports session {current_session} as {status}"

    def flush_best_effort(self, current_session: str | None, downloading: bool) -> None:
        if self.unreachable or not len(self.outbox):
            return
        if self.server.clock() < self.paused_until:
            return  # rate limited a moment ago: the reports wait in the outbox
        try:
            # During a download (its stream may be open right now) a 429 is not waited out.
            self.flush(current_session, downloading, wait=not downloading)
        except RateLimited as exc:
            pause = exc.retry_after if exc.retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
            self.paused_until = self.server.clock() + pause
            self.log.info("rate limited; %s reports wait %.0f s", len(self.outbox), pause)
        except Offline as exc:
            # Keep working without the server; the reports wait in the outbox.
            self.unreachable = True
            self.log.info("reports stay queued (%s): %s", len(self.outbox), exc)
        except Refused as exc:
            self.unreachable = True
            self.log.warning("reports stay queued: %s", exc)
