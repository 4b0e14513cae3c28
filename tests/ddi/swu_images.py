"""Signed SWUpdate images for the tests: a signing certificate and key, CMS signatures of
`sw-description` (openssl), and the cpio "newc" .swu archive (see tests/ddi/swupdate_support.py
for what Debian's swupdate 2022.12 accepts)."""

from __future__ import annotations

import datetime
import hashlib
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OPENSSL = "openssl"


# --- signing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """A key pair whose certificate swupdate is given with `-k` to verify images."""

    cert_path: Path
    key_path: Path


def make_signer(directory: Path, name: str = "signer") -> Signer:
    """An EC P-256 key and a self-signed certificate fit for swupdate's default purpose check.

    Writes `<name>-key.pem` (PKCS#8, unencrypted) and `<name>-cert.pem` into `directory`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # swupdate checks the signer against --cert-purpose, emailProtection by default.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    signer = Signer(
        cert_path=directory / f"{name}-cert.pem", key_path=directory / f"{name}-key.pem"
    )
    signer.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer.key_path.chmod(0o600)
    signer.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return signer


def cms_sign(signer: Signer, data_path: Path, signature_path: Path) -> None:
    """Detached CMS signature in DER, as swupdate expects in `sw-description.sig`."""
    subprocess.run(
        [
            OPENSSL,
            "cms",
            "-sign",
            "-in",
            str(data_path),
            "-out",
            str(signature_path),
            "-signer",
            str(signer.cert_path),
            "-inkey",
            str(signer.key_path),
            "-outform",
            "DER",
            "-nosmimecap",
            "-binary",
        ],
        check=True,
        capture_output=True,
    )


# --- the .swu archive -------------------------------------------------------------------------

NEWC_MAGIC = b"070701"
NEWC_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_entry(name: str, data: bytes, *, inode: int, mode: int = 0o100644) -> bytes:
    """One cpio "newc" member: 110-byte ASCII header, NUL-terminated name, data; 4-byte aligned."""
    encoded_name = name.encode() + b"\0"
    fields = (
        inode,
        mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        0,  # rdevmajor
        0,  # rdevminor
        len(encoded_name),
        0,  # check: always 0 in 070701
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    assert len(header) == 110
    head = header + encoded_name
    return head + _pad4(len(head)) + data + _pad4(len(data))


def cpio_newc(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A whole newc archive of regular files, in the given order, with the trailer."""
    parts = [
        newc_entry(name, data, inode=inode) for inode, (name, data) in enumerate(members, start=1)
    ]
    parts.append(newc_entry(NEWC_TRAILER, b"", inode=0, mode=0))
    archive = b"".join(parts)
    # Like GNU cpio, round up to 512-byte blocks.
    return archive + b"\0" * (-len(archive) % 512)


def _libconfig_string(value: str) -> str:
    if any(ord(char) < 0x20 for char in value):
        raise ValueError(f"control characters are not allowed in sw-description: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sw_description(
    *,
    version: str,
    hardware: str,
    name: str,
    payload_name: str,
    payload_sha256: str,
    target_path: Path,
) -> str:
    """A libconfig sw-description that installs one payload into a file with `rawfile`."""
    q = _libconfig_string
    return (
        "software =\n"
        "{\n"
        f"\tversion = {q(version)};\n"
        f"\tdescription = {q(name)};\n"
        f"\thardware-compatibility: [ {q(hardware)} ];\n"
        "\tfiles: (\n"
        "\t\t{\n"
        f"\t\t\tname = {q(name)};\n"
        f"\t\t\tversion = {q(version)};\n"
        f"\t\t\tfilename = {q(payload_name)};\n"
        f"\t\t\tpath = {q(str(target_path))};\n"
        f"\t\t\tsha256 = {q(payload_sha256)};\n"
        "\t\t}\n"
        "\t);\n"
        "}\n"
    )


def build_swu(
    directory: Path,
    *,
    signer: Signer,
    version: str,
    payload: bytes,
    target_path: Path,
    hardware: str = "1.0",
    name: str = "firmware",
    filename: str = "firmware.swu",
) -> Path:
    """Write a signed .swu into `directory` that, once installed, puts `payload` in `target_path`.

    `hardware` is the accepted revision (`-H <board>:<hardware>` on the client). Sign with
    another signer than the one the client trusts to get an image it must refuse.
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload_name = "payload.bin"
    description = sw_description(
        version=version,
        hardware=hardware,
        name=name,
        payload_name=payload_name,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        target_path=target_path,
    ).encode()
    with tempfile.TemporaryDirectory(dir=directory) as work:
        description_path = Path(work) / "sw-description"
        signature_path = Path(work) / "sw-description.sig"
        description_path.write_bytes(description)
        cms_sign(signer, description_path, signature_path)
        signature = signature_path.read_bytes()
    swu = directory / filename
    swu.write_bytes(
        cpio_newc(
            [
                ("sw-description", description),
                ("sw-description.sig", signature),
                (payload_name, payload),
            ]
        )
    )
    return swu
