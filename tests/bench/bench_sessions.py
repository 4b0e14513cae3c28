"""Benchmark: a year of update sessions in PostgreSQL, with and without the 90-day archive.

Answers issue 8's question, partition the sessions table by time or archive it, with numbers.
Run by `make bench` (PostgreSQL on 127.0.0.1). In a fresh database it builds, with set-based
SQL, BENCH_SESSION_DEVICES devices (default 1,000,000) that each took BENCH_SESSION_WAVES
updates over the last year (default 4, one a quarter: 4M sessions, built in a few minutes), one
completed rollout per update staged over a week, 97% success, 2% failed, 1% cancelled. Then it
measures:

- the queries that read the table, with a year kept: the poll's latest-session lookup (one
  index probe per device), a rollout's GROUP BY by stage and status (as rollout_metrics and the
  evaluation run it), the open sessions by status, and a count by status over the whole table
  (what any whole-table report costs);
- ``archive_sessions(older_than_days=90)`` over that year: sessions per second, and the table's
  size (pg_total_relation_size) before and after VACUUM;
- the same queries with 90 days kept;
- steady state: a run with nothing to do; the next update of every device, which goes into
  the space the archive freed (the size again); the next day's run; then VACUUM FULL (the
  compact size).

Writes the figures to docs/performance.md (section "Update sessions: archive, not partitions").
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import django

ROOT = Path(__file__).resolve().parents[2]
DEVICES = int(os.environ.get("BENCH_SESSION_DEVICES", "1000000"))
WAVES = int(os.environ.get("BENCH_SESSION_WAVES", "4"))
LOOKUPS = 2000
REPEAT = 5
TITLE = "Update sessions: archive, not partitions"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")
    django.setup()
    from django.conf import settings
    from django.db import connection

    if connection.vendor != "postgresql":
        raise SystemExit("make bench needs DATABASE_URL=postgres://...")
    from django.test.utils import setup_databases, teardown_databases

    storage = tempfile.mkdtemp(prefix="bench-archive-")
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": storage},
        },
    }
    old = setup_databases(verbosity=0, interactive=False, keepdb=False)
    try:
        figures = run(Path(storage))
    finally:
        teardown_databases(old, verbosity=0)
        shutil.rmtree(storage, ignore_errors=True)
    write(figures)


def sql(statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall() if cursor.description else []


def size() -> int:
    return int(sql("SELECT pg_total_relation_size('rollouts_updatesession')")[0][0])


def rows() -> int:
    return int(sql("SELECT count(*) FROM rollouts_updatesession")[0][0])


def timed(fn: Callable[[], object], repeat: int = REPEAT) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def build() -> dict[str, Any]:
    """The fleet, one firmware and rollout per wave, and every device's session of each wave."""
    from django.utils import timezone

    from ota_site.versions import version_key

    start = time.perf_counter()
    now = timezone.now()
    last = f"1.{WAVES}.0"
    sql(
        """
        INSERT INTO devices_device (id, hardware_id, device_type, current_version,
            current_version_key, status, metadata, secret_hash, credential_generation,
            created_at, updated_at, last_seen)
        SELECT gen_random_uuid(), 'bench-' || n, 'bench-board', %s, %s, 'success', '{}', '', 1,
               now(), now(), now()
        FROM generate_series(1, %s) AS n
        """,
        [last, version_key(last), DEVICES],
    )
    waves = []
    for wave in range(WAVES):
        # Updates are spread evenly over the year.
        firmware, rollout = new_wave(wave, now - timedelta(days=364 * (WAVES - wave) / WAVES))
        waves.append((firmware, rollout, f"1.{wave}.0", rollout.started_at))
    sql("SET session_replication_role = replica")  # skip per-row foreign key checks while loading
    for firmware, rollout, from_version, begins in waves:
        insert_wave(firmware.id, rollout.id, from_version, begins)
    sql("SET session_replication_role = DEFAULT")
    sql("VACUUM ANALYZE rollouts_updatesession")
    sql("ANALYZE devices_device")
    elapsed = time.perf_counter() - start
    print(f"built {DEVICES:,} devices, {rows():,} sessions in {elapsed:.0f} s", flush=True)
    return {"rollout": waves[-1][1], "build_seconds": elapsed}


