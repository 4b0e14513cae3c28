"""The swupdate test kit works: signed images install locally, forged or foreign ones don't."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ddi.swupdate_support import (
    NEWC_TRAILER,
    Signer,
    build_swu,
    cpio_newc,
    install_local,
    make_signer,
    process_group_running,
    short_tmpdir,
    start_swupdate,
    stop_swupdate,
    swupdate_available,
)

pytestmark = pytest.mark.skipif(
    not swupdate_available(), reason="needs Debian's swupdate (/usr/bin/swupdate)"
)

PAYLOAD = b"firmware 1.1.0\n" + bytes(range(256)) * 40


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not tmp_path: swupdate's UNIX sockets need a short TMPDIR.
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return make_signer(tmp_path / "keys")


def test_newc_layout() -> None:
    archive = cpio_newc([("a", b"xyz")])
    assert archive.startswith(b"070701")
    # 110-byte header + "a\0" padded to 112, then 3 data bytes padded to 4.
    assert archive[110:112] == b"a\0"
    assert archive[112:115] == b"xyz"
    assert archive[116:122] == b"070701"
    assert NEWC_TRAILER.encode() + b"\0" in archive
    assert len(archive) % 512 == 0


def test_signed_image_installs_into_target_file(
    tmp_path: Path, signer: Signer, run_dir: Path
) -> None:
    target = tmp_path / "target.bin"
    image = build_swu(tmp_path, signer=signer, version="1.1.0", payload=PAYLOAD, target_path=target)

    result = install_local(
        image, signer_cert=signer.cert_path, tmpdir=run_dir, log_path=tmp_path / "swupdate.log"
    )

    assert result.installed, result.log
    assert "Installing file payload.bin on" in result.log
    assert target.read_bytes() == PAYLOAD


def test_image_signed_with_another_key_is_refused(
    tmp_path: Path, signer: Signer, run_dir: Path
) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(b"old firmware")
    intruder = make_signer(tmp_path / "intruder", name="intruder")
    image = build_swu(
        tmp_path, signer=intruder, version="6.6.6", payload=PAYLOAD, target_path=target
    )

    result = install_local(
        image, signer_cert=signer.cert_path, tmpdir=run_dir, log_path=tmp_path / "swupdate.log"
    )

    assert result.returncode != 0 and result.verdict == "refused", result.log
    assert "Authentication of all signatures failed" in result.log
    assert target.read_bytes() == b"old firmware"


def test_image_for_another_hardware_revision_is_refused(
    tmp_path: Path, signer: Signer, run_dir: Path
) -> None:
    target = tmp_path / "target.bin"
    image = build_swu(
        tmp_path,
        signer=signer,
        version="1.1.0",
        payload=PAYLOAD,
        target_path=target,
        hardware="2.0",
    )

    result = install_local(
        image,
        signer_cert=signer.cert_path,
        revision="1.0",
        tmpdir=run_dir,
        log_path=tmp_path / "swupdate.log",
    )

    assert result.returncode != 0 and result.verdict == "refused", result.log
    assert "SW not compatible with hardware" in result.log
    assert not target.exists()


def test_suricatta_run_is_isolated_and_stops(tmp_path: Path, signer: Signer, run_dir: Path) -> None:
    # A port nobody listens on: the run polls, fails to connect and waits for the next poll.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = start_swupdate(
        signer_cert=signer.cert_path,
        tenant="Tenant1",
        controller_id="dev-1",
        base_url=f"http://127.0.0.1:{port}",
        target_token="t0ken",
        confirm=2,
        tmpdir=run_dir,
        log_path=tmp_path / "suricatta.log",
    )
    try:
        poll = f"Trying to GET http://127.0.0.1:{port}/Tenant1/controller/v1/dev-1"
        assert run.wait_for_log(poll, timeout=20), run.log_text()
        assert run.wait_for_log("Got state=2 from command line", timeout=5), run.log_text()
        # Its IPC sockets are in its own TMPDIR, not in /tmp.
        assert (run_dir / "sockinstctrl").is_socket()
        assert (run_dir / "swupdateprog").is_socket()
    finally:
        stop_swupdate(run, timeout=5)
    assert run.returncode is not None
    assert not process_group_running(run.pid)  # nor any helper it forked
