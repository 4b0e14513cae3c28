"""Device identity: the device CA, enrollment by CSR, renewal, and revocation."""

from __future__ import annotations

import base64
import json
import textwrap
import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rest_framework.test import APIClient

from devices import ca, certificates, services
from devices.models import Device, DeviceCA, DeviceCertificate, EnrollmentToken
from ota_site import keystore
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor

ENROLL = "/api/v1/devices/enroll"


def make_csr(key: Any = None, *, cn: str = "my-board", algorithm: Any = None) -> tuple[Any, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = algorithm or hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, algorithm)
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def device_ca(db: Any) -> DeviceCA:
    return certificates.create_device_ca(common_name="Test device CA", days=30)


def enroll_body(token: str, csr: str, hardware_id: str = "board-1", **extra: Any) -> dict[str, Any]:
    return {
        "enrollment_token": token,
        "hardware_id": hardware_id,
        "device_type": "board-a",
        "current_version": "1.0.0",
        "csr": csr,
        **extra,
    }


def assert_error(reply: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == status, reply.content
    body: dict[str, Any] = reply.json()
    assert "code" in body and "detail" in body
    if code is not None:
        assert body["code"] == code, body
    return body


# --- The CA ---------------------------------------------------------------------------------------


class TestDeviceCACommand:
    def test_init_creates_a_sealed_ca(self, db: Any) -> None:
        out = StringIO()
        call_command(
            "device_ca", "init", "--common-name", "Fleet CA", "--days", "400", "--json", stdout=out
        )
        result = json.loads(out.getvalue())
        issuer = DeviceCA.objects.get()
        assert result["key_id"] == issuer.key_id and issuer.active
        cert = ca.load_certificate(issuer.certificate)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
        public_key = cert.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp256r1"
        assert 399 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 400
        # Stored only as an envelope that opens with the master key, for this purpose only.
        assert "PRIVATE KEY" not in issuer.private_key
        key = keystore.unseal_private_key(issuer.private_key, purpose="device-ca")
        assert key.public_key() == cert.public_key()
        with pytest.raises(keystore.KeystoreError):
            keystore.unseal(issuer.private_key, purpose="firmware-signing")
        assert Event.objects.filter(kind=EventKind.DEVICE_CA_CREATED).count() == 1

    def test_init_refuses_a_second_ca(self, device_ca: DeviceCA) -> None:
        with pytest.raises(CommandError, match="--rotate"):
            call_command("device_ca", "init", stdout=StringIO())
        assert DeviceCA.objects.count() == 1

    def test_rotate_keeps_the_old_ca_trusted(self, device_ca: DeviceCA) -> None:
        call_command("device_ca", "init", "--rotate", stdout=StringIO())
        new = DeviceCA.objects.get(active=True)
        assert new.pk != device_ca.pk and new.key_id != device_ca.key_id
        out = StringIO()
        call_command("device_ca", "export-cert", stdout=out)
        bundle = x509.load_pem_x509_certificates(out.getvalue().encode())
        assert {ca.fingerprint(c) for c in bundle} == {new.fingerprint, device_ca.fingerprint}
        # The subjects differ, so nginx and the app never confuse the two CAs.
        assert bundle[0].subject != bundle[1].subject

    def test_show_and_export(self, device_ca: DeviceCA) -> None:
        out = StringIO()
        call_command("device_ca", "show", stdout=out)
        assert device_ca.fingerprint in out.getvalue()
        assert "PRIVATE" not in out.getvalue()
        out = StringIO()
        call_command("device_ca", "export-cert", stdout=out)
        assert out.getvalue() == device_ca.certificate
        out = StringIO()
        call_command("device_ca", "export-cert", "--json", stdout=out)
        exported = json.loads(out.getvalue())
        assert exported["bundle"] == device_ca.certificate
        assert [c["fingerprint"] for c in exported["cas"]] == [device_ca.fingerprint]

    def test_show_without_a_ca(self, db: Any) -> None:
        with pytest.raises(CommandError, match="device_ca init"):
            call_command("device_ca", "show", stdout=StringIO())

    def test_bad_days(self, db: Any) -> None:
        with pytest.raises(CommandError, match="one day"):
            call_command("device_ca", "init", "--days", "0", stdout=StringIO())


# --- Enrollment by CSR --------------------------------------------------------------------------


class TestEnrollment:
    def test_enroll_by_csr(self, api: APIClient, device_ca: DeviceCA) -> None:
        _, token = services.create_enrollment_token(name="t")
        key, csr = make_csr(cn="I am the admin")
        reply = api.post(ENROLL, enroll_body(token, csr), format="json")
        assert reply.status_code == 201, reply.content
        body = reply.json()
        assert set(body) == {
            "device_id",
            "certificate",
            "ca_certificate",
            "access_token",
            "token_type",
            "expires_in",
        }
        assert body["ca_certificate"] == device_ca.certificate
        device = Device.objects.get(pk=body["device_id"])
        cert = ca.load_certificate(body["certificate"])
        # The server decides the identity; the CSR's subject is ignored.
        assert cert.subject.rfc4514_string() == f"CN={device.id}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"urn:ota:device:{device.id}"
        ]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.public_key() == key.public_key()
        cert.verify_directly_issued_by(ca.load_certificate(device_ca.certificate))
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        # Capped by the CA's own 30 days.
        assert lifetime <= timedelta(days=30, minutes=5)
        record = DeviceCertificate.objects.get(device=device)
        assert record.fingerprint == ca.fingerprint(cert)
        assert record.serial == format(cert.serial_number, "x")
        # The token works, and the event log has the issue.
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {body['access_token']}")
        assert client.get(f"/api/v1/devices/{device.id}/updates").status_code == 200
        assert Event.objects.filter(
            kind=EventKind.DEVICE_CERTIFICATE_ISSUED, device_id=device.id
        ).exists()

    def test_lifetime_setting(self, api: APIClient, settings: Any, db: Any) -> None:
        certificates.create_device_ca(common_name="Long CA", days=3650)
        settings.DEVICE_CERT_LIFETIME_DAYS = 10
        _, token = services.create_enrollment_token(name="t")
        body = api.post(ENROLL, enroll_body(token, make_csr()[1]), format="json").json()
        cert = ca.load_certificate(body["certificate"])
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=10) <= lifetime <= timedelta(days=10, minutes=5)

    @pytest.mark.parametrize(
        "key",
        [
            ec.generate_private_key(ec.SECP384R1()),
            ed25519.Ed25519PrivateKey.generate(),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ],
        ids=["p384", "ed25519", "rsa2048"],
    )
    def test_accepted_keys(self, api: APIClient, device_ca: DeviceCA, key: Any) -> None:
        _, token = services.create_enrollment_token(name="t")
        reply = api.post(ENROLL, enroll_body(token, make_csr(key)[1]), format="json")
        assert reply.status_code == 201, reply.content

    def test_without_a_ca(self, api: APIClient, db: Any) -> None:
        _, token = services.create_enrollment_token(name="t")
        reply = api.post(ENROLL, enroll_body(token, make_csr()[1]), format="json")
        assert_error(reply, 503, "device_ca_missing")
        assert not Device.objects.exists()
        assert EnrollmentToken.objects.get().uses == 0

    def test_same_hardware_twice(self, api: APIClient, device_ca: DeviceCA) -> None:
        _, token = services.create_enrollment_token(name="t")
        assert api.post(ENROLL, enroll_body(token, make_csr()[1]), format="json").status_code == 201
        reply = api.post(ENROLL, enroll_body(token, make_csr()[1]), format="json")
        assert_error(reply, 409, "device_exists")
        assert DeviceCertificate.objects.count() == 1

    def test_bad_enrollment_token(self, api: APIClient, device_ca: DeviceCA) -> None:
        reply = api.post(ENROLL, enroll_body("ota_enroll_x_y", make_csr()[1]), format="json")
        assert_error(reply, 401, "enrollment_invalid")
        assert not DeviceCertificate.objects.exists()


