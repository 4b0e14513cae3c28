"""Observability of real processes: gunicorn with two workers and a Celery worker with beat, on
PostgreSQL and Redis, with LOG_FORMAT=json and OpenTelemetry on (docs/observability.md).

One server set: /health/ready turns 200 once the worker's heartbeat lands,
/metrics adds up both gunicorn workers and the Celery worker (one PROMETHEUS_MULTIPROC_DIR),
every metric the alert rules use is exported, the worker serves its own metrics port, log lines
are JSON with the request id, and spans of a request and of a task reach a local OTLP/HTTP
receiver.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e import celery_worker, free_port, fresh_database, gunicorn, manage, server_env

pytestmark = pytest.mark.e2e

RULES = Path(__file__).resolve().parent.parent / "ota_site" / "deploy" / "prometheus"
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


@dataclass
class Span:
    service: str
    name: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    """A tiny OTLP/HTTP endpoint: records the spans of every POST /v1/traces."""

    spans: list[Span] = field(default_factory=list)
    bodies: list[tuple[str, str]] = field(default_factory=list)  # (path, content type)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.bodies.append((self.path, self.headers.get("Content-Type", "")))
                if self.path == "/v1/traces":
                    receiver.record(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def record(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {
                        a.key: a.value.string_value or a.value.int_value for a in span.attributes
                    }
                    self.spans.append(Span(resource.get("service.name", ""), span.name, attributes))


@contextmanager
def otlp_receiver() -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Live:
    base: str
    env: dict[str, str]
    receiver: OtlpReceiver
    metrics_dir: Path
    worker_metrics: str

    def scrape(self, url: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        reply = requests.get(url or f"{self.base}/metrics", timeout=10)
        assert reply.status_code == 200, reply.text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text)
            for s in family.samples
        }


@contextmanager
def servers(var: Path) -> Iterator[Live]:
    worker_port = free_port()
    with otlp_receiver() as (receiver, endpoint), fresh_database() as database:
        env = server_env(
            var,
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
            CACHE_KEY_PREFIX=f"obs-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"obs-{uuid.uuid4().hex[:8]}",
            PROMETHEUS_MULTIPROC_DIR=str(var / "prometheus"),
            LOG_FORMAT="json",
            WORKER_HEARTBEAT_INTERVAL="1",
            WORKER_METRICS_PORT=str(worker_port),
            WORKER_METRICS_ADDR="127.0.0.1",
            OTEL_ENABLED="true",
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        manage(env, "migrate", "--noinput")
        with gunicorn(env, workers=2) as base, celery_worker(env):
            yield Live(
                base, env, receiver, var / "prometheus", f"http://127.0.0.1:{worker_port}/metrics"
            )


def test_observability_of_real_processes(tmp_path: Path) -> None:
    # One test over one server set: a module fixture would be set up again whenever xdist runs
    # another module's test between two of these.
    with servers(tmp_path) as live:
        ready_once_the_worker_heartbeat_lands(live)
        metrics_add_up_every_gunicorn_worker(live)
        every_metric_the_rules_use_is_exported(live)
        the_worker_serves_its_own_metrics(live)
        log_lines_are_json_with_the_request_id(live)
        spans_of_requests_and_tasks_reach_the_otlp_endpoint(live)


def ready_once_the_worker_heartbeat_lands(live: Live) -> None:
    def ready() -> dict[str, Any] | None:
        reply = requests.get(f"{live.base}/health/ready", timeout=10)
        return reply.json() if reply.status_code == 200 else None

    body = eventually(ready, "200 from /health/ready")
    assert set(body["checks"]) == {"database", "redis", "storage", "worker"}
    assert all(check["ok"] for check in body["checks"].values()), body


def metrics_add_up_every_gunicorn_worker(live: Live) -> None:
    # Concurrent requests, so that both sync workers answer some of them.
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(
            pool.map(lambda _: requests.get(f"{live.base}/api/v1/firmware", timeout=10), range(40))
        )
    assert {reply.status_code for reply in replies} == {401}
    writers = {p.name for p in live.metrics_dir.glob("histogram_*.db")}
    assert len(writers) >= 2, writers
    key = (
        "ota_http_request_duration_seconds_count",
        frozenset({"route": "firmware-list", "method": "GET", "status": "4xx"}.items()),
    )
    # Whichever worker answers the scrape reports the sum over both.
    assert {live.scrape()[key] for _ in range(6)} == {40.0}


def every_metric_the_rules_use_is_exported(live: Live) -> None:
    def exported() -> set[str] | None:
        names = {name for name, _ in live.scrape()}
        # The task counter comes from the Celery worker's own files, once a task has run.
        return names if "ota_celery_tasks_total" in names else None

    names = eventually(exported, "Celery task counter in /metrics")
    used = set()
    for rules in ("recording.yml", "alerts.yml"):
        used |= set(re.findall(r"\b(ota_[a-z0-9_]+)", (RULES / rules).read_text()))
    assert len(used) >= 6, used
    assert used <= names, used - names


def the_worker_serves_its_own_metrics(live: Live) -> None:
    key = (
        "ota_celery_tasks_total",
        frozenset({"task": "ota_site.tasks.worker_heartbeat", "state": "success"}.items()),
    )

    def heartbeats() -> float | None:
        try:
            return live.scrape(live.worker_metrics).get(key)
        except requests.ConnectionError:
            return None

    assert eventually(heartbeats, "heartbeat task count on the worker's port") >= 1


def log_lines_are_json_with_the_request_id(live: Live) -> None:
    reply = requests.get(f"{live.base}/api/v1/devices", timeout=10)
    request_id = reply.headers["X-Request-ID"]
    log = Path(live.env["OTA_VAR_DIR"]) / "gunicorn.log"

    def access_line() -> dict[str, Any] | None:
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("request_id") == request_id:
                    return dict(entry)
        return None

    entry = eventually(access_line, f"log line with request id {request_id}", timeout=10)
    assert entry["logger"] == "ota.access" and entry["level"] == "INFO"
    assert entry["route"] == "device-list" and entry["status"] == 401
    assert entry["method"] == "GET" and entry["path"] == "/api/v1/devices"
    assert entry["duration_ms"] > 0 and entry["message"].startswith("GET /api/v1/devices 401")
    # The worker logs JSON too, with the task it was running.
    worker_log = (Path(live.env["OTA_VAR_DIR"]) / "celery.log").read_text().splitlines()
    entries = [json.loads(line) for line in worker_log if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def spans_of_requests_and_tasks_reach_the_otlp_endpoint(live: Live) -> None:
    request_id = requests.get(f"{live.base}/api/v1/devices", timeout=10).headers["X-Request-ID"]

    def request_span() -> Span | None:
        for span in list(live.receiver.spans):
            if span.attributes.get("ota.request_id") == request_id:
                return span
        return None

    span = eventually(request_span, "span of the request")
    assert span.service == "ota-server" and span.name.startswith("GET")
    # Beat sends the heartbeat task (apply_async/...) and the worker runs it (run/...).
    names = ("apply_async/ota_site.tasks.worker_heartbeat", "run/ota_site.tasks.worker_heartbeat")
    eventually(
        lambda: set(names) <= {s.name for s in list(live.receiver.spans)}, "spans of the task"
    )
    assert all(
        path == "/v1/traces" and kind == "application/x-protobuf"
        for path, kind in live.receiver.bodies
    )
