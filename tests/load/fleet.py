"""Thousands of virtual devices, in one event loop, through a whole rollout (issue 9, "Load").

The server is the production process set on this machine: gunicorn, a Celery worker with beat
(rollout evaluation, the answer cache's listener, the last_seen flush), PostgreSQL and Redis. The
devices speak the device API over HTTP (aiohttp): each polls every ``poll`` seconds (jittered);
when offered the update it downloads the image and checks its sha256, reports ``downloading``,
``installing`` and ``validating``, and confirms the new version after its "reboot". Like real
fleets, some misbehave on purpose:

- ``duplicate``: a share of devices sends every report twice, at the same time;
- ``reorder``: a share resends a stale ``downloading`` after ``installing`` and after validating;
- ``fail``: a share fails its health check after the reboot and reports it.

At the end, every answer is counted (no 5xx, no connection error allowed), the rollout must have
completed, and ``consistency()`` checks the database against what each device did and against the
rollout's own metrics.

``python tests/load/fleet.py --devices 5000 --minutes 6`` (``make load``) runs it at full size and
writes docs/reliability.md's "Load" section; tests/test_load.py runs a small fleet in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.e2e import celery_worker, fresh_database, gunicorn, manage, server_env  # noqa: E402

OLD, NEW = "1.0.0", "1.1.0"
DEVICE_TYPE = "load-board"
JWT_SECRET = "load-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Options:
    devices: int = 300
    poll: float = 2.0  # seconds between a device's polls
    deadline: float = 240.0  # seconds for the whole rollout
    duplicate: float = 0.1
    reorder: float = 0.1
    fail: float = 0.02
    stages: tuple[int, ...] = (10, 50, 100)
    soak: int = 5  # each stage's min_duration, seconds
    workers: int = 4  # gunicorn
    seed: int = 1


@dataclass
class Tally:
    """Every answer the fleet got, by kind."""

    answers: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    polls: int = 0
    reports: int = 0
    downloads: int = 0

    def note(self, what: str, status: int) -> None:
        self.answers[f"{what} {status}"] += 1
        if status >= 500:
            self.errors.append(f"{what}: {status}")


@dataclass
class Device:
    id: str
    token: str
    duplicate: bool
    reorder: bool
    fails: bool
    version: str = OLD
    outcome: str | None = None  # "success" or "failed": what the device did with the update


@dataclass
class Result:
    options: Options
    seconds: float
    tally: Tally
    rollout: dict[str, Any]
    consistency: dict[str, Any]
    devices: list[Device]

    @property
    def ok(self) -> bool:
        return (
            not self.tally.errors
            and self.rollout.get("status") == "completed"
            and all(value == 0 for value in self.consistency["problems"].values())
        )


# --- The stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    base: str
    database: str
    env: dict[str, str]
    api_key: str


@contextmanager
def stack(options: Options, var: Path) -> Iterator[Stack]:
    with fresh_database() as database:
        env = server_env(
            var,
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("LOAD_REDIS_URL", "redis://127.0.0.1:6379/13"),
            CACHE_KEY_PREFIX=f"load-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"load-{uuid.uuid4().hex[:8]}",
            DEVICE_JWT_SECRET=JWT_SECRET,
            DEVICE_JWT_LIFETIME="3600",
            ROLLOUT_EVALUATION_INTERVAL="1",
            ROLLOUT_CACHE_TIMEOUT="2",
            DJANGO_LOG_LEVEL="WARNING",
        )
        manage(env, "migrate", "--noinput")
        key = json.loads(
            manage(env, "apikey", "create", "--name", "load", "--role", "operator", "--json")
        )
        with gunicorn(env, workers=options.workers) as base, celery_worker(env):
            yield Stack(base, database, env, key["token"])


def make_fleet(stack: Stack, options: Options) -> list[Device]:
    """The devices, inserted in one statement (registration is not what this measures), and an
    access token for each, signed with the server's secret."""
    import jwt
    import psycopg

    from ota_site.versions import version_key

    with psycopg.connect(stack.database, autocommit=True) as conn:
        ids = [
            str(row[0])
            for row in conn.execute(
                """
                INSERT INTO devices_device (id, hardware_id, device_type, current_version,
                    current_version_key, status, metadata, secret_hash, credential_generation,
                    created_at, updated_at)
                SELECT gen_random_uuid(), 'load-' || n, %s, %s, %s, 'idle', '{}', '', 1, now(),
                    now()
                FROM generate_series(1, %s) AS n
                RETURNING id
                """,
                [DEVICE_TYPE, OLD, version_key(OLD), options.devices],
            ).fetchall()
        ]
    now = int(time.time())
    rng = random.Random(options.seed)
    fleet = []
    for index, device_id in enumerate(ids):
        claims = {
            "iss": "ota-server",
            "aud": "ota-device",
            "sub": device_id,
            "typ": DEVICE_TYPE,
            "gen": 1,
            "iat": now,
            "exp": now + 3600,
        }
        fleet.append(
            Device(
                id=device_id,
                token=jwt.encode(claims, JWT_SECRET, algorithm="HS256"),
                duplicate=rng.random() < options.duplicate,
                reorder=rng.random() < options.reorder,
                # Spread evenly, so no stage gets more than its share by chance.
                fails=options.fail > 0 and index % round(1 / options.fail) == 0,
            )
        )
    return fleet


