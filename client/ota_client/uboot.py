"""The U-Boot backend: A/B slots on real storage, the boot variables in U-Boot's environment.

The environment is read and written with ``fw_printenv`` / ``fw_setenv`` from libubootenv
(Debian package ``libubootenv-tool``), configured by an ``fw_env.config`` file that names where the
environment lives: one line per copy, ``DEVICE OFFSET SIZE [SECTOR-SIZE [SECTORS]]``. Two lines
make a *redundant* environment: libubootenv (like U-Boot's ``saveenv``) then always writes the copy
that is not current, with a higher flag byte, so a power cut during a write leaves the other copy
intact and the old environment is read back. With a single copy a torn write leaves a bad CRC and
U-Boot falls back to its built-in default environment, so real devices should use two copies.

Reading (``read_env``) runs ``fw_printenv -c CONFIG`` and parses every ``NAME=VALUE`` line. Missing
variables take these defaults, which are also what the boot script in docs/client.md assumes:

* ``ota_active`` missing: ``"a"``. Provisioning: the factory image is written to slot "a", and the
  board's default environment (U-Boot's built-in one, and ``/etc/u-boot-initial-env`` for
  libubootenv) should carry ``ota_active=a``, so that the bootloader and the client agree even
  before the first ``commit``. A device flashed with its system in slot "b" must set
  ``ota_active=b`` once (``fw_setenv ota_active b``) before the client runs.
* ``ota_trial`` missing: ``""`` (no trial armed). Clearing it deletes the variable, which is what
  U-Boot's ``setenv ota_trial`` (without a value) does too.
* ``ota_trial_left`` missing: ``0``. It is read the way U-Boot's ``test ... -gt 0`` reads it
  (``simple_strtol`` with base 0, anything unparsable is 0).

Writing (``write_env``) makes ONE ``fw_setenv -c CONFIG -s SCRIPT`` call for all the variables of a
change, so they land in a single environment write: a power cut can never leave ``ota_trial`` set
with a stale ``ota_trial_left``. libubootenv 0.3.2's script format is ``name=value`` per line, an
empty value deletes the variable, and lines without ``=`` are silently ignored (unlike U-Boot's own
old ``fw_setenv``, whose scripts were ``name value``). Because fw_setenv exits 0 even when it
ignored a script line, every write is read back and checked.

``ota_trial_left`` is limited to 0..9: U-Boot's ``setexpr`` (used by the boot script to count down)
works in hexadecimal, which agrees with decimal only for single digits.

If the environment has a bad CRC (never written), libubootenv falls back to a default environment
file (``-f``, by default ``/etc/u-boot-initial-env``) and fails when there is none. ``fw_setenv``
with a default file writes the defaults plus the script: that is how a blank environment gets
initialised (or create the image with ``mkenvimage -s SIZE [-r] -o FILE env.txt`` from
u-boot-tools, or boot U-Boot once and run ``saveenv``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .system import SLOTS, BootEnv, SystemInterface

log = logging.getLogger(__name__)

DEFAULT_FW_ENV_CONFIG = Path("/etc/fw_env.config")
DEFAULT_CMDLINE = Path("/proc/cmdline")
DEFAULT_SLOT_KEY = "ota.slot"
DEFAULT_REBOOT_COMMAND = ("systemctl", "reboot")
DEFAULT_TIMEOUT = 60.0
MAX_TRIAL_BOOTS = 9
ENV_VARIABLES = ("ota_active", "ota_trial", "ota_trial_left")
INSTALL_HINT = "install Debian's libubootenv-tool (apt-get install libubootenv-tool)"

# The options from_options() accepts, the keys of a [system] table in the client's TOML config.
OPTION_KEYS = frozenset(
    {
        "fw_env_config",
        "slot_a",
        "slot_b",
        "cmdline",
        "slot_key",
        "booted_slot_file",
        "reboot_command",
        "fw_printenv",
        "fw_setenv",
        "default_env",
        "timeout",
    }
)


class UBootError(RuntimeError):
    """A U-Boot tool failed, or the environment or the command line holds something unusable."""


def uboot_strtol(text: str) -> int:
    """The number U-Boot's ``test A -gt B`` sees in ``text`` (``simple_strtol(text, NULL, 0)``):
    an optional sign, then ``0x`` hex, ``0`` octal or decimal digits up to the first other
    character; no digits at all is 0."""
    sign = 1
    rest = text.strip()
    if rest[:1] in ("-", "+"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest[:2].lower() == "0x" and rest[2:3] and rest[2] in "0123456789abcdefABCDEF":
        base, rest, digits = 16, rest[2:], "0123456789abcdef"
    elif rest.startswith("0"):
        base, digits = 8, "01234567"
    else:
        base, digits = 10, "0123456789"
    value = 0
    for char in rest.lower():
        if char not in digits:
            break
        value = value * base + digits.index(char)
    return sign * value


def parse_printenv(output: str) -> dict[str, str]:
    """Variables from ``fw_printenv`` output. A line without ``=`` continues the value of the
    line before it (a value holding a newline, e.g. a multi-line script)."""
    env: dict[str, str] = {}
    last: str | None = None
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and name:
            env[name] = value
            last = name
        elif last is not None:
            env[last] += "\n" + line
    return env


def parse_cmdline(cmdline: str, key: str) -> str | None:
    """The value of ``key=`` in a kernel command line (the last one wins, quotes are dropped)."""
    prefix = key.rstrip("=") + "="
    found: str | None = None
    for token in cmdline.split():
        if token.startswith(prefix):
            found = token[len(prefix) :].strip('"')
    return found


def env_script(values: Mapping[str, str]) -> str:
    """The ``fw_setenv -s`` script (libubootenv format) setting ``values``; "" deletes."""
    return "".join(f"{name}={value}\n" for name, value in values.items())


def _check_values(values: Mapping[str, str]) -> None:
    for name, value in values.items():
        if name not in ENV_VARIABLES:
            raise ValueError(f"{name!r} is not one of the boot variables {ENV_VARIABLES}")
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if "ota_active" in values and values["ota_active"] not in SLOTS:
        raise ValueError(f"ota_active must be one of {SLOTS}, not {values['ota_active']!r}")
    if "ota_trial" in values and values["ota_trial"] not in (*SLOTS, ""):
        raise ValueError(f"ota_trial must be one of {SLOTS} or '', not {values['ota_trial']!r}")
    if "ota_trial_left" in values:
        left = values["ota_trial_left"]
        if not re.fullmatch(r"[0-9]", left):
            raise ValueError(
                f"ota_trial_left must be a number from 0 to {MAX_TRIAL_BOOTS} (U-Boot's setexpr "
                f"counts in hexadecimal, which matches decimal for one digit only), not {left!r}"
            )


def _path(value: object, key: str) -> Path:
    if isinstance(value, str | os.PathLike) and str(value):
        return Path(value)
    raise ValueError(f"option {key!r} must be a non-empty path string, not {value!r}")


class UBootSystemInterface(SystemInterface):
    """A device with U-Boot: slots are block devices (or files), the environment is U-Boot's.

    ``slot_a`` / ``slot_b``: where each slot's image is written, e.g. ``/dev/mmcblk0p2``.
    ``fw_env_config``: the libubootenv config (``-c``), ``/etc/fw_env.config`` by default.
    ``cmdline`` / ``slot_key``: the booted slot is the value of ``slot_key=`` (``ota.slot`` by
    default; ``rauc.slot`` also works, its ``A``/``B`` are lower-cased) in the kernel command line
    file ``cmdline`` (``/proc/cmdline``), which the boot script sets in ``bootargs``.
    ``booted_slot_file``: if given and present, a file holding just the booted slot's name, which
    overrides the command line (containers see the host's /proc/cmdline; tests have no reboot).
    ``reboot_command``: argv run by ``reboot()``.
    ``fw_printenv`` / ``fw_setenv``: the tools, found on PATH when not given. libubootenv picks
    its mode from the program's name, so a ``fw_setenv`` path must end in ``fw_setenv`` (or be a
    wrapper that execs it).
    ``default_env``: an environment text file passed as ``-f``, used when the stored environment
    has a bad CRC (libubootenv's own default is ``/etc/u-boot-initial-env``).
    """

    def __init__(
        self,
        *,
        slot_a: str | os.PathLike[str],
        slot_b: str | os.PathLike[str],
        fw_env_config: str | os.PathLike[str] = DEFAULT_FW_ENV_CONFIG,
        cmdline: str | os.PathLike[str] = DEFAULT_CMDLINE,
        slot_key: str = DEFAULT_SLOT_KEY,
        booted_slot_file: str | os.PathLike[str] | None = None,
        reboot_command: Sequence[str] = DEFAULT_REBOOT_COMMAND,
        fw_printenv: str | os.PathLike[str] | None = None,
        fw_setenv: str | os.PathLike[str] | None = None,
        default_env: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not slot_key.rstrip("=") or any(c.isspace() for c in slot_key):
            raise ValueError(f"slot_key must be a kernel parameter name, not {slot_key!r}")
        if isinstance(reboot_command, str) or not reboot_command:
            raise ValueError("reboot_command must be a non-empty list of arguments")
        self.slots = {"a": Path(slot_a), "b": Path(slot_b)}
        self.fw_env_config = Path(fw_env_config)
        self.cmdline = Path(cmdline)
        self.slot_key = slot_key.rstrip("=")
        self.booted_slot_file = Path(booted_slot_file) if booted_slot_file is not None else None
        self.reboot_command = [str(arg) for arg in reboot_command]
        self.fw_printenv = str(fw_printenv) if fw_printenv is not None else None
        self.fw_setenv = str(fw_setenv) if fw_setenv is not None else None
        self.default_env = Path(default_env) if default_env is not None else None
        self.timeout = timeout

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> UBootSystemInterface:
        """Build from a config table, e.g. the TOML ``[system]`` table::

            fw_env_config = "/etc/fw_env.config"
            slot_a = "/dev/mmcblk0p2"
            slot_b = "/dev/mmcblk0p3"
            cmdline = "/proc/cmdline"        # optional
            slot_key = "ota.slot"            # optional, e.g. "rauc.slot"
            booted_slot_file = "/run/slot"   # optional override
            reboot_command = ["systemctl", "reboot"]
            fw_printenv = "/usr/bin/fw_printenv"  # optional, also fw_setenv, default_env, timeout

        Unknown keys and wrong types raise ValueError (a typo must not silently fall back)."""
        unknown = sorted(set(options) - OPTION_KEYS)
        if unknown:
            raise ValueError(
                f"unknown U-Boot option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(OPTION_KEYS))}"
            )
        missing = [key for key in ("slot_a", "slot_b") if key not in options]
        if missing:
            raise ValueError(f"U-Boot option(s) {', '.join(missing)} required")

        def optional_path(key: str) -> Path | None:
            return _path(options[key], key) if key in options else None

        slot_key = options.get("slot_key", DEFAULT_SLOT_KEY)
        if not isinstance(slot_key, str):
            raise ValueError(f"option 'slot_key' must be a string, not {slot_key!r}")
        reboot = options.get("reboot_command", list(DEFAULT_REBOOT_COMMAND))
        if not (
            isinstance(reboot, list | tuple)
            and reboot
            and all(isinstance(arg, str) and arg for arg in reboot)
        ):
            raise ValueError(f"option 'reboot_command' must be a list of strings, not {reboot!r}")
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"option 'timeout' must be a positive number, not {timeout!r}")
        return cls(
            slot_a=_path(options["slot_a"], "slot_a"),
            slot_b=_path(options["slot_b"], "slot_b"),
            fw_env_config=optional_path("fw_env_config") or DEFAULT_FW_ENV_CONFIG,
            cmdline=optional_path("cmdline") or DEFAULT_CMDLINE,
            slot_key=slot_key,
            booted_slot_file=optional_path("booted_slot_file"),
            reboot_command=list(reboot),
            fw_printenv=optional_path("fw_printenv"),
            fw_setenv=optional_path("fw_setenv"),
            default_env=optional_path("default_env"),
            timeout=float(timeout),
        )

    # --- SystemInterface ----------------------------------------------------------------------

    def booted_slot(self) -> str:
        if self.booted_slot_file is not None and self.booted_slot_file.exists():
            value: str | None = self.booted_slot_file.read_text().strip()
            source = str(self.booted_slot_file)
        else:
            try:
                text = self.cmdline.read_text()
            except OSError as exc:
                raise UBootError(
                    f"cannot read the kernel command line {self.cmdline}: {exc}"
                ) from exc
            value = parse_cmdline(text, self.slot_key)
            source = f"{self.slot_key}= in {self.cmdline}"
            if value is None:
                raise UBootError(
                    f"no {self.slot_key}= in {self.cmdline}: the boot script must add "
                    f"'{self.slot_key}=${{ota_slot}}' to bootargs"
                )
        slot = (value or "").lower()
        if slot not in SLOTS:
            raise UBootError(f"booted slot {value!r} from {source} is not one of {SLOTS}")
        return slot

    def read_raw_env(self) -> dict[str, str]:
        """Every variable of the environment, as ``fw_printenv`` prints them."""
        result = self._run(self._tool("fw_printenv", self.fw_printenv), [])
        if result.stderr.strip():
            log.warning("fw_printenv: %s", result.stderr.strip())
        return parse_printenv(result.stdout)

    def read_env(self) -> BootEnv:
        env = self.read_raw_env()
        active = env.get("ota_active", "") or "a"
        trial = env.get("ota_trial", "")
        for name, value in (("ota_active", active), ("ota_trial", trial)):
            if value and value not in SLOTS:
                raise UBootError(
                    f"U-Boot variable {name}={value!r} is not one of {SLOTS} ({self.fw_env_config})"
                )
        return BootEnv(
            active=active,
            trial=trial,
            trial_left=max(0, uboot_strtol(env.get("ota_trial_left", ""))),
        )

    def write_env(self, **values: str) -> None:
        """Set the variables in one ``fw_setenv -s`` call (one environment write), then read the
        environment back to check it holds them."""
        if not values:
            return
        _check_values(values)
        fd, script = tempfile.mkstemp(prefix="ota-fw_setenv-", suffix=".env")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(env_script(values))
            result = self._run(self._tool("fw_setenv", self.fw_setenv), ["-s", script])
        finally:
            Path(script).unlink(missing_ok=True)
        if result.stderr.strip():
            log.warning("fw_setenv: %s", result.stderr.strip())
        env = self.read_raw_env()
        wrong = {
            name: env.get(name) for name, value in values.items() if env.get(name, "") != value
        }
        if wrong:
            raise UBootError(
                f"fw_setenv exited 0 but the environment holds {wrong}, not {values}: is "
                f"{self._tool('fw_setenv', self.fw_setenv)} libubootenv's fw_setenv, whose "
                f"script lines are name=value?"
            )

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.slots[slot]

    def reboot(self) -> None:
        """Run the reboot command. ``systemctl reboot`` returns once the reboot is queued, so this
        returns too; the caller should do nothing more."""
        log.info("rebooting: %s", " ".join(self.reboot_command))
        try:
            result = subprocess.run(  # noqa: S603 - a configured argv, no shell
                self.reboot_command, capture_output=True, text=True, timeout=self.timeout
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UBootError(f"reboot command {self.reboot_command} failed: {exc}") from exc
        if result.returncode != 0:
            raise UBootError(
                f"reboot command {self.reboot_command} exited {result.returncode}: "
                f"{result.stderr.strip()}"
            )

    # --- helpers ------------------------------------------------------------------------------

    def _tool(self, name: str, configured: str | None) -> str:
        if configured is not None:
            return configured
        found = shutil.which(name) or next(
            (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None
        )
        if found is None:
            raise UBootError(f"{name} not found on PATH: {INSTALL_HINT}")
        return found

    def _run(self, tool: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        argv = [tool, "-c", str(self.fw_env_config)]
        if self.default_env is not None:
            argv += ["-f", str(self.default_env)]
        argv += args
        try:
            result = subprocess.run(  # noqa: S603 - fixed tool and arguments, no shell
                argv, capture_output=True, text=True, timeout=self.timeout
            )
        except FileNotFoundError as exc:
            raise UBootError(f"{tool} not found: {INSTALL_HINT}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UBootError(f"{' '.join(argv)} failed: {exc}") from exc
        if result.returncode != 0:
            stderr = result.stderr.strip() or "(no message)"
            hint = ""
            if "Cannot read default environment" in stderr:
                hint = (
                    " (the environment has a bad CRC, i.e. was never written, and there is no "
                    "default environment file: create it with mkenvimage, run saveenv in U-Boot, "
                    "or set default_env)"
                )
            raise UBootError(f"{' '.join(argv)} exited {result.returncode}: {stderr}{hint}")
        return result


def from_options(options: Mapping[str, object]) -> UBootSystemInterface:
    """Build a UBootSystemInterface from a config table (see UBootSystemInterface.from_options)."""
    return UBootSystemInterface.from_options(options)
