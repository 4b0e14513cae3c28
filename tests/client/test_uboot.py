"""The U-Boot backend against the real libubootenv tools (fw_printenv / fw_setenv) and real
environment images in tmp_path, in the three layouts a device can have: one copy, two copies in
one device at two offsets, two copies in two devices (the redundant ones are power-safe)."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ota_client.system import BootEnv
from ota_client.uboot import (
    MAX_TRIAL_BOOTS,
    UBootError,
    UBootSystemInterface,
    parse_printenv,
)

FW_SETENV = shutil.which("fw_setenv")
FW_PRINTENV = shutil.which("fw_printenv")
needs_fw_setenv = pytest.mark.skipif(
    FW_SETENV is None,
    reason="fw_setenv not installed (Debian package libubootenv-tool: "
    "apt-get install -y libubootenv-tool)",
)

ENV_SIZE = 0x4000
LAYOUTS = ("single", "redundant", "redundant-files")
# The board's default environment in these tests: no ota_* variables yet.
INITIAL_ENV = {"bootdelay": "2", "bootcmd": "run ota_boot"}


# --- U-Boot's environment image format, written independently of libubootenv -----------------


def uboot_image(variables: dict[str, str], size: int, flags: int | None = None) -> bytes:
    """An environment copy as U-Boot's saveenv / mkenvimage write it: little-endian CRC32 of the
    data area, a flag byte for redundant copies, then NAME=VALUE\\0 ... \\0 padded with 0xff."""
    header = struct.calcsize("<I") + (0 if flags is None else 1)
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(variables.items())) + b"\0"
    data = data.ljust(size - header, b"\xff")
    flag = b"" if flags is None else bytes([flags])
    return struct.pack("<I", zlib.crc32(data)) + flag + data


def parse_image(raw: bytes, redundant: bool) -> tuple[bool, int, dict[str, str]]:
    """(CRC valid, flag byte, variables) of one environment copy, as U-Boot's env_import sees it."""
    header = 5 if redundant else 4
    (crc,) = struct.unpack("<I", raw[:4])
    data = raw[header:]
    flags = raw[4] if redundant else 0
    variables: dict[str, str] = {}
    for entry in data.split(b"\0\0", 1)[0].split(b"\0"):
        if entry:
            name, _, value = entry.decode().partition("=")
            variables[name] = value
    return zlib.crc32(data) == crc, flags, variables


@dataclass
class Layout:
    name: str
    copies: list[tuple[Path, int]]
    size: int = ENV_SIZE

    @property
    def redundant(self) -> bool:
        return len(self.copies) == 2

    def config_text(self) -> str:
        return "".join(f"{path}\t0x{offset:x}\t0x{self.size:x}\n" for path, offset in self.copies)

    def read_copy(self, index: int) -> bytes:
        path, offset = self.copies[index]
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(self.size)

    def write_copy(self, index: int, raw: bytes) -> None:
        path, offset = self.copies[index]
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(raw)

    def current_variables(self) -> dict[str, str]:
        """What U-Boot would load: the valid copy, the one with the higher flag if both are."""
        valid = [parse_image(self.read_copy(i), self.redundant) for i in range(len(self.copies))]
        candidates = [(flags, variables) for ok, flags, variables in valid if ok]
        assert candidates, "no valid environment copy"
        return max(candidates, key=lambda c: c[0])[1]


def make_layout(root: Path, name: str) -> Layout:
    """Erased (0xff) storage for the environment, like blank flash."""
    if name == "single":
        layout = Layout(name, [(root / "uboot.env", 0)])
    elif name == "redundant":
        layout = Layout(name, [(root / "mmcblk0", 0x0), (root / "mmcblk0", ENV_SIZE)])
    else:
        layout = Layout(name, [(root / "mtd1", 0), (root / "mtd2", 0)])
    for path in {path for path, _ in layout.copies}:
        end = max(offset for p, offset in layout.copies if p == path) + layout.size
        path.write_bytes(b"\xff" * end)
    return layout


