"""The client's TUF check on the good path and on offers that do not match their TUF target; the
policy for devices without a TUF root; the configuration keys."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ota_client.agent import Agent
from ota_client.config import Config, ConfigError
from ota_client.tuf_client import verify_file
from ota_client.verifier import VerificationError
from tests.client.conftest import IMAGES, LiveServer
from tests.client.proxy import running_proxy

pytestmark = pytest.mark.e2e


def test_an_update_is_verified_with_tuf_and_its_counter_stored(
    ota_server: LiveServer, make_device: Any
) -> None:
    device = make_device()
    agent = Agent(device.config)
    agent.run_once()
    assert agent.running_version() == "1.1.0", agent.state.last_result
    cache = device.config.state_dir / "tuf"
    assert (cache / "root_history" / "1.root.json").exists()
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        assert (cache / name).exists(), name
    targets = json.loads((cache / "targets.json").read_text())["signed"]["targets"]
    path = "client-board/1.1.0/image-1.1.0.bin"
    assert targets[path]["custom"]["firmware_id"] == ota_server.firmware["1.1.0"]["id"]
    state = json.loads((device.config.state_dir / "state.json").read_text())
    assert state["release_counter"] == 0 and state["tuf_target"] is None


def test_an_offer_that_points_at_another_target_is_refused(
    ota_server: LiveServer, make_device: Any
) -> None:
    with running_proxy(ota_server.url) as proxy:

        def swap(answer: dict[str, Any]) -> dict[str, Any]:
            if answer.get("tuf_target"):
                answer["tuf_target"] = "client-board/1.0.0/image-1.0.0.bin"
            return answer

        proxy.tamper_check = swap
        device = make_device(server=proxy.url)
        agent = Agent(device.config)
        agent.run_once()
    assert agent.running_version() == "1.0.0"
    last = agent.state.last_result
    assert last is not None and last["outcome"] == "failed"
    assert "the TUF target's length" in last["reason"]
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed" and "TUF target" in session["error_message"]


def test_without_a_tuf_root_updates_are_refused(ota_server: LiveServer, make_device: Any) -> None:
    device = make_device(tuf_root=None)
    agent = Agent(device.config)
    agent.run_once()
    assert agent.running_version() == "1.0.0"
    [session] = ota_server.sessions(device.device_id)
    assert session["status"] == "failed"
    assert "no TUF root is configured" in session["error_message"]


def test_simulators_may_install_without_tuf_with_a_warning(
    ota_server: LiveServer, make_device: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ota_client")
    device = make_device(tuf_root=None, allow_without_tuf=True)
    agent = Agent(device.config)
    agent.run_once()
    assert agent.running_version() == "1.1.0"
    assert "installing without TUF verification" in caplog.text


def test_a_file_that_differs_from_its_target_is_refused(tmp_path: Path) -> None:
    image = IMAGES["1.0.0"]
    target = {
        "path": "client-board/1.0.0/image.bin",
        "length": len(image),
        "hashes": {"sha256": hashlib.sha256(image).hexdigest()},
        "custom": {"version": "1.0.0"},
    }
    good = tmp_path / "good.img"
    good.write_bytes(image)
    verify_file(target, good)
    bad = tmp_path / "bad.img"
    bad.write_bytes(image[:-1] + bytes([image[-1] ^ 1]))
    with pytest.raises(VerificationError, match="does not match its TUF target"):
        verify_file(target, bad)


def test_tuf_settings_in_the_configuration_file(tmp_path: Path) -> None:
    base = (
        'server = "https://ota.example"\ndevice_type = "b"\nhardware_id = "h"\n'
        'state_dir = "state"\ncurrent_version = "1.0.0"\n'
    )
    path = tmp_path / "client.toml"
    path.write_text(
        base + "[trust]\n"
        'tuf_root = "root.json"\n'
        'tuf_metadata_url = "https://mirror.example/metadata/"\n'
        "tuf_deadline = 20\n"
    )
    config = Config.load(path)
    assert config.tuf_root == tmp_path / "root.json"
    assert config.tuf_metadata_url == "https://mirror.example/metadata/"
    assert config.tuf_deadline == 20.0 and config.allow_without_tuf is False
    path.write_text(base + "[trust]\ntuf_deadline = 0\n")
    with pytest.raises(ConfigError, match="tuf_deadline"):
        Config.load(path)
    path.write_text(base + '[trust]\ntuf_metadata_url = "ftp://x"\n')
    with pytest.raises(ConfigError, match="tuf_metadata_url"):
        Config.load(path)
