"""Rate limits: per device and per address, 429 with Retry-After, across processes, failing open.

The test environment turns the limits off; every test here turns them on with the `settings`
fixture. Buckets live under the test's own cache prefix (tests/conftest.py), so tests never share
counts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from ota_site import ratelimit
from ota_site.auth import AUDIENCE, ISSUER
from ota_site.ratelimit import Rate, parse_rate
from tests.conftest import DeviceActor
from tests.e2e import ROOT, server_env

CHECK = "/api/v1/updates/check"


@pytest.fixture
def limits(settings: Any) -> Any:
    """Set RATE_LIMIT_DEVICE and RATE_LIMIT_IP for one test."""

    def set_limits(device: str = "off", ip: str = "off") -> None:
        settings.RATE_LIMIT_DEVICE = device
        settings.RATE_LIMIT_IP = ip

    return set_limits


def assert_limited(reply: Any) -> int:
    """A 429 in the API's error shape; returns its Retry-After."""
    assert reply.status_code == 429, reply.content
    body = reply.json()
    assert body["code"] == "rate_limited" and body["detail"]
    retry_after = int(reply["Retry-After"])
    assert body["retry_after"] == retry_after and retry_after >= 1
    return retry_after


def forged_token(subject: str, key: str = "not-the-server-key-but-long-enough!") -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="HS256")


# --- Configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("10/min", Rate(10, 60)),
        ("3/sec", Rate(3, 1)),
        (" 1000 / hour ", Rate(1000, 3600)),
        ("100/MIN", Rate(100, 60)),
        ("0", None),
        ("off", None),
        ("0/min", None),
    ],
)
def test_rates_parse(value: str, rate: Rate | None) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", ["10", "10/fortnight", "ten/min", "-1/min", "10/min/2", "on"])
def test_bad_rates_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="N/sec"):
        parse_rate(value)


def test_a_bad_rate_fails_the_start_up_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=server_env(tmp_path, RATE_LIMIT_DEVICE="10/fortnight"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ota.E013" in result.stderr and "RATE_LIMIT_DEVICE" in result.stderr


# --- Per device and per address ------------------------------------------------------------------


def test_a_device_over_its_limit_gets_429_with_retry_after(
    limits: Any, device_a: DeviceActor, device_b: DeviceActor
) -> None:
    limits(device="10/min", ip="100/min")
    for n in range(10):
        reply = device_a.client.get(CHECK)
        assert reply.status_code == 200, reply.content
        assert reply["RateLimit-Limit"] == "10"
        assert reply["RateLimit-Remaining"] == str(9 - n)
    retry_after = assert_limited(device_a.client.get(CHECK))
    assert retry_after <= 60
    # Refused before any view: the same for every path and method of that device.
    assert_limited(device_a.client.post("/api/v1/status", {}, format="json"))
    # Another device (from the same address, under the address limit) is not affected.
    assert device_b.client.get(CHECK).status_code == 200


def test_the_address_limit_counts_every_device(
    limits: Any, device_a: DeviceActor, device_b: DeviceActor, api: APIClient
) -> None:
    limits(device="100/min", ip="5/min")
    for device in (device_a, device_b, device_a, device_b, device_a):
        assert device.client.get(CHECK).status_code == 200
    assert_limited(device_b.client.get(CHECK))
    assert_limited(api.post("/api/v1/devices/token", {}, format="json"))  # no token at all


def test_people_get_only_the_address_limit(
    limits: Any, operator: User, device_a: DeviceActor
) -> None:
    limits(device="1/min", ip="3/min")
    client = APIClient()
    client.force_login(operator)
    for _ in range(3):
        reply = client.get("/api/v1/firmware")
        assert reply.status_code == 200
        assert reply["RateLimit-Limit"] == "3"
    assert_limited(client.get("/api/v1/firmware"))


def test_x_forwarded_for_is_ignored_from_an_untrusted_peer(
    limits: Any, settings: Any, api: APIClient
) -> None:
    limits(ip="2/min")
    settings.TRUSTED_PROXIES = []
    for n in range(2):
        reply = api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}")
        assert reply.status_code != 429
    # A new forged address each time does not buy a new bucket.
    assert_limited(api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR="203.0.113.99"))


def test_x_forwarded_for_is_honoured_from_a_trusted_proxy(
    limits: Any, settings: Any, api: APIClient
) -> None:
    limits(ip="2/min")
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    for _ in range(2):
        reply = api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR="203.0.113.7")
        assert reply.status_code != 429
    assert_limited(api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR="203.0.113.7"))
    # Another client behind the same proxy has its own bucket; the proxy itself is not limited.
    assert api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR="203.0.113.8").status_code != 429
    # An address the client put in front of the proxy's is not believed.
    spoofed = "198.51.100.1, 203.0.113.7"
    assert_limited(api.get("/api/v1/firmware/keys", HTTP_X_FORWARDED_FOR=spoofed))


