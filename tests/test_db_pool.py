"""The connection pool hands out a working connection after PostgreSQL dropped a pooled one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e import ROOT, server_env

# One "request" takes a connection and gives it back to the pool; the server then ends that
# connection (a restart or a failover does the same to every idle one); the next "request" must
# still get an answer.
SCRIPT = """
import time
import psycopg
from django.conf import settings
from django.db import connection

def backend():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]

first = backend()
connection.close()  # back to the pool, as at the end of a request
with psycopg.connect(settings.DATABASE_URL, autocommit=True) as admin:
    admin.execute("SELECT pg_terminate_backend(%s)", [first])
time.sleep(0.3)
print("replaced" if backend() != first else "same")
"""


def test_a_connection_dropped_by_the_server_is_replaced(tmp_path: Path) -> None:
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ota")
    env = server_env(
        tmp_path, DATABASE_URL=base.rsplit("/", 1)[0] + "/postgres", DATABASE_POOL="true"
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
    assert result.stdout.strip().splitlines()[-1] == "replaced"