def fw(tool: str | None, config: Path, *args: str) -> str:
    assert tool is not None
    result = subprocess.run(
        [tool, "-c", str(config), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


@dataclass
class Device:
    """A device in tmp_path: environment storage, fw_env.config, slots and a kernel command line.
    ``boot()`` plays U-Boot running the boot script of docs/client.md."""

    root: Path
    layout: Layout
    config: Path
    cmdline: Path
    system: UBootSystemInterface
    booted: list[str] = field(default_factory=list)

    def boot(self) -> str:
        """U-Boot's bootcmd, step by step, on the real environment (read with fw_printenv, each
        ``saveenv`` an fw_setenv): count a trial boot down before booting it, drop an exhausted
        trial, else boot ota_active. Numbers follow U-Boot: ``test -gt`` reads decimal here,
        ``setexpr`` computes in hex and prints without 0x."""
        env = parse_printenv(fw(FW_PRINTENV, self.config))
        active = env.get("ota_active") or "a"
        trial = env.get("ota_trial", "")
        left = env.get("ota_trial_left", "")
        assert left == "" or (left.isdigit() and len(left) == 1), left
        if trial and int(left or "0") > 0:
            fw(FW_SETENV, self.config, "ota_trial_left", format(int(left, 16) - 1, "x"))
            slot = trial
        elif trial:
            fw(FW_SETENV, self.config, "ota_trial")  # setenv ota_trial; saveenv
            slot = active
        else:
            slot = active
        self.cmdline.write_text(
            f"console=ttyS0,115200 root=/dev/slot-{slot} rootwait ota.slot={slot}\n"
        )
        self.booted.append(slot)
        return slot


def make_device(root: Path, layout_name: str, **options: object) -> Device:
    root.mkdir(parents=True, exist_ok=True)
    layout = make_layout(root, layout_name)
    config = root / "fw_env.config"
    config.write_text(layout.config_text())
    # A blank environment has a bad CRC; fw_setenv -f loads the default file and stores it.
    defaults = root / "u-boot-initial-env"
    defaults.write_text("".join(f"{k}={v}\n" for k, v in INITIAL_ENV.items()))
    empty = root / "empty.script"
    empty.write_text("")
    fw(FW_SETENV, config, "-f", str(defaults), "-s", str(empty))
    cmdline = root / "cmdline"
    cmdline.write_text("console=ttyS0,115200 root=/dev/slot-a rootwait ota.slot=a\n")
    for slot in ("a", "b"):
        (root / f"slot-{slot}.img").write_bytes(b"")
    system = UBootSystemInterface(
        fw_env_config=config,
        slot_a=root / "slot-a.img",
        slot_b=root / "slot-b.img",
        cmdline=cmdline,
        reboot_command=["true"],
        **options,  # type: ignore[arg-type]
    )
    return Device(root, layout, config, cmdline, system)


@pytest.fixture(params=LAYOUTS)
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Device:
    return make_device(tmp_path / "device", request.param)


def logging_wrapper(bindir: Path, real: str | None, log: Path) -> Path:
    """A shell script named like ``real`` that logs its arguments and the ``-s`` script it is
    given, then execs the real tool (whose mode depends on its name)."""
    assert real is not None
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / Path(real).name
    wrapper.write_text(
        "#!/bin/sh\n"
        f'printf "CALL %s\\n" "$*" >> {shlex.quote(str(log))}\n'
        "prev=\n"
        'for arg in "$@"; do\n'
        f'    if [ "$prev" = "-s" ]; then cat "$arg" >> {shlex.quote(str(log))}; fi\n'
        '    prev="$arg"\n'
        "done\n"
        f'exec {shlex.quote(real)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


# --- the environment --------------------------------------------------------------------------


@needs_fw_setenv
def test_missing_variables_read_as_defaults(device: Device) -> None:
    raw = device.system.read_raw_env()
    assert raw == INITIAL_ENV
    assert device.system.read_env() == BootEnv(active="a", trial="", trial_left=0)


@needs_fw_setenv
def test_arm_commit_and_cancel_round_trip(device: Device) -> None:
    system = device.system
    system.arm_trial("b", 3)
    assert system.read_env() == BootEnv(active="a", trial="b", trial_left=3)
    assert device.layout.current_variables() == {
        **INITIAL_ENV,
        "ota_trial": "b",
        "ota_trial_left": "3",
    }

    system.cancel_trial()
    assert system.read_env() == BootEnv(active="a", trial="", trial_left=0)
    assert "ota_trial" not in system.read_raw_env()  # "" deletes, like U-Boot's setenv

    system.arm_trial("b", 2)
    system.commit("b")
    assert system.read_env() == BootEnv(active="b", trial="", trial_left=0)
    with pytest.raises(RuntimeError, match="committed slot"):
        system.arm_trial("b", 3)
    # Other variables of the board survive every write.
    assert {k: v for k, v in system.read_raw_env().items() if k in INITIAL_ENV} == INITIAL_ENV


@needs_fw_setenv
def test_write_env_is_one_fw_setenv_call_with_a_script(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    device = make_device(
        tmp_path / "device",
        "redundant",
        fw_setenv=logging_wrapper(tmp_path / "bin", FW_SETENV, log),
    )
    for change, script in [
        (lambda: device.system.arm_trial("b", 3), ["ota_trial=b", "ota_trial_left=3"]),
        (lambda: device.system.commit("b"), ["ota_active=b", "ota_trial=", "ota_trial_left=0"]),
        (device.system.cancel_trial, ["ota_trial=", "ota_trial_left=0"]),
    ]:
        log.write_text("")
        change()
        call, *lines = log.read_text().splitlines()
        assert call.startswith(f"CALL -c {device.config} -s ")
        assert lines == script  # one call, every variable of the change in its script
        assert not Path(call.split(" -s ", 1)[1]).exists()  # the script file is removed
    assert device.system.read_env() == BootEnv(active="b", trial="", trial_left=0)


@needs_fw_setenv
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ota_trial_left": str(MAX_TRIAL_BOOTS + 1)}, "from 0 to 9"),
        ({"ota_trial_left": "-1"}, "from 0 to 9"),
        ({"ota_trial": "c"}, "ota_trial must be"),
        ({"ota_active": ""}, "ota_active must be"),
        ({"ota_trial": "b\nota_active=b"}, "ota_trial must be"),
        ({"bootcmd": "reset"}, "not one of the boot variables"),
    ],
)
def test_write_env_refuses_bad_values_before_any_call(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    log = tmp_path / "calls.log"
    device = make_device(
        tmp_path / "device",
        "single",
        fw_setenv=logging_wrapper(tmp_path / "bin", FW_SETENV, log),
    )
    with pytest.raises(ValueError, match=message):
        device.system.write_env(**values)
    assert not log.exists()
    with pytest.raises(ValueError, match="from 0 to 9"):
        device.system.arm_trial("b", 10)


@needs_fw_setenv
def test_fw_setenv_failure_is_reported_with_its_stderr(tmp_path: Path) -> None:
    device = make_device(tmp_path / "device", "single")
    device.config.write_text(f"{tmp_path / 'missing.env'} 0x0 0x4000\n")
    with pytest.raises(UBootError, match=r"fw_printenv -c .* exited \d+: .*Configuration file"):
        device.system.arm_trial("b", 3)  # its read_env fails first
    with pytest.raises(UBootError, match=r"fw_setenv -c .* exited \d+: .*Configuration file"):
        device.system.write_env(ota_trial="b", ota_trial_left="3")


@needs_fw_setenv
def test_a_write_that_did_not_happen_is_detected(tmp_path: Path) -> None:
    # fw_printenv and fw_setenv are one binary that picks its mode from its name: called under
    # another name it prints the environment and exits 0 without writing anything.
    device = make_device(tmp_path / "device", "single", fw_setenv=FW_PRINTENV)
    with pytest.raises(UBootError, match="environment holds"):
        device.system.write_env(ota_trial="b", ota_trial_left="3")


@needs_fw_setenv
@pytest.mark.parametrize("layout", ["redundant", "redundant-files"])
def test_redundant_environment_survives_a_torn_write(tmp_path: Path, layout: str) -> None:
    device = make_device(tmp_path / "device", layout)
    before = [device.layout.read_copy(i) for i in range(2)]
    device.system.arm_trial("b", 3)
    after = [device.layout.read_copy(i) for i in range(2)]
    changed = [i for i in range(2) if before[i] != after[i]]
    assert len(changed) == 1  # the write went to the other copy only
    # A power cut in the middle of that write: half of the new copy is garbage.
    torn = after[changed[0]][: ENV_SIZE // 2] + b"\x00" * (ENV_SIZE // 2)
    device.layout.write_copy(changed[0], torn)
    # The previous environment as a whole, never ota_trial without ota_trial_left.
    assert device.system.read_env() == BootEnv(active="a", trial="", trial_left=0)
    assert device.layout.current_variables() == INITIAL_ENV
    # The next write goes over the torn copy and the device goes on.
    device.system.arm_trial("b", 3)
    assert device.system.read_env() == BootEnv(active="a", trial="b", trial_left=3)


@needs_fw_setenv
def test_single_copy_loses_the_environment_on_a_torn_write(tmp_path: Path) -> None:
    device = make_device(tmp_path / "device", "single")
    device.system.arm_trial("b", 3)
    device.layout.write_copy(0, device.layout.read_copy(0)[:100] + b"\x00" * (ENV_SIZE - 100))
    with pytest.raises(UBootError, match="bad CRC"):
        device.system.read_env()


@needs_fw_setenv
def test_what_fw_setenv_writes_is_a_uboot_image(device: Device) -> None:
    device.system.arm_trial("b", 3)
    device.system.commit("b")
    expected = {**INITIAL_ENV, "ota_active": "b", "ota_trial_left": "0"}
    assert device.layout.current_variables() == expected
    assert device.system.read_raw_env() == expected


@needs_fw_setenv
@pytest.mark.parametrize("redundant", [False, True])
def test_reads_an_image_made_like_mkenvimage(tmp_path: Path, redundant: bool) -> None:
    variables = {
        "ota_active": "b",
        "ota_trial": "a",
        "ota_trial_left": "2",
        "ota_boot": 'if test -n "${ota_trial}"; then\necho trial; fi',  # a multi-line value
        "zz_after": "x=y",
    }
    env = tmp_path / "uboot.env"
    copy = uboot_image(variables, ENV_SIZE, flags=1 if redundant else None)
    env.write_bytes(copy + (b"\xff" * ENV_SIZE if redundant else b""))
    config = tmp_path / "fw_env.config"
    lines = [f"{env} 0x0 0x{ENV_SIZE:x}"] + ([f"{env} 0x{ENV_SIZE:x} 0x{ENV_SIZE:x}"] * redundant)
    config.write_text("\n".join(lines) + "\n")
    system = UBootSystemInterface(fw_env_config=config, slot_a=env, slot_b=env)
    assert system.read_raw_env() == variables
    assert system.read_env() == BootEnv(active="b", trial="a", trial_left=2)


@needs_fw_setenv
def test_blank_environment_needs_a_default_file(tmp_path: Path) -> None:
    layout = make_layout(tmp_path, "redundant")
    config = tmp_path / "fw_env.config"
    config.write_text(layout.config_text())
    system = UBootSystemInterface(fw_env_config=config, slot_a="/dev/null", slot_b="/dev/null")
    with pytest.raises(UBootError, match="bad CRC"):
        system.read_env()

    defaults = tmp_path / "u-boot-initial-env"
    defaults.write_text("bootdelay=2\nota_active=a\n")
    system.default_env = defaults
    assert system.read_env() == BootEnv(active="a", trial="", trial_left=0)
    system.arm_trial("b", 3)  # the first write stores the defaults plus the change
    system.default_env = None
    assert system.read_raw_env() == {
        "bootdelay": "2",
        "ota_active": "a",
        "ota_trial": "b",
        "ota_trial_left": "3",
    }


# --- booted slot, slots, reboot -----------------------------------------------------------------


@needs_fw_setenv
def test_slot_writes_refuse_the_running_slot_and_hash(device: Device, tmp_path: Path) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(bytes(range(256)) * 4099)
    assert device.system.booted_slot() == "a"
    assert device.system.inactive_slot() == "b"
    with pytest.raises(RuntimeError, match="running slot 'a'"):
        device.system.write_slot("a", image)
    seen: list[int] = []
    digest = device.system.write_slot("b", image, progress=seen.append)
    assert digest == hashlib.sha256(image.read_bytes()).hexdigest()
    assert seen[-1] == image.stat().st_size
    assert device.system.slot_path("b").read_bytes() == image.read_bytes()
    assert device.system.slot_sha256("b", image.stat().st_size) == digest
    with pytest.raises(ValueError, match="unknown slot"):
        device.system.slot_path("c")


@pytest.mark.parametrize(
    ("cmdline", "key", "slot"),
    [
        ("console=ttyS0 ota.slot=b rootwait", "ota.slot", "b"),
        ("ota.slot=a quiet ota.slot=b", "ota.slot", "b"),
        ('root=/dev/mmcblk0p3 rauc.slot=B init="/sbin/init"', "rauc.slot=", "b"),
        ('ota.slot="a"\n', "ota.slot", "a"),
    ],
)
def test_booted_slot_from_the_kernel_command_line(
    tmp_path: Path, cmdline: str, key: str, slot: str
) -> None:
    (tmp_path / "cmdline").write_text(cmdline)
    system = UBootSystemInterface(
        slot_a="/dev/a", slot_b="/dev/b", cmdline=tmp_path / "cmdline", slot_key=key
    )
    assert system.booted_slot() == slot


def test_booted_slot_errors_and_override_file(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 myota.slot=b\n")
    override = tmp_path / "booted"
    system = UBootSystemInterface(
        slot_a="/dev/a", slot_b="/dev/b", cmdline=cmdline, booted_slot_file=override
    )
    with pytest.raises(UBootError, match=r"no ota\.slot= in"):
        system.booted_slot()  # no override file yet, and myota.slot is another key
    override.write_text("b\n")
    assert system.booted_slot() == "b"
    override.write_text("system0\n")
    with pytest.raises(UBootError, match="'system0'"):
        system.booted_slot()
    system.cmdline = tmp_path / "nothing"
    system.booted_slot_file = None
    with pytest.raises(UBootError, match="cannot read the kernel command line"):
        system.booted_slot()


def test_reboot_runs_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "rebooted"
    system = UBootSystemInterface(
        slot_a="/dev/a", slot_b="/dev/b", reboot_command=["touch", str(marker)]
    )
    system.reboot()
    assert marker.exists()
    system.reboot_command = ["sh", "-c", "echo no permission >&2; exit 3"]
    with pytest.raises(UBootError, match="exited 3: no permission"):
        system.reboot()
    system.reboot_command = [str(tmp_path / "no-such-command")]
    with pytest.raises(UBootError, match="failed"):
        system.reboot()


# --- the bootloader's logic against the real environment --------------------------------------


@needs_fw_setenv
def test_trial_boots_count_down_then_fall_back(device: Device, tmp_path: Path) -> None:
    system = device.system
    image = tmp_path / "new.img"
    image.write_bytes(b"new firmware")
    system.write_slot(system.inactive_slot(), image)
    system.arm_trial("b", 3)
    system.reboot()  # the reboot command is `true`; device.boot() is U-Boot

    lefts = []
    for _ in range(3):
        assert device.boot() == "b"
        assert system.booted_slot() == "b"
        lefts.append(system.read_env().trial_left)  # the new image never reaches commit
    assert lefts == [2, 1, 0]
    assert device.boot() == "a"  # trial exhausted: dropped, back on the committed slot
    assert system.read_env() == BootEnv(active="a", trial="", trial_left=0)
    assert device.boot() == "a"
    assert device.booted == ["b", "b", "b", "a", "a"]
    assert system.booted_slot() == "a"


@needs_fw_setenv
def test_a_healthy_trial_is_committed_and_the_next_install_goes_to_the_other_slot(
    device: Device, tmp_path: Path
) -> None:
    system = device.system
    image = tmp_path / "new.img"
    image.write_bytes(b"v2")
    system.write_slot("b", image)
    system.arm_trial("b", 2)
    assert device.boot() == "b"
    system.commit(system.booted_slot())  # the health check passed
    assert system.read_env() == BootEnv(active="b", trial="", trial_left=0)
    assert [device.boot() for _ in range(3)] == ["b", "b", "b"]

    assert system.inactive_slot() == "a"
    with pytest.raises(RuntimeError, match="running slot 'b'"):
        system.write_slot("b", image)
    image.write_bytes(b"v3")
    system.write_slot("a", image)
    system.arm_trial("a", 1)
    assert device.boot() == "a"
    assert device.boot() == "b"  # v3 never committed: one trial boot, then back to b
    assert system.read_env() == BootEnv(active="b", trial="", trial_left=0)


def test_image_helpers_agree_with_each_other() -> None:
    # The test's own image writer and reader, checked once so the tests above can lean on them.
    image = uboot_image({"a": "1"}, ENV_SIZE, flags=7)
    assert len(image) == ENV_SIZE
    assert parse_image(image, redundant=True) == (True, 7, {"a": "1"})
    assert parse_image(b"\0" * ENV_SIZE, redundant=False)[0] is False
