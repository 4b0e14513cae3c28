"""The client honours 429 + Retry-After: it waits a short one out and sends again, it pauses
best-effort reports instead of giving up on the server, and an update still completes against a
live server whose device limit it keeps hitting."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ota_client.agent import Agent, Outcome
from ota_client.api import RateLimited, ServerClient
from ota_client.config import Config
from ota_client.link import ServerLink
from ota_client.outbox import Outbox
from ota_client.outcome import DeviceLog
from tests.client.conftest import LiveServer
from tests.client.test_api import Reply, Scripted, registered
from tests.e2e import gunicorn

LIMITED = {"code": "rate_limited", "detail": "Too many requests; retry in 2 s.", "retry_after": 2}


class Clock:
    """Time that passes only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def scripted_client(
    tmp_path: Path, answers: dict[str, list[Reply]], clock: Clock
) -> tuple[ServerClient, Scripted]:
    """A client whose server answers each path from its list, in order (the last one repeats)."""

    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return registered()
        replies = answers[str(request.path_url)]
        return replies.pop(0) if len(replies) > 1 else replies[0]

    config = Config(
        server="http://ota.test",
        device_type="board",
        hardware_id="hw-1",
        state_dir=tmp_path / "state",
        current_version="1.0.0",
        enrollment_token="ota_enroll_x_y",
    ).with_overrides()
    transport = Scripted(answer)
    session = requests.Session()
    session.mount("http://", transport)
    server = ServerClient(config, session=session, clock=clock, sleep=clock.sleep)
    return server, transport


def limited(seconds: str) -> Reply:
    return 429, {"Retry-After": seconds}, LIMITED


UP_TO_DATE: Reply = (200, {}, {"update_available": False, "reason": "up_to_date"})


def test_a_short_retry_after_is_waited_out(tmp_path: Path) -> None:
    clock = Clock()
    server, transport = scripted_client(
        tmp_path, {"/api/v1/updates/check": [limited("2"), UP_TO_DATE]}, clock
    )
    assert server.check()["reason"] == "up_to_date"
    [slept] = clock.slept
    assert 2.0 <= slept <= 2.0 + 0.5 + 0.2  # Retry-After plus a little jitter
    assert transport.paths().count("GET /api/v1/updates/check") == 2


def test_a_long_retry_after_is_left_to_the_agent(tmp_path: Path) -> None:
    clock = Clock()
    server, transport = scripted_client(
        tmp_path, {"/api/v1/updates/check": [limited("600")]}, clock
    )
    with pytest.raises(RateLimited) as caught:
        server.check()
    assert caught.value.retry_after == 600.0 and clock.slept == []
    assert transport.paths().count("GET /api/v1/updates/check") == 1


def test_a_second_429_is_not_waited_out_again(tmp_path: Path) -> None:
    clock = Clock()
    server, transport = scripted_client(tmp_path, {"/api/v1/updates/check": [limited("1")]}, clock)
    with pytest.raises(RateLimited) as caught:
        server.check()
    assert caught.value.retry_after == 1.0 and len(clock.slept) == 1
    assert transport.paths().count("GET /api/v1/updates/check") == 2


def test_a_429_without_retry_after_is_not_waited(tmp_path: Path) -> None:
    clock = Clock()
    server, _ = scripted_client(
        tmp_path, {"/api/v1/updates/check": [(429, {}, b"<html>slow down</html>")]}, clock
    )
    with pytest.raises(RateLimited) as caught:
        server.check()
    assert caught.value.retry_after is None and clock.slept == []


def test_reports_during_a_download_pause_instead_of_waiting(tmp_path: Path) -> None:
    """While the image streams in, a 429 on a progress report must not sleep (the stream would
    stall) nor mark the server unreachable: the reports wait and go once Retry-After is over."""
    clock = Clock()
    server, transport = scripted_client(
        tmp_path, {"/api/v1/status": [limited("2"), (200, {}, {"ok": True})]}, clock
    )
    outbox = Outbox(tmp_path / "outbox.json")
    link = ServerLink(server.config, server, outbox, DeviceLog(logging.getLogger("t"), {}))
    server.ensure_enrolled()
    outbox.add_status("s-1", "downloading", progress=10)

    link.flush_best_effort("s-1", downloading=True)
    assert clock.slept == [] and not link.unreachable and len(outbox) == 1
    sent = len(transport.seen)
    link.flush_best_effort("s-1", downloading=True)  # still within Retry-After: nothing sent
    assert len(transport.seen) == sent

    clock.now += 2.0
    link.flush_best_effort("s-1", downloading=True)
    assert len(outbox) == 0 and clock.slept == []
    _refused, second = [r for r in transport.seen if r.path_url == "/api/v1/status"]
    assert json.loads(second.body or b"{}")["progress"] == 10


# --- Against the live server ------------------------------------------------------------------


@pytest.fixture
def limited_server(ota_server: LiveServer, tmp_path: Path) -> Iterator[str]:
    """A second gunicorn on the client tests' database with a device limit of 3 requests a
    second: an update (a dozen requests in a few seconds) cannot finish without 429s."""
    shared = Path(ota_server.env["OTA_VAR_DIR"])
    var_dir = tmp_path / "limited-server"
    var_dir.mkdir()
    # The same secret key (device tokens), keys and firmware files as the first server.
    for name in ("secret_key", "keys", "media"):
        (var_dir / name).symlink_to(shared / name)
    env = {
        **ota_server.env,
        "OTA_VAR_DIR": str(var_dir),
        "RATE_LIMIT_DEVICE": "3/sec",
        "RATE_LIMIT_IP": "off",
    }
    with gunicorn(env, workers=2) as base:
        yield base


@pytest.mark.e2e
def test_a_rate_limited_device_still_completes_its_update(
    ota_server: LiveServer, limited_server: str, make_device: Any
) -> None:
    device = make_device(server=limited_server)
    statuses: list[int] = []
    session = requests.Session()
    session.hooks["response"].append(lambda response, **_: statuses.append(response.status_code))
    agent = Agent(device.config, server=ServerClient(device.config, session=session))
    agent.server.running_version = agent.running_version

    results = []
    for _ in range(10):
        result = agent.run_once()
        results.append(result)
        if result.outcome is Outcome.IDLE and agent.state.last_result:
            break
        assert result.outcome is Outcome.OFFLINE, result  # only ever a 429 left to the agent
        assert result.retry_after is not None and result.retry_after <= 1
        agent.sleep(result.retry_after)

    assert 429 in statuses, "the limit never bit: the test proves nothing"
    assert agent.state.last_result is not None
    assert agent.state.last_result["outcome"] == "success", agent.state.last_result
    assert agent.running_version() == "1.1.0"
    [update] = ota_server.sessions(device.device_id)
    assert update["status"] == "success", update
    assert ota_server.device(device.device_id)["current_version"] == "1.1.0"
