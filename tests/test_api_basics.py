"""Health, the OpenAPI schema, and the error shape for requests no view answers."""

from __future__ import annotations

from django.test import Client
from drf_spectacular.generators import SchemaGenerator


def test_health_reports_the_database(client: Client, db) -> None:
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "database": "ok"}
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