def operator(stack: Stack, method: str, path: str, **kwargs: Any) -> Any:
    import requests

    reply = requests.request(
        method,
        stack.base + path,
        headers={"Authorization": f"ApiKey {stack.api_key}"},
        timeout=60,
        **kwargs,
    )
    assert reply.status_code < 300, f"{method} {path}: {reply.status_code} {reply.text}"
    return reply.json() if reply.content else None


def publish(stack: Stack, version: str, content: bytes) -> str:
    firmware = operator(
        stack,
        "POST",
        "/api/v1/firmware",
        data={"version": version, "device_type": DEVICE_TYPE},
        files={"file": (f"{version}.bin", content)},
    )
    operator(stack, "POST", f"/api/v1/firmware/{firmware['id']}/publish")
    return str(firmware["id"])


# --- The devices ------------------------------------------------------------------------------


class Fleet:
    def __init__(self, stack: Stack, options: Options, devices: list[Device]) -> None:
        self.stack, self.options, self.devices = stack, options, devices
        self.tally = Tally()
        self.rng = random.Random(options.seed)
        self.stop = asyncio.Event()

    async def run(self, rollout: str) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            self.http = http
            tasks = [asyncio.create_task(self.device(d)) for d in self.devices]
            await self.watch(rollout)
            self.stop.set()
            await asyncio.gather(*tasks)

    async def watch(self, rollout: str) -> None:
        """Until the rollout stopped (rolled back or cancelled), or completed with every device
        finished; or the deadline."""
        deadline = time.monotonic() + self.options.deadline
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            status = (await self.operator_get(f"/api/v1/rollouts/{rollout}")).get("status")
            if status in {"rolled_back", "cancelled"}:
                return
            if status == "completed" and all(d.outcome for d in self.devices):
                return

    async def operator_get(self, path: str) -> dict[str, Any]:
        headers = {"Authorization": f"ApiKey {self.stack.api_key}"}
        async with self.http.get(self.stack.base + path, headers=headers) as reply:
            return dict(await reply.json())

    async def call(self, device: Device, method: str, path: str, what: str, **kwargs: Any) -> Any:
        import aiohttp

        url = path if path.startswith("http") else self.stack.base + path
        headers = {"Authorization": f"Bearer {device.token}"}
        try:
            async with self.http.request(method, url, headers=headers, **kwargs) as reply:
                body = await reply.read()
                self.tally.note(what, reply.status)
                if reply.status != 200:
                    self.tally.errors.append(f"{what}: {reply.status} {body[:200]!r}")
                    return None
                return body if what == "download" else json.loads(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.errors.append(f"{what}: {type(exc).__name__} {exc}")
            return None

    async def report(self, device: Device, path: str, body: dict[str, Any]) -> None:
        self.tally.reports += 1
        copies = 2 if device.duplicate else 1
        await asyncio.gather(
            *(self.call(device, "POST", path, "report", json=body) for _ in range(copies))
        )

    async def device(self, device: Device) -> None:
        await asyncio.sleep(self.rng.uniform(0, self.options.poll))
        while not self.stop.is_set():
            self.tally.polls += 1
            offer = await self.call(device, "GET", "/api/v1/updates/check", "poll")
            if offer and offer["update_available"] and device.outcome is None:
                await self.update(device, offer)
            try:
                jitter = self.rng.uniform(0.8, 1.2) * self.options.poll
                await asyncio.wait_for(self.stop.wait(), timeout=jitter)
            except TimeoutError:
                pass

    async def update(self, device: Device, offer: dict[str, Any]) -> None:
        session = offer["session_id"]
        image = await self.call(device, "GET", offer["url"], "download")
        self.tally.downloads += 1
        if image is None or hashlib.sha256(image).hexdigest() != offer["sha256"]:
            await self.report(
                device,
                "/api/v1/status",
                {"session_id": session, "status": "failed", "error_message": "bad image"},
            )
            device.outcome = "failed"
            return
        steps = [("downloading", 100), ("installing", None), ("validating", None)]
        for status, progress in steps:
            body: dict[str, Any] = {"session_id": session, "status": status}
            if progress is not None:
                body["progress"] = progress
            await self.report(device, "/api/v1/status", body)
            if device.reorder and status == "installing":
                late = {"session_id": session, "status": "downloading", "progress": 40}
                await self.report(device, "/api/v1/status", late)
        healthy = not device.fails
        validation: dict[str, Any] = {
            "session_id": session,
            "success": healthy,
            "version": offer["version"] if healthy else OLD,
        }
        if not healthy:
            validation["error_message"] = "health check failed after the reboot"
        await self.report(device, "/api/v1/validation", validation)
        if device.reorder:  # a stale report, retried after the end
            late = {"session_id": session, "status": "installing"}
            await self.report(device, "/api/v1/status", late)
        device.version = offer["version"] if healthy else OLD
        device.outcome = "success" if healthy else "failed"


# --- The checks -------------------------------------------------------------------------------

CONSISTENCY = {
    # The device's version disagrees with its newest session's outcome.
    "version_disagrees_with_session": """
        SELECT count(*) FROM devices_device d
        JOIN LATERAL (
            SELECT status FROM rollouts_updatesession s WHERE s.device_id = d.id
            ORDER BY s.started_at DESC, s.id DESC LIMIT 1
        ) s ON true
        WHERE (s.status = 'success') <> (d.current_version = %(new)s)
    """,
    "devices_without_a_session": """
        SELECT count(*) FROM devices_device d
        WHERE NOT EXISTS (SELECT 1 FROM rollouts_updatesession s WHERE s.device_id = d.id)
    """,
    "sessions_left_open": """
        SELECT count(*) FROM rollouts_updatesession
        WHERE status IN ('pending', 'downloading', 'installing', 'validating')
    """,
    "devices_with_more_than_one_session": """
        SELECT count(*) FROM (
            SELECT device_id FROM rollouts_updatesession GROUP BY device_id HAVING count(*) > 1
        ) more
    """,
    # Each session finishes once: a duplicated or late report adds no second end.
    "sessions_finished_twice": """
        SELECT count(*) FROM (
            SELECT session_id FROM ota_site_event WHERE kind = 'session.finished'
            GROUP BY session_id HAVING count(*) > 1
        ) twice
    """,
}


def consistency(stack: Stack, devices: list[Device], rollout: str) -> dict[str, Any]:
    """The consistency query: the database against itself, against what every device did, and
    against the rollout's metrics."""
    import psycopg

    problems: dict[str, int] = {}
    with psycopg.connect(stack.database, autocommit=True) as conn:
        for name, sql in CONSISTENCY.items():
            problems[name] = int(conn.execute(sql, {"new": NEW}).fetchone()[0])  # type: ignore[index]
        rows: dict[str, str] = dict(
            conn.execute(
                "SELECT device_id::text, status FROM rollouts_updatesession WHERE rollout_id = %s",
                [rollout],
            ).fetchall()
        )
        by_status = Counter(rows.values())
    # What each device did is what the database says it did: no report was lost.
    problems["devices_whose_outcome_was_lost"] = len(
        [d for d in devices if rows.get(d.id) != d.outcome]
    )
    metrics = operator(stack, "GET", f"/api/v1/rollouts/{rollout}/metrics")
    counted: Counter[str] = Counter()
    for stage in metrics["stages"]:
        counted.update({k: v for k, v in stage["sessions"].items() if v})
    problems["metrics_disagree_with_sessions"] = int(counted != by_status)
    return {"problems": problems, "sessions": dict(by_status), "metrics": dict(counted)}


def run(options: Options, var: Path) -> Result:
    with stack(options, var) as running:
        devices = make_fleet(running, options)
        image = os.urandom(8 * 1024)
        publish(running, NEW, image)
        firmware = operator(running, "GET", f"/api/v1/firmware?device_type={DEVICE_TYPE}")
        firmware_id = firmware["results"][0]["id"]
        created = operator(
            running,
            "POST",
            "/api/v1/rollouts",
            json={
                "name": "load",
                "firmware": firmware_id,
                "stages": [{"percentage": p, "min_duration": options.soak} for p in options.stages],
                # The fleet's 2% of failures never come near the rollback threshold, even in a
                # small first stage that draws several failing devices; the two thresholds add
                # up to 1, so a stage either advances or rolls back, never pauses between them.
                # A stage is judged once min_devices of its devices finished, not on the first
                # few.
                "success_threshold": 0.65,
                "rollback_threshold": 0.35,
                "min_devices": max(10, options.devices // 50),
                "device_timeout": 600,
            },
        )
        rollout = str(created["id"])
        operator(running, "POST", f"/api/v1/rollouts/{rollout}/start")
        fleet = Fleet(running, options, devices)
        started = time.monotonic()
        asyncio.run(fleet.run(rollout))
        seconds = time.monotonic() - started
        state = operator(running, "GET", f"/api/v1/rollouts/{rollout}")
        checked = consistency(running, devices, rollout)
        return Result(options, seconds, fleet.tally, state, checked, devices)


def summary(result: Result) -> str:
    tally = result.tally
    return json.dumps(
        {
            "devices": result.options.devices,
            "seconds": round(result.seconds, 1),
            "rollout": result.rollout.get("status"),
            "polls": tally.polls,
            "reports": tally.reports,
            "downloads": tally.downloads,
            "answers": dict(tally.answers),
            "errors": tally.errors[:20],
            "consistency": result.consistency,
        },
        indent=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--poll", type=float, default=10.0)
    parser.add_argument("--soak", type=int, default=60, help="Each stage's min_duration (s).")
    parser.add_argument("--deadline", type=float, default=900.0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    options = Options(devices=args.devices, poll=args.poll, soak=args.soak, deadline=args.deadline)
    import tempfile

    with tempfile.TemporaryDirectory() as var:
        result = run(options, Path(var))
    print(summary(result))
    if args.write_docs:
        write(result)
    sys.exit(0 if result.ok else 1)


def write(result: Result) -> None:
    from tests.bench.report import replace_section

    tally, options = result.tally, result.options
    requests = sum(tally.answers.values())
    problems = result.consistency["problems"]
    sessions = ", ".join(f"{k} {v:,}" for k, v in sorted(result.consistency["sessions"].items()))
    text = "\n".join(
        [
            f"Measured by `make load` (tests/load/fleet.py) on {time.strftime('%Y-%m-%d')} on this "
            "machine (2 cores, shared by the fleet, gunicorn with "
            f"{options.workers} sync workers, a Celery worker with beat, PostgreSQL and Redis). "
            f"{options.devices:,} virtual devices polled every {options.poll:g} s (jittered) "
            f"through a rollout of stages {', '.join(f'{p}%' for p in options.stages)} soaking "
            f"{options.soak} s each; {options.duplicate:.0%} of them sent every report twice at "
            f"once, {options.reorder:.0%} resent stale reports after later ones, and "
            f"{options.fail:.0%} failed their health check.",
            "",
            "| | |",
            "|---|---:|",
            f"| rollout | {result.rollout.get('status')} in {result.seconds:.0f} s |",
            f"| requests | {requests:,} ({tally.polls:,} polls, {tally.reports:,} reports, "
            f"{tally.downloads:,} downloads) |",
            f"| 5xx or connection errors | {len(tally.errors)} |",
            f"| sessions | {sessions} |",
            *(f"| {name.replace('_', ' ')} | {value} |" for name, value in problems.items()),
        ]
    )
    replace_section(ROOT / "docs" / "reliability.md", "Load", text)


if __name__ == "__main__":
    main()