def _bad_signature_csr() -> str:
    _, pem = make_csr()
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF  # inside the signature
    body = "\n".join(textwrap.wrap(base64.b64encode(bytes(der)).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


BAD_CSRS: dict[str, tuple[Any, str]] = {
    "garbage": (lambda: "hello", "invalid_csr"),
    "garbage-pem": (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "invalid_csr",
    ),
    "bad-signature": (_bad_signature_csr, "csr_signature"),
    "rsa-1024": (
        lambda: make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))[1],
        "weak_key",
    ),
    "p521": (lambda: make_csr(ec.generate_private_key(ec.SECP521R1()))[1], "weak_key"),
    "secp256k1": (lambda: make_csr(ec.generate_private_key(ec.SECP256K1()))[1], "weak_key"),
    "dsa": (lambda: make_csr(dsa.generate_private_key(key_size=2048))[1], "weak_key"),
    "sha224": (lambda: make_csr(algorithm=hashes.SHA224())[1], "weak_key"),
    "a-certificate": (
        lambda: ca.to_pem(ca.create_ca("not a csr", days=1)[1]),
        "invalid_csr",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CSRS))
def test_bad_csrs_are_400(api: APIClient, device_ca: DeviceCA, case: str) -> None:
    make, code = BAD_CSRS[case]
    _, token = services.create_enrollment_token(name="t")
    reply = api.post(ENROLL, enroll_body(token, make()), format="json")
    assert_error(reply, 400, code)
    assert not Device.objects.exists()
    assert EnrollmentToken.objects.get().uses == 0


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"csr": 5},
        {"csr": ["x"]},
        {"csr": None},
        {"csr": "A" * 20000},
        {"csr": "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 16000},
        {"csr": "\x00-----BEGIN CERTIFICATE REQUEST-----\n\udcff"},
    ],
)
def test_malformed_enrollments_are_400(
    api: APIClient, device_ca: DeviceCA, body: dict[str, Any]
) -> None:
    _, token = services.create_enrollment_token(name="t")
    full = {**enroll_body(token, ""), **body} if body else {}
    reply = api.post(ENROLL, json.dumps(full), content_type="application/json")
    result = assert_error(reply, 400)
    assert "errors" in result or result["code"] == "invalid_csr"
    assert not Device.objects.exists()