def new_wave(wave: int, begins: Any) -> tuple[Any, Any]:
    """The firmware 1.<wave + 1>.0 and its completed rollout, staged over the week from
    ``begins``."""
    from django.utils import timezone

    from firmware.models import Firmware
    from ota_site.versions import version_key
    from rollouts.models import Rollout, RolloutStatus

    version = f"1.{wave + 1}.0"
    firmware = Firmware.objects.create(
        version=version, version_key=version_key(version), device_type="bench-board",
        file=f"bench-{wave}.bin", filename="bench.bin", file_size=1, checksum="0" * 64,
        sha1="0" * 40, md5="0" * 32, published_at=timezone.now(),
    )  # fmt: skip
    rollout = Rollout.objects.create(
        name=f"update {wave}", firmware=firmware, device_type="bench-board",
        status=RolloutStatus.COMPLETED, current_stage=0, started_at=begins,
        completed_at=begins + timedelta(days=7),
    )  # fmt: skip
    return firmware, rollout


def insert_wave(firmware_id: Any, rollout_id: Any, from_version: str, begins: Any) -> None:
    """Every device takes the wave's firmware within a week of its start, in ten minutes."""
    sql(
        """
        INSERT INTO rollouts_updatesession (uuid, device_id, firmware_id, rollout_id, stage,
            from_version, is_rollback, status, progress, error_message, started_at, updated_at,
            completed_at, duration)
        SELECT gen_random_uuid(), d.id, %s, %s, 0, %s, false,
               CASE WHEN r < 0.97 THEN 'success' WHEN r < 0.99 THEN 'failed' ELSE 'cancelled' END,
               100, CASE WHEN r < 0.97 THEN NULL ELSE 'bench failure' END,
               t, t + interval '10 minutes', t + interval '10 minutes', 600
        FROM (
            SELECT id, random() AS r, %s::timestamptz + random() * interval '7 days' AS t
            FROM devices_device
        ) AS d
        """,
        [firmware_id, rollout_id, from_version, begins],
    )


def measure_queries(rollout: Any, sample: list[Any]) -> dict[str, float]:
    """Median seconds of each query that reads the sessions table (module docstring)."""
    from django.db import connection

    def lookups() -> None:
        # rollouts.poll._latest_session_subquery, as one statement per device.
        with connection.cursor() as cursor:
            for device_id in sample:
                cursor.execute(
                    "SELECT id, uuid, status, firmware_id, rollout_id, is_rollback, started_at "
                    "FROM rollouts_updatesession WHERE device_id = %s "
                    "ORDER BY started_at DESC, id DESC LIMIT 1",
                    [device_id],
                )
                cursor.fetchall()

    def rollout_group_by() -> None:
        sql(
            "SELECT stage, is_rollback, status, count(id) FROM rollouts_updatesession "
            "WHERE rollout_id = %s GROUP BY stage, is_rollback, status",
            [rollout.id],
        )

    def open_by_status() -> None:
        sql(
            "SELECT status, count(id) FROM rollouts_updatesession WHERE status IN "
            "('pending', 'downloading', 'installing', 'validating') GROUP BY status"
        )

    def whole_table() -> None:
        sql("SELECT status, count(id) FROM rollouts_updatesession GROUP BY status")

    return {
        "lookup": timed(lookups) / len(sample),
        "rollout_group_by": timed(rollout_group_by),
        "open_by_status": timed(open_by_status),
        "whole_table": timed(whole_table, 3),
    }


