"""Reports to the server that survive being offline and power cuts.

Every status report and validation goes into ``state_dir/outbox.json`` (written atomically) and
leaves it only once the server answered it. ``flush`` sends them oldest first and stops at the
first one that cannot be delivered now, so the server always sees a session's steps in the order
they happened, however late.

- Progress reports for the same session and status are coalesced while queued: only the newest
  progress of a step is worth sending, and an offline download must not grow the file.
- A report the server refused with a 4xx (a session that no longer exists, say) was delivered and
  answered; resending cannot change the answer, so it is dropped and logged. 401, 408 and 429 are
  not answers about the report and keep it queued.
- Nothing else is ever dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota_client.api import Offline, Refused
from ota_client.system import atomic_write_json

logger = logging.getLogger(__name__)

STATUS = "status"
VALIDATION = "validation"
_KEEP_ON = (401, 408, 429)


@dataclass
class Report:
    id: int
    kind: str  # STATUS or VALIDATION
    body: dict[str, Any]

    @property
    def session_id(self) -> str:
        return str(self.body.get("session_id", ""))


@dataclass
class FlushResult:
    sent: list[tuple[Report, dict[str, Any]]] = field(default_factory=list)
    dropped: list[tuple[Report, Refused]] = field(default_factory=list)


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: list[Report] = []
        self._next_id = 1
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        self._next_id = int(data.get("next_id", 1))
        self._items = [
            Report(id=int(item["id"]), kind=str(item["kind"]), body=dict(item["body"]))
            for item in data.get("items", [])
        ]

    def _save(self) -> None:
        atomic_write_json(
            self.path,
            {
                "next_id": self._next_id,
                "items": [{"id": r.id, "kind": r.kind, "body": r.body} for r in self._items],
            },
        )

    def pending(self) -> list[Report]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add_status(
        self,
        session_id: str,
        status: str,
        *,
        progress: int | None = None,
        error_message: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"session_id": session_id, "status": status}
        if progress is not None:
            body["progress"] = max(0, min(100, int(progress)))
        if error_message:
            body["error_message"] = error_message[:4000]
        last = self._items[-1] if self._items else None
        if (
            last is not None
            and last.kind == STATUS
            and last.session_id == session_id
            and last.body.get("status") == status
            and "error_message" not in last.body
            and "error_message" not in body
        ):
            # Coalesce: the newest progress of the same step replaces the queued one.
            if "progress" in body:
                last.body["progress"] = max(body["progress"], last.body.get("progress", 0))
            self._save()
            return
        self._append(STATUS, body)

    def add_validation(
        self,
        session_id: str,
        *,
        success: bool,
        version: str,
        error_message: str | None = None,
    ) -> None:
        if any(r.kind == VALIDATION and r.session_id == session_id for r in self._items):
            return  # a repeat after a restart; the first one says the same
        body: dict[str, Any] = {"session_id": session_id, "success": success, "version": version}
        if error_message:
            body["error_message"] = error_message[:4000]
        self._append(VALIDATION, body)

    def _append(self, kind: str, body: dict[str, Any]) -> None:
        self._items.append(Report(id=self._next_id, kind=kind, body=body))
        self._next_id += 1
        self._save()

    def flush(self, send: Callable[[Report], dict[str, Any]]) -> FlushResult:
        """Send queued reports in order. Raises Offline (after saving what was sent) when the
        server cannot be reached; the rest stays queued."""
        result = FlushResult()
        while self._items:
            report = self._items[0]
            try:
                reply = send(report)
            except Refused as exc:
                if not 400 <= exc.status < 500 or exc.status in _KEEP_ON:
                    raise Offline(f"report {report.id} not delivered: {exc}") from exc
                logger.warning("the server refused report %s %s: %s", report.id, report.body, exc)
                result.dropped.append((report, exc))
            else:
                result.sent.append((report, reply))
            self._items.pop(0)
            self._save()
        return result
