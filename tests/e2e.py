"""Helpers that run the real server processes (gunicorn) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
SERVICE_VARS = ("DATABASE_URL", "REDIS_URL", "STORAGE", "CELERY_BROKER_URL", "CACHE_KEY_PREFIX")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """A clean environment: the embedded mode unless `extra` names services."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    # The suite runs several server sets at once (one per xdist worker and test); one persistent
    # connection per process keeps them all under PostgreSQL's max_connections, where a pool per
    # process (which keeps a spare) would not. The production-mode test turns the pool back on.
    env.update(OTA_VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1", DATABASE_POOL="false")
    # No rate limits: live tests run hundreds of simulated devices from 127.0.0.1. The rate-limit
    # tests turn them on through `extra`.
    env.update(RATE_LIMIT_DEVICE="off", RATE_LIMIT_IP="off")
    env.update(extra)
    return env


def _run_python(env: dict[str, str], args: list[str], what: str) -> str:
    """``python <args>`` in the project's folder with ``env``; its output, or AssertionError."""
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise AssertionError(f"{what} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def manage(env: dict[str, str], *args: str) -> str:
    return _run_python(env, ["manage.py", *args], f"manage.py {' '.join(args)}")


# `manage.py migrate --noinput`, then `manage.py createsuperuser --noinput` (its password from
# DJANGO_SUPERUSER_PASSWORD), in one process: Django starts once instead of twice.
_MIGRATE_WITH_ADMIN = """
import os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False)
call_command("createsuperuser", interactive=False, username=sys.argv[1], email=sys.argv[2])
"""


def migrate_with_admin(env: dict[str, str], admin: tuple[str, str], email: str) -> None:
    """Migrate the installation ``env`` names and create its superuser ``admin`` (name,
    password), as the two manage.py commands do."""
    _run_python(
        {**env, "DJANGO_SUPERUSER_PASSWORD": admin[1]},
        ["-c", _MIGRATE_WITH_ADMIN, admin[0], email],
        "migrate and createsuperuser",
    )


@contextmanager
def _server(name: str, args: list[str], env: dict[str, str], port: int) -> Iterator[str]:
    """Run ``python -m <args>`` until it answers /health on ``port``; stop it afterwards. Its
    output goes to OTA_VAR_DIR/<name>.log, shown if it exits early."""
    log_path = Path(env["OTA_VAR_DIR"]) / f"{name}.log"
    log = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited:\n" + log_path.read_text())
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not answer /health within 30 s")
            time.sleep(0.2)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextmanager
def gunicorn(env: dict[str, str], workers: int = 2) -> Iterator[str]:
    """gunicorn (sync workers) serving the HTTP API on a free port; its base URL."""
    port = free_port()
    args = ["gunicorn", "ota_site.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
    with _server(
        "gunicorn", [*args, "--graceful-timeout", "2", "--no-control-socket"], env, port
    ) as base:
        yield base


@contextmanager
def daphne(env: dict[str, str]) -> Iterator[str]:
    """daphne serving ota_site.asgi (the WebSocket streams) on a free port, as `make demo` and
    production run it; its ws:// base URL."""
    port = free_port()
    args = ["daphne", "-b", "127.0.0.1", "-p", str(port), "ota_site.asgi:application"]
    with _server("daphne", args, env, port):
        yield f"ws://127.0.0.1:{port}"


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for server processes; dropped afterwards."""
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/ota")
    name = f"ota_e2e_{uuid.uuid4().hex[:10]}"
    admin_url = base.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def celery_worker(env: dict[str, str], *, beat: bool = True) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker (with beat inside it), on the broker the environment names."""
    log = open(Path(env["OTA_VAR_DIR"]) / "celery.log", "w")  # noqa: SIM115
    args = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "ota_site",
        "worker",
        "--pool=solo",
        "--loglevel=INFO",
        "-Q",
        env.get("CELERY_QUEUE", "ota"),
    ]
    if beat:
        args += ["-B", "-s", str(Path(env["OTA_VAR_DIR"]) / "beat-schedule")]
    # Its own process group: with -B, beat runs in a child process, which must end with it (and
    # must not outlive a worker that a test kills: tests/faults/test_worker_killed.py).
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
