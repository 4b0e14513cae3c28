"""The device flow against real gunicorn processes, in the embedded mode (SQLite, local files, no
Redis) and in the production mode (PostgreSQL and Redis)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e import fresh_database, gunicorn, manage, migrate_with_admin, server_env

pytestmark = pytest.mark.e2e

IMAGE = hashlib.sha256(b"e2e").digest() * 40_000  # 1.25 MiB


def device_flow(base: str, env: dict[str, str]) -> None:
    admin = ("e2e-admin", "e2e-password-123")
    token = json.loads(
        manage(
            env, "create_enrollment_token", "--name", "e2e", "--device-type", "e2e-board", "--json"
        )
    )["token"]

    # An operator uploads and publishes firmware (HTTP basic auth for scripts).
    reply = requests.post(
        f"{base}/api/v1/firmware",
        auth=admin,
        data={"version": "2.0.0", "device_type": "e2e-board", "release_notes": "e2e"},
        files={"file": ("image.bin", IMAGE)},
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    firmware = reply.json()
    assert firmware["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    reply = requests.post(
        f"{base}/api/v1/firmware/{firmware['id']}/publish", auth=admin, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["published"], reply.text

    # A device enrolls, gets a token and is assigned the firmware.
    reply = requests.post(
        f"{base}/api/v1/devices/register",
        json={
            "enrollment_token": token,
            "hardware_id": "e2e-1",
            "device_type": "e2e-board",
            "current_version": "1.0.0",
        },
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    device_id, secret = reply.json()["device_id"], reply.json()["device_secret"]
    reply = requests.post(
        f"{base}/api/v1/devices/token", json={"device_id": device_id, "secret": secret}, timeout=10
    )
    headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}
    reply = requests.patch(
        f"{base}/api/v1/devices/{device_id}",
        auth=admin,
        json={"target_version": "2.0.0"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text

    offer = requests.get(f"{base}/api/v1/updates/check", headers=headers, timeout=10).json()
    assert offer["update_available"] and offer["url"].startswith(base)

    # HEAD has no body (a body would corrupt the keep-alive connection); then a download that is
    # cut and resumed with Range, on one keep-alive session.
    with requests.Session() as http:
        head = http.head(offer["url"], headers=headers, timeout=10)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(IMAGE))
        first = http.get(offer["url"], headers={**headers, "Range": "bytes=0-99999"}, timeout=10)
        assert first.status_code == 206 and len(first.content) == 100_000
        rest = http.get(
            offer["url"],
            headers={**headers, "Range": "bytes=100000-", "If-Range": head.headers["ETag"]},
            timeout=10,
        )
        assert rest.status_code == 206
        assert hashlib.sha256(first.content + rest.content).hexdigest() == offer["sha256"]
        full = http.get(offer["url"], headers=headers, timeout=10)
        assert full.status_code == 200 and full.content == IMAGE

    session = offer["session_id"]
    for status in ("downloading", "installing", "validating"):
        reply = requests.post(
            f"{base}/api/v1/status",
            headers=headers,
            json={"session_id": session, "status": status},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
    reply = requests.post(
        f"{base}/api/v1/validation",
        headers=headers,
        json={"session_id": session, "success": True, "version": "2.0.0"},
        timeout=10,
    )
    assert reply.json()["session"]["status"] == "success"
    offer = requests.get(f"{base}/api/v1/updates/check", headers=headers, timeout=10).json()
    assert offer == {**offer, "update_available": False, "reason": "up_to_date"}

    # A failed attempt is remembered and not offered again (on SQLite too, whose JSON renders
    # datetimes without an offset).
    reply = requests.post(
        f"{base}/api/v1/devices/register",
        json={
            "enrollment_token": token,
            "hardware_id": "e2e-2",
            "device_type": "e2e-board",
            "current_version": "1.0.0",
        },
        timeout=10,
    )
    second = {"Authorization": f"Bearer {reply.json()['access_token']}"}
    requests.patch(
        f"{base}/api/v1/devices/{reply.json()['device_id']}",
        auth=admin,
        json={"target_version": "2.0.0"},
        timeout=10,
    )
    offer = requests.get(f"{base}/api/v1/updates/check", headers=second, timeout=10).json()
    requests.post(
        f"{base}/api/v1/status",
        headers=second,
        timeout=10,
        json={
            "session_id": offer["session_id"],
            "status": "failed",
            "error_message": "flash write error",
        },
    )
    reply = requests.get(f"{base}/api/v1/updates/check", headers=second, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["reason"] == "already_failed"

    # Bad input over the wire is a 4xx with a JSON body, never a 500.
    reply = requests.post(
        f"{base}/api/v1/status",
        headers={**headers, "Content-Type": "application/json"},
        data=b"{nope",
        timeout=10,
    )
    assert reply.status_code == 400 and reply.json()["code"] == "parse_error"
    assert requests.get(f"{base}/api/v1/nowhere", timeout=10).json()["code"] == "not_found"
    schema = requests.get(f"{base}/api/schema/", timeout=10)
    assert schema.status_code == 200 and b"/api/v1/devices/register" in schema.content


def prepare(env: dict[str, str]) -> None:
    migrate_with_admin(env, ("e2e-admin", "e2e-password-123"), "e2e@example.com")


def test_embedded_mode_needs_no_service(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    prepare(env)
    with gunicorn(env) as base:
        ready = requests.get(f"{base}/health/ready?check=database,storage", timeout=5).json()
        assert ready["status"] == "ok" and set(ready["checks"]) == {"database", "storage"}
        device_flow(base, env)
    assert (tmp_path / "db.sqlite3").is_file()
    assert list((tmp_path / "media" / "firmware").rglob("image.bin"))
    # The signing key is sealed in the database under the embedded master key; no key file.
    assert (tmp_path / "keys" / "master.key").is_file()
    assert not (tmp_path / "keys" / "firmware-ed25519.pem").exists()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def test_production_mode_on_postgres_and_redis(tmp_path: Path, postgres_url: str) -> None:
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    env = server_env(
        tmp_path,
        DATABASE_POOL="true",
        DATABASE_URL=postgres_url,
        REDIS_URL=redis_url,
        CACHE_KEY_PREFIX=f"e2e-{uuid.uuid4().hex[:8]}",
    )
    prepare(env)
    with gunicorn(env) as base:
        device_flow(base, env)
