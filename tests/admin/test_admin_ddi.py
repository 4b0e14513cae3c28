"""The admin's hawkBit DDI tools: a view-only DDI inline on the device page, and the action
"Create or replace DDI target token", which shows each new token once, in a message."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from devices import certificates, ddi
from devices.admin import MAX_TARGET_TOKENS_PER_ACTION
from devices.models import DdiTarget, Device
from devices.services import hash_secret
from ota_site.models import EventKind
from tests.admin.conftest import Fleet, events, make_device, messages_of, url

TOKEN = re.compile(r"<code>([A-Za-z0-9_-]{40,})</code>")


def issue(client: Client, *devices: Device) -> Any:
    return client.post(
        url(Device, "changelist"),
        {"action": "issue_target_tokens", "_selected_action": [d.pk for d in devices]},
        follow=True,
    )


def polls(controller_id: str, token: str) -> bool:
    reply = Client().get(
        f"/{settings.DDI_TENANT}/controller/v1/{controller_id}",
        HTTP_AUTHORIZATION=f"TargetToken {token}",
    )
    return reply.status_code == 200


def test_the_action_shows_the_token_once(admin_client: Client, fleet: Fleet) -> None:
    device = fleet.devices[0]
    old = ddi.issue_target_token(device)
    reply = issue(admin_client, device)
    assert reply.status_code == 200
    [message] = messages_of(reply)
    [token] = TOKEN.findall(message)
    assert device.hardware_id in message and settings.DDI_TENANT in message
    target = DdiTarget.objects.get(device=device)
    assert target.token_hash == hash_secret(token) and target.token_prefix == token[:8]
    assert polls(device.hardware_id, token) and not polls(device.hardware_id, old)
    issued = events(EventKind.DEVICE_TARGET_TOKEN_ISSUED)
    assert [e.actor for e in issued] == ["system", "user:admin"]
    # Shown once: the next page has no message, and the device page only the prefix.
    page = admin_client.get(url(Device, "change", device.pk))
    assert messages_of(page) == []
    assert token not in page.content.decode()
    assert token[:8] in page.content.decode()
    assert target.token_hash not in page.content.decode()


def test_each_selected_device_gets_its_own(admin_client: Client, fleet: Fleet) -> None:
    first, second = fleet.devices[:2]
    certificates.revoke_device(fleet.devices[2], reason="stolen")
    reply = issue(admin_client, first, second, fleet.devices[2])
    shown = messages_of(reply)
    tokens = {m.split("<strong>")[1].split("</strong>")[0]: TOKEN.findall(m) for m in shown[:2]}
    assert sorted(tokens) == [first.hardware_id, second.hardware_id]
    for hardware_id, [token] in tokens.items():
        assert polls(hardware_id, token)
    assert any(m.startswith(f"{fleet.devices[2]}:") and "revoked" in m for m in shown), shown
    assert not DdiTarget.objects.filter(device=fleet.devices[2]).exists()


def test_too_many_devices_get_none(admin_client: Client, fleet: Fleet) -> None:
    more = [make_device(f"bulk-{i}") for i in range(MAX_TARGET_TOKENS_PER_ACTION)]
    reply = issue(admin_client, *fleet.devices, *more)
    [message] = messages_of(reply)
    assert f"at most {MAX_TARGET_TOKENS_PER_ACTION} devices" in message
    assert not DdiTarget.objects.exists()


@pytest.mark.parametrize("who", ["viewer", "operator"])
def test_the_inline_is_view_only(fleet: Fleet, viewer: User, operator: User, who: str) -> None:
    device = fleet.devices[0]
    ddi.issue_target_token(device)
    client = Client()
    client.force_login({"viewer": viewer, "operator": operator}[who])
    page = client.get(url(Device, "change", device.pk))
    assert page.status_code == 200
    [inline] = page.context["inline_admin_formsets"]
    assert inline.opts.model is DdiTarget
    assert not inline.has_add_permission and not inline.has_change_permission
    assert not inline.has_delete_permission and inline.has_view_permission
    prefix = DdiTarget.objects.get(device=device).token_prefix
    assert prefix in page.content.decode()


def test_operator_uses_the_action(fleet: Fleet, operator: User) -> None:
    client = Client()
    client.force_login(operator)
    [message] = messages_of(issue(client, fleet.devices[1]))
    [token] = TOKEN.findall(message)
    assert polls(fleet.devices[1].hardware_id, token)
    [issued] = events(EventKind.DEVICE_TARGET_TOKEN_ISSUED)
    assert issued.actor == "user:olivia"


def test_a_viewer_cannot_use_the_action(fleet: Fleet, viewer: User) -> None:
    client = Client()
    client.force_login(viewer)
    reply = issue(client, fleet.devices[1])
    assert reply.status_code == 200
    assert not any(TOKEN.search(m) for m in messages_of(reply))
    assert not DdiTarget.objects.exists()
