"""Which database an analytics query reads: the read replica when one is configured.

Fleet-wide aggregates (the dashboard's counts, rollout populations, the fleet status command,
Prometheus gauges) scan many rows and can be a second or so behind, so with
``DATABASE_REPLICA_URL`` set they read the ``replica`` alias::

    from ota_site.db import analytics
    Device.objects.using(analytics()).aggregate(...)

Everything else stays on ``default``: every state change, the device poll, and any read that must
see what was just written. The choice is explicit rather than a database router, because a router
that sent reads to the replica would break read-your-writes in every service that writes and then
reads back (a rollout that was just started, a session that was just cancelled).
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

REPLICA = "replica"


def analytics() -> str:
    """The alias for analytics queries: ``replica`` when configured, else ``default``.

    A replica alias naming the primary's own database (tests, where it mirrors ``default``) also
    gives ``default``: a second connection to the same database would not see the rows a test
    wrote in its transaction, and spends a connection for nothing.
    """
    if REPLICA not in connections:
        return DEFAULT_DB_ALIAS
    replica = connections[REPLICA].settings_dict
    primary = connections[DEFAULT_DB_ALIAS].settings_dict
    if all(replica.get(key) == primary.get(key) for key in ("HOST", "PORT", "NAME")):
        return DEFAULT_DB_ALIAS
    return REPLICA


def hot_cursor(db: BaseDatabaseWrapper) -> CursorWrapper:
    """A cursor for the few statements run on every device request, planned once per connection.

    Django binds parameters on the client, so PostgreSQL parses and plans every statement anew:
    the device poll's read spent 0.8 ms planning against 0.14 ms executing (docs/performance.md,
    "Device API under load"). On PostgreSQL, with ``DATABASE_PREPARED_STATEMENTS`` on (the
    default), this cursor binds on the server, so psycopg prepares a statement after its
    ``prepare_threshold``-th run on a connection and then sends only its parameters. Only the
    statements run through this cursor are prepared; every other query keeps Django's client-side
    binding. Elsewhere (SQLite, or the setting off) it is Django's usual cursor.

    Like ``connection.cursor()``, the cursor is wrapped by Django, so it is logged, counted by
    ``assertNumQueries`` and its errors are Django's.
    """
    if db.vendor != "postgresql" or db.settings_dict["OPTIONS"].get("prepare_threshold") is None:
        return db.cursor()
    import psycopg

    db.ensure_connection()
    # Django's own cursor wrapping (logging, execute wrappers, error translation) around a
    # server-binding cursor; the connection's adapters (time zone, JSON) apply to it as well.
    return db._prepare_cursor(psycopg.Cursor(db.connection))  # type: ignore[attr-defined]
