"""Forged, expired and stale credentials are refused; device A never reads or changes device B;
CSRF protects session writes; CORS and the security headers."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import jwt
import pytest
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from ota_site import apikeys
from ota_site.permissions import Role
from rollouts.models import UpdateSession
from tests.conftest import DeviceActor

DEVICE_CODES = {"token_invalid", "token_expired", "credentials_reset", "device_revoked"}


@pytest.fixture(autouse=True)
def _no_rate_limits(settings: Any) -> None:
    settings.RATE_LIMIT_IP = "off"
    settings.RATE_LIMIT_DEVICE = "off"


def claims_for(device: DeviceActor, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "ota-server",
        "aud": "ota-device",
        "sub": str(device.id),
        "typ": device.device.device_type,
        "gen": device.device.credential_generation,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forged_tokens(device: DeviceActor, secret: str) -> dict[str, str]:
    good = claims_for(device)
    return {
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(good)}.",
        "alg_none_upper": f"{b64({'alg': 'NONE', 'typ': 'JWT'})}.{b64(good)}.",
        "wrong_key": jwt.encode(good, "not-the-server-key" * 2, algorithm="HS256"),
        "hs512": jwt.encode(good, secret, algorithm="HS512"),
        "wrong_audience": jwt.encode(claims_for(device, aud="ota-admin"), secret, "HS256"),
        "wrong_issuer": jwt.encode(claims_for(device, iss="evil"), secret, "HS256"),
        "no_expiry": jwt.encode(claims_for(device, exp=None), secret, "HS256"),
        "expired": jwt.encode(
            claims_for(device, iat=int(time.time()) - 2000, exp=int(time.time()) - 1000),
            secret,
            "HS256",
        ),
        "not_a_uuid": jwt.encode(claims_for(device, sub="../../admin"), secret, "HS256"),
        "garbage": "eyJhbGciOiJIUzI1NiJ9.garbage.garbage",
        "truncated": jwt.encode(good, secret, algorithm="HS256")[:-5],
    }


@pytest.mark.parametrize(
    "name",
    [
        "alg_none",
        "alg_none_upper",
        "wrong_key",
        "hs512",
        "wrong_audience",
        "wrong_issuer",
        "no_expiry",
        "expired",
        "not_a_uuid",
        "garbage",
        "truncated",
    ],
)
def test_forged_device_tokens_are_401_with_a_code(
    device_a: DeviceActor, settings: Any, name: str
) -> None:
    token = forged_tokens(device_a, settings.DEVICE_JWT_SECRET)[name]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    for method, path in (
        ("get", "/api/v1/updates/check"),
        ("get", f"/api/v1/devices/{device_a.id}"),
        ("post", f"/api/v1/devices/{device_a.id}/heartbeat"),
    ):
        reply = getattr(client, method)(path, format="json")
        assert reply.status_code == 401, (name, path, reply.content)
        body = reply.json()
        assert body["code"] == ("token_expired" if name == "expired" else "token_invalid")
        assert body["detail"]


def test_a_token_from_before_a_credential_reset_is_refused(device_a: DeviceActor) -> None:
    device_services.reset_credentials(device_a.device)
    for method, path in (
        ("get", "/api/v1/updates/check"),
        ("get", f"/api/v1/devices/{device_a.id}/updates"),
        ("get", f"/api/v1/devices/{device_a.id}"),
        ("post", f"/api/v1/devices/{device_a.id}/heartbeat"),
    ):
        reply = getattr(device_a.client, method)(path, format="json")
        assert reply.status_code == 401, (path, reply.content)
        assert reply.json()["code"] == "credentials_reset"


def test_the_old_secret_no_longer_buys_a_token(api: APIClient, device_a: DeviceActor) -> None:
    device_services.reset_credentials(device_a.device)
    reply = api.post(
        "/api/v1/devices/token",
        {"device_id": str(device_a.id), "secret": device_a.secret},
        format="json",
    )
    assert reply.status_code == 401 and reply.json()["code"] == "authentication_failed"


def test_a_device_token_is_no_api_key_and_no_session(device_a: DeviceActor) -> None:
    # Management endpoints do not accept device tokens at all.
    for path in ("/api/v1/devices", "/api/v1/firmware", "/api/v1/audit", "/api/v1/api-keys"):
        reply = device_a.client.get(path)
        assert reply.status_code in (401, 403), path
        assert reply.json()["code"]


# --- Device A against device B -------------------------------------------------------------------


def snapshot(device: Device) -> dict[str, Any]:
    device.refresh_from_db()
    return {
        field.attname: getattr(device, field.attname)
        for field in Device._meta.concrete_fields
        if field.attname != "last_seen"
    }


def test_device_a_never_reads_or_changes_device_b(
    device_a: DeviceActor, device_b: DeviceActor, published: Any
) -> None:
    device_services.update_device(device_b.device, target_version=published.version)
    offer = device_b.client.get("/api/v1/updates/check").json()
    assert offer["update_available"] is True
    session_id = offer["session_id"]
    before = snapshot(device_b.device)
    b = device_b.id
    attempts = [
        ("get", f"/api/v1/devices/{b}", None),
        ("put", f"/api/v1/devices/{b}", {"metadata": {"owned": True}}),
        ("patch", f"/api/v1/devices/{b}", {"target_version": "9.9.9"}),
        ("delete", f"/api/v1/devices/{b}", None),
        ("post", f"/api/v1/devices/{b}/heartbeat", {"current_version": "6.6.6"}),
        ("post", f"/api/v1/devices/{b}/retry", None),
        ("get", f"/api/v1/devices/{b}/updates", None),
        ("post", f"/api/v1/devices/{b}/status", {"session_id": session_id, "status": "failed"}),
        ("post", f"/api/v1/devices/{b}/certificate", {"csr": "x"}),
        ("post", f"/api/v1/devices/{b}/revoke", {}),
        # B's session through A's own endpoints: the session is looked up among A's only.
        ("post", "/api/v1/status", {"session_id": session_id, "status": "failed"}),
        ("post", "/api/v1/validation", {"session_id": session_id, "success": False}),
        ("get", f"/api/v1/sessions/{session_id}", None),
    ]
    for method, path, body in attempts:
        reply = getattr(device_a.client, method)(path, body, format="json")
        assert reply.status_code in (401, 403, 404, 405), (method, path, reply.status_code)
        if reply.status_code != 405:
            assert reply.json()["code"], (method, path)
    assert snapshot(device_b.device) == before
    session = UpdateSession.objects.get(uuid=session_id)
    assert session.status not in ("failed", "rolled_back") and session.device_id == b


def test_device_a_sees_its_own_record(device_a: DeviceActor) -> None:
    reply = device_a.client.get(f"/api/v1/devices/{device_a.id}")
    assert reply.status_code == 200 and reply.json()["id"] == str(device_a.id)
    assert device_a.client.get(f"/api/v1/devices/{uuid.uuid4()}").status_code == 403


# --- CSRF, CORS and headers -------------------------------------------------------------------


def test_a_session_write_needs_the_csrf_token(operator: Any) -> None:
    browser = APIClient(enforce_csrf_checks=True)
    browser.force_login(operator)
    reply = browser.post("/api/v1/groups", {"name": "csrf"}, format="json")
    assert reply.status_code == 403 and "CSRF" in reply.json()["detail"]
    assert browser.get("/api/v1/groups").status_code == 200  # reads need none
    # With the cookie's token echoed in the header, the same write goes through.
    secret = "k" * 32
    browser.cookies["csrftoken"] = secret
    reply = browser.post("/api/v1/groups", {"name": "csrf"}, format="json", HTTP_X_CSRFTOKEN=secret)
    assert reply.status_code == 201, reply.content


def test_device_tokens_need_no_csrf_token(device_a: DeviceActor) -> None:
    access, _ = device_services.issue_token(device_a.device)
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {access}")
    reply = client.post(f"/api/v1/devices/{device_a.id}/heartbeat", {}, format="json")
    assert reply.status_code == 200, reply.content


def test_cors_only_for_configured_origins_and_only_under_api(settings: Any, db: Any) -> None:
    _, token = apikeys.create_api_key(name="web", role=Role.VIEWER)
    client = APIClient()
    origin = "https://dashboard.example.com"
    reply = client.get("/api/v1/firmware", HTTP_ORIGIN=origin, HTTP_X_API_KEY=token)
    assert "Access-Control-Allow-Origin" not in reply  # none allowed by default
    settings.CORS_ALLOWED_ORIGINS = [origin]
    preflight = client.options(
        "/api/v1/firmware",
        HTTP_ORIGIN=origin,
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="x-api-key",
    )
    assert preflight["Access-Control-Allow-Origin"] == origin
    assert "x-api-key" in preflight["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in preflight
    reply = client.get("/api/v1/firmware", HTTP_ORIGIN=origin, HTTP_X_API_KEY=token)
    assert reply.status_code == 200 and reply["Access-Control-Allow-Origin"] == origin
    other = client.get("/api/v1/firmware", HTTP_ORIGIN="https://evil.example", HTTP_X_API_KEY=token)
    assert "Access-Control-Allow-Origin" not in other
    admin_page = client.get("/admin/login/", HTTP_ORIGIN=origin)
    assert "Access-Control-Allow-Origin" not in admin_page


def test_security_headers(db: Any) -> None:
    reply = APIClient().get("/admin/login/")
    assert reply["X-Frame-Options"] == "DENY"
    assert reply["X-Content-Type-Options"] == "nosniff"
    assert reply["Referrer-Policy"] == "same-origin"
    assert reply["X-Request-ID"]


def test_production_settings_turn_on_hsts_and_secure_cookies() -> None:
    import subprocess
    import sys

    code = (
        "from django.conf import settings as s; "
        "print(s.SECURE_HSTS_SECONDS, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, "
        "s.SECURE_HSTS_INCLUDE_SUBDOMAINS)"
    )
    env = {
        "DJANGO_SETTINGS_MODULE": "ota_site.settings",
        "DJANGO_BEHIND_TLS_PROXY": "true",
        "DATABASE_URL": "",
        "REDIS_URL": "",
        "PATH": "/usr/bin:/bin",
    }
    import os

    env["OTA_VAR_DIR"] = os.environ.get("OTA_VAR_DIR", "var/test")
    out = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert out == ["31536000", "True", "True", "True"]
