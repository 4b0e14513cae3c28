"""API keys: created once, stored as an HMAC, scoped to a role, expiring, revocable, last use
recorded; a CI pipeline uploads and publishes firmware with one."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from firmware.models import Firmware
from ota_site import apikeys
from ota_site.models import ApiKey, Event, EventKind
from ota_site.permissions import Role


@pytest.fixture(autouse=True)
def _no_rate_limits(settings: Any) -> None:
    settings.RATE_LIMIT_IP = "off"
    settings.RATE_LIMIT_DEVICE = "off"


def key_client(token: str, *, header: str = "authorization") -> APIClient:
    client = APIClient()
    if header == "authorization":
        client.credentials(HTTP_AUTHORIZATION=f"ApiKey {token}")
    else:
        client.credentials(HTTP_X_API_KEY=token)
    return client


def new_key(role: Role = Role.OPERATOR, **kwargs: Any) -> tuple[ApiKey, str]:
    return apikeys.create_api_key(name=f"ci-{role.label}", role=role, **kwargs)


def test_the_database_row_holds_no_secret(db: Any) -> None:
    key, token = new_key()
    secret = token.split("_", 2)[2]
    assert token.startswith(f"ota_{key.prefix}_") and len(key.prefix) == 8
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM ota_site_apikey WHERE id = %s", [key.pk])
        row = cursor.fetchone()
    assert row is not None
    for column in row:
        assert secret not in str(column) and token not in str(column)
    # Nor a plain hash of it that a leaked database could be searched with.
    for digest in (hashlib.sha256, hashlib.sha512, hashlib.md5):
        plain = digest(secret.encode()).hexdigest()
        assert all(plain not in str(column) for column in row)


def test_the_stored_hmac_cannot_be_checked_without_the_server_key(db: Any, settings: Any) -> None:
    key, token = new_key()
    secret = token.split("_", 2)[2]
    # Knowing the secret and the row is not enough: the HMAC needs API_KEY_HMAC_KEY.
    guess = hmac.new(b"not-the-server-key", f"{key.prefix}:{secret}".encode(), hashlib.sha256)
    assert guess.hexdigest() != key.secret_hmac
    assert apikeys.secret_hmac(key.prefix, secret) == key.secret_hmac
    settings.API_KEY_HMAC_KEY = "a-rotated-server-key"
    reply = key_client(token).get("/api/v1/firmware")
    assert reply.status_code == 401 and reply.json()["code"] == "api_key_invalid"


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_a_key_authenticates_with_its_role(db: Any, header: str) -> None:
    _, token = new_key(Role.VIEWER)
    client = key_client(token, header=header)
    assert client.get("/api/v1/firmware").status_code == 200
    reply = client.post("/api/v1/groups", {"name": "nope"}, format="json")
    assert reply.status_code == 403 and reply.json()["code"] == "permission_denied"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"revoked_at": timezone.now()}, "api_key_revoked"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "api_key_expired"),
    ],
)
def test_expired_and_revoked_keys_are_401_with_a_code(
    db: Any, change: dict[str, Any], code: str
) -> None:
    key, token = new_key()
    ApiKey.objects.filter(pk=key.pk).update(**change)
    reply = key_client(token).get("/api/v1/firmware")
    assert reply.status_code == 401
    assert reply.json()["code"] == code and reply.json()["detail"]
    assert reply["WWW-Authenticate"].startswith("ApiKey")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "ota_zzzzzzzz_" + "a" * 43,
        "ota_0000000a_" + "a" * 43,  # well formed, unknown prefix
        "ota_enroll_abcdef123456_" + "a" * 43,  # an enrollment token is not an API key
        "ApiKey extra words",
        "\u00e9t\u00e9",
    ],
)
def test_malformed_or_unknown_keys_are_401(db: Any, token: str) -> None:
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=token.encode("utf-8").decode("latin-1"))
    reply = client.get("/api/v1/firmware")
    assert reply.status_code == 401 and reply.json()["code"] == "api_key_invalid"


def test_a_wrong_secret_with_a_real_prefix_is_401(db: Any) -> None:
    key, token = new_key()
    forged = f"ota_{key.prefix}_{'A' * 43}"
    assert forged != token
    reply = key_client(forged).get("/api/v1/firmware")
    assert reply.status_code == 401 and reply.json()["code"] == "api_key_invalid"


def test_last_use_is_written_at_most_once_a_minute(db: Any, django_assert_num_queries: Any) -> None:
    key, token = new_key()
    client = key_client(token)
    assert client.get("/api/v1/firmware").status_code == 200
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None and key.last_used_ip == "127.0.0.1"
    assert client.get("/api/v1/firmware").status_code == 200
    key.refresh_from_db()
    assert key.last_used_at == first
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=first - timedelta(minutes=2))
    assert client.get("/api/v1/firmware").status_code == 200
    key.refresh_from_db()
    assert key.last_used_at > first


def test_a_key_needs_no_csrf_token(db: Any) -> None:
    _, token = new_key(Role.OPERATOR)
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"ApiKey {token}")
    reply = client.post("/api/v1/groups", {"name": "from-ci"}, format="json")
    assert reply.status_code == 201


# --- The API -------------------------------------------------------------------------------------


def test_admin_creates_lists_and_revokes_keys(api: APIClient, admin_user: Any) -> None:
    api.force_login(admin_user)
    reply = api.post(
        "/api/v1/api-keys", {"name": "ci", "role": "operator", "expires_days": 90}, format="json"
    )
    assert reply.status_code == 201, reply.content
    body = reply.json()
    token, prefix = body["token"], body["prefix"]
    assert token.startswith(f"ota_{prefix}_") and body["role"] == "operator"
    assert body["created_by"] == f"user:{admin_user.username}" and body["state"] == "active"
    listing = api.get("/api/v1/api-keys").json()
    [listed] = listing["results"]
    assert listed["prefix"] == prefix and "token" not in listed
    assert token not in json.dumps(listing)
    assert api.get(f"/api/v1/api-keys/{prefix}").json()["name"] == "ci"

    assert key_client(token).get("/api/v1/devices").status_code == 200
    revoked = api.post(f"/api/v1/api-keys/{prefix}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert key_client(token).get("/api/v1/devices").json()["code"] == "api_key_revoked"
    assert api.delete(f"/api/v1/api-keys/{prefix}").status_code == 204  # idempotent
    kinds = list(Event.objects.filter(kind__startswith="api_key.").values_list("kind", "actor"))
    actor = f"user:{admin_user.username}"
    assert kinds == [(EventKind.API_KEY_CREATED, actor), (EventKind.API_KEY_REVOKED, actor)]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "x", "role": "root"},
        {"name": "", "role": "viewer"},
        {"name": "x", "role": "viewer", "expires_days": 0},
        {"name": "x", "role": "viewer", "expires_days": "soon"},
        {"name": "x", "role": "viewer", "expires_at": "2001-01-01T00:00:00Z"},
        {"name": "x", "role": "viewer", "expires_at": "yesterday"},
        {"name": "x", "role": "viewer", "expires_days": 3, "expires_at": "2999-01-01T00:00:00Z"},
        [],
        "text",
    ],
)
def test_bad_creations_are_400(api: APIClient, admin_user: Any, body: Any) -> None:
    api.force_login(admin_user)
    reply = api.post("/api/v1/api-keys", body, format="json")
    assert reply.status_code == 400 and reply.json()["code"] == "invalid"
    assert not ApiKey.objects.exists()


def test_unknown_prefixes_are_404(api: APIClient, admin_user: Any) -> None:
    api.force_login(admin_user)
    for path in ("/api/v1/api-keys/nope", "/api/v1/api-keys/00000000/revoke"):
        method = api.get if not path.endswith("revoke") else api.post
        reply = method(path)
        assert reply.status_code == 404 and reply.json()["code"] == "not_found"


def test_only_admins_manage_keys(api: APIClient, operator: Any) -> None:
    _, operator_token = new_key(Role.OPERATOR)
    api.force_login(operator)
    assert api.get("/api/v1/api-keys").status_code == 403
    reply = key_client(operator_token).post(
        "/api/v1/api-keys", {"name": "escalate", "role": "admin"}, format="json"
    )
    assert reply.status_code == 403 and reply.json()["code"] == "permission_denied"


def test_a_key_cannot_create_a_key_above_its_role(db: Any) -> None:
    _, admin_token = new_key(Role.ADMIN)
    client = key_client(admin_token)
    reply = client.post("/api/v1/api-keys", {"name": "ops", "role": "operator"}, format="json")
    assert reply.status_code == 201
    created = Event.objects.filter(kind=EventKind.API_KEY_CREATED).latest("id")
    assert created.actor.startswith("key:") and created.actor_kind == "api_key"
    # A lower principal (here an operator key calling the service) cannot hand out more.
    operator_key = apikeys.authenticate(reply.json()["token"])
    with pytest.raises(apikeys.NotAllowed) as refused:
        apikeys.create_api_key(name="up", role=Role.ADMIN, actor=operator_key)
    assert refused.value.code == "role_too_high"


# --- CI pipeline ---------------------------------------------------------------------------------


def test_a_ci_pipeline_uploads_and_publishes_firmware_with_an_operator_key(db: Any) -> None:
    _, token = new_key(Role.OPERATOR)
    ci = APIClient()
    ci.credentials(HTTP_AUTHORIZATION=f"ApiKey {token}")
    image = SimpleUploadedFile("image.bin", b"\x7fELF" + b"\x00" * 4096)
    uploaded = ci.post(
        "/api/v1/firmware",
        {"file": image, "version": "3.0.0", "device_type": "board-a"},
        format="multipart",
    )
    assert uploaded.status_code == 201, uploaded.content
    firmware_id = uploaded.json()["id"]
    published = ci.post(f"/api/v1/firmware/{firmware_id}/publish")
    assert published.status_code == 200, published.content
    assert published.json()["published"] is True
    firmware = Firmware.objects.get(pk=firmware_id)
    assert firmware.is_published and firmware.created_by is None
    actors = set(Event.objects.filter(firmware_id=firmware.id).values_list("actor", "actor_kind"))
    assert actors == {(f"key:{token.split('_')[1]}", "api_key")}
    # An operator key cannot delete: that is an admin's.
    assert ci.delete(f"/api/v1/firmware/{firmware_id}").status_code == 403


# --- manage.py apikey ----------------------------------------------------------------------------


def run(*args: str) -> str:
    out = StringIO()
    call_command("apikey", *args, stdout=out)
    return out.getvalue()


def test_the_apikey_command(db: Any) -> None:
    created = json.loads(
        run("create", "--name", "ci", "--role", "operator", "--expires-days", "90", "--json")
    )
    token, prefix = created["token"], created["prefix"]
    assert created["role"] == "operator" and created["expires_at"]
    assert key_client(token).get("/api/v1/devices").status_code == 200
    listing = run("list")
    assert prefix in listing and token.split("_", 2)[2] not in listing
    assert json.loads(run("list", "--json"))[0]["prefix"] == prefix
    assert "Revoked" in run("revoke", prefix)
    assert "already" in run("revoke", prefix)
    assert key_client(token).get("/api/v1/devices").status_code == 401
    plain = run("create", "--name", "other", "--role", "viewer")
    assert "ota_" in plain and "shown only this once" in plain
    with pytest.raises(CommandError):
        run("revoke", "ffffffff")
    with pytest.raises(CommandError):
        run("create", "--name", "x", "--role", "viewer", "--expires-days", "0")
    assert Event.objects.filter(actor="manage.py apikey", actor_kind="system").count() == 3
