"""The shipped nginx configuration passes `nginx -t` (Debian's nginx, installed by make test), and
behaves as docs/security.md says with device certificates (a live nginx in front of a stub app)."""

from __future__ import annotations

import ipaddress
import json
import os
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CONFIG = Path(__file__).resolve().parent.parent / "ota_site" / "deploy" / "nginx.conf"


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: `make test` installs Debian's nginx")
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(tls / "server.key"), "-out", str(tls / "server.crt"),
            "-subj", "/CN=ota.example.com", "-days", "1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.copy(tls / "server.crt", tmp_path / "device-ca.pem")
    # The paths under /etc/ota/ point at this test's files; the ports at free-standing ones
    # (nginx -t binds nothing, but needs no root-only port either).
    server = (
        CONFIG.read_text()
        .replace("/etc/ota/", f"{tmp_path}/")
        .replace("listen [::]:443 ssl http2;", "")
        .replace("listen [::]:80;", "")
    )
    (tmp_path / "server.conf").write_text(server)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {tmp_path}/server.conf;\n}}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


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


class _StubApp(BaseHTTPRequestHandler):
    """Plays gunicorn: answers with what it received."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        reply = json.dumps(
            {
                "method": self.command,
                "path": self.path,
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


@pytest.fixture(scope="module")
def live_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The shipped configuration, on free ports, in front of _StubApp; yields (url, folder)."""
    folder = tmp_path_factory.mktemp("nginx")
    (folder / "tls").mkdir()
    ca = _certificate(folder, "device-ca", ca=True, days=(-1, 30))
    _certificate(folder, "device", issuer=ca)
    _certificate(folder, "expired", issuer=ca, days=(-30, -1))
    # From a CA that is not in the bundle (say, one retired from it).
    _certificate(folder, "foreign", issuer=_certificate(folder, "other-ca", ca=True))
    _certificate(folder / "tls", "server")
    (folder / "device-ca.pem").write_bytes((folder / "device-ca.crt").read_bytes())
    app = ThreadingHTTPServer(("127.0.0.1", 0), _StubApp)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    port = _free_port()
    server = (
        CONFIG.read_text()
        .replace("/etc/ota/", f"{folder}/")
        .replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{app.server_address[1]};")
        .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;")
        .replace("listen [::]:443 ssl http2;", "")
        .replace("listen 80;", f"listen 127.0.0.1:{_free_port()};")
        .replace("listen [::]:80;", "")
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
        [_nginx(), "-c", str(folder / "nginx.conf")], stderr=subprocess.DEVNULL
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
