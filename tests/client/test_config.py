"""The configuration file: the documented example loads, paths, overrides and errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ota_client.config import Config, ConfigError, make_system
from ota_client.downloader import TokenBucket
from ota_client.faults import CRASH_STATUS
from ota_client.system import FileSystemInterface

ROOT = Path(__file__).resolve().parents[2]


def documented_example() -> str:
    text = (ROOT / "docs" / "client.md").read_text()
    match = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert match, "docs/client.md has no TOML example"
    return match.group(1)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    (tmp_path / "machine-id").write_text("0123456789abcdef\n")
    example = documented_example()
    example = example.replace("/var/lib/ota-client", str(tmp_path / "state"))
    path.write_text(example.replace("/etc/machine-id", str(tmp_path / "machine-id")))
    config = Config.load(path)
    assert config.server.startswith("https://")
    assert config.health_check[0].startswith("/")
    assert config.backend == "uboot" and config.backend_options
    assert config.trial_boots == 3 and config.trust_on_first_use is False
    assert config.hardware_id == "0123456789abcdef"


def test_minimal_file_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "client.toml"
    path.parent.mkdir()
    (path.parent / "hwid").write_text("board-0042\n")
    path.write_text(
        'server = "http://ota.local:8000/"\n'
        'device_type = "board"\n'
        'hardware_id_file = "hwid"\n'
        'state_dir = "state"\n'
        'current_version = "1.0.0"\n'
        'enrollment_token_file = "token"\n'
        "[trust]\n"
        'keys_file = "keys.json"\n'
    )
    (path.parent / "token").write_text("ota_enroll_a_b\n")
    config = Config.load(path)
    assert config.server == "http://ota.local:8000"
    assert config.hardware_id == "board-0042"
    assert config.state_dir == path.parent / "state"
    assert config.trusted_keys_path == path.parent / "keys.json"
    assert config.read_enrollment_token() == "ota_enroll_a_b"
    assert (config.poll_interval, config.progress_interval, config.trial_boots) == (60, 5, 3)
    assert config.bandwidth_limit == 0 and config.health_check == ()
    system = make_system(config)
    assert isinstance(system, FileSystemInterface)
    assert system.root == config.state_dir / "system"

    changed = Config.load(path, server="https://other", bandwidth_limit=1000, state_dir=None)
    assert changed.server == "https://other" and changed.bandwidth_limit == 1000
    assert changed.state_dir == config.state_dir


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('current_version = "one"', "current_version"),
        ('server = "ota.local"', "server must be"),
        ('[health_check]\ncommand = "reboot-if-bad && true"', "argv"),
        ('[boot]\nbackend = "grub"', "boot.backend"),
        ("[boot]\ntrial_boots = 0", "trial_boots"),
        ("[boot]\ntrial_boots = 10", "trial_boots"),
        ("[download]\nbandwidth_limit = -1", "bandwidth_limit"),
        ("[polling]\njitter = 1.5", "jitter"),
        ('[polling]\ninterval = "often"', "polling.interval must be a number"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, line: str, message: str) -> None:
    base = {
        "server": 'server = "http://ota.local"',
        "current_version": 'current_version = "1.0.0"',
    }
    key = line.split(" ")[0]
    lines = [
        base["server"] if key != "server" else line,
        'device_type = "board"',
        'hardware_id = "hw"',
        'state_dir = "state"',
        base["current_version"] if key != "current_version" else line,
    ]
    if line.startswith("["):
        lines.append(line)
    path = tmp_path / "client.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        Config.load(path)


def test_token_bucket_paces_bytes() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(1000, 100, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        bucket.consume(100)
    # It starts empty, so 1000 bytes at 1000 bytes/s take a second.
    assert sum(slept) == pytest.approx(1.0)
    now[0] += 60  # a long pause fills the bucket only up to its capacity
    slept.clear()
    for _ in range(3):
        bucket.consume(100)
    assert sum(slept) == pytest.approx(0.2)


def test_crash_hook_counts_the_nth_time() -> None:
    script = (
        "from ota_client import faults\n"
        "for i in range(3):\n"
        "    faults.checkpoint('after-arm')\n"
        "    print(i, flush=True)\n"
    )
    env = {"OTA_CLIENT_CRASH_AT": "after-arm:2", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == CRASH_STATUS and result.stdout.split() == ["0"]
    del env["OTA_CLIENT_CRASH_AT"]
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.split() == ["0", "1", "2"]
