"""The deployment files: docker-compose.yml (parsed: services, one image, replicas, health checks,
start-up order, settings in .env.example, nginx's upstreams against the services), the nginx
template ota_site/deploy/nginx.conf (`nginx -t` with Debian's nginx, installed by make test, as
compose and prod-local render it), and a live nginx in front of a stub app: device certificates
reach the app as docs/security.md says, and firmware files go out through X-Accel-Redirect."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ota_site.deploy import prod_local
from ota_site.deploy.render import PLACEHOLDER, TEMPLATE, placeholders, render

ROOT = Path(__file__).resolve().parent.parent
CONFIG = TEMPLATE
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX_ENV: dict[str, str] = SERVICES["nginx"]["environment"]
# The processes that run our code, from the one image.
APP_SERVICES = ("migrate", "nginx-ca", "web", "ws", "worker", "beat")


def env_example() -> dict[str, str]:
    """Variables set in .env.example (commented-out ones are not)."""
    return dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#") and "=" in line
    )


def compose_default(name: str) -> str:
    """The default of ${NAME:-default} in docker-compose.yml."""
    match = re.search(rf"\$\{{{name}:-([^}}]*)\}}", (ROOT / "docker-compose.yml").read_text())
    assert match, name
    return match.group(1)


# --- The template and its renderer ----------------------------------------------------------------


def test_render_replaces_the_ota_placeholders_and_nothing_else() -> None:
    template = CONFIG.read_text()
    values = {name: f"<{name}>" for name in placeholders(template)}
    text = render(template, values)
    assert not PLACEHOLDER.search(text) and "<OTA_WEB_SERVERS>" in text
    for variable in ("$host", "$http_host", "$ssl_client_verify", "$upstream_http_etag"):
        assert variable in text
    values.pop("OTA_MEDIA_ROOT")
    with pytest.raises(KeyError, match="OTA_MEDIA_ROOT"):
        render(template, values)
    # envsubst (the compose side) also replaces $NAME without braces: the template has none.
    assert not re.search(r"\$OTA_", template)


def _nginx_t(main: Path) -> None:
    result = subprocess.run(
        [_nginx(), "-t", "-e", str(main.parent / "error.log"), "-c", str(main)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_accepts_the_configuration_as_prod_local_renders_it(tmp_path: Path) -> None:
    run = prod_local.ProdLocal(
        folder=tmp_path,
        database_url="postgres://unused/x",
        redis_url="redis://unused/0",
        https_port=_free_port(),
        http_port=_free_port(),
        web_nodes=2,
        web_workers=1,
        web_ports=[_free_port(), _free_port()],
        ws_port=_free_port(),
    )
    for folder in ("tls", "nginx", "logs"):
        (tmp_path / folder).mkdir()
    prod_local._self_signed_certificate(tmp_path / "tls")
    shutil.copy(tmp_path / "tls" / "server.crt", tmp_path / "nginx" / "device-ca.pem")
    main = run.nginx_configuration()
    server = (tmp_path / "nginx" / "ota.conf").read_text()
    assert server.count("server 127.0.0.1:") == 3  # two web nodes, one ws
    _nginx_t(main)


def test_nginx_accepts_the_configuration_as_compose_renders_it(tmp_path: Path) -> None:
    """With compose's values; the paths under /etc/ota/ point at this test's files, and the
    service names at 127.0.0.1 (nginx -t resolves upstream names; it binds no port)."""
    tls = tmp_path / "tls"
    tls.mkdir()
    prod_local._self_signed_certificate(tls)
    values = {
        name: value.replace("/etc/ota/", f"{tmp_path}/")
        for name, value in NGINX_ENV.items()
        if name.startswith("OTA_")
    }
    values["OTA_SERVER_NAME"] = compose_default("OTA_SERVER_NAME")
    (tmp_path / "ca").mkdir()
    shutil.copy(tls / "server.crt", values["OTA_DEVICE_CA_BUNDLE"])
    for name in ("OTA_WEB_SERVERS", "OTA_WS_SERVERS"):
        values[name] = re.sub(r"server [\w-]+:", "server 127.0.0.1:", values[name])
    (tmp_path / "server.conf").write_text(render(CONFIG.read_text(), values))
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/server.conf;\n}}\n"
    )
    _nginx_t(main)


def test_client_certificate_headers_are_always_overwritten() -> None:
    """nginx must replace client-sent X-SSL-Client-* on every route, so only its verdict
    reaches the app (which believes it only from TRUSTED_PROXIES as well)."""
    text = CONFIG.read_text()
    assert "ssl_verify_client optional_no_ca;" in text
    assert "error_page 495 = @client_cert_failed;" in text
    assert 'proxy_set_header X-SSL-Client-Verify "";' in text
    assert "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;" in text
    assert "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;" in text
    assert "underscores_in_headers on" not in text


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_runs_the_production_process_set_from_one_image() -> None:
    expected = {"postgres", "redis", "minio", "minio-init", "nginx", *APP_SERVICES}
    assert expected <= set(SERVICES)
    built = {name for name, service in SERVICES.items() if "build" in service}
    assert built == set(APP_SERVICES)
    assert {SERVICES[name]["image"] for name in APP_SERVICES} == {"ota-server:local"}
    assert {SERVICES[name]["build"] for name in APP_SERVICES} == {"."}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[hsm,otel]"' in dockerfile  # HSM keys and tracing work in the image
    for package in ("ota_site", "devices", "firmware", "rollouts", "metrics"):
        assert f"COPY {package}/ {package}/" in dockerfile
    assert SERVICES["web"]["deploy"]["replicas"] >= 2
    assert SERVICES["beat"]["deploy"]["replicas"] == 1  # one scheduler, never more
    assert "--proxy-headers" in SERVICES["ws"]["command"]


def test_every_long_running_service_has_a_health_check() -> None:
    for name in ("postgres", "redis", "minio", "web", "ws", "worker", "nginx"):
        assert SERVICES[name]["healthcheck"]["test"], name


def test_services_start_in_order() -> None:
    def waits_for(name: str) -> dict[str, str]:
        return {
            other: condition["condition"]
            for other, condition in SERVICES[name].get("depends_on", {}).items()
        }

    for name in ("web", "ws", "worker", "beat"):
        assert waits_for(name) | {
            "postgres": "service_healthy",
            "redis": "service_healthy",
            "migrate": "service_completed_successfully",
        } == waits_for(name), name
    assert waits_for("migrate")["postgres"] == "service_healthy"
    assert waits_for("nginx-ca")["migrate"] == "service_completed_successfully"
    assert waits_for("nginx") == {
        "web": "service_healthy",
        "ws": "service_healthy",
        "nginx-ca": "service_completed_successfully",
    }

    # Every name exists, and nothing waits for itself through others.
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name in SERVICES, name
        assert name not in path, f"cycle: {(*path, name)}"
        for other in waits_for(name):
            visit(other, (*path, name))

    for name in SERVICES:
        visit(name, ())


def test_only_nginx_and_the_object_store_are_published() -> None:
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"nginx", "minio"}
    assert set(SERVICES["nginx"]["ports"]) == {"80:80", "443:443"}


def test_nginx_upstreams_are_the_compose_services_and_their_ports() -> None:
    template = CONFIG.read_text()
    assert re.search(r"upstream ota_web \{[^}]*\$\{OTA_WEB_SERVERS\}", template)
    assert re.search(r"upstream ota_ws \{[^}]*\$\{OTA_WS_SERVERS\}", template)
    listening = {
        "web": re.search(r"--bind=0\.0\.0\.0:(\d+)", " ".join(SERVICES["web"]["command"])),
        "ws": re.search(r"--port (\d+)", " ".join(SERVICES["ws"]["command"])),
    }
    for variable, service in (("OTA_WEB_SERVERS", "web"), ("OTA_WS_SERVERS", "ws")):
        servers = re.findall(r"server ([\w-]+):(\d+);", NGINX_ENV[variable])
        port = listening[service]
        assert port is not None
        assert servers == [(service, port.group(1))], NGINX_ENV[variable]
    # The template is what the nginx image renders, with every value it needs.
    assert (
        f"./{CONFIG.relative_to(ROOT)}:/etc/nginx/templates/default.conf.template:ro"
        in (SERVICES["nginx"]["volumes"])
    )
    assert NGINX_ENV["NGINX_ENVSUBST_FILTER"] == "^OTA_"
    assert placeholders(template) == {name for name in NGINX_ENV if name.startswith("OTA_")}


def test_firmware_files_are_where_nginx_looks_for_them() -> None:
    """Local storage: the app's MEDIA_ROOT (OTA_VAR_DIR/media in the image) is the volume nginx
    reads, and the X-Accel prefix is the same in the app's settings and in nginx."""
    var_dir = re.search(r"OTA_VAR_DIR=(\S+)", (ROOT / "Dockerfile").read_text())
    assert var_dir is not None
    media = f"{var_dir.group(1)}/media"
    assert NGINX_ENV["OTA_MEDIA_ROOT"] == f"{media}/"
    assert f"firmware-media:{media}" in SERVICES["web"]["volumes"]
    assert f"firmware-media:{media}:ro" in SERVICES["nginx"]["volumes"]
    location = re.search(r"location (\S+) \{\s*internal;", CONFIG.read_text())
    assert location is not None and location.group(1) == prod_local.X_ACCEL_PREFIX
    example = (ROOT / ".env.example").read_text()
    assert f"# FIRMWARE_X_ACCEL_PREFIX={prod_local.X_ACCEL_PREFIX}\n" in example


