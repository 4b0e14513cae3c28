"""A production-mode server (gunicorn on PostgreSQL and Redis of its own) and a small fleet that
the fault tests load while they break things (tests/faults/services.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e import gunicorn, manage, migrate_with_admin, server_env
from tests.faults import services

ADMIN = ("fault-admin", "fault-password-123")
IMAGE = b"fault-image" * 10_000


@dataclass
class Stack:
    base: str
    env: dict[str, str]
    postgres: services.PrivatePostgres
    redis: services.PrivateRedis


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    reason = services.missing()  # names the missing prerequisite (a binary, the postgres user)
    if reason:
        pytest.skip(reason)
    with services.private_postgres() as postgres, services.private_redis() as redis_server:
        env = server_env(
            tmp_path / "var",
            DATABASE_URL=postgres.url,
            REDIS_URL=redis_server.url,
            CACHE_KEY_PREFIX=f"fault-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"fault-{uuid.uuid4().hex[:8]}",
            DATABASE_POOL="true",  # as production runs
            ROLLOUT_EVALUATION_INTERVAL="0.5",
            ROLLOUT_CACHE_TIMEOUT="1",
        )
        migrate_with_admin(env, ADMIN, "fault@example.com")
        with gunicorn(env, workers=2) as base:
            yield Stack(base, env, postgres, redis_server)


@dataclass
class Device:
    id: str
    headers: dict[str, str]


def fleet(stack: Stack, count: int, *, assign: bool = True) -> list[Device]:
    """``count`` devices on 1.0.0 and firmware 2.0.0, published; with ``assign``, each device is
    assigned 2.0.0, so that each poll offers it."""
    token = json.loads(
        manage(
            stack.env,
            "create_enrollment_token",
            "--name",
            "fault",
            "--device-type",
            "fault-board",
            "--json",
        )
    )["token"]
    reply = requests.post(
        f"{stack.base}/api/v1/firmware",
        auth=ADMIN,
        data={"version": "2.0.0", "device_type": "fault-board"},
        files={"file": ("image.bin", IMAGE)},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    firmware = reply.json()["id"]
    publish = f"{stack.base}/api/v1/firmware/{firmware}/publish"
    reply = requests.post(publish, auth=ADMIN, timeout=30)
    assert reply.status_code == 200, reply.text
    devices = []
    for n in range(count):
        reply = requests.post(
            f"{stack.base}/api/v1/devices/register",
            json={
                "enrollment_token": token,
                "hardware_id": f"fault-{n}",
                "device_type": "fault-board",
                "current_version": "1.0.0",
            },
            timeout=10,
        )
        assert reply.status_code == 201, reply.text
        body = reply.json()
        device = Device(body["device_id"], {"Authorization": f"Bearer {body['access_token']}"})
        devices.append(device)
        if not assign:
            continue
        reply = requests.patch(
            f"{stack.base}/api/v1/devices/{device.id}",
            auth=ADMIN,
            json={"target_version": "2.0.0"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
    return devices


def firmware_id(stack: Stack, version: str) -> str:
    reply = requests.get(f"{stack.base}/api/v1/firmware", auth=ADMIN, timeout=10)
    return next(f["id"] for f in reply.json()["results"] if f["version"] == version)


def update(stack: Stack, device: Device) -> bool:
    """The device takes the update it is offered, if any, all the way to a successful
    validation; whether it was offered one."""
    offer = requests.get(f"{stack.base}/api/v1/updates/check", headers=device.headers, timeout=10)
    session = offer.json().get("session_id")
    if not session:
        return False
    for status in ("downloading", "installing", "validating"):
        reply = requests.post(
            f"{stack.base}/api/v1/status",
            headers=device.headers,
            json={"session_id": session, "status": status},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
    reply = requests.post(
        f"{stack.base}/api/v1/validation",
        headers=device.headers,
        json={"session_id": session, "success": True, "version": offer.json()["version"]},
        timeout=10,
    )
    assert reply.json()["session"]["status"] == "success", reply.text
    return True


@dataclass
class Answer:
    at: float
    method: str
    status: int | None  # None: no HTTP answer at all (connection refused, timeout)
    headers: dict[str, str]
    body: bytes


@dataclass
class Load:
    """Each device polls and reports its download's progress, over and over, and every answer is
    kept; ``acknowledged`` holds the reports the server said it applied."""

    base: str
    devices: list[Device]
    answers: list[Answer] = field(default_factory=list)
    acknowledged: dict[str, int] = field(default_factory=dict)  # session -> highest progress
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, device: Device) -> None:
        progress: dict[str, int] = {}
        with requests.Session() as http:
            while not self.stop.is_set():
                reply = self._call(http, "GET", "/api/v1/updates/check", device)
                session = _json(reply).get("session_id") if reply is not None else None
                if not session:
                    time.sleep(0.05)
                    continue
                step = progress.get(session, 0) + 1
                if step > 100:
                    time.sleep(0.05)
                    continue
                reply = self._call(
                    http,
                    "POST",
                    "/api/v1/status",
                    device,
                    json={"session_id": session, "status": "downloading", "progress": step},
                )
                if reply is not None and reply.status_code == 200 and _json(reply)["applied"]:
                    progress[session] = step
                    with self.lock:
                        self.acknowledged[session] = step
                time.sleep(0.05)  # a download takes a while: its reports span the fault

    def _call(
        self, http: requests.Session, method: str, path: str, device: Device, **kwargs: Any
    ) -> requests.Response | None:
        try:
            reply = http.request(
                method, self.base + path, headers=device.headers, timeout=15, **kwargs
            )
        except requests.RequestException:
            reply = None
        answer = Answer(
            at=time.monotonic(),
            method=method,
            status=reply.status_code if reply is not None else None,
            headers=dict(reply.headers) if reply is not None else {},
            body=reply.content if reply is not None else b"",
        )
        with self.lock:
            self.answers.append(answer)
        return reply

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.run, args=(device,), daemon=True)
            for device in self.devices
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def _json(reply: requests.Response) -> dict[str, Any]:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
