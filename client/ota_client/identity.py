"""The device's X.509 identity: its own key, a CSR, and the certificate the server's CA issued.

With ``[identity] certificate = true`` the client enrolls by CSR (``POST /api/v1/devices/enroll``)
instead of receiving a secret, and gets its access tokens over mTLS: nginx verifies the
certificate and the server trades it for a token (``POST /api/v1/devices/token`` with no secret).

The private key is made on the device and never leaves it: an ECDSA P-256 key in
``<state_dir>/device-key.pem``, created 0600 (O_EXCL, so two processes never make two keys). The
CSR's subject does not matter; the server names the certificate after the device id.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ota_client.system import fsync_dir


class IdentityError(Exception):
    """The key or certificate files are unreadable or do not belong together."""


class Identity:
    def __init__(self, state_dir: Path) -> None:
        self.key_path = state_dir / "device-key.pem"
        self.certificate_path = state_dir / "device-cert.pem"
        self.ca_path = state_dir / "device-ca.pem"

    # --- The key ----------------------------------------------------------------------------

    def key(self) -> ec.EllipticCurvePrivateKey:
        """The device key, created on first use."""
        try:
            return self._load_key()
        except FileNotFoundError:
            pass
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._load_key()  # another process made it first
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.key_path.parent)
        return key

    def _load_key(self) -> ec.EllipticCurvePrivateKey:
        data = self.key_path.read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise IdentityError(f"{self.key_path} is not a PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{self.key_path} is not an EC key")
        return key

    def csr(self) -> str:
        """A PEM CSR for the device key (signed by it: proof that the device holds the key)."""
        key = self.key()
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ota-device")]))
            .sign(key, hashes.SHA256())
        )
        return request.public_bytes(serialization.Encoding.PEM).decode()

    # --- The certificate --------------------------------------------------------------------

    def save_certificate(self, certificate_pem: str, ca_pem: str | None = None) -> None:
        """Keep the issued certificate (and the CA's), after checking it is for our key."""
        try:
            certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
        except ValueError as exc:
            raise IdentityError("the server sent no PEM certificate") from exc
        if certificate.public_key() != self.key().public_key():
            raise IdentityError("the certificate is not for this device's key")
        _write(self.certificate_path, certificate_pem)
        if ca_pem:
            _write(self.ca_path, ca_pem)

    def has_certificate(self) -> bool:
        return self.certificate_path.exists() and self.key_path.exists()

    def certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.certificate_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise IdentityError(f"{self.certificate_path} is not a PEM certificate") from exc

    def needs_renewal(self, *, fraction: float = 2 / 3, now: datetime | None = None) -> bool:
        """True once ``fraction`` of the certificate's lifetime has passed (or it is missing)."""
        certificate = self.certificate()
        if certificate is None:
            return True
        now = now or datetime.now(UTC)
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        return now >= start + (end - start) * fraction

    def client_cert(self) -> tuple[str, str] | None:
        """What ``requests`` takes as ``cert=``: (certificate file, key file), or None."""
        if not self.has_certificate():
            return None
        return (str(self.certificate_path), str(self.key_path))


def _write(path: Path, text: str) -> None:
    """Write a PEM file so that a power cut leaves the old or the new one (temp, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