def test_env_example_sets_what_the_services_need() -> None:
    example = env_example()
    compose_text = (ROOT / "docker-compose.yml").read_text()
    for name in re.findall(r"\$\{(\w+):\?", compose_text):  # compose refuses to start without
        assert example.get(name), name
    for name in (
        "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS", "DJANGO_CSRF_TRUSTED_ORIGINS",
        "DJANGO_BEHIND_TLS_PROXY", "TRUSTED_PROXIES", "DATABASE_URL", "REDIS_URL", "STORAGE",
        "AWS_STORAGE_BUCKET_NAME", "AWS_S3_ENDPOINT_URL", "AWS_S3_PUBLIC_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD",
    ):  # fmt: skip
        assert example.get(name), name
    # The database and Redis are the compose services; the health checks' host is allowed.
    assert "@postgres:5432/" in example["DATABASE_URL"]
    assert example["REDIS_URL"].startswith("redis://redis:6379/")
    assert "127.0.0.1" in example["DJANGO_ALLOWED_HOSTS"].split(",")
    # The app believes forwarded headers from nginx's fixed address, and only from it.
    nginx_address = compose_default("OTA_NGINX_ADDRESS")
    assert example["TRUSTED_PROXIES"] == nginx_address == example["OTA_NGINX_ADDRESS"]
    subnet = ipaddress.ip_network(compose_default("OTA_NETWORK_SUBNET"))
    assert ipaddress.ip_address(nginx_address) in subnet


