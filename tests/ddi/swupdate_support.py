"""Drive the real SWUpdate client (Debian's 2022.12) from pytest: keys, signed .swu images, runs.

Facts this module relies on, checked against /usr/bin/swupdate 2022.12:

- Images must be signed (`-k cert.pem`): a CMS signature (DER) of `sw-description`, stored as
  `sw-description.sig` right after it in the cpio archive. A self-signed certificate is accepted
  as long as its purpose fits `--cert-purpose` (default emailProtection): no extensions, or
  keyUsage digitalSignature + extendedKeyUsage emailProtection, work; an extendedKeyUsage of
  codeSigning alone is refused even with `--cert-purpose codeSigning`.
- The archive is cpio "newc": magic 070701 (no checksums) is accepted, as is 070702 (with
  checksums); this module writes 070701.
- The `files` section with `path` uses the `rawfile` handler, which writes the payload to any
  file: a test installs into a temporary file.
- Its IPC sockets (`sockinstctrl`, `swupdateprog`) and scratch folders (`scripts/`, `datadst/`)
  live in `$TMPDIR`, so one TMPDIR per run keeps parallel runs (pytest-xdist) apart. A UNIX socket
  path must stay under 108 bytes, so the TMPDIR must be short.
- Without `-f` it reads `/etc/swupdate.cfg` if that exists: each run gets its own config file.
- With no bootloader configured ("none") the update state lives in RAM: "after the reboot" is a
  second run with suricatta's `-c 2` (success) or `-c 3` (failure).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SWUPDATE = Path("/usr/bin/swupdate")
OPENSSL = "openssl"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX = 107
_SOCKET_NAMES = ("sockinstctrl", "swupdateprog")
# Environment variables that would make libcurl go through a proxy instead of to the test server.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# Lines of a suricatta run's log (`-l 5`) that tests can wait for with wait_for_log().
LOG_POLL = "[server_get_device_info] : Getting information for device"
LOG_INSTALLED = "All Chunks Installed."  # also the details of the last "proceeding" feedback
LOG_AWAITING_REBOOT = "Please restart SWUpdate to report the test results upstream."
LOG_CANCEL_ACKED = "Acknowledging cancelled update."
LOG_CONFIRMED = "Got state=2 from command line."  # -c 2; -c 3 logs state=3


def swupdate_available() -> bool:
    return SWUPDATE.is_file() and os.access(SWUPDATE, os.X_OK)


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


# --- running the client -----------------------------------------------------------------------


def _check_tmpdir(tmpdir: Path) -> None:
    longest = max(len(os.fsencode(tmpdir / socket_name)) for socket_name in _SOCKET_NAMES)
    if longest > _SOCKET_PATH_MAX:
        raise ValueError(
            f"TMPDIR {tmpdir} is too long for swupdate's UNIX sockets ({longest} > "
            f"{_SOCKET_PATH_MAX} bytes): use a shorter folder, e.g. tempfile.mkdtemp(dir='/tmp')"
        )


def short_tmpdir(prefix: str = "swu-") -> Path:
    """A new private folder under /tmp, short enough for swupdate's sockets; remove it yourself."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _environment(tmpdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _PROXY_VARS}
    env["TMPDIR"] = str(tmpdir)
    return env


def _write_config(tmpdir: Path) -> Path:
    # Its own config keeps a machine's /etc/swupdate.cfg out; 'globals' must be present.
    config = tmpdir / "swupdate.cfg"
    config.write_text("globals:\n{\n\tloglevel = 5;\n};\n")
    return config


def _no_whitespace(option: str, value: str) -> str:
    # swupdate splits the -u argument string on blanks.
    if not value or any(char.isspace() for char in value):
        raise ValueError(f"suricatta {option} must be non-empty without whitespace: {value!r}")
    return value


class SwupdateRun(subprocess.Popen[bytes]):
    """A running swupdate (its own process group) with its log file and TMPDIR."""

    log_path: Path
    tmpdir: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float) -> bool:
        return wait_for_log(self.log_path, pattern, timeout, proc=self)

    def stop(self, timeout: float = 10.0) -> int:
        return stop_swupdate(self, timeout)


