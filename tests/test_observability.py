"""Health, readiness, /metrics, JSON logs and the shipped alert rules (docs/observability.md).

In-process, with Django's test client on the real database and Redis. The gunicorn multiprocess
check, the worker heartbeat, JSON logs of a real server and OpenTelemetry export are in
tests/test_metrics_live.py.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from devices import ddi
from devices import services as device_services
from firmware import services as firmware_services
from firmware.models import Firmware
from metrics.prometheus import CACHE_KEY as METRICS_CACHE_KEY
from metrics.prometheus import MAX_VERSION_SERIES, _capped
from ota_site.context import RequestContext, bound
from ota_site.logging import ContextFilter, JsonFormatter
from ota_site.observability import HEARTBEAT_KEY, route_of
from ota_site.tasks import worker_heartbeat
from rollouts import lifecycle
from tests.conftest import DeviceActor
from tests.factories import FirmwareFactory
from tests.rollouts_support import evaluate, fleet, run_device, started

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "ota_site" / "deploy" / "prometheus"


def sample(name: str, **labels: str) -> float:
    """This process's own value of a sample (other xdist workers share the metric files)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(client: Client, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = client.get("/metrics", headers=headers)
    assert reply.status_code == 200, reply.content
    assert reply["Content-Type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.content.decode())
        for s in family.samples
    }


# --- Health --------------------------------------------------------------------------------------


def test_health_is_liveness_and_asks_nothing(client: Client, db, django_assert_num_queries) -> None:
    with django_assert_num_queries(0):
        reply = client.get("/health")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    assert client.post("/health").status_code == 405


def test_ready_lists_every_check_with_its_time(client: Client, db) -> None:
    worker_heartbeat()  # what beat's task does in a worker
    reply = client.get("/health/ready")
    assert reply.status_code == 200, reply.content
    body = reply.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "storage", "worker"}
    for check in body["checks"].values():
        assert check["ok"] is True and 0 <= check["ms"] < 2000
    assert body["checks"]["storage"]["backend"] == "local"
    assert 0 <= body["checks"]["worker"]["age"] < 5
    assert reply["Cache-Control"].startswith("max-age=0")


def test_ready_is_503_without_a_worker_heartbeat(client: Client, db) -> None:
    reply = client.get("/health/ready")
    assert reply.status_code == 503 and reply["Retry-After"] == "5"
    body = reply.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["worker"] == {"ok": False, "error": "no worker heartbeat yet"}
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]


def test_a_stale_heartbeat_fails_after_the_max_age(client: Client, db, settings) -> None:
    cache.set(HEARTBEAT_KEY, time.time() - 300, 3600)
    worker = client.get("/health/ready").json()["checks"]["worker"]
    assert worker == {"ok": False, "error": "last heartbeat 300 s ago"}
    settings.WORKER_HEARTBEAT_MAX_AGE = 600
    assert client.get("/health/ready").status_code == 200


def test_check_selects_checks_and_refuses_unknown_ones(client: Client, db) -> None:
    # What a Kubernetes readiness probe uses: a dead worker must not take the web tier away.
    reply = client.get("/health/ready?check=database,storage")
    assert reply.status_code == 200 and set(reply.json()["checks"]) == {"database", "storage"}
    reply = client.get("/health/ready?check=database&check=worker")
    assert set(reply.json()["checks"]) == {"database", "worker"}
    reply = client.get("/health/ready?check=database,disk")
    assert reply.status_code == 400
    assert reply.json()["code"] == "invalid_check" and "disk" in reply.json()["detail"]


def test_a_black_holed_redis_is_a_quick_503(client: Client, db, settings) -> None:
    # A socket that accepts connections and never answers: PING waits for its deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings.REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings.HEALTH_CHECK_TIMEOUT = 0.3
        start = time.monotonic()
        reply = client.get("/health/ready?check=redis,database")
        elapsed = time.monotonic() - start
    assert reply.status_code == 503
    assert reply.json()["checks"]["redis"]["ok"] is False
    assert reply.json()["checks"]["redis"]["error"] in {"timeout", "TimeoutError"}
    assert reply.json()["checks"]["database"]["ok"] is True
    assert elapsed < 1.5


def test_an_unusable_storage_folder_fails_the_storage_check(
    client: Client, db, settings, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "media"
    not_a_folder.write_text("a file where the firmware folder should be")
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(not_a_folder / "firmware")},
        },
    }
    storage = client.get("/health/ready?check=storage").json()["checks"]["storage"]
    assert storage == {"ok": False, "error": f"{not_a_folder} is not a writable folder"}


