"""Benchmark: the device poll with the rate limiter on and off, in the same run.

Run with the test environment (PostgreSQL and Redis on 127.0.0.1), e.g.
``DATABASE_URL=postgres://postgres@127.0.0.1:5432/ota REDIS_URL=redis://127.0.0.1:6379/15
.venv/bin/python tests/bench/bench_rate_limits.py``. One device polls ``/api/v1/updates/check``
through the whole middleware stack (Django's test client, in process); rounds alternate between
limits off and limits on (high enough never to refuse), so both see the same machine noise.
Prints the median per poll of each and their ratio, and the limiter's own cost per request.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import django

ROOT = Path(__file__).resolve().parents[2]
POLLS = int(os.environ.get("BENCH_POLLS", "300"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")
    django.setup()
    from django.conf import settings
    from django.test.utils import setup_databases, teardown_databases

    if not settings.REDIS_URL:
        raise SystemExit("this benchmark needs REDIS_URL=redis://...")
    old = setup_databases(verbosity=0, interactive=False, keepdb=False)
    try:
        run(settings)
    finally:
        teardown_databases(old, verbosity=0)


def run(settings) -> None:
    from django.test import Client

    from devices import services as device_services

    _, enrollment = device_services.create_enrollment_token(name="bench")
    device, _ = device_services.register_device(
        enrollment_token=enrollment,
        hardware_id="bench-1",
        device_type="board-a",
        current_version="1.0.0",
    )
    access, _ = device_services.issue_token(device)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {access}")
    settings.CACHES["default"]["KEY_PREFIX"] = f"bench:{time.time_ns()}"
    settings.ALLOWED_HOSTS = ["testserver"]
    settings.RATE_LIMIT_DEVICE = settings.RATE_LIMIT_IP = "off"

    def per_poll() -> float:
        start = time.perf_counter()
        for _ in range(POLLS):
            reply = client.get("/api/v1/updates/check")
            assert reply.status_code == 200, reply.content
        return (time.perf_counter() - start) / POLLS

    per_poll()  # warm caches and connections
    off, on = [], []
    for _ in range(ROUNDS):
        settings.RATE_LIMIT_DEVICE = settings.RATE_LIMIT_IP = "off"
        off.append(per_poll())
        settings.RATE_LIMIT_DEVICE = settings.RATE_LIMIT_IP = "1000000/hour"
        on.append(per_poll())
    median_off, median_on = statistics.median(off), statistics.median(on)
    print(f"poll, limits off: {median_off * 1e6:8.0f} us")
    print(f"poll, limits on:  {median_on * 1e6:8.0f} us")
    print(f"throughput with the limiter: x{median_off / median_on:.2f}")
    print(f"limiter cost per request: {(median_on - median_off) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
