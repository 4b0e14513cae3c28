"""The client against a live server: whole updates, broken downloads, bad signatures, failed health
checks, an unreachable server, and the bandwidth limit."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ota_client.agent import Agent, Outcome
from ota_client.api import Offline, ServerClient
from ota_client.downloader import Downloader, ResumePoint
from ota_client.system import FileSystemInterface
from tests.client.conftest import IMAGES, Device, LiveServer
from tests.client.proxy import Fault, Proxy, running_proxy
from tests.e2e import free_port

pytestmark = pytest.mark.e2e

NEW = IMAGES["1.1.0"]
NEW_SHA = hashlib.sha256(NEW).hexdigest()


@pytest.fixture
def proxy(ota_server: LiveServer) -> Iterator[Proxy]:
    with running_proxy(ota_server.url) as running:
        yield running


def system_of(device: Device) -> FileSystemInterface:
    return FileSystemInterface(device.config.state_dir / "system")


def assert_updated(ota_server: LiveServer, device: Device, agent: Agent) -> None:
    system = system_of(device)
    env = system.read_env()
    assert system.booted_slot() == "b" and env.active == "b" and env.trial == ""
    assert system.slot_sha256("b", len(NEW)) == NEW_SHA
    assert agent.phase == "idle" and agent.running_version() == "1.1.0"
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "success", session
    assert session["version"] == "1.1.0" and session["from_version"] == "1.0.0"
    assert ota_server.device(device.device_id)["current_version"] == "1.1.0"


def test_update_from_1_0_0_to_1_1_0(ota_server: LiveServer, make_device: Any) -> None:
    device = make_device()
    agent = Agent(device.config)
    result = agent.run_once()
    # The last step asked again and heard that the device is up to date.
    assert result.outcome is Outcome.IDLE and result.detail == "up_to_date", result
    assert_updated(ota_server, device, agent)
    assert agent.state.last_result is not None
    assert agent.state.last_result["outcome"] == "success"
    assert not (device.config.state_dir / "download.part").exists()
    assert not (device.config.state_dir / "download.img").exists()
    assert (device.config.state_dir / "credentials.json").stat().st_mode & 0o777 == 0o600
    # Slot a still holds the factory image untouched (empty file in the simulation).
    assert system_of(device).slot_path("a").stat().st_size == 0


def test_corrupted_download_is_rejected_and_downloaded_again(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    device = make_device(server=proxy.url)
    proxy.download_faults.append(Fault("corrupt", at=700_000))
    agent = Agent(device.config)
    agent.run_once()
    assert_updated(ota_server, device, agent)
    downloads = proxy.downloads()
    # The corrupt copy was thrown away whole: the second download starts from byte 0.
    assert len(downloads) == 2 and downloads[1].range is None


def test_image_that_stays_corrupt_fails_the_session(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    device = make_device(server=proxy.url)
    proxy.download_faults.extend(Fault("corrupt", at=10) for _ in range(3))
    agent = Agent(device.config)
    agent.run_once()
    assert len(proxy.downloads()) == 3  # download.attempts, then give up
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert "failed verification 3 times" in session["error_message"]
    assert "sha256" in session["error_message"]
    system = system_of(device)
    assert system.read_env() == system.read_env().__class__("a", "", 0)
    assert system.slot_path("b").stat().st_size == 0  # never written
    assert ota_server.device(device.device_id)["current_version"] == "1.0.0"


def test_dropped_connection_resumes_with_range(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    device = make_device(server=proxy.url)
    proxy.download_faults.append(Fault("cut", at=600_000))
    agent = Agent(device.config)
    agent.run_once()
    assert_updated(ota_server, device, agent)
    first, second = proxy.downloads()
    assert first.range is None
    assert second.range is not None and second.if_range == f'"{NEW_SHA}"'
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 600_000
    assert second.status == 206


def test_downloads_cut_at_random_offsets_resume_every_time(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    """Six cuts in a row, each after a random number of bytes (a new seed each run, shown on
    failure): every one resumes where the last sync point was, nothing starts over, and the
    image installed is the whole, verified image."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    # Each under an eighth of the image, so all six fall inside it, whatever the seed.
    cuts = [rng.randrange(1, len(NEW) // 8) for _ in range(6)]
    device = make_device(server=proxy.url)
    proxy.download_faults += [Fault("cut", at=at) for at in cuts]
    agent = Agent(device.config)
    agent.run_once()
    assert_updated(ota_server, device, agent)
    downloads = proxy.downloads()
    assert len(downloads) == len(cuts) + 1, (seed, cuts)
    assert downloads[0].range is None
    received = 0
    for cut, resumed in zip(cuts, downloads[1:], strict=True):
        received += cut
        start = int(str(resumed.range).removeprefix("bytes=").rstrip("-"))
        # Resumed where the bytes stopped: never past what came, never from zero.
        assert 0 < start <= received, (seed, cuts, start)
        assert resumed.if_range == f'"{NEW_SHA}"' and resumed.status == 206, (seed, cuts)
        received = start


def test_a_whole_image_instead_of_a_range_starts_over(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    device = make_device(server=proxy.url)
    proxy.download_faults += [Fault("cut", at=600_000), Fault("ignore-range")]
    agent = Agent(device.config)
    agent.run_once()
    assert_updated(ota_server, device, agent)
    _, second = proxy.downloads()
    assert second.range is not None and second.status == 200  # asked to resume, got it all


def test_trust_on_first_use_fetches_the_servers_keys(
    ota_server: LiveServer, make_device: Any, tmp_path: Path
) -> None:
    keys_file = tmp_path / "tofu" / "keys.json"
    device = make_device(trusted_keys=keys_file, trust_on_first_use=True)
    agent = Agent(device.config)
    agent.run_once()
    assert_updated(ota_server, device, agent)
    assert json.loads(keys_file.read_text()) == ota_server.keys


def test_bad_signature_is_rejected_and_reported(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    # The device trusts another key under the server's key id: the server's signature cannot
    # verify, as if the offer had been forged.
    other = Ed25519PrivateKey.generate().public_key()
    raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    device = make_device(server=proxy.url)
    forged = {key_id: base64.b64encode(raw).decode() for key_id in ota_server.keys}
    assert device.config.trusted_keys is not None
    device.config.trusted_keys.write_text(json.dumps(forged))
    agent = Agent(device.config)
    result = agent.run_once()
    assert result.outcome is Outcome.IDLE
    assert proxy.downloads() == []  # refused before a single byte was fetched
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert "bad signature" in session["error_message"]
    assert system_of(device).slot_path("b").stat().st_size == 0
    assert system_of(device).read_env().trial == ""
    assert agent.state.last_result is not None and agent.state.last_result["outcome"] == "failed"


def test_failed_health_check_returns_to_the_old_slot(
    ota_server: LiveServer, make_device: Any
) -> None:
    device = make_device(
        health_check=(sys.executable, "-c", "import sys; sys.exit('sensor bus not found')"),
    )
    system = system_of(device)
    agent = Agent(device.config, system)
    agent.run_once()
    env = system.read_env()
    assert system.booted_slot() == "a" and env.active == "a" and env.trial == ""
    assert agent.phase == "idle" and agent.running_version() == "1.0.0"
    assert system.reboots == 2  # into the trial, and back
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert "health check failed on 1.1.0 in slot b" in session["error_message"]
    assert "sensor bus not found" in session["error_message"]
    assert "returning to slot a" in session["error_message"]
    assert ota_server.device(device.device_id)["current_version"] == "1.0.0"


def test_bootloader_gives_up_on_an_image_that_never_reaches_the_client(
    ota_server: LiveServer, make_device: Any
) -> None:
    device = make_device()
    system = system_of(device)
    # The reboot happens, but the new image dies before the client runs: the bootloader counts
    # its trial boots down and goes back to slot a.
    agent = Agent(device.config, system, reboot=lambda: False)
    result = agent.run_once()
    assert result.outcome is Outcome.REBOOTING and agent.phase == "armed"
    for _ in range(device.config.trial_boots):
        assert system.boot() == "b"
    assert system.boot() == "a"
    agent = Agent(device.config, system)
    agent.run_once()
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert session["error_message"].startswith("trial boot failed; device returned to slot a")
    assert ota_server.device(device.device_id)["current_version"] == "1.0.0"
    assert system.read_env() == system.read_env().__class__("a", "", 0)


def test_reports_are_queued_while_the_server_is_unreachable(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    device = make_device(server=proxy.url)
    agent = Agent(device.config)
    while agent.phase != "downloaded":
        assert agent.step().outcome is Outcome.PROGRESS
    # The network goes away: the device installs, reboots, validates and commits anyway.
    offline = device.config.with_overrides(server=f"http://127.0.0.1:{free_port()}")
    agent = Agent(offline)
    result = agent.run_once()
    assert result.outcome is Outcome.OFFLINE
    assert agent.phase == "idle" and agent.running_version() == "1.1.0"
    queued = [(r.kind, r.body.get("status"), r.body.get("success")) for r in agent.outbox.pending()]
    assert queued == [
        ("status", "installing", None),
        ("status", "validating", None),
        ("validation", None, True),
    ]
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "downloading"
    before = len(proxy.reports())

    agent = Agent(device.config)  # the network is back
    assert agent.run_once().outcome is Outcome.IDLE
    assert len(agent.outbox) == 0
    delivered = proxy.reports()[before:]
    assert [(r.get("status"), r.get("success")) for r in delivered] == [
        ("installing", None),
        ("validating", None),
        (None, True),
    ]
    assert_updated(ota_server, device, agent)


def test_the_server_away_for_many_cycles_mid_download(
    ota_server: LiveServer, make_device: Any, proxy: Proxy
) -> None:
    """The server goes away in the middle of a download and stays away for many poll cycles
    (minutes in the field; here seconds, with the backoff scaled down to 0.1-0.4 s). The agent
    keeps backing off without giving up or throwing its part file away, and when the server is
    back it resumes the download where it stopped and finishes the update."""
    device = make_device(server=proxy.url, max_backoff=0.4)
    proxy.download_faults.append(Fault("slow", at=400_000))  # about 4 s for the image
    agent = Agent(device.config, sleep=lambda seconds: time.sleep(min(seconds, 0.05)))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run_forever, args=(stop,), daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not proxy.downloads() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # a part of the image has come
        proxy.down = True
        time.sleep(4.0)
        assert proxy.dropped >= 8, proxy.dropped  # it kept trying, cycle after cycle
        assert agent.phase == "downloading"  # and kept its place
        proxy.down = False
        while agent.running_version() != "1.1.0" and time.monotonic() < deadline + 30:
            time.sleep(0.1)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert_updated(ota_server, device, agent)
    resumed = [seen for seen in proxy.downloads() if seen.range]
    assert resumed and all(seen.status == 206 for seen in resumed), proxy.downloads()


def test_bandwidth_limit(ota_server: LiveServer, make_device: Any, tmp_path: Any) -> None:
    device = make_device()
    server = ServerClient(device.config)
    server.ensure_enrolled()
    image = IMAGES["1.0.0"]
    limit = 400 * 1024
    downloader = Downloader(server, tmp_path / "limited.part", bandwidth_limit=limit)
    started = time.monotonic()
    digest = downloader.download(
        ota_server.firmware["1.0.0"]["download_url"], len(image), ResumePoint()
    )
    elapsed = time.monotonic() - started
    assert digest == hashlib.sha256(image).hexdigest()
    assert elapsed >= len(image) / limit  # 0.5 s
    assert elapsed < len(image) / limit + 2.0


def test_download_deadline_keeps_the_part_for_the_next_run(
    ota_server: LiveServer, make_device: Any, tmp_path: Path
) -> None:
    device = make_device()
    server = ServerClient(device.config)
    server.ensure_enrolled()
    image = IMAGES["1.0.0"]
    url = ota_server.firmware["1.0.0"]["download_url"]
    part = tmp_path / "slow.part"
    points: list[ResumePoint] = []
    # A slow link (100 KiB/s) and a 0.5 s deadline: the download is stopped about half way.
    slow = Downloader(
        server,
        part,
        bandwidth_limit=100 * 1024,
        deadline=0.5,
        progress_interval=0.1,
        on_sync=points.append,
    )
    with pytest.raises(Offline, match="did not finish within"):
        slow.download(url, len(image), ResumePoint())
    assert 0 < points[-1].synced < len(image) and points[-1].etag
    # The next run (a new process would read this point from state.json) resumes from there.
    fast = Downloader(server, part)
    assert fast.download(url, len(image), points[-1]) == hashlib.sha256(image).hexdigest()


def test_agents_update_side_by_side_in_threads(ota_server: LiveServer, make_device: Any) -> None:
    # What `ota-client simulate` builds on: agents share nothing, so threads are enough.
    devices = [make_device() for _ in range(3)]
    agents = [Agent(device.config) for device in devices]
    results: dict[int, Any] = {}

    def run(index: int) -> None:
        results[index] = agents[index].run_once()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(agents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(results[i].outcome is Outcome.IDLE for i in range(len(agents))), results
    for device, agent in zip(devices, agents, strict=True):
        assert_updated(ota_server, device, agent)