# --- /metrics ------------------------------------------------------------------------------------


def test_update_checks_are_counted_by_protocol_and_result(
    client: Client, device_a: DeviceActor, published: Firmware
) -> None:
    keys = [(p, r) for p in ("api", "ddi") for r in ("offered", "none", "error")]
    before = {
        key: sample("ota_update_checks_total", protocol=key[0], result=key[1]) for key in keys
    }
    device_services.update_device(device_a.refresh(), target_version="1.1.0")
    assert device_a.client.get("/api/v1/updates/check").json()["update_available"] is True
    # A DDI device already on the newest version: nothing to offer.
    _, token = ddi.provision_device(
        controller_id="ddi-metrics", device_type="board-a", current_version="1.1.0"
    )
    ddi_client = Client(headers={"authorization": f"TargetToken {token}"})
    assert ddi_client.get("/DEFAULT/controller/v1/ddi-metrics").status_code == 200
    # A token from before a credential reset: the check refuses, which counts as an error.
    device_services.reset_credentials(device_a.device)
    assert device_a.client.get(f"/api/v1/devices/{device_a.id}/updates").status_code == 401
    after = {key: sample("ota_update_checks_total", protocol=key[0], result=key[1]) for key in keys}
    added = {key: after[key] - before[key] for key in keys if after[key] != before[key]}
    assert added == {("api", "offered"): 1, ("ddi", "none"): 1, ("api", "error"): 1}
    scraped = scrape(client)
    assert scraped[("ota_update_checks_total", (("protocol", "api"), ("result", "offered")))] >= 1


def test_latency_is_labelled_by_route_never_by_path(
    client: Client, device_a: DeviceActor, settings
) -> None:
    key = {"route": "device-updates", "method": "GET", "status": "2xx"}
    before = sample("ota_http_request_duration_seconds_count", **key)
    device_a.client.get(f"/api/v1/devices/{device_a.id}/updates")
    assert sample("ota_http_request_duration_seconds_count", **key) == before + 1
    client.get("/no/such/page")
    client.generic("BREW", "/health")
    routes = {
        dict(labels)["route"]
        for (name, labels) in scrape(client)
        if name == "ota_http_request_duration_seconds_count"
    }
    assert {"device-updates", "unmatched", "health"} <= routes
    assert not any(str(device_a.id) in route or "/" in route for route in routes), routes
    assert sample(
        "ota_http_request_duration_seconds_count", route="health", method="other", status="4xx"
    )


def test_a_rate_limited_request_keeps_its_route(device_a: DeviceActor, settings) -> None:
    settings.RATE_LIMIT_DEVICE = "1/min"
    key = {"route": "updates-check", "method": "GET", "status": "4xx"}
    before = sample("ota_http_request_duration_seconds_count", **key)
    device_a.client.get("/api/v1/updates/check")
    assert device_a.client.get("/api/v1/updates/check").status_code == 429
    assert sample("ota_http_request_duration_seconds_count", **key) == before + 1


def test_route_of_answers_before_resolution_too(rf) -> None:
    assert route_of(rf.get("/api/v1/updates/check")) == "updates-check"
    assert route_of(rf.get("/DEFAULT/controller/v1/some-device")) == "ddi:poll"
    assert route_of(rf.get("/static/console/console.css")) == "static"
    assert route_of(rf.get("/definitely/not/here")) == "unmatched"