# --- Live: what reaches the app when a device presents its certificate --------------------------


def _nginx() -> str:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: `make test` installs Debian's nginx")
    return nginx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _certificate(
    folder: Path,
    name: str,
    *,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    days: tuple[int, int] = (-1, 1),
    ca: bool = False,
) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    """Write <name>.crt and <name>.key (self-signed unless ``issuer``); valid from days[0] to
    days[1] relative to now."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
    )
    if name == "server":
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return subject, key


FIRMWARE = bytes(range(256)) * 100
ETAG = '"0123abcd"'


class _StubApp(BaseHTTPRequestHandler):
    """Plays gunicorn: answers with what it received; hands downloads to nginx."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        if self.path.endswith("/download"):
            self.send_response(200)
            self.send_header("X-Accel-Redirect", "/_x_accel/firmware/firmware/board/image.bin")
            self.send_header("ETag", ETAG)
            self.send_header("X-Checksum-Sha256", "0123abcd")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Disposition", 'attachment; filename="image.bin"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        reply = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "host": self.headers.get("Host") or "",
                "verify": self.headers.get("X-SSL-Client-Verify") or "",
                "cert": unquote(self.headers.get("X-SSL-Client-Cert") or ""),
                "body": body,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST
    do_HEAD = do_POST


@pytest.fixture(scope="module")
def live_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The shipped template, rendered for free ports, in front of _StubApp; yields (url,
    folder). Plain HTTP is on the port in folder/http-port."""
    folder = tmp_path_factory.mktemp("nginx")
    (folder / "tls").mkdir()
    ca = _certificate(folder, "device-ca", ca=True, days=(-1, 30))
    _certificate(folder, "device", issuer=ca)
    _certificate(folder, "expired", issuer=ca, days=(-30, -1))
    # From a CA that is not in the bundle (say, one retired from it).
    _certificate(folder, "foreign", issuer=_certificate(folder, "other-ca", ca=True))
    _certificate(folder / "tls", "server")
    (folder / "device-ca.pem").write_bytes((folder / "device-ca.crt").read_bytes())
    (folder / "media" / "firmware" / "board").mkdir(parents=True)
    (folder / "media" / "firmware" / "board" / "image.bin").write_bytes(FIRMWARE)
    app = ThreadingHTTPServer(("127.0.0.1", 0), _StubApp)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port, http_port = _free_port(), _free_port()
    (folder / "http-port").write_text(str(http_port))
    server = render(
        CONFIG.read_text(),
        {
            "OTA_SERVER_NAME": "localhost",
            "OTA_HTTPS_LISTEN": f"127.0.0.1:{port}",
            "OTA_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "OTA_PLAIN_HTTP": "redirect",
            "OTA_WEB_SERVERS": f"server 127.0.0.1:{app.server_address[1]};",
            "OTA_WS_SERVERS": f"server 127.0.0.1:{app.server_address[1]};",
            "OTA_TLS_CERTIFICATE": str(folder / "tls" / "server.crt"),
            "OTA_TLS_CERTIFICATE_KEY": str(folder / "tls" / "server.key"),
            "OTA_DEVICE_CA_BUNDLE": str(folder / "device-ca.pem"),
            "OTA_MEDIA_ROOT": f"{folder / 'media'}/",
        },
    )
    (folder / "server.conf").write_text(server)
    temp = "".join(
        f"  {kind}_temp_path {folder}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\n  access_log off;\n{temp}  include {folder}/server.conf;\n}}\n"
    )
    process = subprocess.Popen(
        [_nginx(), "-e", str(folder / "error.log"), "-c", str(folder / "nginx.conf")],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"https://127.0.0.1:{port}", folder
    finally:
        process.terminate()
        process.wait(timeout=10)
        app.shutdown()
        app.server_close()


def _post(live_nginx: tuple[str, Path], path: str, cert: str | None) -> dict[str, Any]:
    url, folder = live_nginx
    reply = requests.post(
        url + path,
        json={"device_id": "x"},
        cert=(str(folder / f"{cert}.crt"), str(folder / f"{cert}.key")) if cert else None,
        verify=str(folder / "tls" / "server.crt"),
        timeout=10,
    )
    # Always the app's answer, never an error page of nginx's own.
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    assert result["method"] == "POST" and result["body"] == '{"device_id": "x"}'
    return result


def test_a_verified_certificate_is_forwarded_on_device_routes(
    live_nginx: tuple[str, Path],
) -> None:
    got = _post(live_nginx, "/api/v1/devices/token", "device")
    assert got["verify"] == "SUCCESS"
    assert got["cert"] == (live_nginx[1] / "device.crt").read_text()
    # Elsewhere the headers are blanked, and without a certificate the verdict is NONE.
    assert _post(live_nginx, "/api/v1/firmware", "device")["verify"] == ""
    assert _post(live_nginx, "/api/v1/devices/token", None)["verify"] == "NONE"


@pytest.mark.parametrize(
    ("cert", "reason"),
    [
        ("expired", "FAILED:certificate has expired"),
        # A CA that is not (or no longer) in the bundle.
        ("foreign", "FAILED:unable to verify the first certificate"),
    ],
)
def test_a_failed_certificate_still_reaches_the_app(
    live_nginx: tuple[str, Path], cert: str, reason: str
) -> None:
    """Not nginx's 400: enrollment and the secret-based token work, and /devices/token gets the
    verdict and the certificate so that the app can refuse it with a clear code."""
    for path in ("/api/v1/devices/enroll", "/api/v1/devices/token"):
        got = _post(live_nginx, path, cert)
        assert got["path"] == path
        assert got["verify"].startswith(reason) and got["verify"] != "SUCCESS"
        assert got["cert"] == (live_nginx[1] / f"{cert}.crt").read_text()
    # Other routes get through too, never with a SUCCESS (the verdict is the failure, or blank).
    got = _post(live_nginx, "/api/v1/firmware", cert)
    assert got["path"] == "/api/v1/firmware" and got["verify"] in ("", reason)


def test_hawkbit_ddi_routes_get_the_certificate_too(live_nginx: tuple[str, Path]) -> None:
    """DDI clients authenticate by certificate alone (docs/ddi.md)."""
    got = _post(live_nginx, "/DEFAULT/controller/v1/board-7", "device")
    assert got["verify"] == "SUCCESS"
    assert got["cert"] == (live_nginx[1] / "device.crt").read_text()
    # The client's Host, port included: the app builds the absolute links devices follow.
    assert got["host"] == live_nginx[0].removeprefix("https://")


def test_plain_http_is_sent_to_https(live_nginx: tuple[str, Path]) -> None:
    http_port = (live_nginx[1] / "http-port").read_text()
    reply = requests.get(
        f"http://127.0.0.1:{http_port}/api/v1/firmware", allow_redirects=False, timeout=10
    )
    assert reply.status_code == 308
    assert reply.headers["Location"] == "https://127.0.0.1/api/v1/firmware"


def _download(live_nginx: tuple[str, Path], method: str = "GET", **headers: str) -> Any:
    url, folder = live_nginx
    return requests.request(
        method,
        f"{url}/api/v1/firmware/abc/download",
        headers=headers,
        verify=str(folder / "tls" / "server.crt"),
        timeout=10,
    )


def test_nginx_sends_the_file_the_app_names(live_nginx: tuple[str, Path]) -> None:
    whole = _download(live_nginx)
    assert whole.status_code == 200 and whole.content == FIRMWARE
    # The app's ETag and checksum, not nginx's own; nginx's internal header never leaks.
    assert whole.headers["ETag"] == ETAG and whole.headers["X-Checksum-Sha256"] == "0123abcd"
    assert whole.headers["Content-Disposition"] == 'attachment; filename="image.bin"'
    assert "X-Accel-Redirect" not in whole.headers
    part = _download(live_nginx, Range="bytes=10-19")
    assert part.status_code == 206 and part.content == FIRMWARE[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(FIRMWARE)}"
    head = _download(live_nginx, "HEAD", Range="bytes=0-99")
    assert head.status_code == 206 and head.content == b""
    assert head.headers["Content-Length"] == "100"


def test_if_range_is_judged_against_the_apps_etag(live_nginx: tuple[str, Path]) -> None:
    resumed = _download(live_nginx, Range="bytes=25000-", **{"If-Range": ETAG})
    assert resumed.status_code == 206 and resumed.content == FIRMWARE[25000:]
    changed = _download(live_nginx, Range="bytes=25000-", **{"If-Range": '"other"'})
    assert changed.status_code == 200 and changed.content == FIRMWARE
    # Several ranges: the whole file, as the app answers them without nginx.
    several = _download(live_nginx, Range="bytes=0-1,5-6")
    assert several.status_code == 200 and several.content == FIRMWARE


def test_internal_locations_are_not_reachable_from_outside(
    live_nginx: tuple[str, Path],
) -> None:
    url, folder = live_nginx
    reply = requests.get(
        f"{url}/_x_accel/firmware/firmware/board/image.bin",
        verify=str(folder / "tls" / "server.crt"),
        timeout=10,
    )
    assert reply.status_code == 404 and reply.content != FIRMWARE
    # Nor are the metrics: Prometheus scrapes each web node itself.
    metrics = requests.get(f"{url}/metrics", verify=str(folder / "tls" / "server.crt"), timeout=10)
    assert metrics.status_code == 403


# --- The device CA bundle for nginx ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_ca_bundle_is_a_placeholder_until_the_device_ca_exists(tmp_path: Path) -> None:
    from devices import ca_bundle, certificates

    path = tmp_path / "ca" / "device-ca.pem"
    assert ca_bundle.main([str(path)]) == 0
    placeholder = x509.load_pem_x509_certificates(path.read_bytes())
    assert len(placeholder) == 1
    assert placeholder[0].subject.rfc4514_string() == f"CN={ca_bundle.PLACEHOLDER_NAME}"
    issuer = certificates.create_device_ca(
        common_name="OTA device CA", days=30, rotate=False, actor="test"
    )
    assert ca_bundle.main([str(path)]) == 0
    assert path.read_text() == issuer.certificate
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # nginx's workers read it
