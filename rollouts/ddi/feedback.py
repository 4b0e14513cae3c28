"""DDI feedback: read what real clients send, and map it onto our session statuses.

Clients are parsed leniently, as they are in the field: SWUpdate's failure feedback is not strict
JSON (raw newlines in ``details``), newer clients send ``timestamp`` instead of ``time``, progress
may have ``cnt > of`` or ``of = 0``, and unknown fields are ignored. What cannot be understood at
all (not JSON, no status.execution) is a 400 with a machine-readable body.

Mapping (docs/ddi.md):
- proceeding, download, downloaded, resumed, scheduled: the session goes on (downloading, or
  installing once the client says it installs); progress from ``result.progress``.
- closed + failure: failed. closed + success (or none, as hawkBit reads it): success.
- canceled: the device gave up; rejected: the device declined. Both cancel the session without
  counting against the rollout, and need no cancel confirmation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ota_site.errors import ServiceError
from rollouts.models import STATUS_RANK, SessionStatus

EXECUTIONS = frozenset(
    {
        "proceeding",
        "closed",
        "canceled",
        "scheduled",
        "rejected",
        "resumed",
        "downloaded",
        "download",
    }
)
FINISHED_RESULTS = frozenset({"none", "success", "failure"})
MAX_DETAIL = 4000


class FeedbackInvalid(ServiceError):
    code = "invalid_feedback"


@dataclass(frozen=True)
class Feedback:
    execution: str
    finished: str
    progress: int | None
    details: list[str]

    @property
    def detail_text(self) -> str:
        return "\n".join(self.details)[:MAX_DETAIL]

    @property
    def mentions_install(self) -> bool:
        return any("install" in line.lower() for line in self.details)


def parse(body: bytes) -> Feedback:
    data = _lenient_json(body)
    if not isinstance(data, dict) or not isinstance(data.get("status"), dict):
        raise FeedbackInvalid('The feedback needs a "status" object.')
    status = data["status"]
    execution = status.get("execution")
    if not isinstance(execution, str) or execution.lower() not in EXECUTIONS:
        raise FeedbackInvalid(
            f"status.execution must be one of {', '.join(sorted(EXECUTIONS))}.",
        )
    result = status.get("result") if isinstance(status.get("result"), dict) else {}
    finished = result.get("finished", "none")
    if not isinstance(finished, str) or finished.lower() not in FINISHED_RESULTS:
        raise FeedbackInvalid("status.result.finished must be none, success or failure.")
    return Feedback(
        execution=execution.lower(),
        finished=finished.lower(),
        progress=_percent(result.get("progress")),
        details=_details(status.get("details")),
    )


def _lenient_json(body: bytes) -> Any:
    if not body.strip():
        raise FeedbackInvalid("The feedback body is empty.")
    try:
        return json.loads(body.decode("utf-8", errors="replace"), strict=False)
    except (ValueError, RecursionError) as exc:
        raise FeedbackInvalid(f"The feedback is not JSON: {exc}.") from exc


def _percent(progress: Any) -> int | None:
    """cnt of of, as 0..100; None when it says nothing usable (of = 0, missing, not numbers)."""
    if not isinstance(progress, dict):
        return None
    count, total = progress.get("cnt"), progress.get("of")
    numbers = (int, float)
    if not isinstance(count, numbers) or not isinstance(total, numbers) or total <= 0:
        return None
    if isinstance(count, bool) or isinstance(total, bool):
        return None
    try:
        percent = 100 * count / total
    except OverflowError:  # an integer too large for a float
        return None
    if not math.isfinite(percent):  # NaN or Infinity (Python's json reads both)
        return None
    return max(0, min(100, int(percent)))


def _details(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    # NUL characters (binary log output) cannot be stored in PostgreSQL text: drop them.
    return [str(line).replace("\x00", "")[:MAX_DETAIL] for line in value[:100]]


@dataclass(frozen=True)
class Step:
    """What a deploymentBase feedback does to its session."""

    kind: str  # "report", "finish", "cancel", "none"
    status: str | None = None
    progress: int | None = None
    reason: str = ""


def step_for(feedback: Feedback, current: str) -> Step:
    execution = feedback.execution
    if execution == "closed":
        if feedback.finished == "failure":
            return Step(
                "finish",
                SessionStatus.FAILED,
                reason=feedback.detail_text or "The device reported a failed update.",
            )
        return Step("finish", SessionStatus.SUCCESS)
    if execution == "canceled":
        return Step("cancel", reason=_why("The device cancelled the update", feedback))
    if execution == "rejected":
        return Step("cancel", reason=_why("The device rejected the update", feedback))
    if execution == "scheduled":
        return Step("none")
    wanted = SessionStatus.DOWNLOADING
    if feedback.mentions_install or execution == "downloaded":
        wanted = SessionStatus.INSTALLING
    # Never backwards: a "proceeding" after installing started keeps the session installing.
    if STATUS_RANK[SessionStatus(current)] > STATUS_RANK[wanted]:
        wanted = SessionStatus(current)
    progress = 100 if execution == "downloaded" else feedback.progress
    return Step("report", wanted, progress=progress)


def _why(prefix: str, feedback: Feedback) -> str:
    text = feedback.detail_text
    return f"{prefix}: {text}" if text else f"{prefix}."
