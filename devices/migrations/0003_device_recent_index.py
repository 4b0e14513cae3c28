"""An index for the console's device list, newest first with never-seen devices last.

``ORDER BY last_seen DESC NULLS LAST, id`` cannot use the ascending ``device_last_seen_idx`` on
PostgreSQL, which then sorts the whole fleet for every page (~130 ms at 100 000 devices). SQLite
cannot index NULLS LAST at all, and the embedded mode's fleets are small, so the index exists
only on PostgreSQL; it is not in the model's Meta for that reason.
"""

from django.db import migrations

CREATE = (
    "CREATE INDEX IF NOT EXISTS device_recent_idx ON devices_device (last_seen DESC NULLS LAST, id)"
)
DROP = "DROP INDEX IF EXISTS device_recent_idx"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("devices", "0002_device_ca_and_certificates")]

    operations = [migrations.RunPython(create, drop)]
