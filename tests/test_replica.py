"""Analytics read the read replica when one is configured; everything else reads the primary.

The replica here is a second PostgreSQL database on the same server with the primary's schema
and other rows, so each test can tell which database answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import DEFAULT_DB_ALIAS, connections
from django.test.utils import CaptureQueriesContext

from firmware.models import Firmware
from metrics.queries import fleet_summary
from ota_site.db import REPLICA, analytics
from rollouts import evaluation, poll
from tests.conftest import DeviceActor
from tests.e2e import ROOT, server_env
from tests.rollouts_support import fleet, started

# One worker runs the whole module, so the replica database is made once.
pytestmark = pytest.mark.xdist_group("replica")
REPLICA_DEVICES = 7  # rows only the replica has


def url(settings_dict: dict[str, Any], name: str) -> str:
    user = settings_dict["USER"] or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict["PASSWORD"] else ""
    host = settings_dict["HOST"] or "127.0.0.1"
    return f"postgres://{user}{password}@{host}:{settings_dict['PORT'] or 5432}/{name}"


@pytest.fixture(scope="module")
def replica_db(django_db_setup: Any) -> Iterator[str]:
    """A database with the test database's schema (pg_dump) and REPLICA_DEVICES devices."""
    primary = connections[DEFAULT_DB_ALIAS].settings_dict
    name = f"{primary['NAME']}_replica_{uuid.uuid4().hex[:6]}"
    admin = url(primary, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        schema = subprocess.run(
            ["pg_dump", "--schema-only", "--no-owner", "--dbname", url(primary, primary["NAME"])],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(
            ["psql", "--quiet", "-v", "ON_ERROR_STOP=1", "--dbname", url(primary, name)],
            input=schema,
            capture_output=True,
            check=True,
        )
        with psycopg.connect(url(primary, name), autocommit=True) as conn:
            conn.execute(
                """
                INSERT INTO devices_device (id, hardware_id, device_type, current_version,
                    current_version_key, status, metadata, secret_hash, credential_generation,
                    created_at, updated_at, last_seen)
                SELECT gen_random_uuid(), 'replica-' || n, 'board-a', '1.0.0',
                       '000000001.000000000.000000000.000000000~', 'idle', '{}', '', 1,
                       now(), now(), now()
                FROM generate_series(1, %s) AS n
                """,
                [REPLICA_DEVICES],
            )
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alias_settings(name: str) -> dict[str, Any]:
    """The primary's connection settings for another database, without a pool."""
    primary = connections[DEFAULT_DB_ALIAS].settings_dict
    options = {k: v for k, v in primary["OPTIONS"].items() if k != "pool"}
    return {
        **primary,
        "NAME": name,
        "OPTIONS": options,
        "CONN_MAX_AGE": 0,
        "TEST": {**primary["TEST"], "MIRROR": DEFAULT_DB_ALIAS},
    }


@pytest.fixture(scope="module", autouse=True)
def replica(replica_db: str) -> Iterator[str]:
    """DATABASES["replica"], as settings make it from DATABASE_REPLICA_URL.

    Module-wide, so that it exists before a test's database access is set up: tests that read
    it list it (WITH_REPLICA); any other test that touched it would fail. Its TEST MIRROR keeps
    the test transaction off it, so it reads what its database holds.
    """
    connections.settings[REPLICA] = alias_settings(replica_db)
    yield replica_db
    connections[REPLICA].close()
    del connections[REPLICA]
    del connections.settings[REPLICA]


WITH_REPLICA = pytest.mark.django_db(databases=[DEFAULT_DB_ALIAS, REPLICA])


@contextmanager
def replica_setting(name: str | None) -> Iterator[None]:
    """Within: no replica configured (None), or the replica alias naming another database."""
    settings_dict = connections.settings[REPLICA]
    before = settings_dict["NAME"]
    connections[REPLICA].close()
    if name is None:
        del connections.settings[REPLICA]
    else:
        settings_dict["NAME"] = name
    try:
        yield
    finally:
        settings_dict["NAME"] = before
        connections.settings[REPLICA] = settings_dict


# --- In process ----------------------------------------------------------------------------


def test_without_a_replica_analytics_read_the_primary(device_a: DeviceActor) -> None:
    with replica_setting(None):
        assert analytics() == DEFAULT_DB_ALIAS
        assert fleet_summary()["total"] == 1


@WITH_REPLICA
def test_the_dashboard_counts_read_the_replica(device_a: DeviceActor) -> None:
    assert analytics() == REPLICA
    with (
        CaptureQueriesContext(connections[DEFAULT_DB_ALIAS]) as on_primary,
        CaptureQueriesContext(connections[REPLICA]) as on_replica,
    ):
        summary = fleet_summary()
    assert summary["total"] == REPLICA_DEVICES  # the primary has one device, device_a
    assert len(on_replica) == 2 and len(on_primary) == 0


@WITH_REPLICA
def test_rollout_populations_read_the_replica_and_sessions_the_primary(v2: Firmware) -> None:
    devices = fleet(3)
    rollout = started(v2, 100)
    assert poll.check_for_update(devices[0].id).reason == "new"
    metrics = evaluation.rollout_metrics(rollout)
    assert metrics["targeted_devices"] == REPLICA_DEVICES  # the lagging count, from the replica
    assert metrics["stages"][0]["devices"] == REPLICA_DEVICES
    assert metrics["stages"][0]["sessions"]["pending"] == 1  # live, from the primary


def test_the_poll_and_state_changes_never_touch_the_replica(
    device_a: DeviceActor, v2: Firmware
) -> None:
    # The replica is configured but not allowed in this test: touching it would fail the test.
    assert analytics() == REPLICA
    started(v2, 100)
    offer = device_a.client.get("/api/v1/updates/check").json()
    assert offer["reason"] == "new"
    reply = device_a.client.post(
        "/api/v1/status",
        {"session_id": offer["session_id"], "status": "downloading"},
        format="json",
    )
    assert reply.status_code == 200, reply.content


def test_a_replica_alias_naming_the_primary_reads_the_primary(device_a: DeviceActor) -> None:
    # What tests see when DATABASE_REPLICA_URL is set: the alias mirrors the test database, and
    # a second connection would not see this test's uncommitted rows.
    with replica_setting(connections[DEFAULT_DB_ALIAS].settings_dict["NAME"]):
        assert analytics() == DEFAULT_DB_ALIAS
        assert fleet_summary()["total"] == 1


# --- From the environment --------------------------------------------------------------------


def shell(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=server_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


REPORT = """
import json
from django.conf import settings
from metrics.queries import fleet_summary
from ota_site.db import analytics
replica = settings.DATABASES.get("replica", {})
print(json.dumps({
    "alias": analytics(),
    "total": fleet_summary()["total"],
    "mirror": replica.get("TEST", {}).get("MIRROR"),
    "pool": replica.get("OPTIONS", {}).get("pool"),
}))
"""


def test_database_replica_url_sends_analytics_to_that_database(
    replica_db: str, tmp_path: Path, db: Any
) -> None:
    primary = connections[DEFAULT_DB_ALIAS].settings_dict
    env = {"DATABASE_URL": url(primary, primary["NAME"]), "DATABASE_POOL": "true"}
    # The primary's committed rows: this test's own rows are in its (uncommitted) transaction.
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        row = conn.execute("SELECT count(*) FROM devices_device").fetchone()
    assert row is not None and row[0] != REPLICA_DEVICES
    result = shell(tmp_path / "a", REPORT, **env, DATABASE_REPLICA_URL=url(primary, replica_db))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["alias"] == REPLICA and report["total"] == REPLICA_DEVICES
    assert report["mirror"] == DEFAULT_DB_ALIAS  # never a test database on the replica
    assert report["pool"] == {"min_size": 1, "max_size": 10, "timeout": 10.0}
    # Unset: the same code reads the primary.
    result = shell(tmp_path / "b", REPORT, **env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["alias"], report["total"]) == (DEFAULT_DB_ALIAS, row[0])


def test_a_replica_url_that_is_not_postgres_fails_the_checks(tmp_path: Path) -> None:
    env = server_env(
        tmp_path,
        DATABASE_URL=os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ota"),
        DATABASE_REPLICA_URL="mysql://nobody@nowhere/x",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "ota.E070" in result.stderr, result.stderr
