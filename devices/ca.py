"""The X.509 side of device identity: the device CA, CSR checks, issuing and verifying.

Pure cryptography with no database access; devices.services keeps the rows and the events.

- The CA key is ECDSA P-256; the CA certificate may sign only end-entity certificates
  (BasicConstraints CA with path length 0, KeyUsage keyCertSign + cRLSign).
- A device sends a CSR. Its subject and extensions are ignored: the server decides the identity
  (CN = the device id, SAN ``urn:ota:device:<id>``) so a device cannot ask for another one's
  name, a CA bit or a server-auth usage.
- A client certificate forwarded by nginx is checked again here (issued by our CA, in its validity
  window), because a proxy misconfiguration must not be enough to let a device in.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota_site.errors import ServiceError

# Purpose string of the CA key's keystore envelope (ota_site.keystore).
KEY_PURPOSE = "device-ca"
# A CSR is a few hundred bytes (RSA 4096: ~1.7 KB); anything much larger is not a CSR.
MAX_CSR_CHARS = 16 * 1024
MAX_CERT_CHARS = 32 * 1024
# Backdate certificates a little: a device whose clock runs behind must accept its new one.
CLOCK_SKEW = timedelta(minutes=5)
DEVICE_URN = "urn:ota:device:"
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # larger keys only cost the server CPU time on every handshake
WEAK_HASHES = ("md5", "sha1", "sha224")


class CertificateError(ServiceError):
    """A CSR or certificate that is malformed, badly signed, or uses a weak key."""

    code = "invalid_csr"


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    pem: str
    serial: str
    fingerprint: str


def now() -> datetime:
    return datetime.now(UTC)


def to_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(certificate: x509.Certificate) -> str:
    """sha256 of the DER encoding, lower-case hex (what ``openssl x509 -fingerprint`` shows)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def subject_key_id(certificate: x509.Certificate) -> str:
    ext = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return ext.value.digest.hex()


def load_certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


# --- The CA -----------------------------------------------------------------------------------


def create_ca(
    common_name: str, *, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA key and its self-signed certificate, valid from now for ``days``."""
    if days < 1:
        raise ServiceError("The CA must be valid for at least one day.", code="invalid_days")
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # The key id in the subject keeps the names of successive CAs apart, so nginx and the app
    # never have to guess which CA of a rotation issued a certificate.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, ski.digest.hex()[:16]),
        ]
    )
    start = now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


# --- CSRs -------------------------------------------------------------------------------------


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a CSR; CertificateError (400) unless it is one we would sign.

    Checked: one PEM CSR of sane size, its self-signature (proof the sender holds the key), a
    strong key (EC P-256/P-384, Ed25519, RSA 2048-8192) and no weak signature hash.
    """
    if not isinstance(pem, str) or len(pem) > MAX_CSR_CHARS:
        raise CertificateError(f"The CSR must be a PEM text of at most {MAX_CSR_CHARS} characters.")
    if "-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise CertificateError("The CSR must be PEM (-----BEGIN CERTIFICATE REQUEST-----).")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, UnicodeError) as exc:
        raise CertificateError("The CSR is not a well-formed PEM certificate request.") from exc
    try:
        valid = csr.is_signature_valid
        algorithm = csr.signature_hash_algorithm
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
        raise CertificateError("The CSR uses an unsupported key or signature algorithm.") from exc
    if not valid:
        raise CertificateError("The CSR's signature is not valid.", code="csr_signature")
    if algorithm is not None and algorithm.name in WEAK_HASHES:
        raise CertificateError(
            f"The CSR is signed with {algorithm.name}; use SHA-256 or better.", code="weak_key"
        )
    check_public_key(public_key)
    return csr


def check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CertificateError(
                f"EC keys must be P-256 or P-384, not {key.curve.name}.", code="weak_key"
            )
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CertificateError(
                f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {key.key_size}.",
                code="weak_key",
            )
        return
    raise CertificateError(
        "The key must be EC P-256/P-384, Ed25519 or RSA of at least 2048 bits.", code="weak_key"
    )


# --- Issuing ----------------------------------------------------------------------------------


def issue(
    csr: x509.CertificateSigningRequest,
    *,
    device_id: uuid.UUID,
    ca_certificate: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> IssuedCertificate:
    """Sign the CSR's public key into a client certificate for ``device_id``.

    The lifetime ends with the CA's own at the latest: a chain must never outlive its root.
    """
    public_key = csr.public_key()
    check_public_key(public_key)
    start = now()
    end = min(start + timedelta(days=days), ca_certificate.not_valid_after_utc)
    if end <= start:
        raise ServiceError(
            "The device CA has expired; rotate it (manage.py device_ca init --rotate).",
            code="device_ca_expired",
            status_code=503,
        )
    ca_ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(device_id))]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{DEVICE_URN}{device_id}")]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificate(
        certificate=certificate,
        pem=to_pem(certificate),
        serial=format(certificate.serial_number, "x"),
        fingerprint=fingerprint(certificate),
    )


# --- Verifying a forwarded client certificate -------------------------------------------------


def parse_forwarded(value: str) -> x509.Certificate:
    """The certificate nginx forwards as ``$ssl_client_escaped_cert`` (URL-encoded PEM).

    CertificateError when it is not one PEM certificate.
    """
    text = unquote(value.strip()) if "%" in value else value.strip()
    if len(text) > MAX_CERT_CHARS or "-----BEGIN CERTIFICATE-----" not in text:
        raise CertificateError(
            "The client certificate is not a PEM certificate.", code="certificate_invalid"
        )
    try:
        return load_certificate(text)
    except (ValueError, UnicodeError) as exc:
        raise CertificateError(
            "The client certificate is not a PEM certificate.", code="certificate_invalid"
        ) from exc


def problem_with(
    certificate: x509.Certificate, ca_certificate: x509.Certificate, *, at: datetime | None = None
) -> str | None:
    """Why ``certificate`` is not a valid device certificate of this CA now, or None if it is."""
    at = at or now()
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "it was not issued by the device CA"
    for cert, what in ((certificate, "the certificate"), (ca_certificate, "the device CA")):
        if at < cert.not_valid_before_utc:
            return f"{what} is not valid yet"
        if at > cert.not_valid_after_utc:
            return f"{what} has expired"
    if device_id_of(certificate) is None:
        return "its subject is not a device id"
    return None


def device_id_of(certificate: x509.Certificate) -> uuid.UUID | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    try:
        return uuid.UUID(str(names[0].value))
    except ValueError:
        return None
