"""Benchmark: the device API over HTTP, under load, with 100k and 1M devices in PostgreSQL.

Run by `make bench` (PostgreSQL and Redis on 127.0.0.1, Debian's wrk). For each fleet size it
fills a fresh database with set-based SQL (every device with a finished update session, as in a
fleet at rest), starts gunicorn as production runs it (4 sync workers, the connection pool, Redis
for the cache and the rate limiter, limits on but high enough never to refuse), and drives it with
wrk from the same machine:

- saturated: as many requests as 16 connections get through, for the update check
  (`GET /api/v1/updates/check`, a random device of 10,000 per request) and for a no-op Django
  view served by the same gunicorn through the same middleware (tests/bench/noop_urls.py). The
  ratio of the two is the figure that holds on any machine;
- paced: the update check at a fixed rate of about 500 requests a second (100 connections, each
  waiting 200 ms between its requests, so a slow answer does not slow the schedule down much:
  the achieved rate is reported), which is a 450k-device fleet polling every 15 minutes: latency
  percentiles there;
- status reports (`POST /api/v1/status`) on 10,000 open sessions, saturated;
- the resident memory of each gunicorn worker after the load.

Writes the table to docs/performance.md (section "Device API under load").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.report import replace_section  # noqa: E402
from tests.e2e import fresh_database, gunicorn, manage, server_env  # noqa: E402

SIZES = [int(s) for s in os.environ.get("BENCH_HTTP_SIZES", "100000,1000000").split(",")]
DURATION = int(os.environ.get("BENCH_HTTP_SECONDS", "20"))
WORKERS = 4
SAMPLE = 10_000
PACED_RATE = 500
PACED_CONNECTIONS = 100
JWT_SECRET = "bench-" + uuid.uuid4().hex

LUA = r"""
local lines = {}
local method, path, delay_ms = "GET", "/", 0
init = function(args)
  for line in io.lines(args[1]) do lines[#lines + 1] = line end
  method, path, delay_ms = args[2], args[3], tonumber(args[4])
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end
request = function()
  local line = lines[math.random(#lines)]
  local token, session = line:match("^(%S+)%s*(%S*)$")
  local headers = {["Authorization"] = "Bearer " .. token}
  local body = nil
  if method == "POST" then
    headers["Content-Type"] = "application/json"
    body = string.format('{"session_id": "%s", "status": "downloading", "progress": %d}',
                         session, math.random(0, 99))
  end
  return wrk.format(method, path, headers, body)
end
delay = function() return delay_ms end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "p50_us": %d, "p95_us": %d, "p99_us": %d, '
    .. '"socket_errors": %d, "non_2xx": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk(
    base: str,
    script: Path,
    lines: Path,
    *,
    method: str = "GET",
    path: str,
    connections: int = 16,
    delay_ms: int = 0,
    seconds: int = DURATION,
) -> dict[str, Any]:
    result = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base + path,
            "--",
            str(lines),
            method,
            path,
            str(delay_ms),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    figures: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    figures["rps"] = figures["requests"] / figures["seconds"]
    return figures


def fill(database: str, start: int, size: int, firmware_id: str) -> None:
    """Devices start+1..size on 1.0.0, each with the finished session that installed it."""
    import psycopg

    from ota_site.versions import version_key

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            """
            WITH new AS (
                INSERT INTO devices_device (id, hardware_id, device_type, current_version,
                    current_version_key, status, metadata, secret_hash, credential_generation,
                    created_at, updated_at, last_seen)
                SELECT gen_random_uuid(), 'bench-' || n, 'bench-board', '1.0.0', %s, 'success',
                       '{}', '', 1, now(), now(), now() - interval '1 hour'
                FROM generate_series(%s::bigint, %s::bigint) AS n
                RETURNING id
            )
            INSERT INTO rollouts_updatesession (uuid, device_id, firmware_id, from_version,
                is_rollback, status, progress, started_at, updated_at, completed_at, duration)
            SELECT gen_random_uuid(), id, %s, '0.9.0', false, 'success', 100,
                   now() - interval '30 days', now() - interval '30 days',
                   now() - interval '30 days', 600
            FROM new
            """,
            [version_key("1.0.0"), start + 1, size, firmware_id],
        )
        conn.execute("VACUUM ANALYZE devices_device")
        conn.execute("VACUUM ANALYZE rollouts_updatesession")


def sample_lines(database: str, folder: Path, firmware_id: str) -> tuple[Path, Path]:
    """Tokens of SAMPLE random devices; and tokens with an open session each, for the reports."""
    import jwt
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        # Two disjoint samples: devices that poll, and devices with an open session that report
        # (a poll would cancel such a session: no rollout or assignment stands behind it).
        sampled = conn.execute(
            "SELECT id, device_type FROM devices_device TABLESAMPLE SYSTEM_ROWS(%s)", [2 * SAMPLE]
        ).fetchall()
        rows, reporting = sampled[::2], sampled[1::2]
        ids = [row[0] for row in reporting]
        conn.execute(
            "DELETE FROM rollouts_updatesession WHERE status = 'downloading'"
        )  # a previous size's open sessions
        sessions: dict[Any, Any] = dict(
            conn.execute(
                """
                INSERT INTO rollouts_updatesession (uuid, device_id, firmware_id, from_version,
                    is_rollback, status, progress, started_at, updated_at)
                SELECT gen_random_uuid(), id, %s, '1.0.0', false, 'downloading', 0, now(), now()
                FROM unnest(%s::uuid[]) AS id
                RETURNING device_id, uuid
                """,
                [firmware_id, ids],
            ).fetchall()
        )
    now = int(time.time())

    def token(device_id: Any, device_type: str) -> str:
        claims = {
            "iss": "ota-server",
            "aud": "ota-device",
            "sub": str(device_id),
            "typ": device_type,
            "gen": 1,
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, JWT_SECRET, algorithm="HS256")

    checks = folder / "checks.txt"
    reports = folder / "reports.txt"
    checks.write_text("".join(f"{token(i, t)}\n" for i, t in rows))
    reports.write_text("".join(f"{token(i, t)} {sessions[i]}\n" for i, t in reporting))
    return checks, reports


def worker_rss_mib(port: int) -> list[float]:
    """Resident memory of each gunicorn worker serving `port` (the master excluded)."""
    processes: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        if "gunicorn" not in cmdline or f"127.0.0.1:{port}" not in cmdline:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kib = int(fields["VmRSS"].split()[0])
        processes[int(entry.name)] = (int(fields["PPid"]), rss_kib / 1024)
    return [rss for ppid, rss in processes.values() if ppid in processes]


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) used so far by each process of this machine, grouped: the
    gunicorn workers, PostgreSQL's backends and Redis (wrk's own is not counted: it has exited
    before the second reading)."""
    tick = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if b"gunicorn" in cmdline:
            group = "gunicorn"
        elif name.startswith("postgres"):
            group = "postgres"
        elif name.startswith("redis"):
            group = "redis"
        else:
            continue
        totals[f"{group}:{entry.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return totals


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict:
    """Microseconds of CPU per request in each group, between two readings."""
    spent: dict[str, float] = {"gunicorn": 0.0, "postgres": 0.0, "redis": 0.0}
    for key, seconds in after.items():
        spent[key.split(":")[0]] += seconds - before.get(key, 0.0)
    return {group: seconds / max(requests, 1) * 1e6 for group, seconds in spent.items()}


def warm(base: str, checks: Path) -> None:
    """Every sampled device polls once, so its answer is in the answer cache: the steady state
    of a fleet that polls at its interval."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.request import Request, urlopen

    def one(token: str) -> None:
        request = Request(base + "/api/v1/updates/check")
        request.add_header("Authorization", f"Bearer {token}")
        with urlopen(request, timeout=10) as reply:
            reply.read()

    tokens = [line.split()[0] for line in checks.read_text().splitlines() if line.strip()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, tokens))


