"""mTLS behind nginx: a device trades its verified client certificate for a token, no secret.

nginx verifies the certificate and forwards it in X-SSL-Client-Verify / X-SSL-Client-Cert; the
app believes those headers only from TRUSTED_PROXIES and checks the certificate again itself.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rest_framework.test import APIClient

from devices import ca, certificates
from devices.models import DeviceCA, DeviceCertificate
from ota_site import keystore
from tests.conftest import DeviceActor
from tests.test_device_certificates import make_csr

TOKEN = "/api/v1/devices/token"
PROXY = "10.1.2.3"


@pytest.fixture(autouse=True)
def _proxy(settings: Any) -> None:
    settings.TRUSTED_PROXIES = ["127.0.0.1", "10.1.0.0/16"]


@pytest.fixture
def device_ca(db: Any) -> DeviceCA:
    return certificates.create_device_ca(common_name="Test device CA", days=30)


@pytest.fixture
def issued(device_a: DeviceActor, device_ca: DeviceCA) -> DeviceCertificate:
    return certificates.issue_certificate(device_a.device, make_csr()[1])


def via_nginx(
    pem: str | None, *, verify: str = "SUCCESS", remote: str = PROXY, escape: bool = True
) -> dict[str, Any]:
    """The META a request has when nginx forwards it ($ssl_client_escaped_cert is URL-encoded)."""
    meta: dict[str, Any] = {"REMOTE_ADDR": remote, "HTTP_X_SSL_CLIENT_VERIFY": verify}
    if pem is not None:
        meta["HTTP_X_SSL_CLIENT_CERT"] = quote(pem) if escape else pem
    return meta


def ask(api: APIClient, meta: dict[str, Any], body: dict[str, Any] | None = None) -> Any:
    return api.post(TOKEN, body or {}, format="json", **meta)


def refused(reply: Any, code: str) -> None:
    assert reply.status_code == 401, reply.content
    assert reply.json()["code"] == code, reply.json()
    assert "access_token" not in reply.json()


def build_certificate(
    *,
    subject_cn: str,
    issuer_key: Any,
    issuer_name: x509.Name,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(issuer_key, hashes.SHA256())
    )


def test_token_by_certificate(
    api: APIClient, device_a: DeviceActor, issued: DeviceCertificate
) -> None:
    reply = ask(api, via_nginx(issued.certificate))
    assert reply.status_code == 200, reply.content
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {reply.json()['access_token']}")
    assert client.get(f"/api/v1/devices/{device_a.id}/updates").status_code == 200
    # Unescaped PEM (a proxy that forwards it differently) and an explicit device id work too.
    reply = ask(api, via_nginx(issued.certificate, escape=False), {"device_id": str(device_a.id)})
    assert reply.status_code == 200, reply.content


def test_headers_from_a_non_proxy_are_ignored(
    api: APIClient, issued: DeviceCertificate, settings: Any
) -> None:
    refused(ask(api, via_nginx(issued.certificate, remote="192.0.2.7")), "credentials_missing")
    settings.TRUSTED_PROXIES = []
    refused(ask(api, via_nginx(issued.certificate, remote=PROXY)), "credentials_missing")


def test_the_proxy_verdict_counts(api: APIClient, issued: DeviceCertificate) -> None:
    refused(
        ask(api, via_nginx(issued.certificate, verify="FAILED:certificate revoked")),
        "certificate_invalid",
    )
    refused(ask(api, via_nginx(issued.certificate, verify="NONE")), "credentials_missing")
    refused(ask(api, via_nginx(None)), "credentials_missing")


def test_a_self_signed_certificate_is_refused(
    api: APIClient, device_a: DeviceActor, device_ca: DeviceCA
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(device_a.id))])
    now = datetime.now(UTC)
    forged = build_certificate(
        subject_cn=str(device_a.id),
        issuer_key=key,
        issuer_name=name,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
    )
    refused(ask(api, via_nginx(ca.to_pem(forged))), "certificate_unknown")


def test_a_certificate_from_a_look_alike_ca_is_refused(
    api: APIClient, device_a: DeviceActor, device_ca: DeviceCA
) -> None:
    """Same issuer name as ours, another key: even recorded in the database it is refused."""
    impostor = ec.generate_private_key(ec.SECP256R1())
    ours = ca.load_certificate(device_ca.certificate)
    now = datetime.now(UTC)
    forged = build_certificate(
        subject_cn=str(device_a.id),
        issuer_key=impostor,
        issuer_name=ours.subject,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
    )
    refused(ask(api, via_nginx(ca.to_pem(forged))), "certificate_unknown")
    # Planted in the database (say by SQL injection elsewhere), the signature still fails.
    DeviceCertificate.objects.create(
        device=device_a.device,
        ca=device_ca,
        serial=format(forged.serial_number, "x"),
        fingerprint=ca.fingerprint(forged),
        not_before=forged.not_valid_before_utc,
        not_after=forged.not_valid_after_utc,
        certificate=ca.to_pem(forged),
    )
    refused(ask(api, via_nginx(ca.to_pem(forged))), "certificate_invalid")


def test_an_expired_certificate_is_refused(
    api: APIClient, device_a: DeviceActor, device_ca: DeviceCA
) -> None:
    key = keystore.unseal_private_key(device_ca.private_key, purpose=ca.KEY_PURPOSE)
    ours = ca.load_certificate(device_ca.certificate)
    now = datetime.now(UTC)
    expired = build_certificate(
        subject_cn=str(device_a.id),
        issuer_key=key,
        issuer_name=ours.subject,
        not_before=now - timedelta(days=10),
        not_after=now - timedelta(seconds=1),
    )
    DeviceCertificate.objects.create(
        device=device_a.device,
        ca=device_ca,
        serial=format(expired.serial_number, "x"),
        fingerprint=ca.fingerprint(expired),
        not_before=expired.not_valid_before_utc,
        not_after=expired.not_valid_after_utc,
        certificate=ca.to_pem(expired),
    )
    refused(ask(api, via_nginx(ca.to_pem(expired))), "certificate_expired")
    # What nginx (optional_no_ca, error_page 495) forwards for it: still certificate_expired.
    failed = via_nginx(ca.to_pem(expired), verify="FAILED:certificate has expired")
    refused(ask(api, failed), "certificate_expired")


def test_a_failed_verdict_is_refused_with_the_clearest_code(
    api: APIClient, device_a: DeviceActor, issued: DeviceCertificate
) -> None:
    """nginx forwards a certificate it could not verify as FAILED:<reason>. Never accepted; the
    code is the app's own finding, else read from nginx's reason."""
    # The app finds nothing wrong (its clock, or a stale CA bundle in nginx): nginx's reason.
    refused(
        ask(api, via_nginx(issued.certificate, verify="FAILED:certificate has expired")),
        "certificate_expired",
    )
    refused(
        ask(api, via_nginx(issued.certificate, verify="FAILED:unable to verify the first cert")),
        "certificate_invalid",
    )
    reply = ask(api, via_nginx(issued.certificate, verify="FAILED:" + "x" * 500))
    refused(reply, "certificate_invalid")
    assert len(reply.json()["detail"]) < 300
    # A certificate of a CA nginx no longer has, and this server never issued: unknown.
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = build_certificate(
        subject_cn=str(device_a.id),
        issuer_key=key,
        issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Retired CA")]),
        not_before=datetime.now(UTC) - timedelta(days=1),
        not_after=datetime.now(UTC) + timedelta(days=1),
    )
    failed = via_nginx(ca.to_pem(foreign), verify="FAILED:unable to verify the first certificate")
    refused(ask(api, failed), "certificate_unknown")
    # Revoked, and nginx failed it too: the app's code.
    certificates.revoke_certificate(issued)
    failed = via_nginx(issued.certificate, verify="FAILED:certificate has expired")
    refused(ask(api, failed), "certificate_revoked")


def test_a_certificate_naming_another_device_is_refused(
    api: APIClient, device_a: DeviceActor, device_b: DeviceActor, device_ca: DeviceCA
) -> None:
    """Signed by our CA for device B but recorded as device A's: the subject must match."""
    key = keystore.unseal_private_key(device_ca.private_key, purpose=ca.KEY_PURPOSE)
    ours = ca.load_certificate(device_ca.certificate)
    now = datetime.now(UTC)
    cert = build_certificate(
        subject_cn=str(device_b.id),
        issuer_key=key,
        issuer_name=ours.subject,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1),
    )
    DeviceCertificate.objects.create(
        device=device_a.device,
        ca=device_ca,
        serial=format(cert.serial_number, "x"),
        fingerprint=ca.fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        certificate=ca.to_pem(cert),
    )
    refused(ask(api, via_nginx(ca.to_pem(cert))), "certificate_invalid")


