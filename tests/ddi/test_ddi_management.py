"""Operators manage hawkBit DDI devices and their target tokens through /api/v1/.

POST /devices/ddi provisions a device with a token, POST and DELETE /devices/{id}/target-token
replace and revoke it, POST /devices/{id}/ddi-attributes asks the device for its attributes. The
token is shown once, stored as a hash, audited by prefix only, and is what the DDI poll accepts.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from devices import certificates, ddi
from devices.models import DdiTarget, Device
from devices.services import hash_secret
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor
from tests.factories import DeviceFactory, DeviceGroupFactory

pytestmark = pytest.mark.django_db

PROVISION = "/api/v1/devices/ddi"


def token_url(device_id: Any) -> str:
    return f"/api/v1/devices/{device_id}/target-token"


def attributes_url(device_id: Any) -> str:
    return f"/api/v1/devices/{device_id}/ddi-attributes"


def poll(controller_id: str, token: str) -> Any:
    """The DDI poll a client such as SWUpdate makes with its target token."""
    return APIClient().get(
        f"/{settings.DDI_TENANT}/controller/v1/{controller_id}",
        HTTP_AUTHORIZATION=f"TargetToken {token}",
    )


def links_of(reply: Any) -> dict[str, Any]:
    assert reply.status_code == 200
    links: dict[str, Any] = json.loads(reply.content).get("_links", {})  # application/hal+json
    return links


def provision(client: APIClient, **fields: Any) -> Any:
    body = {"controller_id": "swu-001", "device_type": "board-a", **fields}
    return client.post(PROVISION, body, format="json")


def events_of(kind: EventKind, device_id: Any) -> list[Event]:
    return list(Event.objects.filter(kind=kind, device_id=device_id).order_by("id"))


def assert_stored_hashed(device_id: Any, token: str) -> None:
    target = DdiTarget.objects.get(device_id=device_id)
    assert target.token_hash == hash_secret(token) != token
    assert target.token_prefix == token[:8]
    # The audit log names the token by its prefix only.
    logged = json.dumps(list(Event.objects.values("data", "changes")))
    assert token not in logged


# --- Provisioning ---------------------------------------------------------------------------------


def test_provisioning_creates_the_device_and_shows_its_token_once(
    operator_api: APIClient,
) -> None:
    group = DeviceGroupFactory.create(name="lab")
    reply = provision(
        operator_api, current_version="1.0.0", group=str(group.id), metadata={"site": "plant-1"}
    )
    assert reply.status_code == 201, reply.json()
    body = reply.json()
    token = body["target_token"]
    assert len(token) >= 32
    assert body["tenant"] == settings.DDI_TENANT
    assert body["controller_id"] == "swu-001"
    shown = body["device"]
    assert shown["hardware_id"] == "swu-001" and shown["device_type"] == "board-a"
    assert shown["current_version"] == "1.0.0" and shown["group"] == str(group.id)
    assert shown["metadata"] == {"site": "plant-1"}
    assert shown["ddi"]["token_prefix"] == token[:8]
    assert shown["ddi"]["token_created_at"] is not None

    device = Device.objects.get(hardware_id="swu-001")
    assert device.group == group and device.current_version == "1.0.0"
    assert_stored_hashed(device.id, token)
    # Reading the device again shows the prefix, never the token.
    again = operator_api.get(f"/api/v1/devices/{device.id}")
    assert again.status_code == 200
    assert token not in again.content.decode()
    assert again.json()["ddi"]["token_prefix"] == token[:8]

    assert poll("swu-001", token).status_code == 200


def test_provisioning_is_audited(operator_api: APIClient) -> None:
    reply = provision(operator_api)
    device_id = reply.json()["device"]["id"]
    [registered] = events_of(EventKind.DEVICE_REGISTERED, device_id)
    assert registered.actor == "user:olivia"
    assert registered.data == {"how": "provisioned_ddi", "hardware_id": "swu-001"}
    [issued] = events_of(EventKind.DEVICE_TARGET_TOKEN_ISSUED, device_id)
    assert issued.actor == "user:olivia"
    assert issued.data == {"token_prefix": reply.json()["target_token"][:8]}


def test_the_token_polls_as_that_device_only(operator_api: APIClient) -> None:
    token = provision(operator_api).json()["target_token"]
    other = provision(operator_api, controller_id="swu-002").json()["target_token"]
    reply = poll("swu-001", token)
    assert reply.status_code == 200
    assert "sleep" in json.loads(reply.content)["config"]["polling"]
    assert poll("swu-001", other).status_code == 401
    assert poll("swu-002", token).status_code == 401


@pytest.mark.parametrize("taken", ["swu-001", "device-a"])
def test_a_taken_controller_id_is_a_409(
    operator_api: APIClient, device_a: DeviceActor, taken: str
) -> None:
    provision(operator_api)
    before = Device.objects.count()
    reply = provision(operator_api, controller_id=taken)
    assert reply.status_code == 409
    assert reply.json()["code"] == "device_exists"
    assert Device.objects.count() == before
    # The existing device keeps what it had: device A gets no token by this.
    assert not DdiTarget.objects.filter(device=device_a.device).exists()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"controller_id": "a/b"}, "controller_id"),
        ({"controller_id": ""}, "controller_id"),
        ({"controller_id": "x" * 129}, "controller_id"),
        ({"controller_id": "-starts-with-a-dash"}, "controller_id"),
        ({"device_type": None}, "device_type"),
        ({"device_type": "no spaces"}, "device_type"),
        ({"current_version": "not a version"}, "current_version"),
        ({"group": str(uuid.UUID(int=7))}, "group"),
        ({"group": "not-a-uuid"}, "group"),
        ({"metadata": [1, 2]}, "metadata"),
        ({"metadata": {"bad key!": 1}}, "metadata"),
    ],
)
def test_bad_input_is_a_400(operator_api: APIClient, fields: dict[str, Any], field: str) -> None:
    body = {"controller_id": "swu-001", "device_type": "board-a", **fields}
    body = {key: value for key, value in body.items() if value is not None}
    reply = operator_api.post(PROVISION, body, format="json")
    assert reply.status_code == 400
    error = reply.json()
    assert error["code"] == "invalid" and error["detail"]
    assert field in error["errors"]
    assert not Device.objects.exists()
    assert not Event.objects.filter(kind=EventKind.DEVICE_REGISTERED).exists()


def test_a_body_that_is_not_an_object_is_a_400(operator_api: APIClient) -> None:
    reply = operator_api.post(PROVISION, [1, 2], format="json")
    assert reply.status_code == 400 and reply.json()["code"] == "invalid"


def test_an_api_key_may_provision(db: Any) -> None:
    from ota_site import apikeys
    from ota_site.permissions import Role

    key, secret = apikeys.create_api_key(name="ci", role=Role.OPERATOR)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"ApiKey {secret}")
    reply = provision(client)
    assert reply.status_code == 201
    [issued] = events_of(EventKind.DEVICE_TARGET_TOKEN_ISSUED, reply.json()["device"]["id"])
    assert issued.actor == f"key:{key.prefix}"


# --- Who may ------------------------------------------------------------------------------------


def test_viewers_devices_and_strangers_are_refused(
    viewer: Any, device_a: DeviceActor, api: APIClient
) -> None:
    watcher = APIClient()
    watcher.force_login(viewer)
    target = DeviceFactory.create(hardware_id="swu-009")
    token = ddi.issue_target_token(target)
    calls = [
        ("post", PROVISION),
        ("post", token_url(target.id)),
        ("delete", token_url(target.id)),
        ("post", attributes_url(target.id)),
        # A device may not give itself a token either.
        ("post", token_url(device_a.id)),
    ]
    for client, allowed_codes in (
        (watcher, {403}),
        (device_a.client, {401, 403}),
        (api, {401, 403}),
    ):
        for method, path in calls:
            reply = getattr(client, method)(path, {}, format="json")
            assert reply.status_code in allowed_codes, (method, path, reply.status_code)
            assert reply.json()["code"] and reply.json()["detail"]
    assert Device.objects.count() == 2
    assert poll("swu-009", token).status_code == 200  # nothing was replaced or revoked
    assert not DdiTarget.objects.filter(device=device_a.device).exists()


# --- Replacing and revoking the token -------------------------------------------------------------


def test_a_new_token_replaces_the_old_one(operator_api: APIClient) -> None:
    first = provision(operator_api).json()
    device_id = first["device"]["id"]
    reply = operator_api.post(token_url(device_id))
    assert reply.status_code == 201
    body = reply.json()
    assert set(body) == {"target_token", "token_prefix", "controller_id", "tenant"}
    assert body["token_prefix"] == body["target_token"][:8]
    assert body["controller_id"] == "swu-001" and body["tenant"] == settings.DDI_TENANT
    assert body["target_token"] != first["target_token"]
    assert_stored_hashed(device_id, body["target_token"])

    assert poll("swu-001", first["target_token"]).status_code == 401
    assert poll("swu-001", body["target_token"]).status_code == 200
    issued = events_of(EventKind.DEVICE_TARGET_TOKEN_ISSUED, device_id)
    assert [e.data["token_prefix"] for e in issued] == [
        first["target_token"][:8],
        body["target_token"][:8],
    ]


def test_any_device_can_be_given_a_token(operator_api: APIClient, device_a: DeviceActor) -> None:
    before = operator_api.get(f"/api/v1/devices/{device_a.id}").json()
    assert before["ddi"] is None
    reply = operator_api.post(token_url(device_a.id))
    assert reply.status_code == 201
    token = reply.json()["target_token"]
    assert reply.json()["controller_id"] == "device-a"
    assert poll("device-a", token).status_code == 200
    after = operator_api.get(f"/api/v1/devices/{device_a.id}").json()
    assert after["ddi"]["token_prefix"] == token[:8]


def test_a_revoked_device_gets_no_token(operator_api: APIClient, device_a: DeviceActor) -> None:
    certificates.revoke_device(device_a.device, reason="stolen")
    reply = operator_api.post(token_url(device_a.id))
    assert reply.status_code == 409
    assert reply.json()["code"] == "device_revoked"
    assert not DdiTarget.objects.filter(device=device_a.device).exists()
    assert not events_of(EventKind.DEVICE_TARGET_TOKEN_ISSUED, device_a.id)


def test_revoking_the_token(operator_api: APIClient) -> None:
    created = provision(operator_api).json()
    device_id = created["device"]["id"]
    reply = operator_api.delete(token_url(device_id))
    assert reply.status_code == 204
    assert poll("swu-001", created["target_token"]).status_code == 401
    target = DdiTarget.objects.get(device_id=device_id)
    assert target.token_hash == "" and target.token_prefix == ""
    [revoked] = events_of(EventKind.DEVICE_TARGET_TOKEN_REVOKED, device_id)
    assert revoked.actor == "user:olivia"
    shown = operator_api.get(f"/api/v1/devices/{device_id}").json()["ddi"]
    assert shown["token_prefix"] is None and shown["token_created_at"] is None

    again = operator_api.delete(token_url(device_id))
    assert again.status_code == 404
    assert again.json()["code"] == "no_target_token"
    assert len(events_of(EventKind.DEVICE_TARGET_TOKEN_REVOKED, device_id)) == 1


def test_revoking_a_token_that_never_was_is_a_404(
    operator_api: APIClient, device_a: DeviceActor
) -> None:
    reply = operator_api.delete(token_url(device_a.id))
    assert reply.status_code == 404
    assert reply.json()["code"] == "no_target_token"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", token_url(uuid.UUID(int=1))),
        ("delete", token_url(uuid.UUID(int=1))),
        ("post", attributes_url(uuid.UUID(int=1))),
    ],
)
def test_an_unknown_device_is_a_404(operator_api: APIClient, method: str, path: str) -> None:
    reply = getattr(operator_api, method)(path)
    assert reply.status_code == 404
    assert reply.json()["code"] == "not_found"


# --- Attributes -----------------------------------------------------------------------------------


def test_asking_for_attributes(operator_api: APIClient) -> None:
    created = provision(operator_api).json()
    device_id = created["device"]["id"]
    ddi.update_attributes(Device.objects.get(pk=device_id), {"board": "rev-b"})
    assert not DdiTarget.objects.get(device_id=device_id).attributes_requested
    assert "configData" not in links_of(poll("swu-001", created["target_token"]))

    reply = operator_api.post(attributes_url(device_id))
    assert reply.status_code == 202
    assert reply.json()["id"] == device_id
    assert reply.json()["ddi"]["attributes_requested"] is True
    assert reply.json()["ddi"]["attributes_updated_at"] is not None
    assert DdiTarget.objects.get(device_id=device_id).attributes_requested
    [asked] = [
        e
        for e in events_of(EventKind.DEVICE_UPDATED, device_id)
        if e.data == {"ddi": "attributes_requested"}
    ]
    assert asked.actor == "user:olivia"
    links = links_of(poll("swu-001", created["target_token"]))
    assert links["configData"]["href"].endswith("/swu-001/configData")


# --- The device record ----------------------------------------------------------------------------


def test_the_device_list_shows_ddi_without_a_query_per_row(
    operator_api: APIClient, device_a: DeviceActor
) -> None:
    def listing() -> tuple[int, list[dict[str, Any]]]:
        with CaptureQueriesContext(connection) as queries:
            reply = operator_api.get("/api/v1/devices", {"ordering": "hardware_id"})
        assert reply.status_code == 200
        return len(queries), reply.json()["results"]

    provision(operator_api)
    before, rows = listing()
    assert {row["hardware_id"]: row["ddi"] is not None for row in rows} == {
        "device-a": False,
        "swu-001": True,
    }
    ddi_row = next(row for row in rows if row["hardware_id"] == "swu-001")
    assert set(ddi_row["ddi"]) == {
        "token_prefix",
        "token_created_at",
        "attributes_requested",
        "attributes_updated_at",
    }
    for i in range(5):
        provision(operator_api, controller_id=f"swu-1{i}")
    after, rows = listing()
    assert len(rows) == 7
    assert after == before


def test_deleting_the_device_takes_its_target(admin_api: APIClient) -> None:
    created = provision(admin_api).json()
    device_id = created["device"]["id"]
    assert admin_api.delete(f"/api/v1/devices/{device_id}").status_code == 204
    assert not DdiTarget.objects.filter(device_id=device_id).exists()
    assert poll("swu-001", created["target_token"]).status_code == 401
