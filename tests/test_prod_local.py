"""`make prod-local` end to end: the production process set (nginx with TLS and mTLS, gunicorn x2,
daphne, Celery worker and beat) on a fresh PostgreSQL database, checked through nginx as devices
and operators use it; then stopped, leaving no process behind.

The firmware bytes must come from nginx (X-Accel-Redirect), never from Python: asked directly,
a web node answers with an empty body and X-Accel-Redirect; through nginx the answer carries
Last-Modified, which only nginx's static file module sets (the app never does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e import ROOT, fresh_database, manage, server_env
from tests.test_streams_live import WebSocket

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("prod_local")]

FIRMWARE = bytes(range(256)) * 400 + b"prod-local"  # 102 410 bytes


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    state: dict[str, Any]
    env: dict[str, str]  # for manage.py against it
    folder: Path

    @property
    def https(self) -> str:
        return str(self.state["https"])

    @property
    def verify(self) -> str:
        return str(self.state["certificate"])


@contextmanager
def prod_local(tmp_path: Path) -> Iterator[Running]:
    """Start prod-local on a fresh database and free ports; yield once it is ready; make sure
    it is stopped afterwards (the test stops it itself and checks how)."""
    folder = tmp_path / "prod-local"
    with fresh_database() as database:
        env = server_env(
            tmp_path / "manage",
            PROD_LOCAL_DIR=str(folder),
            PROD_LOCAL_DATABASE_URL=database,
            PROD_LOCAL_REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
            CACHE_KEY_PREFIX=f"pl-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"pl-{uuid.uuid4().hex[:8]}",
        )
        for chosen in ("PROD_LOCAL_PORT", "PROD_LOCAL_HTTP_PORT"):  # free ports, whatever is set
            env.pop(chosen, None)
        log = open(tmp_path / "prod-local.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            # One sync worker per web node: still two nodes behind nginx, half the start-up.
            [sys.executable, "-m", "ota_site.deploy.prod_local", "--web-workers=1"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            state_file = folder / "state.json"
            deadline = time.monotonic() + 60
            while not state_file.exists():
                output = (tmp_path / "prod-local.log").read_text()
                assert process.poll() is None, f"prod-local exited:\n{output}"
                assert time.monotonic() < deadline, f"prod-local not ready in 60 s:\n{output}"
                time.sleep(0.2)
            state = json.loads(state_file.read_text())
            app_env = dict(
                shlex.split(line)[0].split("=", 1)
                for line in (folder / "app.env").read_text().splitlines()
                if line and not line.startswith("#")
            )
            yield Running(process, state, {**env, **app_env}, folder)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
            log.close()


def sessions_of(leaders: set[int]) -> set[int]:
    """Every process whose session is one of these (prod-local starts each in its own)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) in leaders:  # session id: field 6 of /proc/PID/stat
            found.add(int(entry.name))
    return found


