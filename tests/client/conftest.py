"""A live server for the client tests: gunicorn on a fresh PostgreSQL database, with firmware
1.0.0 and 1.1.0 uploaded and published through the HTTP API, a group whose target is 1.1.0 and an
enrollment token that enrolls devices into it. Started once per test session."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from ota_client.config import Config
from tests.e2e import gunicorn, manage, migrate_with_admin, server_env

DEVICE_TYPE = "client-board"
ADMIN = ("client-admin", "client-password-123")
GROUP = "client-fleet"
# 1.1.0 is over 1 MiB so that a cut after the first chunk of a slot write is a real mid-write.
IMAGES = {
    "1.0.0": random.Random(100).randbytes(200 * 1024),
    "1.1.0": random.Random(110).randbytes(1536 * 1024),
}


@dataclass
class LiveServer:
    url: str
    env: dict[str, str]
    enrollment_token: str
    keys: dict[str, str]
    operator: requests.Session
    #: Root v1 of the server's TUF repository: what devices ship with (trust.tuf_root).
    tuf_root: bytes
    firmware: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, path: str, **params: Any) -> Any:
        reply = self.operator.get(self.url + path, params=params, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def device(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/api/v1/devices/{device_id}")
        return result

    def sessions(self, device_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/sessions", device=device_id)["results"]
        return result


def _upload(base: str, version: str) -> dict[str, Any]:
    reply = requests.post(
        f"{base}/api/v1/firmware",
        auth=ADMIN,
        data={"version": version, "device_type": DEVICE_TYPE, "release_notes": "client tests"},
        files={"file": (f"image-{version}.bin", IMAGES[version])},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    reply = requests.post(
        f"{base}/api/v1/firmware/{reply.json()['id']}/publish", auth=ADMIN, timeout=30
    )
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def _logged_in(base: str) -> requests.Session:
    """An operator session through the admin login: the password is hashed once, not on every
    request as with basic auth (about 0.4 s each here)."""
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
    assert reply.status_code == 200 and "sessionid" in session.cookies, reply.text[:500]
    return session


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ota")
    name = f"ota_client_{uuid.uuid4().hex[:10]}"
    admin_url = base.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def ota_server(
    tmp_path_factory: pytest.TempPathFactory, postgres_database: str
) -> Iterator[LiveServer]:
    env = server_env(
        tmp_path_factory.mktemp("server"),
        DATABASE_URL=postgres_database,
        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"),
        CACHE_KEY_PREFIX=f"client-{uuid.uuid4().hex[:8]}",
        # The admin login page (used once, for an operator session) renders without
        # collectstatic's manifest.
        STATIC_MANIFEST="false",
        # The fleet simulation runs 200 devices from one address: no rate limits here
        # (test_rate_limit_client.py starts its own server with them).
        RATE_LIMIT_DEVICE="off",
        RATE_LIMIT_IP="off",
        # The first publish creates the TUF repository (root key under the server's var dir).
        TUF_AUTO_INIT="true",
    )
    migrate_with_admin(env, ADMIN, "client@example.com")
    # Enough workers for the 200-device fleet simulation (tests/client/test_simulate.py).
    with gunicorn(env, workers=10) as base:
        firmware = {version: _upload(base, version) for version in IMAGES}
        reply = requests.post(
            f"{base}/api/v1/groups",
            auth=ADMIN,
            json={"name": GROUP, "target_version": "1.1.0"},
            timeout=10,
        )
        assert reply.status_code == 201, reply.text
        token = json.loads(
            manage(
                env,
                "create_enrollment_token",
                "--name",
                "client tests",
                "--device-type",
                DEVICE_TYPE,
                "--group",
                GROUP,
                "--json",
            )
        )["token"]
        operator = _logged_in(base)
        keys = operator.get(f"{base}/api/v1/firmware/keys", timeout=10).json()
        tuf_root = operator.get(f"{base}/tuf/metadata/1.root.json", timeout=10)
        assert tuf_root.status_code == 200, tuf_root.text
        yield LiveServer(
            url=base,
            env=env,
            enrollment_token=token,
            keys={key["key_id"]: key["public_key"] for key in keys},
            operator=operator,
            firmware=firmware,
            tuf_root=tuf_root.content,
        )
        operator.close()


@dataclass
class Device:
    """Everything a test needs to set up one client: its folder, keys file and configuration."""

    root: Path
    config: Config

    @property
    def device_id(self) -> str:
        result: str = json.loads((self.config.state_dir / "credentials.json").read_text())[
            "device_id"
        ]
        return result

    def write_toml(self, **extra: str) -> Path:
        """The configuration as a TOML file, for running the real command line."""
        c = self.config
        lines = [
            f'server = "{c.server}"',
            f'device_type = "{c.device_type}"',
            f'hardware_id = "{c.hardware_id}"',
            f'state_dir = "{c.state_dir}"',
            f'current_version = "{c.current_version}"',
            f'enrollment_token = "{c.enrollment_token}"',
            "[polling]",
            "interval = 5",
            "[download]",
            f"progress_interval = {c.progress_interval}",
            "[boot]",
            f"trial_boots = {c.trial_boots}",
            "[trust]",
            f'keys_file = "{c.trusted_keys}"',
            *([f'tuf_root = "{c.tuf_root}"'] if c.tuf_root else []),
            *extra.values(),
        ]
        path = self.root / "client.toml"
        path.write_text("\n".join(lines) + "\n")
        return path


@pytest.fixture
def make_device(tmp_path: Path, ota_server: LiveServer) -> Any:
    counter = iter(range(1000))

    def make(server: str | None = None, **overrides: Any) -> Device:
        root = tmp_path / f"device-{next(counter)}"
        root.mkdir()
        keys = root / "trusted_keys.json"
        keys.write_text(json.dumps(ota_server.keys))
        tuf_root = root / "tuf-root.json"
        tuf_root.write_bytes(ota_server.tuf_root)
        values: dict[str, Any] = {
            "server": server or ota_server.url,
            "device_type": DEVICE_TYPE,
            "hardware_id": f"client-{uuid.uuid4().hex[:12]}",
            "state_dir": root / "state",
            "current_version": "1.0.0",
            "enrollment_token": ota_server.enrollment_token,
            "trusted_keys": keys,
            "tuf_root": tuf_root,
            "progress_interval": 0.2,
            "min_backoff": 0.1,
        }
        values.update(overrides)
        return Device(root=root, config=Config(**values).with_overrides())

    return make


def run_client_once(
    device: Device, *, crash_at: str | None = None, clock: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``ota-client once`` in its own process, as a device runs it: ``crash_at`` makes it die at
    that checkpoint (OTA_CLIENT_CRASH_AT, a power cut); ``clock`` moves its wall clock with
    Debian's faketime ("+3y", "-5y"), its monotonic clock staying true."""
    env = {
        k: v for k, v in os.environ.items() if k != "OTA_CLIENT_CRASH_AT" and "FAKETIME" not in k
    }
    prefix: list[str] = []
    if crash_at:
        env["OTA_CLIENT_CRASH_AT"] = crash_at
    if clock is not None:
        prefix = ["faketime", "-f", clock]
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "ota_client.cli",
            "once",
            "--config",
            str(device.root / "client.toml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
