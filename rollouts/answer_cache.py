"""What keeps the poll answer cache (ota_site.answers) true: the database's triggers, and the
listener that Celery beat runs.

The triggers are the only source of invalidation, so no code path or SQL statement can change
what a poll answers without the cache hearing of it:

- a device's row (anything but ``last_seen`` and ``updated_at``, which polls and the presence
  flush move) or any of its update sessions: ``d:<device id>``;
- a firmware: its ``{"id", "device_type", "version_key"}`` as JSON, so the listener can drop its
  cached entries too;
- a device group, a rollout, a stage or a rollout's target groups: ``*``;
- a TRUNCATE of any of them: ``*``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ota_site import answers

logger = logging.getLogger(__name__)

TRIGGER_FUNCTION = f"""
CREATE OR REPLACE FUNCTION ota_poll_changed() RETURNS trigger AS $$
-- TG_ARGV[0]: the column holding the device id, or '*' (any change matters to every device), or
-- 'firmware'; TG_ARGV[1..]: columns whose changes alone do not matter to a poll.
DECLARE
    old_row jsonb;
    new_row jsonb;
    i integer;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('{answers.CHANNEL}', '{answers.GLOBAL}');
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;
    IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;
    IF TG_OP = 'UPDATE' THEN
        FOR i IN 1 .. TG_NARGS - 1 LOOP
            old_row := old_row - TG_ARGV[i];
            new_row := new_row - TG_ARGV[i];
        END LOOP;
        IF old_row = new_row THEN
            RETURN NULL;
        END IF;
    END IF;
    IF TG_ARGV[0] = '*' THEN
        PERFORM pg_notify('{answers.CHANNEL}', '{answers.GLOBAL}');
    ELSIF TG_ARGV[0] = 'firmware' THEN
        IF old_row IS NOT NULL THEN
            PERFORM pg_notify('{answers.CHANNEL}', jsonb_build_object(
                'id', old_row ->> 'id', 'device_type', old_row ->> 'device_type',
                'version_key', old_row ->> 'version_key')::text);
        END IF;
        IF new_row IS NOT NULL THEN
            PERFORM pg_notify('{answers.CHANNEL}', jsonb_build_object(
                'id', new_row ->> 'id', 'device_type', new_row ->> 'device_type',
                'version_key', new_row ->> 'version_key')::text);
        END IF;
    ELSE
        IF old_row IS NOT NULL THEN
            PERFORM pg_notify('{answers.CHANNEL}', 'd:' || (old_row ->> TG_ARGV[0]));
        END IF;
        IF new_row IS NOT NULL THEN
            PERFORM pg_notify('{answers.CHANNEL}', 'd:' || (new_row ->> TG_ARGV[0]));
        END IF;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"""

# table -> the trigger's arguments (see ota_poll_changed)
WATCHED: dict[str, tuple[str, ...]] = {
    "devices_device": ("id", "last_seen", "updated_at"),
    "rollouts_updatesession": ("device_id",),
    "firmware_firmware": ("firmware",),
    "devices_devicegroup": ("*", "updated_at"),
    "rollouts_rollout": ("*", "updated_at"),
    "rollouts_rolloutstage": ("*",),
    "rollouts_rollout_target_groups": ("*",),
}


def create_triggers_sql() -> list[str]:
    statements = [TRIGGER_FUNCTION]
    for table, arguments in WATCHED.items():
        quoted = ", ".join(f"'{argument}'" for argument in arguments)
        statements += [
            f"DROP TRIGGER IF EXISTS ota_poll_changed ON {table}",
            f"CREATE TRIGGER ota_poll_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION ota_poll_changed({quoted})",
            f"DROP TRIGGER IF EXISTS ota_poll_truncated ON {table}",
            f"CREATE TRIGGER ota_poll_truncated AFTER TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION ota_poll_changed('*')",
        ]
    return statements


def drop_triggers_sql() -> list[str]:
    statements = []
    for table in WATCHED:
        statements += [
            f"DROP TRIGGER IF EXISTS ota_poll_changed ON {table}",
            f"DROP TRIGGER IF EXISTS ota_poll_truncated ON {table}",
        ]
    return [*statements, "DROP FUNCTION IF EXISTS ota_poll_changed()"]


def forget(changes: list[str]) -> None:
    """Drop the caches behind the poll that a global change may have made stale."""
    from firmware import services as firmware_services
    from rollouts import targeting

    targeting.forget_live_specs()
    for change in changes:
        firmware = answers.firmware_payload(change) if change != answers.GLOBAL else None
        if firmware is not None:
            firmware_services.forget_published_keys(
                str(firmware.get("device_type")),
                str(firmware.get("version_key")),
                str(firmware.get("id")),
            )


def listener() -> answers.Listener:
    return answers.Listener(forget)


_started: threading.Thread | None = None


def start_in_background(**_: Any) -> None:
    """Run the listener in a daemon thread of this process (Celery beat: one per installation).
    Nothing to do when the cache is off."""
    global _started
    if _started is not None or not answers.enabled():
        return
    _started = threading.Thread(target=listener().run, name="poll-answer-cache", daemon=True)
    _started.start()
    logger.info("poll answer cache listener started")
