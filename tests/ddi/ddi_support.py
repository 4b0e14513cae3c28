"""A DDI device as its client sees the server, for the DDI tests (test_ddi_protocol.py,
test_ddi_feedback.py, test_ddi_auth.py) and the download tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.test import Client

from devices import ddi
from devices.models import Device
from rollouts.models import UpdateSession

TENANT = "DEFAULT"


@dataclass
class Target:
    """A DDI device as its client sees the server: its controllerId, token and HTTP client."""

    device: Device
    token: str
    client: Client

    @property
    def base(self) -> str:
        return f"/{TENANT}/controller/v1/{self.device.hardware_id}"

    def get(self, path: str = "", **extra: Any) -> Any:
        return self.client.get(self.base + path, **extra)

    def send(self, method: str, path: str, body: Any, **extra: Any) -> Any:
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        call = getattr(self.client, method)
        return call(self.base + path, data, content_type="application/json", **extra)

    def poll(self) -> dict[str, Any]:
        reply = self.client.get(self.base)
        assert reply.status_code == 200, reply.content
        body: dict[str, Any] = reply.json()
        return body

    def links(self) -> dict[str, Any]:
        links: dict[str, Any] = self.poll().get("_links", {})
        return links

    def offered(self) -> int:
        """Poll; the action id of the deploymentBase link (which must be there)."""
        links = self.links()
        assert "deploymentBase" in links, links
        return action_of(links["deploymentBase"]["href"], "deploymentBase")

    def action(self, action_id: int) -> dict[str, Any]:
        reply = self.get(f"/deploymentBase/{action_id}")
        assert reply.status_code == 200, reply.content
        body: dict[str, Any] = reply.json()
        return body

    def feedback(self, action_id: int, body: Any, *, on: str = "deploymentBase") -> Any:
        return self.send("post", f"/{on}/{action_id}/feedback", body)

    def refresh(self) -> Device:
        self.device.refresh_from_db()
        return self.device


def provision(controller_id: str, version: str = "1.0.0", **fields: Any) -> Target:
    device, token = ddi.provision_device(
        controller_id=controller_id, device_type="board-a", current_version=version, **fields
    )
    return Target(device, token, Client(headers={"authorization": f"TargetToken {token}"}))


def action_of(href: str, kind: str) -> int:
    """The action id in a link; the path is absolute, any query (deploymentBase's ?c=) aside."""
    parts = urlsplit(href)
    assert (parts.scheme, parts.netloc) == ("http", "testserver"), href
    match = re.fullmatch(rf"/{TENANT}/controller/v1/[^/]+/{kind}/(\d+)", parts.path)
    assert match is not None, href
    return int(match.group(1))


def report(execution: str, finished: str = "none", **status: Any) -> dict[str, Any]:
    """A feedback body as SWUpdate sends it."""
    return {
        "id": "0",
        "time": "20261127T163911",
        "status": {"execution": execution, "result": {"finished": finished}, **status},
    }


def session_of(action_id: int) -> UpdateSession:
    return UpdateSession.objects.select_related("firmware").get(pk=action_id)


def assert_refused(reply: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.content
    assert reply["Content-Type"].startswith("application/json"), reply["Content-Type"]
    body: dict[str, Any] = reply.json()
    assert set(body) >= {"code", "detail"}, body
    if code is not None:
        assert body["code"] == code, body
    return body


def attributes_sent(target: Target) -> None:
    """The device answers the configData link, as real clients do on their first poll."""
    assert target.send("put", "/configData", {"data": {"hwRevision": "2"}}).status_code == 200