def run(storage: Path) -> dict[str, Any]:
    from django.utils import timezone

    from rollouts import archive

    built = build()
    rollout = built["rollout"]
    sample = [row[0] for row in sql("SELECT id FROM devices_device LIMIT %s", [LOOKUPS * 50])]
    sample = random.sample(sample, min(LOOKUPS, len(sample)))
    figures: dict[str, Any] = {"build_seconds": built["build_seconds"]}
    figures["rows_year"], figures["size_year"] = rows(), size()
    figures["year"] = measure_queries(rollout, sample)
    print("a year kept:", figures["year"], flush=True)

    start = time.perf_counter()
    result = archive.archive_sessions(older_than_days=90, actor="bench")
    figures["archive_seconds"] = time.perf_counter() - start
    figures["archived"] = result.sessions
    figures["archive_bytes"] = sum(p.stat().st_size for p in storage.rglob("*.jsonl.gz"))
    print(f"archived {result.sessions:,} in {figures['archive_seconds']:.0f} s", flush=True)
    sql("VACUUM ANALYZE rollouts_updatesession")
    figures["rows_kept"], figures["size_vacuumed"] = rows(), size()
    figures["kept"] = measure_queries(rollout, sample)
    print("just archived:", figures["kept"], flush=True)

    # Steady state: a run with nothing to do; the next update of every device, whose sessions
    # go into the space the archive freed; then the next day's run, which finds the part of the
    # previous update that has just turned 90 days old and is no longer any device's newest.
    start = time.perf_counter()
    idle = archive.archive_sessions(older_than_days=90, actor="bench")
    figures["idle_run_seconds"] = time.perf_counter() - start
    assert idle.sessions == 0
    firmware, update = new_wave(WAVES, timezone.now() - timedelta(days=7))
    sql("SET session_replication_role = replica")
    insert_wave(firmware.id, update.id, f"1.{WAVES}.0", update.started_at)
    sql("SET session_replication_role = DEFAULT")
    sql("VACUUM ANALYZE rollouts_updatesession")
    figures["rows_refilled"], figures["size_refilled"] = rows(), size()
    start = time.perf_counter()
    daily = archive.archive_sessions(older_than_days=90, actor="bench")
    figures["daily_run_seconds"] = time.perf_counter() - start
    figures["daily_sessions"] = daily.sessions
    # The same 90 days in a compact table: what a server that archived from the start has.
    sql("VACUUM FULL rollouts_updatesession")
    sql("VACUUM ANALYZE rollouts_updatesession")  # VACUUM FULL leaves the visibility map unset
    figures["rows_full"], figures["size_full"] = rows(), size()
    figures["compact"] = measure_queries(update, sample)
    print("compacted:", figures["compact"], flush=True)
    print(
        f"sizes: year {figures['size_year'] >> 20} MiB, vacuumed "
        f"{figures['size_vacuumed'] >> 20} MiB, +1 update {figures['size_refilled'] >> 20} MiB, "
        f"VACUUM FULL {figures['size_full'] >> 20} MiB",
        flush=True,
    )
    return figures