@contextmanager
def answer_listener(env: dict[str, str]) -> Iterator[None]:
    """The poll answer cache's listener (manage.py answer_cache listen), live until the block
    ends; then stopped, which ends the cache at once (it releases its epoch)."""
    import redis

    key = f"{env['CACHE_KEY_PREFIX']}:answers:epoch"
    client = redis.Redis.from_url(env["REDIS_URL"])
    process = subprocess.Popen(
        [sys.executable, "manage.py", "answer_cache", "listen"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30

        def live() -> bool:
            value = client.get(key)
            return isinstance(value, bytes) and not value.endswith(b".-")

        while not live():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the answer cache listener did not start")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)
        client.delete(key)


def measure(base: str, folder: Path, checks: Path, reports: Path, env: dict[str, str]) -> dict:
    script = folder / "bench.lua"
    script.write_text(LUA)
    # Warm every worker: connections, the pool, caches, imports.
    wrk(base, script, checks, path="/api/v1/updates/check", seconds=3)

    def saturated(lines: Path, path: str, method: str = "GET") -> dict[str, Any]:
        before = cpu_seconds()
        figures = wrk(base, script, lines, method=method, path=path)
        figures["cpu_us"] = cpu_per_request(before, cpu_seconds(), figures["requests"])
        return figures

    noop = saturated(checks, "/bench/noop")
    # Every answer computed: no listener, so no answer cache.
    computed = saturated(checks, "/api/v1/updates/check")
    with answer_listener(env):
        warm(base, checks)
        check = saturated(checks, "/api/v1/updates/check")
        paced = wrk(
            base,
            script,
            checks,
            path="/api/v1/updates/check",
            connections=PACED_CONNECTIONS,
            delay_ms=PACED_CONNECTIONS * 1000 // PACED_RATE,
        )
    status = saturated(reports, "/api/v1/status", method="POST")
    port = int(base.rsplit(":", 1)[1])
    return {
        "noop": noop,
        "check": check,
        "computed": computed,
        "paced": paced,
        "status": status,
        "rss": worker_rss_mib(port),
    }


def publish_firmware(env: dict[str, str]) -> str:
    """Firmware 1.0.0 for the bench fleet, published through the service (signed, in TUF)."""
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = "ota_site.settings"
    import django

    django.setup()
    from django.core.files.uploadedfile import SimpleUploadedFile

    from firmware import services

    content = os.urandom(64 * 1024)
    import hashlib

    hashes = {
        "sha256": hashlib.sha256(content).hexdigest(),
        "sha1": hashlib.sha1(content, usedforsecurity=False).hexdigest(),
        "md5": hashlib.md5(content, usedforsecurity=False).hexdigest(),
    }
    firmware = services.upload_firmware(
        file=SimpleUploadedFile("bench.bin", content),
        hashes=hashes,
        version="1.0.0",
        device_type="bench-board",
    )
    services.publish_firmware(firmware)
    return str(firmware.id)


def main() -> None:
    rows = []
    with fresh_database() as database, tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        env = server_env(
            folder / "var",
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
            CACHE_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
            DJANGO_SETTINGS_MODULE="tests.bench.noop_settings",
            DATABASE_POOL="true",
            DEVICE_JWT_SECRET=JWT_SECRET,
            DEVICE_JWT_LIFETIME="3600",
            RATE_LIMIT_DEVICE="1000000/min",
            RATE_LIMIT_IP="100000000/min",
            TUF_AUTO_INIT="true",
            DJANGO_LOG_LEVEL="WARNING",
        )
        manage({**env, "DJANGO_SETTINGS_MODULE": "ota_site.settings"}, "migrate", "--noinput")
        with __import__("psycopg").connect(database, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS tsm_system_rows")
        firmware_id = publish_firmware(env)
        filled = 0
        for size in SIZES:
            started = time.perf_counter()
            fill(database, filled, size, firmware_id)
            filled = size
            print(f"{size:,} devices in {time.perf_counter() - started:.0f} s", flush=True)
            checks, reports = sample_lines(database, folder, firmware_id)
            with gunicorn(env, workers=WORKERS) as base:
                figures = measure(base, folder, checks, reports, env)
            figures["devices"] = size
            print(json.dumps(figures), flush=True)
            rows.append(figures)
    write(rows)


def write(rows: list[dict[str, Any]]) -> None:
    lines = [
        f"Measured by `make bench` ({Path(__file__).name}) on {time.strftime('%Y-%m-%d')} on this "
        "machine (2 cores; PostgreSQL 15, Redis 7, gunicorn with 4 sync workers and wrk all on "
        f"it). Saturated runs use 16 connections for {DURATION} s; the paced run asks for "
        f"{PACED_RATE} checks a second. Each device has a finished update session, so the "
        "answer is `already_success`. *Cached*: the poll answer cache's listener runs (as "
        "Celery beat runs it in production) and every sampled device has polled once before, "
        "the steady state of a fleet polling at its interval: its answer comes from the rate "
        "limiter's Redis round trip (docs/answer-cache.md). *Computed*: no listener, so every "
        "check reads the device and its latest session in one prepared query and decides. "
        "Either way the sighting (last_seen) goes to Redis in the rate limiter's round trip. "
        "A status report moves an open session's progress. Latencies are wrk's, from "
        "send to last byte. The paced run (cached) is wrk with each connection waiting between "
        "requests, close to an open-loop load while answers are much faster than the wait; the "
        "rate it reached is shown.",
        "",
        "| devices | no-op view | update check, cached | x no-op | update check, computed | "
        "x no-op | p50 / p95 / p99 saturated, cached | paced rate | p50 / p95 / p99 paced | "
        "status reports | 5xx or errors | worker RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(figures: dict[str, Any]) -> str:
        return " / ".join(f"{figures[k] / 1000:.1f}" for k in ("p50_us", "p95_us", "p99_us"))

    for row in rows:
        noop, check, paced, status = row["noop"], row["check"], row["paced"], row["status"]
        computed = row["computed"]
        errors = sum(
            r["socket_errors"] + r["non_2xx"] for r in (noop, check, computed, paced, status)
        )
        rss = row["rss"]
        lines.append(
            f"| {row['devices']:,} | {noop['rps']:,.0f}/s | {check['rps']:,.0f}/s | "
            f"x{check['rps'] / noop['rps']:.2f} | {computed['rps']:,.0f}/s | "
            f"x{computed['rps'] / noop['rps']:.2f} | {ms(check)} ms | {paced['rps']:,.0f}/s | "
            f"{ms(paced)} ms | {status['rps']:,.0f}/s | {errors} | "
            f"{sum(rss) / max(len(rss), 1):.0f} MiB |"
        )
    lines += [
        "",
        "CPU per request in the same saturated runs (read from /proc before and after each; "
        "the machine's other work is not in it):",
        "",
        "| devices | request | gunicorn worker | PostgreSQL | Redis | total |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for label, key in (
            ("no-op view", "noop"),
            ("update check, cached", "check"),
            ("update check, computed", "computed"),
            ("status report", "status"),
        ):
            cpu = row[key]["cpu_us"]
            lines.append(
                f"| {row['devices']:,} | {label} | {cpu['gunicorn']:,.0f} µs | "
                f"{cpu['postgres']:,.0f} µs | {cpu['redis']:,.0f} µs | "
                f"{sum(cpu.values()):,.0f} µs |"
            )
    largest = rows[-1]
    ratio = largest["check"]["rps"] / largest["noop"]["rps"]
    computed_ratio = largest["computed"]["rps"] / largest["noop"]["rps"]
    p95 = largest["paced"]["p95_us"] / 1000
    lines += [
        "",
        f"Against issue 8's targets, at {largest['devices']:,} devices: the update check reaches "
        f"x{ratio:.2f} of the no-op view's throughput when saturated, answered from the answer "
        f"cache as a fleet's unchanged devices are (target x0.50: "
        f"{'met' if ratio >= 0.5 else 'not met'}); x{computed_ratio:.2f} when every answer is "
        f"computed. Its p95 at about {PACED_RATE} checks a second is {p95:.1f} ms (target "
        f"under 50 ms: {'met' if p95 < 50 else 'not met'}). The fleet size hardly matters: a "
        "computed check is one index probe by device (plus its newest session), and a cached "
        "one a Redis key, whatever the table's size. The no-op view is what gunicorn and "
        'Django\'s middleware cost. Where the rest goes is in "What an update check costs" '
        "below.",
    ]
    replace_section(ROOT / "docs" / "performance.md", "Device API under load", "\n".join(lines))


if __name__ == "__main__":
    main()