def test_huge_body_is_refused(api: APIClient, device_ca: DeviceCA) -> None:
    _, token = services.create_enrollment_token(name="t")
    huge = json.dumps(enroll_body(token, "x" * (2 * 1024 * 1024)))
    reply = api.post(ENROLL, huge, content_type="application/json")
    assert reply.status_code in (400, 413), reply.content
    assert "code" in reply.json()
    assert not Device.objects.exists()


def test_not_json(api: APIClient, device_ca: DeviceCA) -> None:
    reply = api.post(ENROLL, "{nope", content_type="application/json")
    assert_error(reply, 400)


# --- Renewal ------------------------------------------------------------------------------------


def csr_enrolled(api: APIClient, hardware_id: str = "board-1") -> tuple[str, APIClient, str]:
    _, token = services.create_enrollment_token(name=f"for {hardware_id}")
    body = api.post(ENROLL, enroll_body(token, make_csr()[1], hardware_id), format="json").json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {body['access_token']}")
    return body["device_id"], client, body["certificate"]


class TestRenewal:
    def test_renew(self, api: APIClient, device_ca: DeviceCA) -> None:
        device_id, client, first = csr_enrolled(api)
        key, csr = make_csr()
        reply = client.post(f"/api/v1/devices/{device_id}/certificate", {"csr": csr}, format="json")
        assert reply.status_code == 201, reply.content
        body = reply.json()
        cert = ca.load_certificate(body["certificate"])
        assert cert.public_key() == key.public_key()
        assert cert.subject.rfc4514_string() == f"CN={device_id}"
        assert body["ca_certificate"] == device_ca.certificate
        assert body["certificate"] != first
        # The earlier certificate stays valid until it expires.
        assert DeviceCertificate.objects.filter(device_id=device_id, revoked_at=None).count() == 2

    def test_renew_after_rotation_uses_the_new_ca(
        self, api: APIClient, device_ca: DeviceCA
    ) -> None:
        device_id, client, _ = csr_enrolled(api)
        new = certificates.create_device_ca(common_name="Next CA", days=30, rotate=True)
        body = client.post(
            f"/api/v1/devices/{device_id}/certificate", {"csr": make_csr()[1]}, format="json"
        ).json()
        assert body["ca_certificate"] == new.certificate

    def test_only_own_device(self, api: APIClient, device_ca: DeviceCA) -> None:
        _, client_a, _ = csr_enrolled(api, "board-a")
        device_b, _, _ = csr_enrolled(api, "board-b")
        reply = client_a.post(
            f"/api/v1/devices/{device_b}/certificate", {"csr": make_csr()[1]}, format="json"
        )
        assert_error(reply, 403, "not_your_device")
        assert DeviceCertificate.objects.filter(device_id=device_b).count() == 1

    def test_people_and_strangers_cannot_renew(
        self, api: APIClient, device_ca: DeviceCA, admin_user: User
    ) -> None:
        device_id, _, _ = csr_enrolled(api)
        url = f"/api/v1/devices/{device_id}/certificate"
        assert api.post(url, {"csr": make_csr()[1]}, format="json").status_code == 401
        api.force_login(admin_user)
        assert api.post(url, {"csr": make_csr()[1]}, format="json").status_code in (401, 403)

    @pytest.mark.parametrize("case", ["garbage", "bad-signature", "rsa-1024"])
    def test_bad_csr(self, api: APIClient, device_ca: DeviceCA, case: str) -> None:
        device_id, client, _ = csr_enrolled(api)
        make, code = BAD_CSRS[case]
        reply = client.post(
            f"/api/v1/devices/{device_id}/certificate", {"csr": make()}, format="json"
        )
        assert_error(reply, 400, code)
        reply = client.post(f"/api/v1/devices/{device_id}/certificate", {}, format="json")
        assert_error(reply, 400, "invalid")

    def test_a_secret_enrolled_device_can_get_a_certificate(
        self, device_a: DeviceActor, device_ca: DeviceCA
    ) -> None:
        reply = device_a.client.post(
            f"/api/v1/devices/{device_a.id}/certificate", {"csr": make_csr()[1]}, format="json"
        )
        assert reply.status_code == 201, reply.content