def write(f: dict[str, Any]) -> None:
    from tests.bench.report import replace_section

    def mib(n: int) -> str:
        return f"{n / 2**20:,.0f} MiB"

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.1f} ms" if seconds >= 0.001 else f"{seconds * 1e6:,.0f} µs"

    def row(label: str, key: str) -> str:
        a, b, c = f["year"][key], f["kept"][key], f["compact"][key]
        return f"| {label} | {ms(a)} | {ms(b)} | {ms(c)} |"

    year, kept, compact = f["year"], f["kept"], f["compact"]
    rate = f["archived"] / f["archive_seconds"]
    # What the new update's rows would take in fresh pages, against what the table grew by.
    fresh = f["size_year"] / f["rows_year"] * (f["rows_refilled"] - f["rows_kept"])
    grew = f["size_refilled"] - f["size_vacuumed"]
    lines = [
        f"Measured by `make bench` (`tests/bench/bench_sessions.py`) on "
        f"{time.strftime('%Y-%m-%d')} on this machine (2 cores, PostgreSQL 15 on 127.0.0.1 with "
        "its default settings, shared with other work, so differences under 2x are noise): "
        f"{DEVICES:,} devices that each took {WAVES} updates over the last year, one rollout per "
        "update staged over a week, 97% success, 2% failed, 1% cancelled. Three states of the "
        "sessions table: the whole year kept; right after archiving what is older than 90 days "
        "(VACUUM frees the space for reuse but the files keep their size); and, after one more "
        "update, the 90 days compacted by VACUUM FULL, which is the table a server that "
        "archives from the start has. Medians; the lookup is per device, over "
        f"{LOOKUPS:,} random devices, one statement each; the rollout counted has "
        f"{DEVICES:,} sessions in every state.",
        "",
        "| | a year kept | just archived | 90 days, compact |",
        "|---|---:|---:|---:|",
        f"| sessions in the table | {f['rows_year']:,} | {f['rows_kept']:,} | {f['rows_full']:,} |",
        f"| table + indexes | {mib(f['size_year'])} | {mib(f['size_vacuumed'])} | "
        f"{mib(f['size_full'])} |",
        row("poll: a device's latest session", "lookup"),
        row("one rollout's sessions by stage and status", "rollout_group_by"),
        row("open sessions by status", "open_by_status"),
        row("every session by status (a whole-table report)", "whole_table"),
        "",
        f"The archive job (`archive_sessions`, batches of 5,000) moved {f['archived']:,} sessions "
        f"in {f['archive_seconds']:.0f} s: **{rate:,.0f} sessions/s** when catching up on a "
        f"year, into {mib(f['archive_bytes'])} of gzip JSON Lines "
        f"({f['archive_bytes'] / max(f['archived'], 1):.0f} bytes a session). Its cost is mostly "
        "random reads: for each session it looks at the device's other sessions (is there a "
        "newer one, a newer success?). In steady state, a run with nothing to archive took "
        f"{f['idle_run_seconds']:.1f} s, and the next day's run, after every device took one "
        f"more update, archived {f['daily_sessions']:,} sessions (the part of the previous update "
        f"that had just turned 90 days old) in {f['daily_run_seconds']:.1f} s.",
        "",
        "Space: the table kept its size after the archive; the next update's "
        f"{f['rows_refilled'] - f['rows_kept']:,} sessions, about {mib(int(fresh))} in new "
        f"pages, then grew it by only {mib(grew)}: the freed space is reused. VACUUM FULL "
        "compacts it, but it locks the table; a server that archives daily never needs it, "
        "because each day's run frees about what a day adds.",
        "",
        "**Decision: archive, do not partition.** The poll's lookup, the query on every "
        f"device's path, is one index probe by device: {ms(year['lookup'])} with a year kept, "
        f"{ms(compact['lookup'])} with 90 days; it does not read history, so no layout of the "
        "old rows changes it much, and the same holds for a rollout's counts, which read that "
        "rollout's rows only. What grows with history is whatever reads the whole table (such "
        "as the `ota_update_sessions` gauge of `/metrics`, cached for METRICS_CACHE_TIMEOUT): "
        f"the report over all sessions took {ms(year['whole_table'])} with a year kept and "
        f"{ms(compact['whole_table'])} with 90 days compact ({ms(kept['whole_table'])} right "
        "after the archive, in the year's pages). A year kept keeps growing; 90 days does not. "
        "Partitioning by time would not help either kind of query: the poll looks a device up "
        "by `device_id` with no time condition, so a partitioned table must probe the "
        "index of every partition, and reports by rollout or status read every partition too. "
        "It would cost correctness: PostgreSQL requires the partition key in every unique index, "
        "so the sequential `id` (DDI action ids), `uuid` and the one-open-session-per-device "
        "constraint could no longer be enforced by the database; and dropping an old partition "
        "would delete devices' newest sessions, which the poll needs so as not to offer a "
        "failed update again. The archive decides row by row, keeps about 90 days, and the space "
        "it frees is reused. Revisit partitioning only if the daily run stops keeping up with "
        "the sessions that finish each day, or autovacuum falls behind on the deleted rows "
        "([operations.md](operations.md#watching-the-size) says how to watch the size).",
    ]
    replace_section(ROOT / "docs" / "performance.md", TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
