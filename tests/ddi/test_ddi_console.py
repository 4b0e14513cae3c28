"""Console: the device page's "hawkBit DDI" panel and the device list's "Add DDI device" form.

Viewers see the panel without its buttons and are refused the POSTs; operators add DDI devices
and create, replace and revoke target tokens. A token is shown once, on the page that answers the
POST, and never again.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from devices import certificates, ddi
from devices.models import DdiTarget, Device
from devices.services import hash_secret
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor
from tests.factories import DeviceGroupFactory

pytestmark = pytest.mark.django_db

TOKEN = re.compile(r"<code data-target-token>([A-Za-z0-9_-]+)</code>")


def browser(user: User) -> Client:
    """A signed-in client that checks CSRF as a browser session does."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf_post(client: Client, page: str, url: str, data: dict[str, Any] | None = None) -> Any:
    """POST as the page's form would, with the token from the CSRF cookie the page set."""
    client.get(page)
    token = client.cookies["csrftoken"].value
    return client.post(url, {**(data or {}), "csrfmiddlewaretoken": token})


def page_of(device: Device) -> str:
    return f"/devices/{device.id}/"


def html(response: Any) -> str:
    return response.content.decode()


def shown_token(response: Any) -> str:
    assert response.status_code == 200
    [token] = TOKEN.findall(html(response))
    return token


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def polls(controller_id: str, token: str) -> bool:
    reply = Client().get(
        f"/{settings.DDI_TENANT}/controller/v1/{controller_id}",
        HTTP_AUTHORIZATION=f"TargetToken {token}",
    )
    assert reply.status_code in (200, 401)
    return reply.status_code == 200


# --- The device page -----------------------------------------------------------------------------


def test_viewer_sees_the_panel_without_buttons(viewer: User, device_a: DeviceActor) -> None:
    ddi.issue_target_token(device_a.device)
    prefix = DdiTarget.objects.get(device=device_a.device).token_prefix
    page = html(browser(viewer).get(page_of(device_a.device)))
    assert "hawkBit DDI" in page
    assert f"{prefix}…" in page
    for control in ("Replace target token", "Revoke token", "Ask for attributes", "/ddi/"):
        assert control not in page


@pytest.mark.parametrize("action", ["ddi/token/", "ddi/token/revoke/", "ddi/attributes/"])
def test_viewer_is_refused_the_actions(viewer: User, device_a: DeviceActor, action: str) -> None:
    token = ddi.issue_target_token(device_a.device)
    DdiTarget.objects.filter(device=device_a.device).update(attributes_requested=False)
    page = page_of(device_a.device)
    reply = csrf_post(browser(viewer), page, f"{page}{action}")
    assert reply.status_code == 403
    assert polls("device-a", token)
    assert not DdiTarget.objects.get(device=device_a.device).attributes_requested


def test_viewer_cannot_add_a_ddi_device(viewer: User) -> None:
    client = browser(viewer)
    assert "Add DDI device" not in html(client.get("/devices/"))
    reply = csrf_post(
        client, "/devices/", "/devices/ddi/", {"controller_id": "swu-1", "device_type": "board-a"}
    )
    assert reply.status_code == 403
    assert not Device.objects.exists()


def test_operator_creates_a_token_shown_once(operator: User, device_a: DeviceActor) -> None:
    client = browser(operator)
    page = page_of(device_a.device)
    before = html(client.get(page))
    assert "no target token" not in before  # no DDI row yet: a plain device
    assert "Create target token" in before and "Revoke token" not in before

    reply = csrf_post(client, page, f"{page}ddi/token/")
    token = shown_token(reply)
    assert "no-store" in reply["Cache-Control"]
    body = html(reply)
    assert (
        f'swupdate -u "-t {settings.DDI_TENANT} -i device-a -u http://testserver -k {token}"'
        in body.replace("&quot;", '"')
    )
    target = DdiTarget.objects.get(device=device_a.device)
    assert target.token_hash == hash_secret(token) and target.token_prefix == token[:8]
    [issued] = Event.objects.filter(kind=EventKind.DEVICE_TARGET_TOKEN_ISSUED)
    assert issued.actor == "user:olivia" and issued.device_id == device_a.id
    assert polls("device-a", token)

    # The device page shows its prefix from now on, never the token.
    after = html(client.get(page))
    assert token not in after and f"{token[:8]}…" in after
    assert "Replace target token" in after and "Revoke token" in after


def test_operator_replaces_the_token(operator: User, device_a: DeviceActor) -> None:
    old = ddi.issue_target_token(device_a.device)
    client = browser(operator)
    page = page_of(device_a.device)
    new = shown_token(csrf_post(client, page, f"{page}ddi/token/"))
    assert new != old
    assert not polls("device-a", old) and polls("device-a", new)
    assert Event.objects.filter(kind=EventKind.DEVICE_TARGET_TOKEN_ISSUED).count() == 2


