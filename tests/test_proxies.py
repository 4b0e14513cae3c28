"""Forwarded headers are believed only from TRUSTED_PROXIES (ota_site.proxies)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.test import RequestFactory

from ota_site.proxies import client_ip, forwarded_header, from_trusted_proxy


def request(remote: str, forwarded: str | None = None, **headers: str) -> Any:
    meta: dict[str, str] = {"REMOTE_ADDR": remote, **headers}
    if forwarded is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().get("/api/v1/devices", **meta)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _proxies(settings: Any) -> None:
    settings.TRUSTED_PROXIES = ["10.0.0.0/8", "127.0.0.1"]


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert client_ip(request("203.0.113.9", "198.51.100.1")) == "203.0.113.9"
    assert not from_trusted_proxy(request("203.0.113.9"))


def test_the_nearest_untrusted_hop_is_the_client() -> None:
    # The client wrote "1.1.1.1" itself; nginx appended the address it saw (198.51.100.7).
    chain = "1.1.1.1, 198.51.100.7, 10.1.2.3"
    assert client_ip(request("127.0.0.1", chain)) == "198.51.100.7"


def test_a_chain_of_only_proxies_gives_its_first_address() -> None:
    assert client_ip(request("127.0.0.1", "10.0.0.5")) == "10.0.0.5"
    assert client_ip(request("127.0.0.1")) == "127.0.0.1"


def test_a_malformed_chain_falls_back_to_the_peer() -> None:
    assert client_ip(request("127.0.0.1", "not-an-ip")) == "127.0.0.1"


def test_forwarded_headers_only_through_a_trusted_proxy() -> None:
    header = {"HTTP_X_SSL_CLIENT_VERIFY": "SUCCESS"}
    assert forwarded_header(request("10.9.9.9", **header), "HTTP_X_SSL_CLIENT_VERIFY") == "SUCCESS"
    assert forwarded_header(request("192.0.2.1", **header), "HTTP_X_SSL_CLIENT_VERIFY") is None


def test_no_trusted_proxies_means_no_forwarded_headers(settings: Any) -> None:
    settings.TRUSTED_PROXIES = []
    assert client_ip(request("127.0.0.1", "198.51.100.7")) == "127.0.0.1"


def test_bad_entries_fail_the_system_check(settings: Any) -> None:
    settings.TRUSTED_PROXIES = ["10.0.0.0/8", "nginx.local"]
    ids = [message.id for message in checks.run_checks()]
    assert "ota.E012" in ids