def csr_for(folder: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    (folder / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def publish(run: Running, operator: dict[str, str]) -> dict[str, Any]:
    upload = requests.post(
        f"{run.https}/api/v1/firmware",
        headers=operator,
        data={"version": "2.0.0", "device_type": "pl-board"},
        files={"file": ("image.bin", FIRMWARE)},
        verify=run.verify,
        timeout=30,
    )
    assert upload.status_code == 201, upload.text
    published = requests.post(
        f"{run.https}/api/v1/firmware/{upload.json()['id']}/publish",
        headers=operator,
        verify=run.verify,
        timeout=30,
    )
    assert published.status_code == 200, published.text
    body: dict[str, Any] = published.json()
    return body


def enroll_with_a_certificate(run: Running, folder: Path) -> tuple[dict[str, Any], tuple[str, str]]:
    """CSR enrollment, then a token for the certificate alone: nginx verified it with the CA
    bundle prod-local exported, and forwarded it to an app that trusts 127.0.0.1."""
    token = json.loads(manage(run.env, "create_enrollment_token", "--name", "pl", "--json"))
    enrolled = requests.post(
        f"{run.https}/api/v1/devices/enroll",
        json={
            "enrollment_token": token["token"],
            "hardware_id": "pl-device-1",
            "device_type": "pl-board",
            "current_version": "1.0.0",
            "csr": csr_for(folder),
        },
        verify=run.verify,
        timeout=10,
    )
    assert enrolled.status_code == 201, enrolled.text
    (folder / "device.crt").write_text(enrolled.json()["certificate"])
    cert = (str(folder / "device.crt"), str(folder / "device.key"))
    by_certificate = requests.post(
        f"{run.https}/api/v1/devices/token", json={}, cert=cert, verify=run.verify, timeout=10
    )
    assert by_certificate.status_code == 200, by_certificate.text
    device = {**enrolled.json(), "access_token": by_certificate.json()["access_token"]}
    return device, cert


def trickle(http: str, head: bytes, slowly: bytes, seconds: float) -> socket.socket:
    """A client that sends ``head`` at once, then ``slowly`` a few bytes at a time over
    ``seconds``, in a thread; the socket is returned at once (close it to end the client)."""
    host, port = http.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head)

    def run() -> None:
        pieces = [slowly[i : i + 4] for i in range(0, len(slowly), 4)]
        pause = seconds / max(len(pieces), 1)
        with contextlib.suppress(OSError):
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(pause)

    threading.Thread(target=run, daemon=True).start()
    return sock


def hostile_input(
    run: Running, bearer: dict[str, str], operator: dict[str, str], tmp_path: Path
) -> None:
    """What nginx and the app answer to hostile requests: a JSON refusal, never a 5xx, and a
    server that keeps serving devices meanwhile (issue 9)."""
    https, verify, http = run.https, run.verify, str(run.state["http"])

    def get(path: str, **kwargs: Any) -> requests.Response:
        return requests.get(https + path, verify=verify, timeout=10, **kwargs)

    def refused(reply: requests.Response, status: int, code: str) -> None:
        assert reply.status_code == status, (reply.status_code, reply.text[:300])
        assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
        assert reply.json()["code"] == code, reply.text

    poll = "/api/v1/updates/check"
    # Huge headers and a huge request line: refused by nginx, in the app's JSON shape.
    refused(get(poll, headers={**bearer, "X-Padding": "a" * 20000}), 431, "headers_too_large")
    refused(get(f"/api/v1/devices?search={'a' * 20000}", headers=operator), 414, "uri_too_long")
    # Bodies: over nginx's limit for device routes, over the app's, not JSON, the wrong type.
    status = https + "/api/v1/status"
    big = {**bearer, "Content-Type": "application/json"}
    huge = b'{"x": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    refused(
        requests.post(status, data=huge, headers=big, verify=verify, timeout=30),
        413,
        "payload_too_large",
    )
    large = b'{"x": "' + b"a" * (1536 * 1024) + b'"}'
    refused(
        requests.post(status, data=large, headers=big, verify=verify, timeout=30),
        413,
        "payload_too_large",
    )
    reply = requests.post(status, data=b'{"session_id": ', headers=big, verify=verify, timeout=10)
    assert reply.status_code == 400 and reply.json()["code"], reply.text
    reply = requests.post(
        status,
        data=b"status=x",
        headers={**bearer, "Content-Type": "text/plain"},
        verify=verify,
        timeout=10,
    )
    assert reply.status_code == 415 and reply.json()["code"], reply.text
    # Path traversal: nginx's internal file location is not reachable, nor anything beside it.
    for path in (
        "/_x_accel/firmware/../../../etc/passwd",
        "/_x_accel/firmware/firmware/",
        "/api/v1/firmware/..%2f..%2f..%2fetc%2fpasswd/download",
        "/static/../../../../etc/passwd",
    ):
        reply = get(path, headers=bearer)
        assert reply.status_code in (400, 404), (path, reply.status_code)
        assert b"root:" not in reply.content, path
    # A file name that climbs out of the storage folder is only a name.
    uploaded = requests.post(
        https + "/api/v1/firmware",
        headers=operator,
        data={"version": "6.6.6", "device_type": "pl-board"},
        files={"file": ("../../../../../../tmp/ota-traversal.bin", b"evil" * 100)},
        verify=verify,
        timeout=30,
    )
    assert uploaded.status_code == 201, uploaded.text
    assert not Path("/tmp/ota-traversal.bin").exists()
    media = run.folder / "ota" / "media"
    stored = [p.relative_to(media) for p in media.rglob("*") if p.is_file()]
    assert all(p.parts[0] == "firmware" for p in stored), stored
    assert [p.name for p in stored if "traversal" in p.name] == ["ota-traversal.bin"], stored
    # Slow clients: more than there are gunicorn workers (two) trickle a device's headers or a
    # status report's body; nginx holds them, and polls are answered as fast as ever.
    body = b'{"session_id": "00000000-0000-4000-8000-000000000000", "status": "downloading"}'
    host = http.removeprefix("http://")
    slow_body = (
        f"POST /api/v1/status HTTP/1.1\r\nHost: {host}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Authorization: {bearer['Authorization']}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    slow = [trickle(http, slow_body, body, 8.0) for _ in range(4)]
    slow += [
        trickle(http, f"GET {poll} HTTP/1.1\r\nHost: {host}\r\n".encode(), b"X" * 200, 8.0)
        for _ in range(4)
    ]
    try:
        time.sleep(1.0)  # every slow client is connected and sending
        for _ in range(5):
            started = time.monotonic()
            reply = requests.get(http + poll, headers=bearer, timeout=5)
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - started < 2.0
    finally:
        for sock in slow:
            sock.close()


def test_prod_local_serves_the_production_path_through_nginx(tmp_path: Path) -> None:
    with prod_local(tmp_path) as run:
        https, verify = run.https, run.verify
        # --- Health, through TLS and through plain HTTP ---------------------------------------
        assert requests.get(f"{https}/health", verify=verify, timeout=5).status_code == 200
        assert requests.get(f"{run.state['http']}/health", timeout=5).status_code == 200
        ready = requests.get(f"{https}/health/ready", verify=verify, timeout=10)
        if ready.status_code != 404:  # /health/ready: database, Redis, storage, worker
            deadline = time.monotonic() + 20
            while ready.status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
                ready = requests.get(f"{https}/health/ready", verify=verify, timeout=10)
            assert ready.status_code == 200, ready.text

        # --- An operator publishes, a device enrolls with a certificate ------------------------
        key = json.loads(
            manage(run.env, "apikey", "create", "--name", "pl", "--role", "operator", "--json")
        )
        operator = {"Authorization": f"ApiKey {key['token']}"}
        firmware = publish(run, operator)
        etag = f'"{hashlib.sha256(FIRMWARE).hexdigest()}"'
        device, cert = enroll_with_a_certificate(run, tmp_path)
        bearer = {"Authorization": f"Bearer {device['access_token']}"}

        # --- Our download: Range answered by nginx from the file, as the app decided ----------
        download = f"/api/v1/firmware/{firmware['id']}/download"
        direct = requests.get(
            run.state["web"][0] + download, headers={**bearer, "Range": "bytes=100-199"}, timeout=10
        )
        assert direct.status_code == 200 and direct.content == b""
        assert direct.headers["X-Accel-Redirect"].startswith("/_x_accel/firmware/firmware/")
        assert "Last-Modified" not in direct.headers

        ranged = requests.get(
            https + download,
            headers={**bearer, "Range": "bytes=100-199"},
            verify=verify,
            timeout=10,
        )
        assert ranged.status_code == 206, ranged.text
        assert ranged.content == FIRMWARE[100:200]
        assert ranged.headers["Content-Range"] == f"bytes 100-199/{len(FIRMWARE)}"
        assert ranged.headers["ETag"] == etag
        assert "Last-Modified" in ranged.headers and "X-Accel-Redirect" not in ranged.headers
        # Resuming with If-Range: the same ETag gives the rest, another one the whole file.
        resumed = requests.get(
            https + download,
            headers={**bearer, "Range": "bytes=102400-", "If-Range": etag},
            verify=verify,
            timeout=10,
        )
        assert resumed.status_code == 206 and resumed.content == FIRMWARE[102400:]
        stale = requests.get(
            https + download,
            headers={**bearer, "Range": "bytes=102400-", "If-Range": '"stale"'},
            verify=verify,
            timeout=10,
        )
        assert stale.status_code == 200 and stale.content == FIRMWARE

        # --- hawkBit DDI with the same certificate: HEAD first, then a range -------------------
        requests.patch(
            f"{https}/api/v1/devices/{device['device_id']}",
            headers=operator,
            json={"target_version": "2.0.0"},
            verify=verify,
            timeout=10,
        ).raise_for_status()
        ddi = f"{https}/DEFAULT/controller/v1/pl-device-1"
        poll = requests.get(ddi, cert=cert, verify=verify, timeout=10)
        assert poll.status_code == 200, poll.text
        action_url = poll.json()["_links"]["deploymentBase"]["href"]
        # Absolute links name the port the device used (nginx passes the client's Host on).
        assert action_url.startswith(f"{https}/DEFAULT/controller/v1/pl-device-1/"), action_url
        action = requests.get(action_url, cert=cert, verify=verify, timeout=10).json()
        artifact = action["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download"]["href"]
        head = requests.head(artifact, cert=cert, verify=verify, timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(FIRMWARE))
        assert head.headers["ETag"] == etag and "Last-Modified" in head.headers
        part = requests.get(
            artifact, cert=cert, headers={"Range": "bytes=0-9"}, verify=verify, timeout=10
        )
        assert part.status_code == 206 and part.content == FIRMWARE[:10]

        # --- A WebSocket stream through nginx (plain HTTP) reaches daphne ----------------------
        ws_base = str(run.state["http"]).replace("http://", "ws://")
        stream = WebSocket(
            f"{ws_base}/api/v1/stream/devices/{device['device_id']}",
            {"Authorization": f"ApiKey {key['token']}"},
        )
        try:
            snapshot = stream.receive(timeout=10)
            assert isinstance(snapshot, dict) and snapshot["type"] == "snapshot", snapshot
        finally:
            stream.close()

        # --- Hostile input, over the wire -------------------------------------------------------
        hostile_input(run, bearer, operator, tmp_path)

        # --- Stopping leaves nothing behind ---------------------------------------------------
        leaders = set(run.state["pids"].values())
        started = sessions_of(leaders)
        assert len(started) > len(leaders)  # gunicorn workers, nginx workers, Celery's pool
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(timeout=30) == 0
        assert sessions_of(leaders) == set()
        assert not (run.folder / "state.json").exists()
        for name in ("web-1", "web-2", "ws", "worker", "beat", "nginx-access", "nginx-error"):
            assert (run.folder / "logs" / f"{name}.log").exists(), name
        assert "Traceback" not in (run.folder / "logs" / "ws.log").read_text()
