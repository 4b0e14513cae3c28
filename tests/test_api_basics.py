"""Health, the OpenAPI schema, and the error shape for requests no view answers."""

from __future__ import annotations

import pytest
from django.db import InterfaceError, OperationalError
from django.test import Client
from drf_spectacular.generators import SchemaGenerator

from rollouts import poll


def test_health_answers_liveness(client: Client, db) -> None:
    # Readiness (the database and the rest) is /health/ready: tests/test_observability.py.
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}
    assert client.post("/health").status_code == 405


def test_unknown_api_paths_are_json_404(client: Client, db) -> None:
    reply = client.get("/api/v1/does-not-exist")
    assert reply.status_code == 404 and reply.json()["code"] == "not_found"
    assert client.get("/api/v1/devices/not-a-uuid").status_code == 404


def test_wrong_methods_are_405_json(operator_api, db) -> None:
    reply = operator_api.delete("/api/v1/firmware")
    assert reply.status_code == 405 and reply.json()["code"] == "method_not_allowed"


def test_the_schema_describes_every_endpoint_without_warnings(client: Client, db, capsys) -> None:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    paths = set(schema["paths"])
    for path in (
        "/api/v1/devices",
        "/api/v1/devices/register",
        "/api/v1/devices/token",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/updates",
        "/api/v1/devices/{device_id}/status",
        "/api/v1/devices/{device_id}/heartbeat",
        "/api/v1/updates/check",
        "/api/v1/status",
        "/api/v1/validation",
        "/api/v1/firmware",
        "/api/v1/firmware/{firmware_id}",
        "/api/v1/firmware/{firmware_id}/publish",
        "/api/v1/firmware/{firmware_id}/download",
    ):
        assert path in paths
    assert "Warning" not in capsys.readouterr().err
    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/docs/").status_code == 200


def test_an_oversized_json_body_is_413_before_it_is_read(device_a) -> None:
    body = '{"session_id": "' + "x" * (2 * 1024 * 1024) + '"}'
    reply = device_a.client.generic("POST", "/api/v1/status", body, content_type="application/json")
    assert reply.status_code == 413 and reply.json()["code"] == "payload_too_large"


def test_a_malformed_content_length_is_400(device_a) -> None:
    reply = device_a.client.generic(
        "POST", "/api/v1/status", "{}", content_type="application/json", CONTENT_LENGTH="ten"
    )
    assert reply.status_code == 400


def test_s3_mode_redirects_downloads_to_a_short_lived_signed_url(
    settings, device_a, published
) -> None:
    """Presigning is computed locally by botocore: no S3 service is contacted."""
    from urllib.parse import parse_qs, urlparse

    settings.STORAGE = "s3"
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": "firmware",
                "endpoint_url": "http://127.0.0.1:9",
                "access_key": "test-access",
                "secret_key": "test-secret",
                "querystring_expire": 300,
                "region_name": "us-east-1",
                "signature_version": "s3v4",
            },
        },
    }
    url = f"/api/v1/firmware/{published.id}/download"
    reply = device_a.client.get(url)
    assert reply.status_code == 302
    location = urlparse(reply["Location"])
    query = parse_qs(location.query)
    assert location.path.endswith(published.file.name)
    assert query["X-Amz-Expires"] == ["300"] and "X-Amz-Signature" in query
    # HEAD is answered from the database: size and ETag without touching storage.
    head = device_a.client.head(url)
    assert head.status_code == 200 and head["Content-Length"] == str(published.file_size)


@pytest.mark.parametrize("fault", [OperationalError, InterfaceError])
def test_a_database_that_is_away_is_503_with_retry_after(device_a, monkeypatch, fault) -> None:
    """No health check per request (a round trip each): a connection broken by a restart fails
    one request, which the client is told to retry, with no traceback."""

    def broken(device_id):
        raise fault("server closed the connection unexpectedly")

    monkeypatch.setattr(poll, "read_device", broken)
    device_a.client.raise_request_exception = False
    reply = device_a.client.get("/api/v1/updates/check")
    assert reply.status_code == 503
    assert reply["Retry-After"] == "5"
    assert reply.json() == {
        "code": "unavailable",
        "detail": "The service is temporarily unavailable; retry later.",
    }


def test_the_console_says_503_too_when_the_database_is_away(operator, monkeypatch) -> None:
    from django.contrib.auth import middleware

    def broken(request):
        raise OperationalError("connection refused")

    client = Client(raise_request_exception=False)
    client.force_login(operator)
    monkeypatch.setattr(middleware.auth, "get_user", broken)  # type: ignore[attr-defined]
    reply = client.get("/console/")
    assert reply.status_code == 503 and reply["Retry-After"] == "5"
    assert b"Traceback" not in reply.content
