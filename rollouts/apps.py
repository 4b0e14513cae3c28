from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _register_sqlite_functions(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor == "sqlite":
        from rollouts.buckets import register_sqlite_function

        register_sqlite_function(connection)


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Rollouts and update sessions"

    def ready(self) -> None:
        # PostgreSQL has ota_bucket() from a migration; SQLite needs it on every connection.
        connection_created.connect(_register_sqlite_functions, dispatch_uid="ota_bucket_sqlite")
