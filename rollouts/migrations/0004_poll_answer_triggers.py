"""The triggers that tell the poll answer cache of every change a poll's answer depends on
(rollouts.answer_cache), on PostgreSQL."""

from django.db import migrations

from rollouts.answer_cache import create_triggers_sql, drop_triggers_sql


def create_triggers(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for statement in create_triggers_sql():
            schema_editor.execute(statement, params=None)  # plpgsql uses %: no placeholders


def drop_triggers(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for statement in drop_triggers_sql():
            schema_editor.execute(statement, params=None)


class Migration(migrations.Migration):
    dependencies = [
        ("rollouts", "0003_ddi"),
        ("devices", "0004_ddi"),
        ("firmware", "0004_signing_key_backend"),
    ]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
