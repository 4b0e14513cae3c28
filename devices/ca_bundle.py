"""Write the device CA bundle that nginx's ssl_client_certificate names.

    python -m devices.ca_bundle /etc/ota/ca/device-ca.pem

It holds every CA still trusted (as `manage.py device_ca export-cert` prints). Before
`manage.py device_ca init` there is none, yet nginx will not start without the file; then it
holds a placeholder CA whose key is thrown away, so no client certificate verifies and devices
use their secrets. docker-compose.yml runs this once before nginx starts (service nginx-ca);
run it again after `device_ca init` or `init --rotate`, then reload nginx.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PLACEHOLDER_NAME = "OTA placeholder: no device CA yet (manage.py device_ca init)"


def placeholder_ca() -> str:
    """A self-signed CA certificate whose private key exists only in this function."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PLACEHOLDER_NAME)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def trusted_bundle() -> str:
    """The PEM of every trusted device CA, or "" when there is none yet (needs Django set up)."""
    from devices import certificates

    return "".join(issuer.certificate for issuer in certificates.trusted_cas())


def write(path: Path, text: str) -> None:
    """Replace ``path`` at once, so a reloading nginx never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.chmod(0o644)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devices.ca_bundle",
        description="Write the device CA bundle for nginx (a placeholder CA before device_ca "
        "init).",
    )
    parser.add_argument("path", type=Path, help="Where to write the PEM bundle.")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ota_site.settings")
    import django

    django.setup()
    bundle = trusted_bundle()
    if bundle:
        write(args.path, bundle)
        print(f"{args.path}: the trusted device CAs", file=sys.stderr)
    else:
        write(args.path, placeholder_ca())
        print(
            f"{args.path}: a placeholder (no device CA yet); run this again after "
            "`manage.py device_ca init`, then reload nginx",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
