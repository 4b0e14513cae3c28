"""Benchmark: firmware downloads through the production path vs nginx serving the file directly.

Run by `make bench`. Starts `make prod-local`'s process set (nginx in front of two gunicorn
nodes, on a fresh PostgreSQL database) and publishes a 16 MiB image. Then wrk downloads it, over
plain HTTP on 127.0.0.1, in two ways:

- the production path: `GET /api/v1/firmware/{id}/download` with a device token. nginx passes
  the request to gunicorn, the app checks the token and the firmware and answers with
  X-Accel-Redirect, and nginx sends the file from disk;
- nginx direct: a second nginx whose only location serves the same media folder, with the
  same sendfile settings.

The ratio of the two throughputs is the cost of the app's decision per download. It writes the
figures to docs/performance.md (section "Firmware downloads").
"""

from __future__ import annotations

import json
import os
import shlex
import signal
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

import requests  # noqa: E402

from tests.bench.report import replace_section  # noqa: E402
from tests.e2e import free_port, fresh_database, manage, server_env  # noqa: E402

SIZE = 16 * 1024 * 1024
SECONDS = int(os.environ.get("BENCH_DOWNLOAD_SECONDS", "15"))
CONNECTIONS = 8

NGINX_DIRECT = """
{user}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {folder}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}; }}
    }}
}}
"""


@contextmanager
def prod_local(work: Path) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    folder = work / "prod-local"
    with fresh_database() as database:
        env = server_env(
            work / "manage",
            PROD_LOCAL_DIR=str(folder),
            PROD_LOCAL_DATABASE_URL=database,
            PROD_LOCAL_REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
            CACHE_KEY_PREFIX=f"bench-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"bench-{uuid.uuid4().hex[:8]}",
            DJANGO_LOG_LEVEL="WARNING",
        )
        for chosen in ("PROD_LOCAL_PORT", "PROD_LOCAL_HTTP_PORT"):
            env.pop(chosen, None)
        with open(work / "prod-local.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "ota_site.deploy.prod_local"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                state_file = folder / "state.json"
                deadline = time.monotonic() + 90
                while not state_file.exists():
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit((work / "prod-local.log").read_text())
                    time.sleep(0.2)
                app_env = dict(
                    shlex.split(line)[0].split("=", 1)
                    for line in (folder / "app.env").read_text().splitlines()
                    if line and not line.startswith("#")
                )
                yield json.loads(state_file.read_text()), {**env, **app_env}
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


@contextmanager
def nginx_direct(work: Path, root: Path) -> Iterator[str]:
    folder = work / "nginx-direct"
    (folder / "tmp").mkdir(parents=True)
    port = free_port()
    conf = folder / "nginx.conf"
    # As prod-local does: as root, nginx's workers must run as root to read the test's folders.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_DIRECT.format(user=user, folder=folder, port=port, root=root))
    process = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(timeout=10)


def wrk(url: str, headers: dict[str, str]) -> dict[str, float]:
    args = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--timeout", "30s"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    output = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    requests_line = next(line for line in output.splitlines() if "requests in" in line)
    count = int(requests_line.split()[0])
    seconds = float(requests_line.split(" in ")[1].split("s,")[0])
    non_2xx = 0
    for line in output.splitlines():
        if "Non-2xx" in line:
            non_2xx = int(line.split(":")[1])
    return {"rps": count / seconds, "mib_s": count * SIZE / seconds / 2**20, "non_2xx": non_2xx}


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        with prod_local(work) as (state, env):
            base = state["http"]
            key = json.loads(
                manage(env, "apikey", "create", "--name", "bench", "--role", "admin", "--json")
            )["token"]
            operator = {"Authorization": f"ApiKey {key}"}
            upload = requests.post(
                f"{base}/api/v1/firmware",
                headers=operator,
                data={"version": "2.0.0", "device_type": "bench-board"},
                files={"file": ("bench.bin", os.urandom(SIZE))},
                timeout=60,
            )
            upload.raise_for_status()
            firmware = upload.json()
            requests.post(
                f"{base}/api/v1/firmware/{firmware['id']}/publish", headers=operator, timeout=60
            ).raise_for_status()
            token = json.loads(manage(env, "create_enrollment_token", "--name", "bench", "--json"))[
                "token"
            ]
            device = requests.post(
                f"{base}/api/v1/devices/register",
                json={
                    "enrollment_token": token,
                    "hardware_id": "bench-downloader",
                    "device_type": "bench-board",
                    "current_version": "1.0.0",
                },
                timeout=10,
            )
            device.raise_for_status()
            bearer = {"Authorization": f"Bearer {device.json()['access_token']}"}
            url = f"{base}/api/v1/firmware/{firmware['id']}/download"
            check = requests.get(url, headers=bearer, timeout=60)
            assert check.status_code == 200 and len(check.content) == SIZE, check.status_code
            media = Path(env["MEDIA_ROOT"])
            stored = next(path for path in media.rglob("bench.bin"))
            with nginx_direct(work, media) as direct:
                direct_url = f"{direct}/{stored.relative_to(media)}"
                assert len(requests.get(direct_url, timeout=60).content) == SIZE
                production = wrk(url, bearer)
                nginx = wrk(direct_url, {})
    print(json.dumps({"production": production, "nginx": nginx}))
    write(production, nginx)


def write(production: dict[str, float], nginx: dict[str, float]) -> None:
    lines = [
        f"Measured by `make bench` ({Path(__file__).name}) on {time.strftime('%Y-%m-%d')} on "
        f"this machine (2 cores): a {SIZE // 2**20} MiB image downloaded over and over by wrk "
        f"({CONNECTIONS} connections, {SECONDS} s, plain HTTP on 127.0.0.1) through "
        "`make prod-local`'s nginx. *Production path*: the device API's download URL with a "
        "device token (nginx, then gunicorn deciding, then X-Accel-Redirect, then nginx sends "
        "the file). *nginx direct*: a plain nginx location serving the same file.",
        "",
        "| path | downloads/s | throughput | non-2xx | vs nginx direct |",
        "|---|---:|---:|---:|---:|",
        f"| production path | {production['rps']:,.1f} | {production['mib_s']:,.0f} MiB/s | "
        f"{production['non_2xx']:.0f} | x{production['mib_s'] / nginx['mib_s']:.2f} |",
        f"| nginx direct | {nginx['rps']:,.1f} | {nginx['mib_s']:,.0f} MiB/s | "
        f"{nginx['non_2xx']:.0f} | x1.00 |",
    ]
    replace_section(ROOT / "docs" / "performance.md", "Firmware downloads", "\n".join(lines))


if __name__ == "__main__":
    main()
