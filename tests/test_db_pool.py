"""A connection that PostgreSQL dropped is replaced; without health checks, after one failure.

Connections are not checked before each request (DATABASE_HEALTH_CHECKS=false: that round trip
cost the device poll a quarter of its throughput). So the one request that finds a dropped
connection fails (answered 503 with Retry-After: tests/test_api_basics.py) and the next gets a
new connection. With the checks on, that request gets a new connection itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import ROOT, server_env

# One "request" takes a connection and gives it back to the pool; the server then ends that
# connection (a restart or a failover does the same to every idle one); then two more requests.
SCRIPT = """
import time
import psycopg
from django.conf import settings
from django.db import connection, OperationalError

def backend():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]
    finally:
        connection.close()  # back to the pool, as at the end of a request

first = backend()
with psycopg.connect(settings.DATABASE_URL, autocommit=True) as admin:
    admin.execute("SELECT pg_terminate_backend(%s)", [first])
time.sleep(0.3)
failures = 0
for _ in range(4):  # the pool may hold more than one connection; only one was dropped
    try:
        last = backend()
    except OperationalError:
        failures += 1
print("failures", failures)
print("replaced" if backend() != first else "same")
"""


@pytest.mark.parametrize(("checks", "failures"), [("false", 1), ("true", 0)])
def test_a_connection_dropped_by_the_server_is_replaced(
    tmp_path: Path, checks: str, failures: int
) -> None:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ota")
    env = server_env(
        tmp_path,
        DATABASE_URL=base.rsplit("/", 1)[0] + "/postgres",
        DATABASE_POOL="true",
        DATABASE_HEALTH_CHECKS=checks,
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Without checks, the dropped connection fails exactly one request, then it is replaced.
    assert result.stdout.strip().splitlines()[-2:] == [f"failures {failures}", "replaced"]