def _spawn(
    args: Sequence[str], *, tmpdir: Path, log_path: Path, cwd: Path | None = None
) -> SwupdateRun:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = SwupdateRun(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_environment(tmpdir),
            # Its Lua handler search includes "./": run it in its private folder.
            cwd=cwd or tmpdir,
            # swupdate forks helpers (suricatta, downloader): stop them with it, as a group.
            start_new_session=True,
        )
    proc.log_path = log_path
    proc.tmpdir = tmpdir
    return proc


def swupdate_base_args(*, signer_cert: Path, board: str, revision: str, tmpdir: Path) -> list[str]:
    """The options every run shares: own config, signer certificate, hardware, full logs."""
    return [
        str(SWUPDATE),
        "-f",
        str(_write_config(tmpdir)),
        "-k",
        str(signer_cert),
        "-H",
        f"{board}:{revision}",
        "-l",
        "5",
    ]


def suricatta_args(
    *,
    tenant: str,
    controller_id: str,
    base_url: str,
    target_token: str | None = None,
    gateway_token: str | None = None,
    confirm: int | None = None,
    poll_delay: int = 5,
    retries: int = 3,
    retry_wait: int = 2,
    extra: Sequence[str] = (),
) -> str:
    """The string given to `swupdate -u` (hawkBit mode)."""
    parts = [
        "-t",
        _no_whitespace("tenant", tenant),
        "-i",
        _no_whitespace("controller id", controller_id),
        "-u",
        _no_whitespace("url", base_url),
        "-p",
        str(poll_delay),
        "-r",
        str(retries),
        "-w",
        str(retry_wait),
    ]
    if target_token is not None:
        parts += ["-k", _no_whitespace("target token", target_token)]
    if gateway_token is not None:
        parts += ["-g", _no_whitespace("gateway token", gateway_token)]
    if confirm is not None:
        if confirm not in (1, 2, 3):
            raise ValueError("confirm is 1 (again), 2 (success) or 3 (failure)")
        parts += ["-c", str(confirm)]
    parts += [_no_whitespace("extra option", value) for value in extra]
    return " ".join(parts)


def start_swupdate(
    *,
    signer_cert: Path,
    tenant: str,
    controller_id: str,
    base_url: str,
    tmpdir: Path,
    log_path: Path,
    target_token: str | None = None,
    gateway_token: str | None = None,
    confirm: int | None = None,
    board: str = "board",
    revision: str = "1.0",
    poll_delay: int = 5,
    retries: int = 3,
    retry_wait: int = 2,
    extra_args: Sequence[str] = (),
    extra_suricatta_args: Sequence[str] = (),
) -> SwupdateRun:
    """Start swupdate in suricatta (hawkBit DDI) mode, logging everything (`-l 5`) to `log_path`.

    `base_url` is scheme, host and port (swupdate adds `/{tenant}/controller/v1/{id}`).
    `confirm=2`/`3` report the previous install as succeeded/failed ("after the reboot").
    `tmpdir` must be private to this run and short (UNIX socket paths): it is created.
    Stop it with `stop_swupdate()`.
    """
    tmpdir.mkdir(parents=True, exist_ok=True)
    _check_tmpdir(tmpdir)
    args = swupdate_base_args(
        signer_cert=signer_cert, board=board, revision=revision, tmpdir=tmpdir
    )
    args += list(extra_args)
    args += [
        "-u",
        suricatta_args(
            tenant=tenant,
            controller_id=controller_id,
            base_url=base_url,
            target_token=target_token,
            gateway_token=gateway_token,
            confirm=confirm,
            poll_delay=poll_delay,
            retries=retries,
            retry_wait=retry_wait,
            extra=extra_suricatta_args,
        ),
    ]
    return _spawn(args, tmpdir=tmpdir, log_path=log_path)


