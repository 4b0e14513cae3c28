"""The shipped nginx configuration passes `nginx -t` (Debian's nginx, installed by make test)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
    assert "ssl_verify_client optional;" in text
    assert 'proxy_set_header X-SSL-Client-Verify "";' in text
    assert "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;" in text
    assert "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;" in text
    assert "underscores_in_headers on" not in text
