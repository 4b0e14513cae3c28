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
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The images (signing, the .swu archive) live in tests/ddi/swu_images.py; re-exported here so
# that a test imports everything about swupdate from one place.
from tests.ddi.swu_images import (  # noqa: F401
    NEWC_TRAILER,
    Signer,
    build_swu,
    cms_sign,
    cpio_newc,
    make_signer,
    newc_entry,
    sw_description,
)

SWUPDATE = Path("/usr/bin/swupdate")
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