def test_device_id_must_match_the_certificate(
    api: APIClient, issued: DeviceCertificate, device_b: DeviceActor
) -> None:
    refused(
        ask(api, via_nginx(issued.certificate), {"device_id": str(device_b.id)}),
        "certificate_invalid",
    )


def test_a_revoked_certificate_is_refused(
    api: APIClient, device_a: DeviceActor, issued: DeviceCertificate, device_ca: DeviceCA
) -> None:
    other = certificates.issue_certificate(device_a.device, make_csr()[1])
    certificates.revoke_certificate(issued)
    refused(ask(api, via_nginx(issued.certificate)), "certificate_revoked")
    # The device's other certificate still works.
    assert ask(api, via_nginx(other.certificate)).status_code == 200


def test_a_revoked_device_is_refused(
    api: APIClient, device_a: DeviceActor, issued: DeviceCertificate
) -> None:
    certificates.revoke_device(device_a.device)
    refused(ask(api, via_nginx(issued.certificate)), "certificate_revoked")
    # Even if the certificate row were left unrevoked.
    DeviceCertificate.objects.filter(pk=issued.pk).update(revoked_at=None)
    refused(ask(api, via_nginx(issued.certificate)), "device_revoked")


def test_the_old_ca_keeps_working_after_a_rotation(
    api: APIClient, device_a: DeviceActor, issued: DeviceCertificate
) -> None:
    certificates.create_device_ca(common_name="Next CA", days=30, rotate=True)
    assert ask(api, via_nginx(issued.certificate)).status_code == 200
    renewed = certificates.issue_certificate(device_a.device, make_csr()[1])
    assert renewed.ca_id != issued.ca_id
    assert ask(api, via_nginx(renewed.certificate)).status_code == 200


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "%ZZ%" * 10,
        "-----BEGIN CERTIFICATE-----" + "A" * 40000,
    ],
)
def test_garbage_in_the_header(api: APIClient, device_ca: DeviceCA, value: str) -> None:
    refused(ask(api, via_nginx(value, escape=False)), "certificate_invalid")


def test_a_secret_still_works_and_wins(
    api: APIClient, device_a: DeviceActor, device_b: DeviceActor, device_ca: DeviceCA
) -> None:
    """A request with a secret is judged by the secret alone, whatever headers it carries."""
    cert_b = certificates.issue_certificate(device_b.device, make_csr()[1])
    body = {"device_id": str(device_a.id), "secret": device_a.secret}
    reply = ask(api, via_nginx(cert_b.certificate), body)
    assert reply.status_code == 200
    body = {"device_id": str(device_a.id), "secret": "wrong"}
    refused(ask(api, via_nginx(cert_b.certificate), body), "authentication_failed")


def test_unknown_device_id_format(api: APIClient, db: Any) -> None:
    reply = ask(api, via_nginx(None), {"device_id": "nope"})
    assert reply.status_code == 400
    reply = ask(api, {"REMOTE_ADDR": "192.0.2.1"}, {"secret": "x"})
    assert reply.status_code == 400 and "device_id" in reply.json()["errors"]
    reply = ask(api, {"REMOTE_ADDR": "192.0.2.1"}, {"device_id": str(uuid.uuid4())})
    refused(reply, "credentials_missing")
