"""The U-Boot backend's configuration and parsers (no fw_setenv needed)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ota_client.uboot import (
    UBootSystemInterface,
    env_script,
    from_options,
    parse_cmdline,
    parse_printenv,
    uboot_strtol,
)

# --- configuration and parsing ----------------------------------------------------------------


def test_from_options_takes_a_toml_table(tmp_path: Path) -> None:
    table = tomllib.loads(
        """
        [system]
        backend = "uboot"
        fw_env_config = "/etc/fw_env.config"
        slot_a = "/dev/mmcblk0p2"
        slot_b = "/dev/mmcblk0p3"
        cmdline = "/run/ota/cmdline"
        slot_key = "rauc.slot"
        reboot_command = ["/sbin/reboot", "-f"]
        fw_setenv = "/usr/local/bin/fw_setenv"
        timeout = 5
        """
    )["system"]
    table.pop("backend")  # the Config loader's own key
    system = from_options(table)
    assert system.fw_env_config == Path("/etc/fw_env.config")
    assert system.slot_path("a") == Path("/dev/mmcblk0p2")
    assert system.slot_path("b") == Path("/dev/mmcblk0p3")
    assert system.cmdline == Path("/run/ota/cmdline")
    assert system.slot_key == "rauc.slot"
    assert system.reboot_command == ["/sbin/reboot", "-f"]
    assert system.fw_setenv == "/usr/local/bin/fw_setenv"
    assert system.fw_printenv is None
    assert system.timeout == 5.0

    minimal = UBootSystemInterface.from_options({"slot_a": "/dev/a", "slot_b": "/dev/b"})
    assert minimal.fw_env_config == Path("/etc/fw_env.config")
    assert minimal.cmdline == Path("/proc/cmdline")
    assert minimal.slot_key == "ota.slot"
    assert minimal.reboot_command == ["systemctl", "reboot"]
    assert minimal.booted_slot_file is None and minimal.default_env is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"slot_a": "/dev/a"}, "slot_b required"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "slot-b": "x"}, "unknown U-Boot option"),
        ({"slot_a": "/dev/a", "slot_b": ""}, "'slot_b' must be"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "reboot_command": "reboot"}, "reboot_command"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "reboot_command": []}, "reboot_command"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "timeout": True}, "timeout"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "slot_key": 3}, "slot_key"),
        ({"slot_a": "/dev/a", "slot_b": "/dev/b", "slot_key": "ota slot"}, "slot_key"),
    ],
)
def test_from_options_rejects_bad_tables(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_options(options)


@pytest.mark.parametrize(
    ("text", "value"),
    [("", 0), ("3", 3), ("9", 9), ("0x1f", 31), ("010", 8), ("12abc", 12), ("f", 0), ("-2", -2)],
)
def test_trial_left_is_read_like_uboot_test(text: str, value: int) -> None:
    assert uboot_strtol(text) == value


def test_parsers() -> None:
    assert parse_printenv("a=1\nb=x=y\nscript=echo 1\necho 2\nc=\n") == {
        "a": "1",
        "b": "x=y",
        "script": "echo 1\necho 2",
        "c": "",
    }
    assert parse_cmdline("ota.slot=a", "rauc.slot") is None
    assert env_script({"ota_trial": "", "ota_trial_left": "0"}) == "ota_trial=\nota_trial_left=0\n"
