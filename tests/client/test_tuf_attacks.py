"""TUF attacks against the real client: a "compromised mirror" serves /tuf/metadata/ to the device
(passing everything through to the live server until a test tampers with a file), while offers
and downloads come from the live server. Each attack leaves the device on what it ran, with the
reason reported (a refused session) or logged (metadata it could not fetch: tried again later),
and the good path installs afterwards.

The device first installs 1.1.0 through the honest mirror (so it holds trusted metadata, as a
device in the field does); each attack then targets the next update, an operator's assignment.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from ota_client.agent import Agent, Outcome
from tests.client.conftest import DEVICE_TYPE, LiveServer
from tests.client.proxy import Fault, running_proxy
from tests.e2e import manage

pytestmark = pytest.mark.e2e

Override = bytes | int | Callable[[], Iterator[bytes]]


@dataclass
class Mirror:
    upstream: str
    session: requests.Session
    url: str = ""
    overrides: dict[str, Override] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def metadata_url(self) -> str:
        return f"{self.url}/tuf/metadata/"

    def upstream_bytes(self, name: str) -> bytes:
        with self.lock:
            reply = self.session.get(f"{self.upstream}/tuf/metadata/{name}", timeout=10)
        assert reply.status_code == 200, (name, reply.text)
        return reply.content


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.split("?")[0].removeprefix("/tuf/metadata/")
            override = mirror.overrides.get(name)
            if callable(override):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for chunk in override():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
                return
            if isinstance(override, int):
                status, body = override, b'{"code": "not_found", "detail": "Not found."}'
            elif isinstance(override, bytes):
                status, body = 200, override
            else:
                with mirror.lock:
                    reply = mirror.session.get(f"{mirror.upstream}{self.path}", timeout=10)
                status, body = reply.status_code, reply.content
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def mirror(ota_server: LiveServer) -> Iterator[Mirror]:
    running = Mirror(upstream=ota_server.url, session=ota_server.operator)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(running))
    server.daemon_threads = True
    running.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield running
    finally:
        server.shutdown()
        server.server_close()


def assign(ota_server: LiveServer, device_id: str, version: str) -> None:
    reply = ota_server.operator.patch(
        f"{ota_server.url}/api/v1/devices/{device_id}",
        json={"target_version": version},
        headers={"X-CSRFToken": ota_server.operator.cookies.get("csrftoken", "")},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


def latest_version(mirror: Mirror, role: str) -> int:
    if role == "timestamp":
        return int(json.loads(mirror.upstream_bytes("timestamp.json"))["signed"]["version"])
    version = 1
    while True:
        with mirror.lock:
            reply = mirror.session.get(
                f"{mirror.upstream}/tuf/metadata/{version + 1}.{role}.json", timeout=10
            )
        if reply.status_code == 404:
            return version
        version += 1


def refresh(ota_server: LiveServer, **env: str) -> None:
    manage({**ota_server.env, **env}, "tuf", "refresh", "--force")


@dataclass
class Field:
    """A device that installed 1.1.0 through the mirror and holds trusted metadata."""

    agent: Agent
    device_id: str
    state_dir: Path


@pytest.fixture
def fielded(ota_server: LiveServer, make_device: Any, mirror: Mirror) -> Callable[[], Field]:
    def make() -> Field:
        device = make_device(tuf_metadata_url=mirror.metadata_url, tuf_deadline=3.0)
        agent = Agent(device.config)
        agent.run_once()
        assert agent.running_version() == "1.1.0", agent.state.last_result
        return Field(agent, device.device_id, device.config.state_dir)

    return make


def refused(ota_server: LiveServer, unit: Field, version: str, reason: str) -> None:
    """The attacked update was refused and reported; the device still runs 1.1.0."""
    agent = unit.agent
    assert agent.running_version() == "1.1.0" and agent.phase == "idle"
    last = agent.state.last_result
    assert last is not None and last["version"] == version and last["outcome"] == "failed", last
    assert reason in last["reason"], last
    sessions = [s for s in ota_server.sessions(unit.device_id) if s["version"] == version]
    assert sessions and sessions[0]["status"] == "failed", sessions
    assert reason in sessions[0]["error_message"]


def installs_after_all(ota_server: LiveServer, unit: Field, mirror: Mirror, version: str) -> None:
    """With the mirror honest again and the update assigned again, it installs."""
    mirror.overrides.clear()
    assign(ota_server, unit.device_id, "1.1.0")
    assign(ota_server, unit.device_id, version)
    unit.agent.run_once()
    assert unit.agent.running_version() == version, unit.agent.state.last_result
    assert ota_server.device(unit.device_id)["current_version"] == version


# --- The attacks ----------------------------------------------------------------------------------


def test_tampered_image_is_never_installed(
    ota_server: LiveServer, make_device: Any, tmp_path: Path
) -> None:
    with running_proxy(ota_server.url) as proxy:
        device = make_device(server=proxy.url)
        proxy.download_faults.extend(Fault("corrupt", at=1000) for _ in range(3))
        agent = Agent(device.config)
        agent.run_once()
        assert agent.running_version() == "1.0.0"
        last = agent.state.last_result
        assert last is not None and last["outcome"] == "failed"
        assert "sha256" in last["reason"]
        [session] = ota_server.sessions(device.device_id)
        assert session["status"] == "failed"
        # Honest bytes install.
        good = make_device(server=proxy.url)
        Agent(good.config).run_once()
        assert ota_server.device(good.device_id)["current_version"] == "1.1.0"


def test_forged_metadata_is_refused(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    unit = fielded()
    refresh(ota_server)  # a timestamp newer than the device's, to forge from
    forged = json.loads(mirror.upstream_bytes("timestamp.json"))
    forged["signed"]["version"] += 5  # the signature no longer covers what is signed
    mirror.overrides["timestamp.json"] = json.dumps(forged).encode()
    assign(ota_server, unit.device_id, "1.0.0")
    unit.agent.run_once()
    refused(ota_server, unit, "1.0.0", "UnsignedMetadataError")
    installs_after_all(ota_server, unit, mirror, "1.0.0")


def test_replayed_old_timestamp_is_a_rollback_attack(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    old = mirror.upstream_bytes("timestamp.json")
    refresh(ota_server)
    unit = fielded()  # trusts the newer timestamp
    mirror.overrides["timestamp.json"] = old
    assign(ota_server, unit.device_id, "1.0.0")
    unit.agent.run_once()
    refused(ota_server, unit, "1.0.0", "BadVersionNumberError")
    installs_after_all(ota_server, unit, mirror, "1.0.0")


def test_expired_metadata_is_a_freeze_attack(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    unit = fielded()
    # The server signs a timestamp that lives two seconds, then a normal one; the mirror keeps
    # serving the short one after it expired, as a frozen mirror serves stale metadata.
    refresh(ota_server, TUF_TIMESTAMP_EXPIRY="2", TUF_REFRESH_INTERVAL="0.5")
    frozen = mirror.upstream_bytes("timestamp.json")
    refresh(ota_server)
    time.sleep(2.5)
    mirror.overrides["timestamp.json"] = frozen
    assign(ota_server, unit.device_id, "1.0.0")
    unit.agent.run_once()
    refused(ota_server, unit, "1.0.0", "ExpiredMetadataError")
    installs_after_all(ota_server, unit, mirror, "1.0.0")


def test_old_targets_under_a_new_snapshot_are_a_mix_and_match_attack(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    unit = fielded()
    # Something is published: targets V+1 under snapshot S+1. The mirror serves the old targets
    # V under the new name.
    old_version = latest_version(mirror, "targets")
    old_targets = mirror.upstream_bytes(f"{old_version}.targets.json")
    reply = requests.post(
        f"{ota_server.url}/api/v1/firmware",
        auth=("client-admin", "client-password-123"),
        data={"version": "0.0.1", "device_type": "tuf-mix-board"},
        files={"file": ("mix.bin", b"m" * 2048)},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    published = requests.post(
        f"{ota_server.url}/api/v1/firmware/{reply.json()['id']}/publish",
        auth=("client-admin", "client-password-123"),
        timeout=30,
    )
    assert published.status_code == 200, published.text
    assert latest_version(mirror, "targets") == old_version + 1
    mirror.overrides[f"{old_version + 1}.targets.json"] = old_targets
    assign(ota_server, unit.device_id, "1.0.0")
    unit.agent.run_once()
    refused(ota_server, unit, "1.0.0", "BadVersionNumberError")
    installs_after_all(ota_server, unit, mirror, "1.0.0")


def test_endless_and_slow_metadata_are_cut_off(
    ota_server: LiveServer,
    fielded: Callable[[], Field],
    mirror: Mirror,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = fielded()
    refresh(ota_server)
    assign(ota_server, unit.device_id, "1.0.0")

    def endless() -> Iterator[bytes]:
        while True:
            yield b" " * 65536

    mirror.overrides["timestamp.json"] = endless
    caplog.set_level(logging.WARNING, logger="ota_client")
    result = unit.agent.run_once()
    assert result.outcome is Outcome.OFFLINE, result
    assert "DownloadLengthMismatchError" in result.detail
    assert "TUF metadata unavailable" in caplog.text

    def drip() -> Iterator[bytes]:
        for _ in range(60):
            yield b" "
            time.sleep(0.25)

    mirror.overrides["timestamp.json"] = drip
    started = time.monotonic()
    result = unit.agent.run_once()
    assert result.outcome is Outcome.OFFLINE, result
    assert "SlowRetrievalError" in result.detail
    assert time.monotonic() - started < 8  # the 3 s deadline, not the 15 s drip
    assert unit.agent.running_version() == "1.1.0" and unit.agent.phase == "idle"
    # Nothing was refused for good: with an honest mirror the same assignment installs.
    mirror.overrides.clear()
    unit.agent.run_once()
    assert unit.agent.running_version() == "1.0.0"


def test_a_lower_release_counter_is_refused(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    unit = fielded()
    reply = requests.post(
        f"{ota_server.url}/api/v1/firmware",
        auth=("client-admin", "client-password-123"),
        data={"version": "4.2.0", "device_type": DEVICE_TYPE, "release_counter": "5"},
        files={"file": ("counter.bin", b"c" * 4096)},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    published = requests.post(
        f"{ota_server.url}/api/v1/firmware/{reply.json()['id']}/publish",
        auth=("client-admin", "client-password-123"),
        timeout=30,
    )
    assert published.status_code == 200, published.text
    assign(ota_server, unit.device_id, "4.2.0")
    unit.agent.run_once()
    assert unit.agent.running_version() == "4.2.0"
    assert unit.agent.state.release_counter == 5
    saved = json.loads((unit.state_dir / "state.json").read_text())
    assert saved["release_counter"] == 5
    # 1.1.0 is validly signed and still listed by TUF, and the operator marks it a rollback:
    # only the counter stops it.
    assign(ota_server, unit.device_id, "1.1.0")
    unit.agent.run_once()
    assert unit.agent.running_version() == "4.2.0"
    last = unit.agent.state.last_result
    assert last is not None and last["outcome"] == "failed"
    assert "release counter 0 of 1.1.0 is below this device's 5" in last["reason"]
    sessions = [s for s in ota_server.sessions(unit.device_id) if s["version"] == "1.1.0"]
    assert sessions[0]["status"] == "failed" and "release counter" in sessions[0]["error_message"]


def root_key_file(ota_server: LiveServer) -> Path:
    [path] = (Path(ota_server.env["OTA_VAR_DIR"]) / "keys" / "tuf-root").glob("*.pem")
    return path


def test_a_valid_root_rotation_is_accepted(
    ota_server: LiveServer, make_device: Any, mirror: Mirror, tmp_path: Path
) -> None:
    before = latest_version(mirror, "root")
    assert before == 1, "only this test rotates the live server's root"
    new = json.loads(
        manage(ota_server.env, "tuf", "keygen", "--out", str(tmp_path / "new-root"), "--json")
    )["key_files"]
    # Signed by the old root key (threshold 1) and by the new one.
    manage(
        ota_server.env,
        "tuf",
        "rotate-root",
        "--old-key",
        str(root_key_file(ota_server)),
        "--new-key",
        *new,
    )
    assert latest_version(mirror, "root") == 2
    # A device that shipped with root v1 learns v2 and installs.
    device = make_device(tuf_metadata_url=mirror.metadata_url)
    agent = Agent(device.config)
    agent.run_once()
    assert agent.running_version() == "1.1.0", agent.state.last_result
    assert (device.config.state_dir / "tuf" / "root_history" / "2.root.json").exists()


def test_a_forged_root_rotation_is_refused(
    ota_server: LiveServer, fielded: Callable[[], Field], mirror: Mirror
) -> None:
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    unit = fielded()
    current = latest_version(mirror, "root")
    # An attacker's root N+1: its own key for every role, signed only by that key.
    forged = Metadata[Root].from_bytes(mirror.upstream_bytes(f"{current}.root.json"))
    attacker = CryptoSigner.generate_ed25519()
    root = forged.signed
    root.version = current + 1
    for role in ("root", "targets", "snapshot", "timestamp"):
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(attacker.public_key, role)
        root.roles[role].threshold = 1
    forged.signatures.clear()
    forged.sign(attacker)
    mirror.overrides[f"{current + 1}.root.json"] = forged.to_bytes()
    assign(ota_server, unit.device_id, "1.0.0")
    unit.agent.run_once()
    refused(ota_server, unit, "1.0.0", "UnsignedMetadataError")
    assert not (unit.state_dir / "tuf" / "root_history" / f"{current + 1}.root.json").exists()
    installs_after_all(ota_server, unit, mirror, "1.0.0")