# --- Revocation ---------------------------------------------------------------------------------


def revoke_url(device_id: Any) -> str:
    return f"/api/v1/devices/{device_id}/revoke"


class TestRevocation:
    def test_roles(
        self, api: APIClient, device_a: DeviceActor, operator: User, viewer: User
    ) -> None:
        assert api.post(revoke_url(device_a.id)).status_code in (401, 403)
        for user in (viewer, operator):
            api.force_login(user)
            assert_error(api.post(revoke_url(device_a.id)), 403)
        assert device_a.client.post(revoke_url(device_a.id)).status_code in (401, 403)
        assert device_a.refresh().revoked_at is None

    def test_revoke_locks_the_device_out_at_once(
        self,
        api: APIClient,
        admin_user: User,
        device_a: DeviceActor,
        device_b: DeviceActor,
        device_ca: DeviceCA,
    ) -> None:
        issued = certificates.issue_certificate(device_a.device, make_csr()[1])
        api.force_login(admin_user)
        reply = api.post(revoke_url(device_a.id), {"reason": "stolen"}, format="json")
        assert reply.status_code == 200, reply.content
        assert reply.json()["revoked_at"] is not None
        device = device_a.refresh()
        assert device.revoked_at is not None and not device.secret_hash
        issued.refresh_from_db()
        assert issued.revoked_at is not None
        event = Event.objects.get(kind=EventKind.DEVICE_REVOKED)
        assert event.data["certificates"] == [issued.serial] and event.data["reason"] == "stolen"

        base = f"/api/v1/devices/{device_a.id}"
        session = {"session_id": str(uuid.uuid4()), "status": "downloading"}
        calls = [
            device_a.client.get(f"{base}/updates"),
            device_a.client.get("/api/v1/updates/check"),
            device_a.client.post(f"{base}/heartbeat", {}, format="json"),
            device_a.client.post(f"{base}/status", session, format="json"),
            device_a.client.post("/api/v1/status", session, format="json"),
            device_a.client.post(
                "/api/v1/validation",
                {"session_id": session["session_id"], "success": True},
                format="json",
            ),
            device_a.client.get(base),
            device_a.client.post(f"{base}/certificate", {"csr": make_csr()[1]}, format="json"),
        ]
        for reply in calls:
            assert_error(reply, 401, "device_revoked")
        # Device B is untouched.
        assert device_b.client.get(f"/api/v1/devices/{device_b.id}/updates").status_code == 200

    def test_a_revoked_device_gets_no_new_credentials(
        self, api: APIClient, device_a: DeviceActor, device_ca: DeviceCA
    ) -> None:
        certificates.revoke_device(device_a.device)
        reply = api.post(
            "/api/v1/devices/token",
            {"device_id": str(device_a.id), "secret": device_a.secret},
            format="json",
        )
        assert_error(reply, 401, "authentication_failed")
        _, token = services.create_enrollment_token(name="again")
        for path, extra in (
            ("/api/v1/devices/register", {}),
            (ENROLL, {"csr": make_csr()[1]}),
        ):
            body = {
                "enrollment_token": token,
                "hardware_id": "device-a",
                "device_type": "board-a",
                **extra,
            }
            assert_error(api.post(path, body, format="json"), 403, "device_revoked")
        # Even after an operator resets its credentials.
        services.reset_credentials(device_a.device)
        reply = api.post("/api/v1/devices/register", body, format="json")
        assert_error(reply, 403, "device_revoked")
        assert EnrollmentToken.objects.get(name="again").uses == 0

    def test_revoke_twice_and_unknown(self, api: APIClient, admin_user: User, db: Any) -> None:
        from tests.conftest import enroll

        actor = enroll("device-x")
        api.force_login(admin_user)
        assert api.post(revoke_url(actor.id)).status_code == 200
        assert_error(api.post(revoke_url(actor.id)), 409, "already_revoked")
        assert_error(api.post(revoke_url(uuid.uuid4())), 404)
        assert_error(api.post(revoke_url(actor.id), {"reason": "x" * 600}, format="json"), 400)

    def test_poll_stays_within_two_queries(
        self, device_a: DeviceActor, django_assert_max_num_queries: Any
    ) -> None:
        url = f"/api/v1/devices/{device_a.id}/updates"
        device_a.client.get(url)
        with django_assert_max_num_queries(2):
            assert device_a.client.get(url).status_code == 200