def test_operator_revokes_the_token(operator: User, device_a: DeviceActor) -> None:
    token = ddi.issue_target_token(device_a.device)
    client = browser(operator)
    page = page_of(device_a.device)
    reply = csrf_post(client, page, f"{page}ddi/token/revoke/")
    assert reply.status_code == 302 and reply["Location"] == page
    assert not polls("device-a", token)
    [revoked] = Event.objects.filter(kind=EventKind.DEVICE_TARGET_TOKEN_REVOKED)
    assert revoked.actor == "user:olivia"
    shown = client.get(page)
    assert "The target token of device-a was revoked." in messages_of(shown)
    assert "no target token" in html(shown) and "Create target token" in html(shown)

    again = csrf_post(client, page, f"{page}ddi/token/revoke/")
    assert "device-a had no target token." in messages_of(client.get(again["Location"]))
    assert Event.objects.filter(kind=EventKind.DEVICE_TARGET_TOKEN_REVOKED).count() == 1


def test_operator_asks_for_attributes(operator: User, device_a: DeviceActor) -> None:
    ddi.issue_target_token(device_a.device)
    DdiTarget.objects.filter(device=device_a.device).update(attributes_requested=False)
    client = browser(operator)
    page = page_of(device_a.device)
    reply = csrf_post(client, page, f"{page}ddi/attributes/")
    assert reply.status_code == 302
    assert DdiTarget.objects.get(device=device_a.device).attributes_requested
    shown = client.get(page)
    assert any("asked for its attributes" in m for m in messages_of(shown))
    assert "requested: the device sends them on its next poll" in html(shown)


def test_a_revoked_device_offers_no_token(operator: User, device_a: DeviceActor) -> None:
    certificates.revoke_device(device_a.device, reason="stolen")
    client = browser(operator)
    page = page_of(device_a.device)
    assert "Create target token" not in html(client.get(page))
    reply = csrf_post(client, page, f"{page}ddi/token/")
    assert reply.status_code == 302
    assert any("revoked" in m for m in messages_of(client.get(page)))
    assert not DdiTarget.objects.filter(device=device_a.device).exists()


def test_the_actions_need_csrf_and_post(operator: User, device_a: DeviceActor) -> None:
    client = browser(operator)
    page = page_of(device_a.device)
    assert client.post(f"{page}ddi/token/").status_code == 403
    assert (
        client.post("/devices/ddi/", {"controller_id": "x", "device_type": "y"}).status_code == 403
    )
    assert client.get(f"{page}ddi/token/").status_code == 405
    assert client.get("/devices/ddi/").status_code == 405
    assert not DdiTarget.objects.exists()


def test_an_unknown_device_is_a_404(operator: User) -> None:
    missing = "/devices/00000000-0000-0000-0000-000000000001/"
    assert csrf_post(browser(operator), "/devices/", f"{missing}ddi/token/").status_code == 404


# --- Adding a DDI device from the list ----------------------------------------------------------


def test_operator_adds_a_ddi_device(operator: User) -> None:
    group = DeviceGroupFactory.create(name="lab")
    client = browser(operator)
    listing = html(client.get("/devices/"))
    assert "Add DDI device" in listing and 'action="/devices/ddi/"' in listing

    reply = csrf_post(
        client,
        "/devices/",
        "/devices/ddi/",
        {
            "controller_id": "swu-001",
            "device_type": "board-a",
            "current_version": "1.0.0",
            "group": str(group.id),
        },
    )
    token = shown_token(reply)
    assert "no-store" in reply["Cache-Control"]
    assert "DDI device added" in html(reply)
    device = Device.objects.get(hardware_id="swu-001")
    assert device.device_type == "board-a" and device.current_version == "1.0.0"
    assert device.group == group
    assert DdiTarget.objects.get(device=device).token_hash == hash_secret(token)
    [registered] = Event.objects.filter(kind=EventKind.DEVICE_REGISTERED, device_id=device.id)
    assert registered.actor == "user:olivia" and registered.data["how"] == "provisioned_ddi"
    assert token not in json.dumps(list(Event.objects.values("data", "changes")))
    assert polls("swu-001", token)
    assert token not in html(client.get(page_of(device)))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"controller_id": "a/b"}, "Controller id: A hardware id is"),
        ({"controller_id": ""}, "Controller id: This field is required."),
        ({"device_type": ""}, "Device type: This field is required."),
        ({"current_version": "nope"}, "Current version:"),
        ({"group": "00000000-0000-0000-0000-000000000007"}, "Group: No such group."),
        ({"group": "lab"}, "Group: No such group."),
    ],
)
def test_bad_input_is_shown_on_the_list(
    operator: User, fields: dict[str, str], message: str
) -> None:
    client = browser(operator)
    data = {"controller_id": "swu-001", "device_type": "board-a", **fields}
    reply = csrf_post(client, "/devices/", "/devices/ddi/", data)
    assert reply.status_code == 302 and reply["Location"] == "/devices/"
    shown = messages_of(client.get("/devices/"))
    assert any(m.startswith(message) for m in shown), shown
    assert not Device.objects.exists()


def test_a_taken_controller_id_is_refused(operator: User, device_a: DeviceActor) -> None:
    client = browser(operator)
    data = {"controller_id": "device-a", "device_type": "board-a"}
    reply = csrf_post(client, "/devices/", "/devices/ddi/", data)
    assert reply.status_code == 302
    assert any("already exists" in m for m in messages_of(client.get("/devices/")))
    assert Device.objects.count() == 1
    assert not DdiTarget.objects.exists()