# The installer's own verdict, and what the `-i` front end then reports as the end of it.
_INSTALLED = re.compile(r"^\[INFO \] : SWUPDATE successful !", re.MULTILINE)
_REFUSED = re.compile(r"^\[ERROR\] : SWUPDATE failed \[1\]", re.MULTILINE)
_END_INSTALLED = re.compile(r"\[endupdate\] : SWUpdate was successful !")
_END_REFUSED = re.compile(r"endupdate : \d+ : SWUpdate \*failed\* !")


@dataclass(frozen=True)
class LocalInstall:
    """How `swupdate -i` ended: exit status, the installer's verdict and the run's log."""

    returncode: int
    verdict: str | None  # "installed", "refused", or None if the installer never finished
    log: str
    attempts: int

    @property
    def installed(self) -> bool:
        return self.returncode == 0 and self.verdict == "installed"


def _verdict(log: str) -> str | None:
    if _INSTALLED.search(log):
        return "installed"
    if _REFUSED.search(log):
        return "refused"
    return None


def _consistent(log: str, verdict: str | None, returncode: int) -> bool:
    """Whether the front end waited for the installer: its end came after, and agrees."""
    if verdict is None:
        return False
    said, end = (_INSTALLED, _END_INSTALLED) if verdict == "installed" else (_REFUSED, _END_REFUSED)
    said_at, end_at = said.search(log), end.search(log)
    return (
        said_at is not None
        and end_at is not None
        and said_at.start() < end_at.start()
        and (returncode == 0) == (verdict == "installed")
    )


def install_local(
    image: Path,
    *,
    signer_cert: Path,
    tmpdir: Path,
    log_path: Path,
    board: str = "board",
    revision: str = "1.0",
    timeout: float = 60.0,
    attempts: int = 5,
) -> LocalInstall:
    """Install `image` without a server (`swupdate -i`).

    swupdate 2022.12 has a race in this mode (ipc_wait_for_complete): its IPC client may ask for
    the status before the install has started, see "idle" and end at once, printing "SWUpdate
    was successful !", exiting 1 and deleting the extracted sw-description under the installer
    (which then fails with "... cannot be opened"). A run whose end was not reported after the
    installer's verdict, or disagrees with it, is run again, up to `attempts` times. Every
    attempt's output is appended to `log_path`; `LocalInstall.log` is the last one's.
    """
    tmpdir.mkdir(parents=True, exist_ok=True)
    _check_tmpdir(tmpdir)
    args = swupdate_base_args(
        signer_cert=signer_cert, board=board, revision=revision, tmpdir=tmpdir
    )
    result: LocalInstall | None = None
    for attempt in range(1, attempts + 1):
        with log_path.open("a") as log:
            log.write(f"==== swupdate -i, attempt {attempt} ====\n")
        start = log_path.stat().st_size
        proc = _spawn([*args, "-i", str(image)], tmpdir=tmpdir, log_path=log_path)
        try:
            returncode = proc.wait(timeout)
        finally:
            stop_swupdate(proc)
        with log_path.open("rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
        verdict = _verdict(text)
        result = LocalInstall(returncode, verdict, text, attempt)
        if _consistent(text, verdict, returncode):
            break
    assert result is not None
    return result


def stop_swupdate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM its process group, SIGKILL after `timeout` seconds; its exit status.

    Returns once no process of the group runs any more (or after another `timeout`).
    """
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout)
    # Helpers it forked may outlive it; they are in its process group.
    _signal_group(proc, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while process_group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def process_group_running(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, left for init to reap, don't count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for_log(
    log_path: Path,
    pattern: str | re.Pattern[str],
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.1,
) -> bool:
    """Whether `pattern` shows up in the log within `timeout` seconds.

    A `str` is a plain substring, a compiled pattern is searched as a regex. With `proc`, stop
    waiting (after one last look) as soon as the process has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        exited = proc is not None and proc.poll() is not None
        try:
            text = log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        found = pattern in text if isinstance(pattern, str) else pattern.search(text) is not None
        if found:
            return True
        if exited or time.monotonic() >= deadline:
            return False
        time.sleep(interval)