# --- Admin ----------------------------------------------------------------------------------------


class TestAdmin:
    def test_revoke_action_needs_the_admin_role(
        self, client: Any, operator: User, admin_user: User, device_a: DeviceActor
    ) -> None:
        url = "/admin/devices/device/"
        action = {"action": "revoke_devices", "_selected_action": [str(device_a.id)]}
        client.force_login(operator)
        client.post(url, action)
        assert device_a.refresh().revoked_at is None
        client.force_login(admin_user)
        reply = client.post(url, action)
        assert reply.status_code == 302
        assert device_a.refresh().revoked_at is not None

    def test_certificate_pages(
        self,
        client: Any,
        admin_user: User,
        operator: User,
        device_a: DeviceActor,
        device_ca: DeviceCA,
    ) -> None:
        issued = certificates.issue_certificate(device_a.device, make_csr()[1])
        client.force_login(admin_user)
        page = client.get(f"/admin/devices/device/{device_a.id}/change/")
        assert page.status_code == 200 and issued.serial[:16] in page.content.decode()
        page = client.get(f"/admin/devices/deviceca/{device_ca.pk}/change/")
        assert page.status_code == 200
        assert device_ca.fingerprint in page.content.decode()
        assert '"ct"' not in page.content.decode()  # no envelope, no key
        # Operators see certificates but not the CA, and cannot revoke.
        client.force_login(operator)
        assert client.get(f"/admin/devices/deviceca/{device_ca.pk}/change/").status_code == 403
        url = "/admin/devices/devicecertificate/"
        assert client.get(url).status_code == 200
        client.post(url, {"action": "revoke_certificates", "_selected_action": [str(issued.pk)]})
        issued.refresh_from_db()
        assert issued.revoked_at is None
        client.force_login(admin_user)
        client.post(url, {"action": "revoke_certificates", "_selected_action": [str(issued.pk)]})
        issued.refresh_from_db()
        assert issued.revoked_at is not None
        assert Event.objects.filter(kind=EventKind.DEVICE_CERTIFICATE_REVOKED).count() == 1
        assert timezone.now() - issued.revoked_at < timedelta(minutes=1)
