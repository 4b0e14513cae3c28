"""The SQL function behind deterministic stage membership (rollouts.buckets), on PostgreSQL."""

from django.db import migrations

from rollouts.buckets import POSTGRES_FUNCTION


def create_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(POSTGRES_FUNCTION, params=None)


def drop_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS ota_bucket(uuid, uuid)")


class Migration(migrations.Migration):
    dependencies = [("rollouts", "0001_initial")]

    operations = [migrations.RunPython(create_function, drop_function)]