def test_ipv6_clients_are_counted_by_their_64(limits: Any, settings: Any, api: APIClient) -> None:
    limits(ip="1/min")
    assert api.get(CHECK, REMOTE_ADDR="2001:db8:1:2::1").status_code != 429
    assert_limited(api.get(CHECK, REMOTE_ADDR="2001:db8:1:2::ffff"))
    assert api.get(CHECK, REMOTE_ADDR="2001:db8:1:3::1").status_code != 429


def test_a_forged_token_gets_no_bucket_of_its_own(
    limits: Any, settings: Any, api: APIClient, device_a: DeviceActor
) -> None:
    limits(device="2/min", ip="4/min")
    # Tokens with made-up subjects (and one naming device A) are all counted by address only.
    subjects = [str(uuid.uuid4()), str(uuid.uuid4()), str(device_a.id)]
    for subject in subjects:
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {forged_token(subject)}")
        assert api.get(CHECK).status_code == 401
    api.credentials(HTTP_AUTHORIZATION="Bearer not.a.jwt")
    assert api.get(CHECK).status_code == 401
    assert_limited(api.get(CHECK))
    # Device A's own bucket is untouched by the forgery in its name (the address one is full).
    settings.RATE_LIMIT_IP = "off"
    for _ in range(2):
        assert device_a.client.get(CHECK).status_code == 200
    assert_limited(device_a.client.get(CHECK))


def test_the_window_frees_after_retry_after(limits: Any, device_a: DeviceActor) -> None:
    limits(device="3/sec")
    for _ in range(3):
        assert device_a.client.get(CHECK).status_code == 200
    retry_after = assert_limited(device_a.client.get(CHECK))
    assert retry_after == 1
    time.sleep(retry_after)
    reply = device_a.client.get(CHECK)
    assert reply.status_code == 200 and reply["RateLimit-Remaining"] == "2"


# --- Which paths ----------------------------------------------------------------------------------


def test_tuf_files_are_limited_as_well(limits: Any, api: APIClient) -> None:
    limits(ip="1/min")
    assert api.get("/tuf/1.root.json").status_code != 429
    assert_limited(api.get("/tuf/timestamp.json"))


def test_health_admin_and_static_files_are_not_limited(
    limits: Any, api: APIClient, admin_user: User
) -> None:
    limits(ip="1/min")
    for _ in range(3):
        assert api.get("/health").status_code == 200
        assert api.get("/admin/login/").status_code == 200
        assert api.get("/static/does-not-exist.css").status_code == 404
    assert "RateLimit-Limit" not in api.get("/health")


def test_limits_off_send_no_headers(limits: Any, device_a: DeviceActor) -> None:
    limits(device="off", ip="0")
    for _ in range(20):
        reply = device_a.client.get(CHECK)
        assert reply.status_code == 200
    assert "RateLimit-Limit" not in reply


# --- Backends ---------------------------------------------------------------------------------


def test_without_redis_the_embedded_counter_limits(
    limits: Any, settings: Any, device_a: DeviceActor
) -> None:
    settings.REDIS_URL = ""
    limits(device="2/min")
    for _ in range(2):
        assert device_a.client.get(CHECK).status_code == 200
    assert_limited(device_a.client.get(CHECK))


COUNT_HITS = """
from ota_site import ratelimit
from ota_site.ratelimit import Bucket, Rate
counter = ratelimit.counter()
assert isinstance(counter, ratelimit.SQLiteCounter), counter
bucket = [Bucket("shared", Rate(250, 60))]
print(sum(1 for _ in range(200) if not counter.hit(bucket).counts[0].over))
"""


def test_the_embedded_counter_is_shared_by_processes(tmp_path: Path) -> None:
    """Two processes (as two gunicorn workers) hit one bucket at once: exactly the limit passes."""
    env = server_env(tmp_path)  # the embedded mode: no REDIS_URL
    processes = [
        subprocess.Popen(
            [sys.executable, "manage.py", "shell", "-c", COUNT_HITS],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    allowed = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        allowed.append(int(out.strip().splitlines()[-1]))
    assert sum(allowed) == 250, allowed
    assert (tmp_path / "ratelimit.sqlite3").is_file()


def test_an_unreachable_redis_fails_open(
    limits: Any,
    settings: Any,
    device_a: DeviceActor,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "_last_warning", 0.0)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    limits(device="1/min", ip="1/min")
    with caplog.at_level(logging.WARNING, logger="ota_site.ratelimit"):
        for _ in range(3):
            reply = device_a.client.get(CHECK)
            assert reply.status_code == 200
            assert "RateLimit-Limit" not in reply
    warnings = [r for r in caplog.records if r.name == "ota_site.ratelimit"]
    assert len(warnings) == 1 and "not enforced" in warnings[0].getMessage()
