"""Who may call what: every /api/v1/ endpoint and method against every kind of caller.

The table says the least a caller needs: ``public``, ``device`` (a device, for its own records),
``device|viewer`` (a device or anyone with a role), or a role. Each endpoint is called by nobody,
by device A (with its own id in the path), by a viewer, an operator and an admin signed in, and by
an API key of each role. Allowed means anything but 401/403 (a 400 for an empty body or a 404 for
a made-up id still got past the door); denied means exactly 401 or 403 with the JSON error body.
A URL under /api/v1/ that is missing from the table fails the suite, so new endpoints get a row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from devices import services as device_services
from ota_site import apikeys
from ota_site.permissions import Role
from tests.conftest import DeviceActor

PUBLIC, DEVICE, DEVICE_OR_VIEWER = "public", "device", "device|viewer"
VIEWER, OPERATOR, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

MATRIX: dict[str, dict[str, Any]] = {
    "devices": {"get": VIEWER},
    "devices/register": {"post": PUBLIC},
    "devices/token": {"post": PUBLIC},
    "devices/enroll": {"post": PUBLIC},
    "devices/<uuid:device_id>": {
        "get": DEVICE_OR_VIEWER,
        "put": OPERATOR,
        "patch": OPERATOR,
        "delete": ADMIN,
    },
    "devices/<uuid:device_id>/heartbeat": {"post": DEVICE},
    "devices/<uuid:device_id>/retry": {"post": OPERATOR},
    "devices/<uuid:device_id>/certificate": {"post": DEVICE},
    "devices/<uuid:device_id>/revoke": {"post": ADMIN},
    "devices/ddi": {"post": OPERATOR},
    "devices/<uuid:device_id>/target-token": {"post": OPERATOR, "delete": OPERATOR},
    "devices/<uuid:device_id>/ddi-attributes": {"post": OPERATOR},
    "devices/<uuid:device_id>/updates": {"get": DEVICE},
    "devices/<uuid:device_id>/status": {"post": DEVICE},
    "updates/check": {"get": DEVICE},
    "status": {"post": DEVICE},
    "validation": {"post": DEVICE},
    "sessions": {"get": VIEWER},
    "sessions/<uuid:session_id>": {"get": VIEWER},
    "rollouts": {"get": VIEWER, "post": OPERATOR},
    "rollouts/<uuid:rollout_id>": {"get": VIEWER, "put": OPERATOR, "patch": OPERATOR},
    "rollouts/<uuid:rollout_id>/start": {"post": OPERATOR},
    "rollouts/<uuid:rollout_id>/pause": {"post": OPERATOR},
    "rollouts/<uuid:rollout_id>/resume": {"post": OPERATOR},
    "rollouts/<uuid:rollout_id>/cancel": {"post": OPERATOR},
    "rollouts/<uuid:rollout_id>/advance": {"post": OPERATOR},
    "rollouts/<uuid:rollout_id>/metrics": {"get": VIEWER},
    "firmware": {"get": VIEWER, "post": OPERATOR},
    "firmware/keys": {"get": DEVICE_OR_VIEWER},
    "firmware/keys/rotate": {"post": ADMIN},
    "firmware/keys/<str:key_id>/retire": {"post": ADMIN},
    "firmware/<uuid:firmware_id>": {"get": VIEWER, "delete": ADMIN},
    "firmware/<uuid:firmware_id>/publish": {"post": OPERATOR},
    "firmware/<uuid:firmware_id>/download": {"get": DEVICE_OR_VIEWER},
    "api-keys": {"get": ADMIN, "post": ADMIN},
    "api-keys/<str:prefix>": {"get": ADMIN, "delete": ADMIN},
    "api-keys/<str:prefix>/revoke": {"post": ADMIN},
    "audit": {"get": ADMIN},
    "^groups$": {"get": VIEWER, "post": OPERATOR},
    "^groups/(?P<group_id>[^/.]+)$": {
        "get": VIEWER,
        "put": OPERATOR,
        "patch": OPERATOR,
        "delete": OPERATOR,
    },
}

API_PREFIX = "api/v1/"


def _walk(patterns: list[Any], prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern), pattern


def api_endpoints() -> dict[str, set[str]]:
    """Every route under /api/v1/ with the HTTP methods its view answers."""
    found: dict[str, set[str]] = {}
    for route, pattern in _walk(get_resolver().url_patterns):
        if not route.startswith(API_PREFIX):
            continue
        callback: Any = pattern.callback
        actions = getattr(callback, "actions", None)
        view_class = getattr(callback, "cls", None)
        if actions:
            methods = set(actions) - {"head", "options"}
        elif view_class is not None:
            methods = {
                m
                for m in view_class.http_method_names
                if m not in ("options", "head", "trace") and hasattr(view_class, m)
            }
        else:
            methods = {"get"}
        found.setdefault(route.removeprefix(API_PREFIX), set()).update(methods)
    return found


def test_every_api_endpoint_is_in_the_matrix() -> None:
    endpoints = api_endpoints()
    missing = {
        f"{method.upper()} {route}"
        for route, methods in endpoints.items()
        for method in methods
        if method not in MATRIX.get(route, {})
    }
    assert not missing, f"add these to MATRIX: {sorted(missing)}"
    stale = {
        f"{method.upper()} {route}"
        for route, methods in MATRIX.items()
        for method in methods
        if method not in endpoints.get(route, set())
    }
    assert not stale, f"remove these from MATRIX: {sorted(stale)}"


CASES = [(route, method) for route, methods in MATRIX.items() for method in methods]
CALLERS = [
    "anonymous",
    "device",
    "viewer",
    "operator",
    "key:viewer",
    "key:operator",
    "admin",
    "key:admin",
]


def allowed(requirement: Any, caller: str) -> bool:
    if requirement == PUBLIC:
        return True
    if caller == "anonymous":
        return False
    if caller == "device":
        return requirement in (DEVICE, DEVICE_OR_VIEWER)
    if requirement == DEVICE:
        return False
    needed = VIEWER if requirement == DEVICE_OR_VIEWER else requirement
    role = Role.from_label(caller.removeprefix("key:"))
    return bool(role >= needed)


def concrete(route: str, device_id: uuid.UUID, group_id: Any) -> str:
    values = {
        "<uuid:device_id>": str(device_id),
        "<uuid:session_id>": str(uuid.uuid4()),
        "<uuid:rollout_id>": str(uuid.uuid4()),
        "<uuid:firmware_id>": str(uuid.uuid4()),
        "<str:key_id>": "0000000000000000",
        "<str:prefix>": "00000000",
        "(?P<group_id>[^/.]+)": str(group_id),
    }
    path = route.removeprefix("^").removesuffix("$")
    for placeholder, value in values.items():
        path = path.replace(placeholder, value)
    assert "<" not in path and "(" not in path, f"no value for a parameter in {route}"
    return f"/{API_PREFIX}{path}"


@pytest.fixture
def callers(db: Any, device_a: DeviceActor, admin_user: Any, operator: Any, viewer: Any) -> Any:
    clients: dict[str, APIClient] = {"anonymous": APIClient(), "device": device_a.client}
    for name, user in (("viewer", viewer), ("operator", operator), ("admin", admin_user)):
        client = APIClient()
        client.force_login(user)
        clients[name] = client
    for role in Role:
        _, token = apikeys.create_api_key(name=f"matrix-{role.label}", role=role)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"ApiKey {token}")
        clients[f"key:{role.label}"] = client
    return clients


@pytest.fixture(autouse=True)
def _no_rate_limits(settings: Any) -> None:
    settings.RATE_LIMIT_IP = "off"
    settings.RATE_LIMIT_DEVICE = "off"


@pytest.mark.parametrize(("route", "method"), CASES, ids=[f"{m} {r}" for r, m in CASES])
def test_role_matrix(callers: Any, device_a: DeviceActor, route: str, method: str) -> None:
    requirement = MATRIX[route][method]
    group = device_services.create_group(name=f"g-{uuid.uuid4().hex[:8]}")
    path = concrete(route, device_a.id, group.id)
    problems = []
    for caller in CALLERS:
        client = callers[caller]
        reply = getattr(client, method)(path, {}, format="json")
        status = reply.status_code
        if requirement == PUBLIC:
            # Public endpoints judge the credential in the body (an enrollment token, a device
            # secret): 401 for an empty one is theirs to give, but never "not authenticated".
            if status == 403 or (status == 401 and reply.json()["code"] == "not_authenticated"):
                problems.append(f"{caller}: {status}, expected to be let in")
        elif allowed(requirement, caller):
            if status in (401, 403):
                problems.append(f"{caller}: {status}, expected to be let in")
        elif status not in (401, 403):
            problems.append(f"{caller}: {status}, expected 401/403")
        else:
            body = reply.json()
            if not (isinstance(body, dict) and body.get("code") and body.get("detail")):
                problems.append(f"{caller}: {status} without the JSON error body")
    assert not problems, f"{method.upper()} {path}: {problems}"


# --- The Django admin follows the same roles ------------------------------------------------------


def test_staff_without_a_role_is_refused_by_the_admin(db: Any) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    staff = User.objects.create_user("stan", password="pw-stan-1", is_staff=True)
    client = Client()
    client.force_login(staff)
    reply = client.get("/admin/")
    assert reply.status_code == 302 and "/admin/login/" in reply["Location"]
    assert client.get("/admin/firmware/firmware/").status_code == 302


def test_permissions_outside_the_role_groups_grant_nothing(viewer: Any) -> None:
    from django.contrib.auth.models import Permission, User

    viewer.user_permissions.add(Permission.objects.get(codename="delete_device"))
    fresh = User.objects.get(pk=viewer.pk)
    assert fresh.has_perm("devices.view_device")
    assert not fresh.has_perm("devices.delete_device")


@pytest.mark.parametrize(
    ("who", "path", "action", "visible"),
    [
        ("viewer", "/admin/firmware/firmware/", "publish_selected", False),
        ("operator", "/admin/firmware/firmware/", "publish_selected", True),
        ("viewer", "/admin/rollouts/rollout/", "start_rollout", False),
        ("operator", "/admin/rollouts/rollout/", "start_rollout", True),
        ("viewer", "/admin/devices/device/", "reset_credentials", False),
        ("operator", "/admin/devices/device/", "reset_credentials", True),
        ("viewer", "/admin/devices/device/", "issue_target_tokens", False),
        ("operator", "/admin/devices/device/", "issue_target_tokens", True),
        ("operator", "/admin/devices/enrollmenttoken/", "revoke_tokens", False),
        ("operator", "/admin/ota_site/apikey/", "revoke_keys", False),
        ("admin", "/admin/ota_site/apikey/", "revoke_keys", True),
    ],
)
def test_admin_actions_follow_the_roles(
    db: Any,
    viewer: Any,
    operator: Any,
    admin_user: Any,
    who: str,
    path: str,
    action: str,
    visible: bool,
) -> None:
    from django.test import Client

    client = Client()
    client.force_login({"viewer": viewer, "operator": operator, "admin": admin_user}[who])
    reply = client.get(path)
    if reply.status_code == 403:
        assert not visible
        return
    assert reply.status_code == 200
    actions = (
        reply.context["action_form"].fields["action"].choices
        if reply.context.get("action_form")
        else []
    )
    assert (action in [name for name, _ in actions]) is visible


def test_the_admin_creates_an_api_key_and_shows_it_once(admin_user: Any) -> None:
    from django.test import Client

    from ota_site.models import ApiKey

    client = Client()
    client.force_login(admin_user)
    reply = client.post(
        "/admin/ota_site/apikey/add/", {"name": "ci", "role": "operator"}, follow=True
    )
    assert reply.status_code == 200
    key = ApiKey.objects.get()
    shown = [str(m) for m in reply.context["messages"]]
    assert any(f"ota_{key.prefix}_" in m for m in shown)
    assert key.created_by_actor == f"user:{admin_user.username}" and key.role == "operator"
