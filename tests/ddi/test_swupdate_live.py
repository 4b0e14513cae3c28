"""The real hawkBit DDI client, Debian's swupdate 2022.12 (suricatta), against our server.

gunicorn on a fresh PostgreSQL database with a real Celery worker and beat (which evaluates
rollouts), and swupdate installing signed .swu images into temporary files, talking to the
server through a small proxy that records what it sends and can slow or cut downloads. Each test
uses its own device type, so their rollouts never meet.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.client.proxy import Fault, Proxy, running_proxy
from tests.ddi.swupdate_support import (
    LOG_AWAITING_REBOOT,
    LOG_CANCEL_ACKED,
    Signer,
    SwupdateRun,
    build_swu,
    make_signer,
    short_tmpdir,
    start_swupdate,
    swupdate_available,
)
from tests.e2e import (
    celery_worker,
    fresh_database,
    gunicorn,
    migrate_with_admin,
    server_env,
)

pytestmark = [
    pytest.mark.skipif(not swupdate_available(), reason="needs Debian's swupdate (make test)"),
    pytest.mark.e2e,
    # One server for the module: its tests go to one xdist worker (make test: --dist loadgroup).
    pytest.mark.xdist_group("swupdate"),
]

ADMIN = ("ddi-admin", "ddi-password-123")
TENANT = "DEFAULT"


@dataclass
class Server:
    url: str
    api: requests.Session
    proxy: Proxy
    work: Path

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        reply = self.api.request(method, self.url + path, timeout=30, **kwargs)
        assert reply.status_code == expect, f"{method} {path}: {reply.status_code} {reply.text}"
        return reply.json() if reply.content else None

    def upload(self, swu: Path, device_type: str, version: str) -> str:
        """Upload and publish a .swu (its version read from sw-description); its id."""
        with swu.open("rb") as handle:
            firmware = self.call(
                "POST",
                "/api/v1/firmware",
                expect=201,
                data={"device_type": device_type},
                files={"file": (swu.name, handle)},
            )
        assert firmware["version"] == version
        self.call("POST", f"/api/v1/firmware/{firmware['id']}/publish")
        return str(firmware["id"])

    def provision(self, controller_id: str, device_type: str) -> tuple[str, str]:
        """A DDI device running 1.0.0; its id and target token."""
        reply = self.call(
            "POST",
            "/api/v1/devices/ddi",
            expect=201,
            json={
                "controller_id": controller_id,
                "device_type": device_type,
                "current_version": "1.0.0",
            },
        )
        return str(reply["device"]["id"]), str(reply["target_token"])

    def sessions(self, device_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(
            "GET", "/api/v1/sessions", params={"device": device_id}
        )["results"]
        return result

    def rollout(self, firmware_id: str, **fields: Any) -> str:
        body = {
            "name": f"swupdate {uuid.uuid4().hex[:6]}",
            "firmware": firmware_id,
            "stages": [{"name": "all", "percentage": 100}],
            **fields,
        }
        rollout_id = str(self.call("POST", "/api/v1/rollouts", expect=201, json=body)["id"])
        self.call("POST", f"/api/v1/rollouts/{rollout_id}/start")
        return rollout_id


def _logged_in(base: str) -> requests.Session:
    session = requests.Session()
    login = f"{base}/admin/login/"
    session.get(login, timeout=10)
    reply = session.post(
        login,
        data={
            "username": ADMIN[0],
            "password": ADMIN[1],
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
            "next": "/admin/",
        },
        headers={"Referer": login},
        timeout=10,
    )
    assert reply.status_code == 200 and "sessionid" in session.cookies, reply.text[:300]
    session.headers["X-CSRFToken"] = session.cookies["csrftoken"]
    session.headers["Referer"] = base + "/"
    return session


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    var = tmp_path_factory.mktemp("ddi-server")
    with fresh_database() as database:
        env = server_env(
            var,
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"),
            CACHE_KEY_PREFIX=f"ddi-{uuid.uuid4().hex[:8]}",
            STATIC_MANIFEST="false",
            # swupdate sleeps what the poll says between cycles: keep the tests quick.
            DEVICE_POLL_INTERVAL="1",
            ROLLOUT_EVALUATION_INTERVAL="1",
            TUF_AUTO_INIT="true",
        )
        migrate_with_admin(env, ADMIN, "ddi@example.com")
        with (
            gunicorn(env, workers=3) as base,
            celery_worker(env),
            running_proxy(base, is_download=lambda path: "/artifacts/" in path) as proxy,
        ):
            api = _logged_in(base)
            yield Server(url=base, api=api, proxy=proxy, work=var)
            api.close()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return make_signer(tmp_path_factory.mktemp("signer"))


@dataclass
class Board:
    """One device running swupdate: its ids, token, folder and the file it installs into."""

    controller_id: str
    device_id: str
    token: str
    root: Path
    target: Path
    runs: list[SwupdateRun]

    def start(self, server: Server, signer: Signer, confirm: int | None = None) -> SwupdateRun:
        tmpdir = self.root / f"run{len(self.runs)}"
        run = start_swupdate(
            signer_cert=signer.cert_path,
            tenant=TENANT,
            controller_id=self.controller_id,
            base_url=server.proxy.url,
            target_token=self.token,
            tmpdir=tmpdir,
            log_path=self.root / f"run{len(self.runs)}.log",
            confirm=confirm,
            poll_delay=1,
            retry_wait=1,
        )
        self.runs.append(run)
        return run


@pytest.fixture
def boards(server: Server) -> Iterator[Callable[[str], Board]]:
    made: list[Board] = []

    def make(device_type: str) -> Board:
        controller_id = f"swu-{uuid.uuid4().hex[:8]}"
        device_id, token = server.provision(controller_id, device_type)
        root = short_tmpdir()
        board = Board(controller_id, device_id, token, root, root / "installed.bin", [])
        made.append(board)
        return board

    yield make
    for board in made:
        for run in board.runs:
            run.stop()
        shutil.rmtree(board.root, ignore_errors=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def finished(run: SwupdateRun, pattern: str, timeout: float = 60.0) -> None:
    assert run.wait_for_log(pattern, timeout), run.log_text()[-4000:]
    run.stop()


def publish(
    server: Server, signer: Signer, device_type: str, version: str, payload: bytes, target: Path
) -> str:
    """A .swu signed by `signer` that writes `payload` into `target`, uploaded and published."""
    swu = build_swu(
        target.parent / "images" / version,
        signer=signer,
        version=version,
        payload=payload,
        target_path=target,
        filename=f"{device_type}-{version}.swu",
    )
    return server.upload(swu, device_type, version)


def poll(server: Server, board: Board) -> dict[str, Any]:
    reply = requests.get(
        f"{server.url}/{TENANT}/controller/v1/{board.controller_id}",
        headers={"Authorization": f"TargetToken {board.token}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def session_of(server: Server, board: Board, status: str | None = None) -> dict[str, Any] | None:
    sessions = server.sessions(board.device_id)
    if not sessions:
        return None
    if status is not None and sessions[0]["status"] != status:
        return None
    return sessions[0]


# --- The tests ----------------------------------------------------------------------------------


def test_install_then_confirm_after_the_reboot(
    server: Server, signer: Signer, boards: Callable[[str], Board]
) -> None:
    board = boards("swu-ok")
    payload = os.urandom(300 * 1024)
    publish(server, signer, "swu-ok", "1.1.0", payload, board.target)
    server.call("PATCH", f"/api/v1/devices/{board.device_id}", json={"target_version": "1.1.0"})

    first = board.start(server, signer)
    finished(first, LOG_AWAITING_REBOOT, timeout=90)
    assert board.target.read_bytes() == payload
    session = session_of(server, board)
    assert session is not None and session["status"] == "installing", session
    artifact = [s for s in server.proxy.seen if "/artifacts/" in s.path]
    assert artifact[0].method == "HEAD" and artifact[1].method == "GET", artifact
    assert not any(s.path.endswith(".MD5SUM") and s.status != 200 for s in artifact)

    # "After the reboot": swupdate reports the result of the install it did before.
    second = board.start(server, signer, confirm=2)
    done = wait_for("the session's success", lambda: session_of(server, board, "success"))
    assert done["version"] == "1.1.0" and done["error_message"] is None
    time.sleep(3)  # a few more polls by the client: nothing is offered or installed again
    second.stop()
    assert "_links" not in poll(server, board) or "deploymentBase" not in poll(server, board).get(
        "_links", {}
    )
    assert len(server.sessions(board.device_id)) == 1
    device = server.call("GET", f"/api/v1/devices/{board.device_id}")
    assert device["current_version"] == "1.1.0"


def test_failed_installs_count_against_the_rollout(
    server: Server, signer: Signer, boards: Callable[[str], Board]
) -> None:
    """One board refuses an image signed with a key it does not trust; the other installs it
    but fails after the reboot (-c 3). Both are failures, and the rollout rolls back."""
    foreign = make_signer(short_tmpdir(), "foreign")
    refuses, fails = boards("swu-fail"), boards("swu-fail")
    target = refuses.root / "installed.bin"
    firmware = publish(server, foreign, "swu-fail", "1.1.0", os.urandom(64 * 1024), target)
    rollout = server.rollout(firmware, min_devices=2, rollback_threshold=0.4)

    refusing = refuses.start(server, signer)  # trusts `signer`, not `foreign`
    failed = wait_for("a failure", lambda: session_of(server, refuses, "failed"), timeout=90)
    assert "Authentication of all signatures failed" in refusing.log_text()
    refusing.stop()
    # The failure's details, as swupdate sends them with closed/failure, are the error message.
    assert "No suitable .swu image found" in failed["error_message"], failed

    installing = fails.start(server, foreign)
    finished(installing, LOG_AWAITING_REBOOT, timeout=90)
    fails.start(server, foreign, confirm=3)
    wait_for("the failed boot", lambda: session_of(server, fails, "failed"))

    state = wait_for(
        "the rollback",
        lambda: (
            (r := server.call("GET", f"/api/v1/rollouts/{rollout}"))["status"] == "rolled_back"
            and r
        ),
    )
    assert "rollback threshold" in state["status_reason"].lower(), state
    metrics = server.call("GET", f"/api/v1/rollouts/{rollout}/metrics")
    stage = metrics["stages"][0]
    assert stage["sessions"]["failed"] == 2 and stage["failure_rate"] == 1.0, metrics


def test_a_cancel_during_the_download_is_acknowledged(
    server: Server, signer: Signer, boards: Callable[[str], Board]
) -> None:
    board = boards("swu-cancel")
    payload = os.urandom(2 * 1024 * 1024)
    firmware = publish(server, signer, "swu-cancel", "1.1.0", payload, board.target)
    rollout = server.rollout(firmware)
    # About 20 s for the whole image: time to cancel while it downloads.
    server.proxy.download_faults.append(Fault("slow", at=100 * 1024))
    run = board.start(server, signer)
    wait_for(
        "the download",
        lambda: any(
            s.method == "GET" and "/artifacts/" in s.path and board.controller_id in s.path
            for s in server.proxy.seen
        ),
    )
    server.call("POST", f"/api/v1/rollouts/{rollout}/cancel", json={"reason": "stop it"})
    finished(run, LOG_CANCEL_ACKED, timeout=60)
    session = wait_for(
        "the acknowledgement",
        lambda: (s := session_of(server, board, "cancelled")) and s["cancel_acknowledged_at"] and s,
    )
    assert session["version"] == "1.1.0"
    assert not board.target.exists() or board.target.read_bytes() != payload
    assert "cancelAction" not in poll(server, board).get("_links", {})


def test_a_cut_download_resumes_with_range(
    server: Server, signer: Signer, boards: Callable[[str], Board]
) -> None:
    board = boards("swu-resume")
    payload = os.urandom(1536 * 1024)
    publish(server, signer, "swu-resume", "1.1.0", payload, board.target)
    server.proxy.download_faults.append(Fault("cut", at=400 * 1024))
    server.call("PATCH", f"/api/v1/devices/{board.device_id}", json={"target_version": "1.1.0"})
    run = board.start(server, signer)
    finished(run, LOG_AWAITING_REBOOT, timeout=90)
    assert board.target.read_bytes() == payload
    resumed = [
        s for s in server.proxy.downloads() if board.controller_id in s.path and s.range is not None
    ]
    assert resumed and resumed[0].status == 206, server.proxy.downloads()
    assert resumed[0].range is not None and resumed[0].range.startswith("bytes=")
    session = session_of(server, board)
    assert session is not None and session["status"] == "installing"
