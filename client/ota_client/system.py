"""The device's side of the boot: A/B slots and the bootloader environment.

Every backend keeps the same three variables in the bootloader environment:

``ota_active``
    The committed slot ("a" or "b"): the one that boots when nothing else is asked.
``ota_trial``
    A slot armed for trial boots after an install, or "" when none is.
``ota_trial_left``
    How many trial boots remain.

The bootloader runs this logic at every boot (docs/client.md has the U-Boot script)::

    if ota_trial != "" and ota_trial_left > 0:  ota_trial_left -= 1 (saved first); boot ota_trial
    elif ota_trial != "":                       ota_trial = "" (saved first);      boot ota_active
    else:                                                                          boot ota_active

so a new image that cannot reach the client's health check is abandoned after its trial boots and
the device comes back on the slot it ran before. Only ``commit`` moves ``ota_active``; an install
writes only the slot that is not running; each environment change is one atomic write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SLOTS = ("a", "b")
CHUNK = 1024 * 1024


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class BootEnv:
    active: str
    trial: str
    trial_left: int


ENV_KEYS = frozenset({"ota_active", "ota_trial", "ota_trial_left"})


class SystemInterface(ABC):
    """What the client needs from the device: slots, the boot environment, and a reboot."""

    #: True when ``reboot()`` returns with the device already restarted (a simulation), so the
    #: caller may carry on as the freshly booted system. On real hardware a reboot ends the
    #: process (or is about to), and the caller must stop.
    reboot_returns: bool = False

    @abstractmethod
    def booted_slot(self) -> str:
        """The slot the running system booted from."""

    @abstractmethod
    def read_env(self) -> BootEnv:
        """The bootloader variables (see the module docstring)."""

    @abstractmethod
    def write_env(self, **values: str) -> None:
        """Set some of ota_active, ota_trial, ota_trial_left in one atomic write."""

    @abstractmethod
    def slot_path(self, slot: str) -> Path:
        """Where the slot's image is written (a file, or a block device on real hardware)."""

    @abstractmethod
    def reboot(self) -> None:
        """Restart the device. On real hardware this does not return."""

    # --- Operations built on the primitives above (the same for every backend) ---------------

    def inactive_slot(self) -> str:
        return other_slot(self.booted_slot())

    def write_slot(
        self, slot: str, source: Path, progress: Callable[[int], None] | None = None
    ) -> str:
        """Copy an image into a slot that is not running, fsync it, and return its sha256."""
        if slot == self.booted_slot():
            raise RuntimeError(f"refusing to write the running slot {slot!r}")
        digest = hashlib.sha256()
        written = 0
        target = self.slot_path(slot)
        # A block device is written in place; a slot file is replaced from its start.
        mode = "r+b" if target.is_block_device() else "wb"
        with source.open("rb") as src, target.open(mode) as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                dst.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
            dst.flush()
            os.fsync(dst.fileno())
        return digest.hexdigest()

    def slot_sha256(self, slot: str, size: int) -> str:
        """sha256 of the first ``size`` bytes of a slot (block devices are larger than images)."""
        digest = hashlib.sha256()
        remaining = size
        with self.slot_path(slot).open("rb") as handle:
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
        return digest.hexdigest()

    def arm_trial(self, slot: str, tries: int) -> None:
        """Ask the bootloader to try ``slot`` for at most ``tries`` boots."""
        if slot == self.read_env().active:
            raise RuntimeError(f"slot {slot!r} is the committed slot, not a new one")
        self.write_env(ota_trial=slot, ota_trial_left=str(tries))

    def commit(self, slot: str) -> None:
        """Make ``slot`` the one that boots from now on (after a healthy trial boot)."""
        self.write_env(ota_active=slot, ota_trial="", ota_trial_left="0")

    def cancel_trial(self) -> None:
        """Drop an armed trial: the next boot is the committed slot."""
        self.write_env(ota_trial="", ota_trial_left="0")


def atomic_write_json(path: Path, data: object) -> None:
    """Write JSON so that a power cut leaves either the old or the new file: temp, fsync, rename,
    fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in this folder survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystemInterface(SystemInterface):
    """A simulated device in a folder: two slot files and a JSON bootloader environment.

    ``boot()`` plays the bootloader's part (the logic in the module docstring) and is what a
    "reboot" means in tests and in the fleet simulator.
    """

    reboot_returns = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env_path = self.root / "bootenv.json"
        self.booted_path = self.root / "booted"
        self.reboots = 0
        if not self.env_path.exists():
            # The environment is written last: its presence marks a complete initialisation, so
            # a kill in the middle is simply redone by the next start.
            for slot in SLOTS:
                self.slot_path(slot).touch()
            self._set_booted("a")
            atomic_write_json(
                self.env_path, {"ota_active": "a", "ota_trial": "", "ota_trial_left": "0"}
            )

    def booted_slot(self) -> str:
        return self.booted_path.read_text().strip()

    def read_env(self) -> BootEnv:
        data = json.loads(self.env_path.read_text())
        return BootEnv(
            active=data["ota_active"],
            trial=data.get("ota_trial", ""),
            trial_left=int(data.get("ota_trial_left", "0") or 0),
        )

    def write_env(self, **values: str) -> None:
        unknown = set(values) - ENV_KEYS
        if unknown:
            raise ValueError(f"unknown boot environment variables: {sorted(unknown)}")
        data = json.loads(self.env_path.read_text())
        data.update(values)
        atomic_write_json(self.env_path, data)

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        return self.root / f"slot-{slot}.img"

    def reboot(self) -> None:
        self.boot()

    def boot(self) -> str:
        """The bootloader: pick the slot to boot, persisting the trial counter first."""
        env = self.read_env()
        if env.trial and env.trial_left > 0:
            self.write_env(ota_trial_left=str(env.trial_left - 1))
            slot = env.trial
        elif env.trial:
            self.write_env(ota_trial="")
            slot = env.active
        else:
            slot = env.active
        self._set_booted(slot)
        self.reboots += 1
        return slot

    def _set_booted(self, slot: str) -> None:
        # Atomic like the environment: a kill while "booting" must not leave an empty file.
        tmp = self.booted_path.with_name(f".{self.booted_path.name}.tmp")
        tmp.write_text(slot)
        os.replace(tmp, self.booted_path)
