"""The live streams on real servers: a device's status report sent to gunicorn reaches a WebSocket
client of daphne. With PostgreSQL + Redis the Redis channel layer wakes daphne at once (the timer
is set far off to prove it); in the embedded mode (SQLite, no Redis) daphne's timer finds it.

No WebSocket client library is installed, so ``WebSocket`` below is a minimal RFC 6455 client
(text frames, close, ping) on the standard library."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e import daphne, fresh_database, gunicorn, manage, migrate_with_admin, server_env

pytestmark = pytest.mark.e2e

ADMIN = ("stream-admin", "stream-password-123")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocket:
    """Just enough of a WebSocket client for these tests."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float = 10) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status + b" ", f"handshake refused: {status!r}"
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        assert b"sec-websocket-accept: " + accept.lower() in head.lower()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self, timeout: float) -> dict[str, Any] | int:
        """The next JSON message, or the close code if the server closed."""
        self.sock.settimeout(timeout)
        message = b""
        while True:
            first, second = self._take(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._take(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._take(8))[0]
            payload = self._take(length)
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            message += payload
            if first & 0x80 and opcode in (0x0, 0x1):
                parsed: dict[str, Any] = json.loads(message)
                return parsed

    def close(self) -> None:
        with suppress(OSError):
            self._send(0x8, struct.pack("!H", 1000))
        self.sock.close()


def prepare(env: dict[str, str]) -> str:
    """Migrate, an admin for the HTTP API, and a viewer API key for the stream; its token."""
    migrate_with_admin(env, ADMIN, "streams@example.com")
    created = json.loads(
        manage(env, "apikey", "create", "--name", "ws", "--role", "viewer", "--json")
    )
    return str(created["token"])


def device_with_an_open_session(base: str, env: dict[str, str]) -> tuple[str, dict[str, str], str]:
    """A device registered over HTTP and offered firmware 1.1.0: (id, its headers, session)."""
    token = json.loads(manage(env, "create_enrollment_token", "--name", "ws", "--json"))["token"]
    reply = requests.post(
        f"{base}/api/v1/devices/register",
        json={
            "enrollment_token": token,
            "hardware_id": f"ws-{uuid.uuid4().hex[:8]}",
            "device_type": "ws-board",
            "current_version": "1.0.0",
        },
        timeout=10,
    )
    reply.raise_for_status()
    device = reply.json()
    headers = {"Authorization": f"Bearer {device['access_token']}"}
    upload = requests.post(
        f"{base}/api/v1/firmware",
        auth=ADMIN,
        timeout=30,
        data={"version": "1.1.0", "device_type": "ws-board"},
        files={"file": ("image.bin", b"1.1.0" * 5000)},
    )
    upload.raise_for_status()
    requests.post(
        f"{base}/api/v1/firmware/{upload.json()['id']}/publish", auth=ADMIN, timeout=30
    ).raise_for_status()
    requests.patch(
        f"{base}/api/v1/devices/{device['device_id']}",
        auth=ADMIN,
        json={"target_version": "1.1.0"},
        timeout=10,
    ).raise_for_status()
    offer = requests.get(f"{base}/api/v1/updates/check", headers=headers, timeout=10).json()
    assert offer["update_available"], offer
    return str(device["device_id"]), headers, str(offer["session_id"])


def report_reaches_the_stream(base: str, ws_base: str, env: dict[str, str], key: str) -> float:
    """Seconds from a status report's answer to its event on the device's stream."""
    device_id, headers, session = device_with_an_open_session(base, env)
    stream = WebSocket(
        f"{ws_base}/api/v1/stream/devices/{device_id}", {"Authorization": f"ApiKey {key}"}
    )
    try:
        snapshot = stream.receive(timeout=10)
        assert isinstance(snapshot, dict) and snapshot["type"] == "snapshot", snapshot
        assert snapshot["session"]["id"] == session
        reply = requests.post(
            f"{base}/api/v1/status",
            headers=headers,
            json={"session_id": session, "status": "downloading", "progress": 10},
            timeout=10,
        )
        reply.raise_for_status()
        answered = time.monotonic()
        while True:
            message = stream.receive(timeout=10)
            assert isinstance(message, dict), f"stream closed with {message}"
            if message["type"] == "session.progress":
                return time.monotonic() - answered
    finally:
        stream.close()


def test_a_report_to_gunicorn_reaches_a_daphne_stream_at_once_through_redis(
    tmp_path: Path,
) -> None:
    with fresh_database() as database:
        env = server_env(
            tmp_path,
            DATABASE_URL=database,
            REDIS_URL="redis://127.0.0.1:6379/15",
            CACHE_KEY_PREFIX=f"ws-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"ws-{uuid.uuid4().hex[:8]}",
            STREAM_POLL_INTERVAL="30",  # only the channel layer can deliver within the test
        )
        key = prepare(env)
        with gunicorn(env) as base, daphne(env) as ws_base:
            assert report_reaches_the_stream(base, ws_base, env, key) < 1.0


def test_the_embedded_mode_delivers_through_the_timer(tmp_path: Path) -> None:
    env = server_env(tmp_path)  # SQLite, no Redis: the in-memory layer cannot cross processes
    key = prepare(env)
    with gunicorn(env) as base, daphne(env) as ws_base:
        assert report_reaches_the_stream(base, ws_base, env, key) < 2.0


def test_daphne_refuses_strangers_and_foreign_pages(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    prepare(env)
    with daphne(env) as ws_base:
        stream = WebSocket(f"{ws_base}/api/v1/stream/fleet", {})
        assert stream.receive(timeout=10) == 4401
        stream.close()
        stream = WebSocket(f"{ws_base}/nowhere", {})
        assert stream.receive(timeout=10) == 4404
        stream.close()
        with pytest.raises(AssertionError, match="handshake refused"):
            WebSocket(f"{ws_base}/api/v1/stream/fleet", {"Origin": "https://evil.example"})
        log = (tmp_path / "daphne.log").read_text()
        assert "Traceback" not in log, log
