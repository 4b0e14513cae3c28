"""The reference client's device certificate: its own key, enrollment by CSR, mTLS tokens.

The live part runs a real gunicorn (TRUSTED_PROXIES = 127.0.0.1) behind a tiny TLS proxy that
plays nginx: it asks for a client certificate issued by the device CA and forwards the verdict
and the certificate in the headers nginx would set.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devices import ca as server_ca
from ota_client import cli
from ota_client.agent import Agent, Outcome
from ota_client.api import Offline, Refused, ServerClient
from ota_client.config import Config, ConfigError
from ota_client.identity import Identity, IdentityError
from tests.e2e import fresh_database, gunicorn, manage, server_env

DEVICE_TYPE = "cert-board"
FORWARDED = ("x-ssl-client-verify", "x-ssl-client-cert")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


# --- The identity files -------------------------------------------------------------------------


def test_the_key_is_private_and_kept(tmp_path: Path) -> None:
    identity = Identity(tmp_path / "state")
    key = identity.key()
    assert stat.S_IMODE(os.stat(identity.key_path).st_mode) == 0o600
    assert Identity(tmp_path / "state").key().public_key() == key.public_key()
    # The CSR is one the server accepts, for this key.
    csr = server_ca.load_csr(identity.csr())
    assert csr.public_key() == key.public_key()


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    identity = Identity(tmp_path)
    identity.key()
    _other_key, other_cert = server_ca.create_ca("someone else", days=1)
    with pytest.raises(IdentityError, match="not for this device's key"):
        identity.save_certificate(server_ca.to_pem(other_cert))
    with pytest.raises(IdentityError):
        identity.save_certificate("garbage")
    assert not identity.has_certificate() and identity.client_cert() is None


def test_renewal_is_due_after_two_thirds(tmp_path: Path) -> None:
    identity = Identity(tmp_path)
    key = identity.key()
    ca_key, ca_cert = server_ca.create_ca("test CA", days=10)
    issued = server_ca.issue(
        x509.load_pem_x509_csr(identity.csr().encode()),
        device_id=uuid.uuid4(),
        ca_certificate=ca_cert,
        ca_key=ca_key,
        days=3,
    )
    identity.save_certificate(issued.pem, server_ca.to_pem(ca_cert))
    assert issued.certificate.public_key() == key.public_key()
    now = datetime.now(UTC)
    assert not identity.needs_renewal(now=now)
    assert identity.needs_renewal(now=now + timedelta(days=2, hours=1))
    assert identity.client_cert() == (str(identity.certificate_path), str(identity.key_path))


# --- Live: enrollment by CSR and tokens over mTLS ------------------------------------------------


def _server_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed TLS certificate for 127.0.0.1 (the proxy's), which the client trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "proxy.crt", folder / "proxy.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _handler(upstream: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in HOP_BY_HOP and k.lower() not in FORWARDED
            }
            headers["Host"] = self.headers.get("Host", "")
            # What nginx sets: its verdict, and the certificate as $ssl_client_escaped_cert.
            assert isinstance(self.connection, ssl.SSLSocket)
            peer = self.connection.getpeercert(binary_form=True)
            headers["X-SSL-Client-Verify"] = "SUCCESS" if peer else "NONE"
            if peer:
                headers["X-SSL-Client-Cert"] = quote(ssl.DER_cert_to_PEM_cert(peer))
            reply = requests.request(
                self.command,
                upstream + self.path,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=30,
            )
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.content)))
            self.end_headers()
            self.wfile.write(reply.content)

        do_GET = do_POST = do_PUT = do_HEAD = forward

    return Handler


@dataclass
class MtlsServer:
    url: str  # the TLS proxy
    direct: str  # gunicorn itself
    env: dict[str, str]
    enrollment_token: str
    tls_bundle: Path


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsServer]:
    folder = tmp_path_factory.mktemp("mtls")
    with fresh_database() as database:
        env = server_env(
            folder / "var",
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"),
            CACHE_KEY_PREFIX=f"mtls-{uuid.uuid4().hex[:8]}",
            TRUSTED_PROXIES="127.0.0.1",
        )
        manage(env, "migrate", "--noinput")
        manage(env, "device_ca", "init", "--common-name", "mTLS test CA", "--days", "30")
        bundle = folder / "device-ca.pem"
        bundle.write_text(manage(env, "device_ca", "export-cert"))
        token = json.loads(manage(env, "create_enrollment_token", "--name", "mtls", "--json"))[
            "token"
        ]
        cert_path, key_path = _server_certificate(folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        context.load_verify_locations(cafile=str(bundle))
        context.verify_mode = ssl.CERT_OPTIONAL  # ssl_verify_client optional
        with gunicorn(env) as upstream:
            proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream))
            proxy.socket = context.wrap_socket(proxy.socket, server_side=True)
            thread = threading.Thread(target=proxy.serve_forever, daemon=True)
            thread.start()
            try:
                yield MtlsServer(
                    url=f"https://127.0.0.1:{proxy.server_address[1]}",
                    direct=upstream,
                    env=env,
                    enrollment_token=token,
                    tls_bundle=cert_path,
                )
            finally:
                proxy.shutdown()
                proxy.server_close()


def config_for(server: MtlsServer, root: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "server": server.url,
        "device_type": DEVICE_TYPE,
        "hardware_id": f"cert-{uuid.uuid4().hex[:12]}",
        "state_dir": root / "state",
        "current_version": "1.0.0",
        "enrollment_token": server.enrollment_token,
        "use_certificate": True,
        "allow_without_tuf": True,
    }
    values.update(overrides)
    return Config(**values).with_overrides()


@pytest.fixture
def trust_proxy(mtls_server: MtlsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The device trusts the server's TLS certificate as it would trust a real one.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(mtls_server.tls_bundle))


def test_enroll_by_csr_and_authenticate_by_certificate(
    mtls_server: MtlsServer, trust_proxy: None, tmp_path: Path
) -> None:
    config = config_for(mtls_server, tmp_path)
    client = ServerClient(config)
    credentials = client.ensure_enrolled()
    assert client.enrolled_now and credentials.device_secret == ""
    saved = json.loads((config.state_dir / "credentials.json").read_text())
    assert saved["device_secret"] == ""
    identity = Identity(config.state_dir)
    cert = identity.certificate()
    assert cert is not None
    assert cert.subject.rfc4514_string() == f"CN={credentials.device_id}"
    assert stat.S_IMODE(os.stat(identity.key_path).st_mode) == 0o600

    # A new process: no token yet, so it gets one with its certificate over mTLS.
    later = ServerClient(config)
    assert later.http.cert == identity.client_cert()
    assert later.check()["update_available"] is False
    assert later.access_token()

    # Renewal: a new certificate for the same key, and mTLS keeps working with it.
    later.renew_certificate()
    renewed = identity.certificate()
    assert renewed is not None and renewed.serial_number != cert.serial_number
    assert ServerClient(config).check()["update_available"] is False


def test_without_the_proxy_there_is_no_token(
    mtls_server: MtlsServer, trust_proxy: None, tmp_path: Path
) -> None:
    """Straight to gunicorn, the certificate is not seen and no secret exists: refused."""
    config = config_for(mtls_server, tmp_path)
    ServerClient(config).ensure_enrolled()
    # No enrollment token either, so the client cannot fall back to enrolling again.
    direct = ServerClient(config.with_overrides(server=mtls_server.direct, enrollment_token=""))
    with pytest.raises(Refused) as refused:
        direct.access_token()
    assert refused.value.code == "credentials_missing"


def test_the_command_line(
    mtls_server: MtlsServer, trust_proxy: None, tmp_path: Path, capsys: Any
) -> None:
    state = tmp_path / "state"
    toml = tmp_path / "client.toml"
    toml.write_text(
        "\n".join(
            [
                f'server = "{mtls_server.url}"',
                f'device_type = "{DEVICE_TYPE}"',
                f'hardware_id = "cli-{uuid.uuid4().hex[:10]}"',
                f'state_dir = "{state}"',
                'current_version = "1.0.0"',
                f'enrollment_token = "{mtls_server.enrollment_token}"',
                "[trust]",
                "allow_without_tuf = true",
            ]
        )
        + "\n"
    )
    assert cli.main(["enroll", "--config", str(toml), "--csr"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["enrolled_now"] and result["certificate"] == str(state / "device-cert.pem")
    # [identity] certificate = true in the file does the same on later runs.
    config = Config.load(toml, use_certificate=True)
    assert ServerClient(config).check()["update_available"] is False
    # Without it too: the enrolled certificate in state_dir is used (not "no secret, no
    # certificate", 401 credentials_missing and a refused re-enrollment).
    config = Config.load(toml)
    assert not config.use_certificate
    client = ServerClient(config)
    assert client.identity is not None and client.http.cert == client.identity.client_cert()
    assert client.check()["update_available"] is False
    assert cli.main(["once", "--config", str(toml)]) == 0


def test_a_device_enrolled_by_secret_presents_no_certificate(
    mtls_server: MtlsServer, trust_proxy: None, tmp_path: Path
) -> None:
    config = config_for(mtls_server, tmp_path, use_certificate=False)
    client = ServerClient(config)
    assert client.ensure_enrolled().device_secret
    assert client.identity is None and client.http.cert is None
    assert not (config.state_dir / "device-key.pem").exists()
    assert not client.certificate_renewal_due()


# --- Live: the agent renews the certificate ------------------------------------------------------


def _serial(config: Config) -> int:
    certificate = Identity(config.state_dir).certificate()
    assert certificate is not None
    return certificate.serial_number


def test_the_agent_renews_its_certificate_when_due(
    mtls_server: MtlsServer, trust_proxy: None, tmp_path: Path
) -> None:
    config = config_for(mtls_server, tmp_path)
    ServerClient(config).ensure_enrolled()
    first = _serial(config)
    key = Identity(config.state_dir).key_path.read_bytes()

    # Not due (2/3 of 365 days): the cycle leaves the certificate alone.
    assert Agent(config).run_once().outcome is Outcome.IDLE
    assert _serial(config) == first

    # Due at once (a tiny fraction of the lifetime has passed): renewed in the idle cycle, for
    # the same key, and the new certificate works over mTLS.
    due = config.with_overrides(certificate_renew_after=1e-9)
    assert Agent(due).run_once().outcome is Outcome.IDLE
    second = _serial(config)
    assert second != first
    assert Identity(config.state_dir).key_path.read_bytes() == key
    assert ServerClient(config).check()["update_available"] is False
    # Renewal is only from idle: no other phase (an update in progress) renews.
    agent = Agent(due)
    assert agent.server.certificate_renewal_due()
    calls: list[str] = []
    agent.server.renew_certificate = lambda: calls.append("renew")  # type: ignore[method-assign]
    for phase in ("downloading", "downloaded", "installing", "installed", "armed"):
        agent.state.phase = phase
        with contextlib.suppress(Exception):  # these phases need an offer; there is none
            agent.step()
    assert calls == []


def test_a_failed_renewal_keeps_the_old_certificate_and_the_cycle(
    mtls_server: MtlsServer,
    trust_proxy: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = config_for(mtls_server, tmp_path, certificate_renew_after=1e-9)
    ServerClient(config).ensure_enrolled()
    first = _serial(config)
    old_pem = Identity(config.state_dir).certificate_path.read_bytes()

    # A power cut while the new certificate is written: the rename never happens.
    agent = Agent(config)
    replace = os.replace

    def cut(source: Any, target: Any) -> None:
        if Path(target).name == "device-cert.pem":
            raise OSError("power cut")
        replace(source, target)

    monkeypatch.setattr(os, "replace", cut)
    assert agent.run_once().outcome is Outcome.IDLE  # the update check still ran
    assert "renewing the device certificate failed" in caplog.text
    assert Identity(config.state_dir).certificate_path.read_bytes() == old_pem
    assert not list(config.state_dir.glob(".device-cert.pem.*"))  # no temporary left behind
    # The old pair still works.
    assert ServerClient(config).check()["update_available"] is False

    # The server unreachable for the renewal alone: logged, and the cycle goes on.
    monkeypatch.setattr(os, "replace", replace)
    agent = Agent(config)

    def offline() -> None:
        raise Offline("POST /api/v1/devices/x/certificate: ConnectionError")

    agent.server.renew_certificate = offline  # type: ignore[method-assign]
    assert agent.run_once().outcome is Outcome.IDLE
    assert _serial(config) == first

    # Next cycle: renewed.
    assert Agent(config).run_once().outcome is Outcome.IDLE
    assert _serial(config) != first


def test_renew_after_is_a_fraction(tmp_path: Path) -> None:
    base = {
        "server": "https://ota.example.com",
        "device_type": DEVICE_TYPE,
        "hardware_id": "x",
        "state_dir": str(tmp_path),
        "current_version": "1.0.0",
    }
    config = Config.from_dict({**base, "identity": {"renew_after": 0.5}})
    assert config.certificate_renew_after == 0.5
    assert Config.from_dict(base).certificate_renew_after == pytest.approx(2 / 3)
    for wrong in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="renew_after"):
            Config.from_dict({**base, "identity": {"renew_after": wrong}})
