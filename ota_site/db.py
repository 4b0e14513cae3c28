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
