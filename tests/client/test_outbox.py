"""The outbox keeps reports in order across restarts and outages, and drops none unsent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ota_client.api import Offline, Refused
from ota_client.outbox import Outbox, Report


def test_reports_survive_a_restart_and_go_out_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.json"
    box = Outbox(path)
    box.add_status("s1", "downloading", progress=0)
    box.add_status("s1", "installing")
    box.add_validation("s1", success=True, version="1.1.0")
    sent: list[dict[str, Any]] = []

    def send(report: Report) -> dict[str, Any]:
        sent.append(report.body)
        return {"applied": True}

    Outbox(path).flush(send)
    assert [b.get("status", "validation") for b in sent] == [
        "downloading",
        "installing",
        "validation",
    ]
    assert len(Outbox(path)) == 0


def test_progress_of_the_same_step_is_coalesced(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.json")
    for progress in (0, 10, 55, 40):
        box.add_status("s1", "downloading", progress=progress)
    box.add_status("s1", "installing", progress=0)
    box.add_status("s1", "installing", progress=50)
    box.add_status("s2", "installing", progress=60)
    assert [(r.session_id, r.body["status"], r.body["progress"]) for r in box.pending()] == [
        ("s1", "downloading", 55),
        ("s1", "installing", 50),
        ("s2", "installing", 60),
    ]


def test_a_failure_report_is_never_merged_into_progress(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.json")
    box.add_status("s1", "downloading", progress=30)
    box.add_status("s1", "failed", error_message="disk full")
    box.add_status("s1", "failed", error_message="disk full")
    assert len(box) == 3


def test_offline_keeps_the_rest_queued(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.json")
    box.add_status("s1", "downloading", progress=5)
    box.add_status("s1", "installing")
    box.add_validation("s1", success=False, version="1.0.0", error_message="health")
    calls: Iterator[Any] = iter([{"applied": True}, Offline("gone")])

    def send(report: Report) -> dict[str, Any]:
        answer = next(calls)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with pytest.raises(Offline):
        box.flush(send)
    assert [r.kind for r in Outbox(tmp_path / "outbox.json").pending()] == [
        "status",
        "validation",
    ]


def test_refused_reports_are_dropped_but_auth_trouble_keeps_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.json")
    box.add_status("gone", "downloading", progress=5)
    box.add_status("s2", "installing")

    def refuse_first(report: Report) -> dict[str, Any]:
        if report.session_id == "gone":
            raise Refused(404, "session_not_found", "No such update session.")
        raise Refused(401, "authentication_failed", "who are you")

    with pytest.raises(Offline):
        box.flush(refuse_first)
    assert [r.session_id for r in box.pending()] == ["s2"]


def test_a_validation_is_queued_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.json")
    box.add_validation("s1", success=False, version="1.0.0", error_message="x")
    box.add_validation("s1", success=False, version="1.0.0", error_message="x")
    assert len(box) == 1
