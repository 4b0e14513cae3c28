"""ServerClient against a scripted server: tokens, enrollment, errors, Retry-After, redirects."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from requests.adapters import BaseAdapter

from ota_client.api import Offline, Refused, ServerClient, clock_offset
from ota_client.config import Config

Reply = tuple[int, Mapping[str, str], Any]


@dataclass
class Scripted(BaseAdapter):
    """A requests transport that answers from a function and records every request."""

    answer: Callable[[requests.PreparedRequest], Reply]
    seen: list[requests.PreparedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.seen.append(request)
        status, headers, body = self.answer(request)
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        response._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response.request = request
        response.url = str(request.url)
        return response

    def close(self) -> None:
        pass

    def paths(self) -> list[str]:
        return [f"{r.method} {urlsplit(str(r.url)).path}" for r in self.seen]


def client(
    tmp_path: Path, answer: Callable[[requests.PreparedRequest], Reply], **overrides: Any
) -> tuple[ServerClient, Scripted]:
    values: dict[str, Any] = {
        "server": "http://ota.test",
        "device_type": "board",
        "hardware_id": "hw-1",
        "state_dir": tmp_path / "state",
        "current_version": "1.0.0",
        "enrollment_token": "ota_enroll_x_y",
    }
    values.update(overrides)
    config = Config(**values).with_overrides()
    transport = Scripted(answer)
    session = requests.Session()
    session.mount("http://", transport)
    return ServerClient(config, session=session), transport


def registered(secret: str = "s1", token: str = "t1") -> Reply:
    body = {
        "device_id": "dev-1",
        "device_secret": secret,
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 900,
    }
    return 201, {}, body


def test_enrollment_stores_credentials_privately(tmp_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            sent = json.loads(request.body or b"{}")
            assert sent["hardware_id"] == "hw-1" and sent["current_version"] == "1.0.0"
            return registered()
        assert request.headers["Authorization"] == "Bearer t1"
        return 200, {}, {"update_available": False, "reason": "up_to_date", "poll_interval": 60}

    server, transport = client(tmp_path, answer)
    assert server.check()["reason"] == "up_to_date"
    path = tmp_path / "state" / "credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["device_secret"] == "s1"
    assert transport.paths() == ["POST /api/v1/devices/register", "GET /api/v1/updates/check"]


def test_an_expired_token_is_replaced(tmp_path: Path) -> None:
    tokens = iter(["t2"])

    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return registered()
        if request.path_url == "/api/v1/devices/token":
            assert json.loads(request.body or b"{}") == {"device_id": "dev-1", "secret": "s1"}
            return 200, {}, {"access_token": next(tokens), "expires_in": 900}
        if request.headers["Authorization"] == "Bearer t1":
            return 401, {}, {"code": "token_expired", "detail": "expired"}
        return 200, {}, {"update_available": False}

    server, transport = client(tmp_path, answer)
    assert server.check() == {"update_available": False}
    assert transport.paths()[1:] == [
        "GET /api/v1/updates/check",
        "POST /api/v1/devices/token",
        "GET /api/v1/updates/check",
    ]


def test_credentials_reset_enrolls_again_with_the_token(tmp_path: Path) -> None:
    registrations = iter([registered("s1", "t1"), registered("s2", "t2")])

    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return next(registrations)
        if request.headers["Authorization"] == "Bearer t1":
            return 401, {}, {"code": "credentials_reset", "detail": "enroll again"}
        return 200, {}, {"update_available": False}

    server, _ = client(tmp_path, answer)
    assert server.check() == {"update_available": False}
    stored = json.loads((tmp_path / "state" / "credentials.json").read_text())
    assert stored["device_secret"] == "s2"


def test_credentials_reset_without_an_enrollment_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "credentials.json").write_text(
        json.dumps({"device_id": "dev-1", "device_secret": "s1"})
    )

    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/token":
            return 200, {}, {"access_token": "t1", "expires_in": 900}
        return 401, {}, {"code": "credentials_reset", "detail": "enroll again"}

    server, _ = client(tmp_path, answer, enrollment_token=None)
    with pytest.raises(Refused) as caught:
        server.check()
    assert caught.value.code == "credentials_reset" and caught.value.status == 401


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [
        # Longer than the client waits in line (60 s): left to the agent, not slept here.
        (429, {"Retry-After": "120"}, 120.0),
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past
        (503, {}, None),
        (500, {}, None),
        (502, {}, None),
    ],
)
def test_server_trouble_is_offline_with_retry_after(
    tmp_path: Path, status: int, headers: dict[str, str], retry_after: float | None
) -> None:
    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return registered()
        return status, headers, b"<html>busy</html>"

    server, _ = client(tmp_path, answer)
    with pytest.raises(Offline) as caught:
        server.check()
    assert caught.value.retry_after == retry_after


def test_connection_errors_are_offline(tmp_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> Reply:
        raise requests.ConnectionError("refused")

    server, _ = client(tmp_path, answer)
    with pytest.raises(Offline, match="ConnectionError"):
        server.check()


def test_client_errors_are_refused_with_the_servers_code(tmp_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return registered()
        return 404, {}, {"code": "session_not_found", "detail": "No such update session."}

    server, _ = client(tmp_path, answer)
    with pytest.raises(Refused) as caught:
        server.report_status({"session_id": "x", "status": "downloading"})
    assert (caught.value.status, caught.value.code) == (404, "session_not_found")


def test_a_download_redirect_elsewhere_carries_no_token(tmp_path: Path) -> None:
    def answer(request: requests.PreparedRequest) -> Reply:
        if request.path_url == "/api/v1/devices/register":
            return registered()
        if str(request.url).startswith("http://ota.test/"):
            assert request.headers["Authorization"] == "Bearer t1"
            return 302, {"Location": "http://storage.test/bucket/image?sig=abc"}, b""
        assert "Authorization" not in request.headers
        assert request.headers["Range"] == "bytes=10-"
        return 206, {"Content-Range": "bytes 10-19/20"}, b"0123456789"

    server, transport = client(tmp_path, answer)
    response = server.open_download(
        "http://ota.test/api/v1/firmware/f/download", {"Range": "bytes=10-"}
    )
    assert response.status_code == 206
    assert [str(r.url) for r in transport.seen][-1] == "http://storage.test/bucket/image?sig=abc"


@pytest.mark.parametrize("header", ["", "yesterday", "Sat, 28 Nov 2026 10:00:00"])
def test_no_clock_offset_without_an_http_date(header: str) -> None:
    assert clock_offset(header) is None  # the last one has no zone: not an HTTP date


@pytest.mark.parametrize("offset", [-3 * 86400, 3600])
def test_the_clock_offset_is_read_from_the_date_header(offset: float) -> None:
    # The header is made here, not in the parameters: xdist workers must collect the same ids.
    header = formatdate(time.time() + offset, usegmt=True)
    assert clock_offset(header) == pytest.approx(offset, abs=2)
