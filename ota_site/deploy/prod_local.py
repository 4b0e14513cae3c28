"""`make prod-local`: the production process set on this machine, without Docker.

The same processes as docker-compose.yml, from the same code and nginx template: two gunicorn
web nodes behind nginx's upstream, daphne for the WebSocket streams, a Celery worker and Celery
beat, on the local PostgreSQL (database ``ota_prod_local``, created if missing) and Redis (a db
of its own). nginx terminates TLS with a self-signed certificate, asks devices for client
certificates, and sends firmware files itself (local storage behind X-Accel-Redirect). It also
serves plain HTTP on a second port, for local use.

Everything it writes is under ``var/prod-local/`` (PROD_LOCAL_DIR): ``logs/`` (one file per
process, nginx's access and error logs), ``nginx/`` (the rendered configuration), ``tls/`` (the
certificate), ``secrets/`` (the secret key and master key, made once), ``ota/`` (OTA_VAR_DIR:
firmware files, static files, beat's schedule), ``app.env`` (the app's environment, for
manage.py) and, while it runs, ``state.json`` (URLs, ports and process ids).

It runs in the foreground and stops every process it started on Ctrl-C or SIGTERM; if one of
them exits on its own it stops the others and exits with status 1, naming the log to read.
Differences from production (docs/deployment.md): a self-signed certificate, plain HTTP served,
no HSTS, TUF_AUTO_INIT on, and a device CA made on the first start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from urllib.error import URLError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import urlopen

import psycopg
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg import sql

from ota_site.deploy.render import TEMPLATE, render

ROOT = Path(__file__).resolve().parents[2]
# The internal location of nginx.conf that the app's X-Accel-Redirect answers name.
X_ACCEL_PREFIX = "/_x_accel/firmware/"
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/ota_prod_local"
# Redis db 14: make test uses 15, and the tests' own helpers 1-13.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class Stop(Exception):
    """A signal asked prod-local to stop."""


class Failed(Exception):
    """prod-local cannot start or a process died; the message says what to do."""


@dataclass
class Running:
    """A manage.py command under way."""

    process: subprocess.Popen[str]
    label: str


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class ProdLocal:
    """The configuration of one run, and the processes it started."""

    folder: Path
    database_url: str
    redis_url: str
    https_port: int
    http_port: int
    web_nodes: int
    web_workers: int
    children: list[Child] = field(default_factory=list)
    web_ports: list[int] = field(default_factory=list)
    ws_port: int = 0

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def var(self) -> Path:
        return self.folder / "ota"

    # --- Preparing ------------------------------------------------------------------------------

    def app_environment(self) -> dict[str, str]:
        """What the app processes (and manage.py against them) must see. Settings not named here
        come from the caller's environment (RATE_LIMIT_*, LOG_LEVEL, ...) as in production;
        a .env next to manage.py applies too, for what neither sets."""
        https = f"https://127.0.0.1:{self.https_port},https://localhost:{self.https_port}"
        http = f"http://127.0.0.1:{self.http_port},http://localhost:{self.http_port}"
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": "",  # Redis, from REDIS_URL
            "STORAGE": "local",
            "OTA_VAR_DIR": str(self.var),
            "MEDIA_ROOT": str(self.var / "media"),
            "STATIC_ROOT": str(self.var / "static"),
            "FIRMWARE_X_ACCEL_PREFIX": X_ACCEL_PREFIX,
            "DJANGO_SECRET_KEY_FILE": str(self.folder / "secrets" / "django-secret-key"),
            "OTA_MASTER_KEY_FILE": str(self.folder / "secrets" / "master-key"),
            "DJANGO_DEBUG": "false",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_CSRF_TRUSTED_ORIGINS": f"{https},{http}",
            "DJANGO_BEHIND_TLS_PROXY": "true",
            # Browsers would keep HSTS for "localhost" for a year, for every port.
            "SECURE_HSTS_SECONDS": "0",
            "TRUSTED_PROXIES": "127.0.0.1",
            "CONSOLE_STREAM_URL": "",  # nginx routes the streams: same origin
            "CACHE_KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX") or "ota-prod-local",
            "CELERY_QUEUE": os.environ.get("CELERY_QUEUE") or "ota-prod-local",
            # A one-key TUF repository made on the first publish, so that devices verify
            # updates without `manage.py tuf init` (production: offline root keys).
            "TUF_AUTO_INIT": os.environ.get("TUF_AUTO_INIT") or "true",
        }

    def process_environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
        env.update(self.app_environment())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def prepare(self) -> None:
        for folder in ("logs", "nginx", "tls", "secrets", "ota"):
            (self.folder / folder).mkdir(parents=True, exist_ok=True)
        self.folder.joinpath("secrets").chmod(0o700)
        _keep_secret(self.folder / "secrets" / "django-secret-key", secrets.token_urlsafe(50))
        _keep_secret(
            self.folder / "secrets" / "master-key",
            base64.b64encode(secrets.token_bytes(32)).decode(),
        )
        _self_signed_certificate(self.folder / "tls")
        _ensure_database(self.database_url)
        _ensure_redis(self.redis_url)
        (self.folder / "app.env").write_text(
            "# The environment of prod-local's app processes, for manage.py against them:\n"
            "#   set -a; . var/prod-local/app.env; set +a; .venv/bin/python manage.py ...\n"
            + "".join(f"{k}={shlex.quote(v)}\n" for k, v in self.app_environment().items())
        )
        env = self.process_environment()
        say("migrating the database and collecting static files")
        # At once: collectstatic needs no database.
        collect = self.manage_start(env, "collectstatic", "--noinput", "--verbosity", "0")
        try:
            self.manage(env, "migrate", "--noinput")
        except BaseException:
            collect.process.kill()
            collect.process.wait()
            raise
        self.manage_result(collect)
        self.export_device_ca(env)

    def manage_start(self, env: dict[str, str], *args: str) -> Running:
        process = subprocess.Popen(  # noqa: S603 (our own command lines)
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Running(process, f"manage.py {' '.join(args)}")

    def manage_result(self, running: Running) -> str:
        try:
            stdout, stderr = running.process.communicate()
        except BaseException:  # a signal: the command must not outlive prod-local
            running.process.kill()
            running.process.wait()
            raise
        if running.process.returncode != 0:
            raise Failed(f"{running.label} failed:\n{stdout}{stderr}")
        return stdout

    def manage(self, env: dict[str, str], *args: str) -> str:
        return self.manage_result(self.manage_start(env, *args))

    def export_device_ca(self, env: dict[str, str]) -> None:
        """The CA bundle nginx verifies device certificates with; the CA is made on the first
        start (production runs `manage.py device_ca init` by hand)."""
        try:
            bundle = self.manage(env, "device_ca", "export-cert")
        except Failed:
            say("creating the device CA")
            bundle = json.loads(self.manage(env, "device_ca", "init", "--json"))["certificate"]
        (self.folder / "nginx" / "device-ca.pem").write_text(bundle)

    def nginx_configuration(self) -> Path:
        """The shared template for these ports, in a main configuration of prod-local's own."""
        nginx = self.folder / "nginx"
        server = render(
            TEMPLATE.read_text(),
            {
                "OTA_SERVER_NAME": "localhost 127.0.0.1",
                "OTA_HTTPS_LISTEN": f"127.0.0.1:{self.https_port}",
                "OTA_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
                "OTA_PLAIN_HTTP": "serve",
                "OTA_WEB_SERVERS": " ".join(f"server 127.0.0.1:{p};" for p in self.web_ports),
                "OTA_WS_SERVERS": f"server 127.0.0.1:{self.ws_port};",
                "OTA_TLS_CERTIFICATE": str(self.folder / "tls" / "server.crt"),
                "OTA_TLS_CERTIFICATE_KEY": str(self.folder / "tls" / "server.key"),
                "OTA_DEVICE_CA_BUNDLE": str(nginx / "device-ca.pem"),
                "OTA_MEDIA_ROOT": f"{self.var / 'media'}/",
            },
        )
        (nginx / "ota.conf").write_text(server)
        temp = "".join(
            f"    {kind}_temp_path {nginx / 'tmp' / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (nginx / "tmp").mkdir(exist_ok=True)
        main = nginx / "nginx.conf"
        main.write_text(
            # As root, nginx's workers would run as nobody, who cannot read the checkout.
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"worker_processes 2;\npid {nginx / 'nginx.pid'};\n"
            f"error_log {self.logs / 'nginx-error.log'};\ndaemon off;\n"
            "events {\n    worker_connections 1024;\n}\n"
            "http {\n    default_type application/octet-stream;\n"
            f"    access_log {self.logs / 'nginx-access.log'};\n{temp}"
            f"    include {nginx / 'ota.conf'};\n}}\n"
        )
        return main

    # --- Running --------------------------------------------------------------------------------

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(  # noqa: S603 (our own command lines)
                args,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session: the terminal's Ctrl-C reaches only prod-local, which stops
                # the processes in order; and its process group holds all of its children.
                start_new_session=True,
                preexec_fn=_die_with_parent,  # prod-local has no threads
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def start_all(self) -> None:
        env = self.process_environment()
        python = sys.executable
        self.web_ports = [_free_port() for _ in range(self.web_nodes)]
        self.ws_port = _free_port()
        say(f"starting gunicorn x{self.web_nodes}, daphne, the Celery worker and beat")
        for number, port in enumerate(self.web_ports, start=1):
            self.start(
                f"web-{number}",
                [python, "-m", "gunicorn", "ota_site.wsgi", f"--bind=127.0.0.1:{port}",
                 f"--workers={self.web_workers}", "--worker-class=sync",
                 "--access-logfile=-", "--graceful-timeout=5", "--no-control-socket"],
                env,
            )  # fmt: skip
        self.start(
            "ws",
            [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.ws_port),
             "--proxy-headers", "--access-log", "-", "ota_site.asgi:application"],
            env,
        )  # fmt: skip
        self.start(
            "worker",
            [python, "-m", "celery", "-A", "ota_site", "worker", "--loglevel=INFO",
             "--concurrency=2", "--hostname=prod-local-worker@%h"],
            env,
        )  # fmt: skip
        self.start(
            "beat",
            [python, "-m", "celery", "-A", "ota_site", "beat", "--loglevel=INFO",
             f"--schedule={self.var / 'celerybeat-schedule'}"],
            env,
        )  # fmt: skip
        for port in [*self.web_ports, self.ws_port]:
            self.wait_for(f"http://127.0.0.1:{port}/health")
        main = self.nginx_configuration()
        nginx = _nginx_binary()
        say("starting nginx")
        self.start("nginx", [nginx, "-e", str(self.logs / "nginx-error.log"), "-c", str(main)], env)
        self.wait_for(f"http://127.0.0.1:{self.http_port}/health")

    def wait_for(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_children()
            try:
                with urlopen(url, timeout=2) as answer:  # noqa: S310 (our own http:// URL)
                    if answer.status == 200:
                        return
            except (URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise Failed(f"{url} did not answer 200 within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = "".join(child.log.read_text(errors="replace").splitlines(True)[-20:])
                raise Failed(f"{child.name} exited with status {code}; {child.log}:\n{tail}")

    def state(self) -> dict[str, object]:
        return {
            "https": f"https://127.0.0.1:{self.https_port}",
            "http": f"http://127.0.0.1:{self.http_port}",
            "web": [f"http://127.0.0.1:{port}" for port in self.web_ports],
            "ws": f"http://127.0.0.1:{self.ws_port}",
            "certificate": str(self.folder / "tls" / "server.crt"),
            "app_env": str(self.folder / "app.env"),
            "logs": str(self.logs),
            "pids": {child.name: child.process.pid for child in self.children},
            "prod_local_pid": os.getpid(),
        }

    def stop_all(self) -> None:
        """SIGTERM to each process in reverse order of start (nginx first: no new requests);
        each stops its own workers. Then SIGKILL to any process group still there after
        STOP_TIMEOUT."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop within {STOP_TIMEOUT:.0f} s: killed")
        for child in self.children:
            # Workers of a master that is gone (or one that hung) go with its group.
            _signal_group(child.process.pid, signal.SIGKILL)
            if child.process.poll() is None:
                child.process.wait()
        self.children.clear()


# --- Helpers --------------------------------------------------------------------------------


def say(message: str) -> None:
    print(f"prod-local: {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port(value: str | None, name: str) -> int:
    """A port from the environment or the command line, or a free one; refused when taken."""
    if not value:
        return _free_port()
    try:
        port = int(value)
    except ValueError as exc:
        raise Failed(f"{name}={value!r} is not a port number") from exc
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise Failed(f"port {port} ({name}) is not free: {exc.strerror}") from exc
    return port


def _keep_secret(path: Path, value: str) -> None:
    """Made once, then reused: sessions, API keys and sealed keys survive restarts."""
    if not path.exists():
        path.write_text(value + "\n")
        path.chmod(0o600)


def _self_signed_certificate(folder: Path) -> None:
    """server.crt/server.key for localhost and 127.0.0.1, remade when it nears its end."""
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    now = datetime.now(UTC)
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if existing.not_valid_after_utc > now + timedelta(days=7):
            return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    names = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(names, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _ensure_database(url: str) -> None:
    """CREATE DATABASE when it does not exist (through the server's `postgres` database)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.path.strip("/"):
        raise Failed(f"the database URL must be postgres://.../name, not {url!r}")
    name = parts.path.strip("/")
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if exists is None:
                say(f"creating the database {name}")
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise Failed(f"PostgreSQL at {admin} cannot be used: {exc}") from exc


def _ensure_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        raise Failed(f"Redis at {url} cannot be used: {exc}") from exc


def _nginx_binary() -> str:
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"):
        if Path(candidate).exists():
            return candidate
    raise Failed("nginx is not installed: `apt-get install nginx` (make test installs it)")


def _die_with_parent() -> None:
    """In the child: SIGTERM it if prod-local dies without stopping it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make prod-local",
        description="Run the production process set on this machine: gunicorn x2, daphne, "
        "nginx (TLS), a Celery worker and beat, on the local PostgreSQL and Redis.",
    )
    env = os.environ.get
    parser.add_argument(
        "--port",
        default=env("PROD_LOCAL_PORT"),
        help="nginx's TLS port (PROD_LOCAL_PORT; default: a free port)",
    )
    parser.add_argument(
        "--http-port",
        default=env("PROD_LOCAL_HTTP_PORT"),
        help="nginx's plain-HTTP port (PROD_LOCAL_HTTP_PORT; default: a free port)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(env("PROD_LOCAL_DIR") or ROOT / "var" / "prod-local"),
        help="where logs, configuration and data go (PROD_LOCAL_DIR; default var/prod-local)",
    )
    parser.add_argument(
        "--database-url",
        default=env("PROD_LOCAL_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help=f"PostgreSQL, created if missing (PROD_LOCAL_DATABASE_URL; {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--redis-url",
        default=env("PROD_LOCAL_REDIS_URL") or DEFAULT_REDIS_URL,
        help=f"Redis (PROD_LOCAL_REDIS_URL; default {DEFAULT_REDIS_URL})",
    )
    parser.add_argument("--web-workers", type=int, default=2, help="sync workers per web node")
    args = parser.parse_args(argv)

    handler: Callable[[int, FrameType | None], None] = _raise_stop
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    run: ProdLocal | None = None
    try:
        run = ProdLocal(
            folder=args.dir.resolve(),
            database_url=args.database_url,
            redis_url=args.redis_url,
            https_port=_port(args.port, "PROD_LOCAL_PORT"),
            http_port=_port(args.http_port, "PROD_LOCAL_HTTP_PORT"),
            web_nodes=2,
            web_workers=args.web_workers,
        )
        run.prepare()
        run.start_all()
        state = run.state()
        (run.folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        say(
            f"ready\n  {state['https']}  (TLS, self-signed: {state['certificate']})\n"
            f"  {state['http']}  (plain HTTP, local use)\n"
            f"  logs in {state['logs']}; manage.py with: set -a; . {state['app_env']}; set +a\n"
            "  Ctrl-C stops everything."
        )
        while True:
            run.check_children()
            time.sleep(0.5)
    except Stop as stop:
        say(f"{stop}: stopping")
        return 0
    except Failed as failure:
        say(f"error: {failure}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if run is not None:
            run.stop_all()
            (run.folder / "state.json").unlink(missing_ok=True)
            say("stopped")


if __name__ == "__main__":
    sys.exit(main())