def test_database_gauges_count_sessions_rollouts_and_the_fleet(
    client: Client, v2: Firmware, admin_user: User
) -> None:
    devices = fleet(6)
    # The engine pauses one rollout (failures past its threshold, no auto-rollback) ...
    by_engine = started(v2, 100, min_devices=5, rollback_threshold=0.1, auto_rollback=False)
    for i, device in enumerate(devices):
        run_device(device, "failed" if i % 2 else "success")
    assert evaluate(by_engine) == "paused"
    # ... and an operator another, of another device type.
    other = firmware_services.publish_firmware(
        FirmwareFactory.create(version="3.0.0", device_type="board-b")
    )
    lifecycle.pause_rollout(started(other, 50), actor=admin_user)

    scraped = scrape(client)
    assert scraped[("ota_database_metrics_up", ())] == 1
    assert scraped[("ota_rollouts", (("status", "paused"),))] == 2
    assert scraped[("ota_rollouts", (("status", "completed"),))] == 0
    assert scraped[("ota_rollouts_paused", (("by", "engine"),))] == 1
    assert scraped[("ota_rollouts_paused", (("by", "operator"),))] == 1
    assert scraped[("ota_update_sessions", (("status", "success"),))] == 3
    assert scraped[("ota_update_sessions", (("status", "failed"),))] == 3
    assert scraped[("ota_update_sessions", (("status", "pending"),))] == 0
    assert scraped[("ota_fleet_devices", (("device_type", "board-a"), ("version", "1.1.0")))] == 3
    assert scraped[("ota_fleet_devices", (("device_type", "board-a"), ("version", "1.0.0")))] == 3
    assert scraped[("ota_fleet_devices_online", ())] == 6
    assert scraped[("ota_worker_heartbeat_age_seconds", ())] == float("inf")
    # Cached: a new rollout shows only after METRICS_CACHE_TIMEOUT.
    lifecycle.cancel_rollout(by_engine, actor=admin_user)
    assert scrape(client)[("ota_rollouts", (("status", "paused"),))] == 2
    cache.delete(METRICS_CACHE_KEY)  # as if METRICS_CACHE_TIMEOUT had passed
    worker_heartbeat()
    scraped = scrape(client)
    assert scraped[("ota_rollouts", (("status", "paused"),))] == 1
    assert scraped[("ota_rollouts", (("status", "cancelled"),))] == 1
    assert scraped[("ota_worker_heartbeat_age_seconds", ())] < 5


def test_rare_versions_are_summed_per_device_type() -> None:
    rows = [("a", f"1.{n}", 1000 - n) for n in range(MAX_VERSION_SERIES)]
    rows += [("a", "0.1", 2), ("b", "9.9", 1), ("a", "", 1)]
    capped = _capped(rows)
    assert len(capped) == MAX_VERSION_SERIES + 2
    assert capped[-2:] == [("a", "other", 3), ("b", "other", 1)]
    assert _capped([("a", "", 4)]) == [("a", "unknown", 4)]


def test_metrics_token_is_required_when_set(client: Client, db, settings) -> None:
    settings.METRICS_TOKEN = "scrape-me-7f3a"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer ключ"}):
        reply = client.get("/metrics", headers=headers)
        assert reply.status_code == 401, headers
        assert reply.json()["code"] == "not_authenticated"
        assert reply["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert scrape(client, Authorization="Bearer scrape-me-7f3a")


# --- Logs ----------------------------------------------------------------------------------------


def json_log(logger_name: str) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(logger_name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_request_id_and_the_exception() -> None:
    logger, stream = json_log("tests.json-log")
    with bound(RequestContext(ip="192.0.2.7", request_id="req-42")):
        logger.info("device %s polled", "dev-1", extra={"route": "updates-check"})
    try:
        raise ValueError("bad bytes")
    except ValueError:
        logger.exception("upload failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "device dev-1 polled" and first["level"] == "INFO"
    assert first["logger"] == "tests.json-log" and first["request_id"] == "req-42"
    assert first["route"] == "updates-check"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert "request_id" not in second
    assert second["level"] == "ERROR" and "ValueError: bad bytes" in second["exception"]


def test_the_access_log_has_one_line_per_request(
    device_a: DeviceActor, settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings.ACCESS_LOG = True
    device_a.client.get("/health")  # probes stay out of the access log
    with caplog.at_level(logging.INFO, logger="ota.access"):
        reply = device_a.client.get("/api/v1/updates/check")
        device_a.client.get("/health")
    (line,) = [r for r in caplog.records if r.name == "ota.access"]
    assert line.getMessage().startswith("GET /api/v1/updates/check 200 ")
    fields: Any = line.__dict__
    assert fields["route"] == "updates-check" and fields["status"] == 200
    assert fields["method"] == "GET" and 0 < fields["duration_ms"] < 5000
    assert reply["X-Request-ID"]


def test_log_format_is_checked_at_start(tmp_path: Path) -> None:
    from tests.e2e import manage, server_env

    env = server_env(tmp_path, LOG_FORMAT="yaml")
    with pytest.raises(AssertionError, match=r"ota\.E080"):
        manage(env, "check")


# --- Alert rules ---------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make debian-packages)"
    for args in (
        ["check", "rules", "recording.yml", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
