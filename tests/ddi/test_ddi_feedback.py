"""DDI feedback: what real clients send is understood, answered with exactly 200, and moves the
update session as docs/ddi.md says.

SWUpdate treats anything but 200 as an error and retries forever, and its failure feedback is not
strict JSON, so leniency here is what keeps a fleet from hammering the server. Feedback that
cannot be understood at all is a JSON 400. Every change is written as session events, which the
console and the streams read, so DDI devices show up live like native ones.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts import lifecycle
from rollouts.models import Rollout, SessionStatus
from tests.ddi.ddi_support import (
    Target,
    assert_refused,
    provision,
    report,
    session_of,
)
from tests.rollouts_support import evaluate, started


@pytest.fixture
def target(db: Any) -> Target:
    return provision("ddi-1")


@pytest.fixture
def rollout(v1: Firmware, v2: Firmware, target: Target) -> Rollout:
    return started(v2, 100, min_devices=1)


@pytest.fixture
def action(target: Target, rollout: Rollout) -> int:
    """The action the rollout offers the device (a pending session)."""
    return target.offered()


def ok(target: Target, action_id: int, body: Any) -> None:
    reply = target.feedback(action_id, body)
    assert reply.status_code == 200, reply.content


def status_of(action_id: int) -> tuple[str, int]:
    session = session_of(action_id)
    return session.status, session.progress


# --- Exactly 200 ------------------------------------------------------------------------------


class TestAnswer:
    def test_a_whole_install_is_answered_with_200(self, target: Target, action: int) -> None:
        steps = [
            report("proceeding", details=["Started processing"]),
            report("proceeding", progress={"cnt": 1, "of": 4}),
            report("proceeding", progress={"cnt": 1, "of": 4}),  # a repeat
            report("downloaded"),
            report("proceeding", details=["All Chunks Installed."]),
            report("closed", "success"),
            report("closed", "success"),  # the client did not see our answer and retries
            report("closed", "failure"),  # on an action that has ended
            report("proceeding"),
        ]
        for body in steps:
            reply = target.feedback(action, body)
            assert reply.status_code == 200, (body, reply.content)
        assert status_of(action) == (SessionStatus.SUCCESS, 100)

    def test_failure_then_repeats(self, target: Target, action: int) -> None:
        for _ in range(3):
            ok(target, action, report("closed", "failure", details=["boom"]))
        session = session_of(action)
        assert session.status == SessionStatus.FAILED
        assert session.error_message == "boom"

    def test_no_action_is_offered_once_closed(self, target: Target, action: int) -> None:
        ok(target, action, report("closed", "failure"))
        links = target.links()
        assert "deploymentBase" not in links and "cancelAction" not in links
        # Still readable (a client that rebooted may look it up), but never offered again.
        assert target.action(action)["id"] == str(action)
        assert "deploymentBase" not in target.links()


# --- Lenient parsing ----------------------------------------------------------------------------


class TestLenientParsing:
    def test_raw_newlines_inside_a_string(self, target: Target, action: int) -> None:
        body = (
            f'{{"id": "{action}", "time": "20261127T163911", "status": {{"execution": "closed", '
            '"result": {"finished": "failure", "progress": {"cnt": 0, "of": 0}}, '
            '"details": ["ERROR : Installation failed\n\tbad image", "second"]}}'
        )
        with pytest.raises(json.JSONDecodeError, match="control character"):
            json.loads(body)  # not strict JSON: what SWUpdate really sends
        ok(target, action, body)
        session = session_of(action)
        assert session.status == SessionStatus.FAILED
        assert session.error_message == "ERROR : Installation failed\n\tbad image\nsecond"

    def test_timestamp_and_unknown_fields(self, target: Target, action: int) -> None:
        body = {
            "id": str(action),
            "timestamp": 1_795_000_000_000,
            "vendor": {"anything": [1, 2]},
            "status": {
                "execution": "Proceeding",
                "result": {"finished": "NONE", "progress": {"cnt": 3, "of": 4}, "extra": True},
                "code": 200,
                "details": "one line, not a list",
            },
        }
        ok(target, action, body)
        assert status_of(action) == (SessionStatus.DOWNLOADING, 75)

    @pytest.mark.parametrize(
        ("progress", "expected"),
        [
            ({"cnt": 9, "of": 4}, 100),  # cnt > of
            ({"cnt": 3, "of": 0}, 0),  # of = 0: says nothing
            ({"cnt": -5, "of": 10}, 0),  # negative
            ({"cnt": "3", "of": "4"}, 0),  # not numbers
            ({"cnt": 1.5, "of": 2.0}, 75),
            ("half", 0),
            (None, 0),
            ({"cnt": float("nan"), "of": 4}, 0),
            ({"cnt": 1, "of": float("nan")}, 0),
            ({"cnt": float("inf"), "of": 4}, 0),
            ({"cnt": 1, "of": float("inf")}, 0),
            ({"cnt": 10**400, "of": 3}, 0),  # too large for a float
            ({"cnt": 10**300, "of": 3}, 100),
        ],
    )
    def test_odd_progress(self, target: Target, action: int, progress: Any, expected: int) -> None:
        ok(target, action, report("proceeding", result={"finished": "none", "progress": progress}))
        assert status_of(action) == (SessionStatus.DOWNLOADING, expected)

    def test_nul_characters_in_details(self, target: Target, action: int) -> None:
        """Binary log output: PostgreSQL text cannot hold NUL, so it is dropped, not a 500."""
        ok(target, action, report("closed", "failure", details=["bad\u0000 image", "\u0000"]))
        assert session_of(action).error_message == "bad image\n"

    def test_no_result_at_all(self, target: Target, action: int) -> None:
        ok(target, action, {"status": {"execution": "proceeding"}})
        assert status_of(action)[0] == SessionStatus.DOWNLOADING

    def test_progress_never_goes_back(self, target: Target, action: int) -> None:
        ok(target, action, report("proceeding", result={"progress": {"cnt": 8, "of": 10}}))
        ok(target, action, report("proceeding", result={"progress": {"cnt": 2, "of": 10}}))
        assert status_of(action) == (SessionStatus.DOWNLOADING, 80)


class TestNotUnderstood:
    @pytest.mark.parametrize(
        "body",
        [
            "",
            "   ",
            "not json",
            '{"status": ',
            "[1, 2, 3]",
            {"id": "1"},
            {"status": "closed"},
            {"status": {}},
            {"status": {"execution": 3}},
            {"status": {"execution": "exploded"}},
            {"status": {"execution": "closed", "result": {"finished": "maybe"}}},
            b"\xff\xfe\x00garbage",
            "[" * 100_000,
        ],
    )
    def test_400_with_a_code(self, target: Target, action: int, body: Any) -> None:
        assert_refused(target.feedback(action, body), 400, "invalid_feedback")
        assert status_of(action) == (SessionStatus.PENDING, 0)

    def test_unknown_action(self, target: Target, action: int) -> None:
        assert_refused(target.feedback(action + 1000, report("closed", "success")), 404)

    def test_get_on_a_feedback_url(self, target: Target, action: int) -> None:
        for url in (f"/deploymentBase/{action}/feedback", f"/cancelAction/{action}/feedback"):
            reply = target.get(url)
            assert_refused(reply, 405, "method_not_allowed")
            assert reply["Allow"] == "POST"
            reply = target.send("put", url, report("closed", "success"))
            assert_refused(reply, 405, "method_not_allowed")
        assert status_of(action) == (SessionStatus.PENDING, 0)


# --- Status mapping -----------------------------------------------------------------------------


class TestMapping:
    def test_proceeding_is_downloading(self, target: Target, action: int) -> None:
        ok(target, action, report("proceeding", result={"progress": {"cnt": 1, "of": 2}}))
        assert status_of(action) == (SessionStatus.DOWNLOADING, 50)
        assert target.refresh().status == "updating"

    @pytest.mark.parametrize("execution", ["download", "resumed"])
    def test_download_and_resumed_are_downloading(
        self, target: Target, action: int, execution: str
    ) -> None:
        ok(target, action, report(execution))
        assert status_of(action)[0] == SessionStatus.DOWNLOADING

    def test_scheduled_changes_nothing(self, target: Target, action: int) -> None:
        ok(target, action, report("scheduled"))
        assert status_of(action) == (SessionStatus.PENDING, 0)

    def test_details_about_installing(self, target: Target, action: int) -> None:
        ok(target, action, report("proceeding", details=["Installing image 1.1.0"]))
        assert status_of(action)[0] == SessionStatus.INSTALLING
        # A later plain "proceeding" does not move it back to downloading.
        ok(target, action, report("proceeding", result={"progress": {"cnt": 9, "of": 10}}))
        assert status_of(action) == (SessionStatus.INSTALLING, 90)

    def test_downloaded_is_installing_at_100(self, target: Target, action: int) -> None:
        ok(target, action, report("proceeding", result={"progress": {"cnt": 1, "of": 10}}))
        ok(target, action, report("downloaded"))
        assert status_of(action) == (SessionStatus.INSTALLING, 100)

    @pytest.mark.parametrize("finished", ["success", "none"])
    def test_closed_success(self, target: Target, action: int, finished: str) -> None:
        ok(target, action, report("proceeding"))
        ok(target, action, report("closed", finished))
        session = session_of(action)
        assert session.status == SessionStatus.SUCCESS
        assert session.completed_at is not None
        device = target.refresh()
        assert device.current_version == "1.1.0"
        assert device.status == "success"

    def test_closed_failure(self, target: Target, action: int) -> None:
        details = ["Download failed", "sha256 mismatch"]
        ok(target, action, report("closed", "failure", details=details))
        session = session_of(action)
        assert session.status == SessionStatus.FAILED
        assert session.error_message == "Download failed\nsha256 mismatch"
        device = target.refresh()
        assert device.current_version == "1.0.0"
        assert device.status == "failed"

    def test_closed_failure_without_details(self, target: Target, action: int) -> None:
        ok(target, action, report("closed", "failure"))
        assert session_of(action).error_message

    @pytest.mark.parametrize("execution", ["canceled", "rejected"])
    def test_the_device_gives_up(self, target: Target, action: int, execution: str) -> None:
        ok(target, action, report(execution, details=["low battery"]))
        session = session_of(action)
        assert session.status == SessionStatus.CANCELLED
        assert "low battery" in (session.error_message or "")
        # Its own decision: nothing to confirm, no cancelAction, and nothing offered again.
        assert session.cancel_acknowledged_at is not None
        links = target.links()
        assert "cancelAction" not in links and "deploymentBase" not in links
        assert target.refresh().current_version == "1.0.0"

    def test_a_failed_rollback_action(self, v1: Firmware, v2: Firmware) -> None:
        """The previous firmware, offered as a new action, takes the same feedback path."""
        good, bad = provision("ddi-good"), provision("ddi-bad")
        rollout = started(v2, 100, min_devices=2)
        first = good.offered()
        ok(good, first, report("closed", "success"))
        ok(bad, bad.offered(), report("closed", "failure"))
        assert evaluate(rollout) == "rolled_back"
        rollback = good.offered()
        assert rollback != first
        ok(good, rollback, report("closed", "failure", details=["no space left"]))
        session = session_of(rollback)
        assert session.status == SessionStatus.FAILED
        assert session.error_message == "no space left"
        assert good.refresh().current_version == "1.1.0"
        assert "deploymentBase" not in good.links()


# --- Events -------------------------------------------------------------------------------------


class TestEvents:
    def kinds(self, action_id: int) -> list[str]:
        return list(
            Event.objects.filter(session_id=action_id).order_by("id").values_list("kind", flat=True)
        )

    def test_feedback_writes_session_events(self, target: Target, action: int) -> None:
        ok(target, action, report("proceeding"))
        ok(target, action, report("proceeding"))  # a repeat changes nothing: no event
        ok(target, action, report("downloaded"))
        ok(target, action, report("closed", "success"))
        ok(target, action, report("closed", "success"))
        assert self.kinds(action) == [
            EventKind.SESSION_PROGRESS,
            EventKind.SESSION_PROGRESS,
            EventKind.SESSION_FINISHED,
        ]
        events = Event.objects.filter(session_id=action)
        assert {e.device_id for e in events} == {target.device.id}
        assert {e.actor for e in events} == {f"device:{target.device.id}"}
        finished = events.get(kind=EventKind.SESSION_FINISHED)
        assert finished.data["status"] == SessionStatus.SUCCESS

    def test_cancel_events(self, target: Target, action: int) -> None:
        ok(target, action, report("rejected"))
        assert self.kinds(action) == [EventKind.SESSION_CANCELLED]

    def test_cancel_acknowledgement_event(
        self, target: Target, action: int, rollout: Rollout
    ) -> None:
        lifecycle.cancel_rollout(rollout)
        reply = target.feedback(action, report("closed", "success"), on="cancelAction")
        assert reply.status_code == 200
        acknowledged = Event.objects.get(
            session_id=action, kind=EventKind.SESSION_CANCEL_ACKNOWLEDGED
        )
        assert acknowledged.data["refused"] is False

    def test_attributes_event(self, target: Target) -> None:
        reply = target.send("put", "/configData", {"data": {"hwRevision": "2"}})
        assert reply.status_code == 200
        event = Event.objects.filter(
            device_id=target.device.id, kind=EventKind.DEVICE_ATTRIBUTES_UPDATED
        ).get()
        assert event.changes == {"metadata": [{}, {"hwRevision": "2"}]}
        # The same attributes again (clients re-send them) write nothing more.
        ddi_put = target.send("put", "/configData", {"data": {"hwRevision": "2"}})
        assert ddi_put.status_code == 200
        assert (
            Event.objects.filter(
                device_id=target.device.id, kind=EventKind.DEVICE_ATTRIBUTES_UPDATED
            ).count()
            == 1
        )
