"""DATABASES from DATABASE_URL and DATABASE_REPLICA_URL (read by ota_site/settings.py).

Kept apart from the settings module for its size; it runs while the settings load, so it takes
what it needs as arguments and imports nothing of Django's configuration. Options are explained in
docs/configuration.md, "Database", and docs/deployment.md, "Database connections".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured


def databases(
    env: environ.Env,
    typed: Callable[[str, str, Any], Any],
    var_dir: Path,
    errors: list[tuple[str, str]],
) -> tuple[str, dict[str, dict[str, Any]], str]:
    """(DATABASE_URL, DATABASES, DATABASE_REPLICA_URL); unusable values are appended to
    ``errors`` as (check id, message) and replaced by Django's dummy backend."""
    # An empty value means "not set" (make demo clears them to force the embedded mode).
    database_url = env.str("DATABASE_URL", default="") or f"sqlite:///{var_dir / 'db.sqlite3'}"
    try:
        db: dict[str, Any] = env.db_url_config(database_url)
    except (ImproperlyConfigured, ValueError, KeyError) as exc:
        errors.append(("ota.E002", f"DATABASE_URL cannot be used: {exc}"))
        db = {"ENGINE": "django.db.backends.dummy"}

    if db["ENGINE"] == "django.db.backends.postgresql":
        if typed("bool", "DATABASE_POOL", True):
            # psycopg's pool, one per process. A sync gunicorn worker, daphne and a Celery prefork
            # child use one connection at a time; sizing: docs/deployment.md "Database connections".
            db.setdefault("OPTIONS", {})["pool"] = {
                "min_size": typed("int", "DATABASE_POOL_MIN_SIZE", 1),
                "max_size": typed("int", "DATABASE_POOL_MAX_SIZE", 10),
                "timeout": typed("float", "DATABASE_POOL_TIMEOUT", 10.0),
            }
            db["CONN_MAX_AGE"] = 0  # the pool keeps connections; Django must not
        else:
            # Persistent connections: a new connection per request cost ~4x throughput here.
            db["CONN_MAX_AGE"] = typed("int", "DATABASE_CONN_MAX_AGE", 600)
        # A health check costs a round trip on every request that uses the database. Without it, a
        # connection broken by a PostgreSQL restart fails its next request with 503 and Retry-After
        # (ota_site.errors.server_error) and is then replaced; docs/deployment.md.
        db["CONN_HEALTH_CHECKS"] = typed("bool", "DATABASE_HEALTH_CHECKS", False)
        db.setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
        if typed("bool", "DATABASE_PREPARED_STATEMENTS", True):
            # The device poll's statements are prepared once per connection (ota_site.db.hot_cursor:
            # planning cost 6x their execution). Off behind a pooler that cannot keep prepared
            # statements (PgBouncer in transaction mode before 1.21, or without
            # max_prepared_statements).
            db["OPTIONS"].setdefault("prepare_threshold", 2)
    elif db["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the web server and the worker read while one writes; a busy timeout instead of
        # "database is locked" under concurrent writers.
        db["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    elif db["ENGINE"] != "django.db.backends.dummy":
        errors.append(
            (
                "ota.E002",
                f"DATABASE_URL engine {db['ENGINE']} is not supported (use postgres or sqlite)",
            )
        )
        db = {"ENGINE": "django.db.backends.dummy"}
    db["ATOMIC_REQUESTS"] = False
    db.setdefault("TEST", {})["NAME"] = env.str("DATABASE_TEST_NAME", default=None)
    databases = {"default": db}
    # A read replica for analytics only (fleet-wide counts; ota_site.db.analytics): the same pool
    # and options as the primary. Unset, analytics read the primary.
    replica_url = env.str("DATABASE_REPLICA_URL", default="")
    if replica_url:
        try:
            replica: dict[str, Any] = env.db_url_config(replica_url)
        except (ImproperlyConfigured, ValueError, KeyError) as exc:
            replica = {"ENGINE": "", "problem": f"cannot be used: {exc}"}
        if db["ENGINE"] != "django.db.backends.postgresql" or replica.get("ENGINE") != db["ENGINE"]:
            errors.append(
                (
                    "ota.E070",
                    "DATABASE_REPLICA_URL "
                    + replica.get(
                        "problem", "must be a postgres:// URL, with DATABASE_URL one too"
                    ),
                )
            )
        else:
            replica.update(
                {key: db[key] for key in ("CONN_MAX_AGE", "CONN_HEALTH_CHECKS") if key in db},
                ATOMIC_REQUESTS=False,
                OPTIONS={**db["OPTIONS"], **replica.get("OPTIONS", {})},
                # Tests never create a database on the replica: the alias reads the primary's test
                # database there (and ota_site.db.analytics then answers "default").
                TEST={"MIRROR": "default"},
            )
            databases["replica"] = replica
    return database_url, databases, replica_url
