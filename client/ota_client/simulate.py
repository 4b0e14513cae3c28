"""``ota-client simulate``: a fleet of virtual devices on the real client code (docs/client.md).

Each device is an ``Agent`` with its own ``Config``, state folder, ``FileSystemInterface`` (whose
``boot()`` is the "reboot"), health check and random generator, run in its own thread. Faults are
injected per device through a ``FaultPlan``, never through global state:

* download failure: the bytes of a fetch are corrupted, so the image fails its sha256;
* install failure: writing the slot raises ``OSError``;
* health failure: the health check says unhealthy after the trial boot;
* offline: the device skips a poll.

``run_simulation(options)`` is the Python API (used by the tests); ``main(args)`` the command.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests

from ota_client.agent import Agent, Outcome
from ota_client.api import ServerClient
from ota_client.config import Config, ConfigError
from ota_client.health import HealthResult
from ota_client.system import FileSystemInterface
from ota_client.versions import InvalidVersion, Version

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("download", "install", "health", "offline", "error")


@dataclass(frozen=True)
class SimulationOptions:
    devices: int
    server: str
    device_type: str
    enrollment_token: str | None = None
    enrollment_token_file: Path | None = None
    version: str = "1.0.0"
    state_dir: Path | None = None  # None: a temporary folder, removed at the end
    poll_interval: float = 5.0
    download_failure_rate: float = 0.0
    install_failure_rate: float = 0.0
    health_failure_rate: float = 0.0
    offline_rate: float = 0.0
    duration: float | None = None  # None: until stopped (or until_version)
    until_version: str | None = None
    quiet: bool = False
    progress_every: float = 5.0
    id_prefix: str | None = None  # default: sim-<host>
    trusted_keys: Path | None = None  # None: trust the server's keys on first use
    # The TUF root the devices ship with; None: install without TUF (with a warning).
    tuf_root: Path | None = None
    seed: int | None = None

    def validate(self) -> None:
        if self.devices < 1:
            raise ConfigError("--devices must be at least 1")
        if not (self.enrollment_token or self.enrollment_token_file):
            raise ConfigError("an enrollment token (or token file) is required")
        for name in ("download", "install", "health"):
            rate = getattr(self, f"{name}_failure_rate")
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"--{name}-failure-rate must be between 0 and 1")
        if not 0.0 <= self.offline_rate <= 1.0:
            raise ConfigError("--offline-rate must be between 0 and 1")
        if self.poll_interval <= 0:
            raise ConfigError("--poll-interval must be positive")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError("--duration must be positive")
        if self.until_version is not None:
            try:
                Version.parse(self.until_version)
            except InvalidVersion as exc:
                raise ConfigError(f"--until-version: {exc}") from exc


@dataclass
class Summary:
    """The fleet at the end of a run."""

    devices: int
    elapsed: float
    versions: dict[str, int]
    phases: dict[str, int]
    failures: dict[str, int]
    reached_target: bool
    state_dir: Path
    hardware_ids: list[str] = field(default_factory=list)
    device_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "elapsed": round(self.elapsed, 2),
            "versions": self.versions,
            "phases": self.phases,
            "failures": self.failures,
            "reached_target": self.reached_target,
        }


class FaultPlan:
    """One device's injected faults: each decision is a draw from the device's own generator."""

    def __init__(self, options: SimulationOptions, rng: random.Random) -> None:
        self.options = options
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _hit(self, kind: str, rate: float) -> bool:
        if rate <= 0 or self.rng.random() >= rate:
            return False
        with self._lock:
            self.counts[kind] += 1
        return True

    def corrupt_download(self) -> bool:
        return self._hit("download", self.options.download_failure_rate)

    def fail_install(self) -> bool:
        return self._hit("install", self.options.install_failure_rate)

    def fail_health(self) -> bool:
        return self._hit("health", self.options.health_failure_rate)

    def offline(self) -> bool:
        return self._hit("offline", self.options.offline_rate)

    def record(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)


class _CorruptingRaw:
    """A response body whose first chunk has one byte flipped."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._done = False

    def _spoil(self, chunk: bytes) -> bytes:
        if chunk and not self._done:
            self._done = True
            return bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return chunk

    def read(self, amount: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        return self._spoil(self._raw.read(amount, *args, **kwargs))

    def read1(self, amount: int = -1) -> bytes:
        reader = getattr(self._raw, "read1", None) or self._raw.read
        return self._spoil(reader(amount))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class SimulatedServerClient(ServerClient):
    """The real client, with downloads corrupted as the fault plan says."""

    def __init__(self, config: Config, plan: FaultPlan, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.plan = plan

    def open_download(
        self, url: str, headers: Mapping[str, str], *, timeout: tuple[float, float] | None = None
    ) -> requests.Response:
        response = super().open_download(url, headers, timeout=timeout)
        if response.status_code in (200, 206) and self.plan.corrupt_download():
            response.raw = _CorruptingRaw(response.raw)
        return response


class SimulatedSystem(FileSystemInterface):
    """A device folder whose slot writes fail as the fault plan says."""

    def __init__(self, root: Path, plan: FaultPlan) -> None:
        super().__init__(root)
        self.plan = plan

    def write_slot(
        self, slot: str, source: Path, progress: Callable[[int], None] | None = None
    ) -> str:
        if self.plan.fail_install():
            raise OSError(f"simulated write error on slot {slot}")
        return super().write_slot(slot, source, progress)


class VirtualDevice:
    def __init__(self, index: int, options: SimulationOptions, root: Path, prefix: str) -> None:
        self.index = index
        self.options = options
        seed = None if options.seed is None else options.seed * 100_003 + index
        self.rng = random.Random(seed)  # noqa: S311 (fault injection, not cryptography)
        self.plan = FaultPlan(options, self.rng)
        self.hardware_id = f"{prefix}-{index}"
        state_dir = root / f"device-{index:04d}"
        self.config = Config(
            server=options.server,
            device_type=options.device_type,
            hardware_id=self.hardware_id,
            state_dir=state_dir,
            current_version=options.version,
            enrollment_token=options.enrollment_token,
            enrollment_token_file=options.enrollment_token_file,
            metadata={"simulated": True},
            poll_interval=options.poll_interval,
            min_backoff=options.poll_interval,
            max_backoff=max(options.poll_interval * 8, options.poll_interval),
            # Download progress reports are for operators; a fleet sends few of them.
            progress_interval=max(options.poll_interval * 10, 5.0),
            trusted_keys=options.trusted_keys,
            trust_on_first_use=options.trusted_keys is None,
            tuf_root=options.tuf_root,
            # Simulated devices only: a real device without a TUF root refuses every update.
            allow_without_tuf=options.tuf_root is None,
        ).with_overrides()
        state_dir.mkdir(parents=True, exist_ok=True)
        self.system = SimulatedSystem(state_dir / "system", self.plan)
        self.agent = Agent(
            self.config,
            self.system,
            server=SimulatedServerClient(self.config, self.plan),
            health_check=self._health_check,
            rng=self.rng,
        )
        # The agent's server client must know the running version, as in Agent's default.
        self.agent.server.running_version = self.agent.running_version

    def _health_check(self) -> HealthResult:
        if self.plan.fail_health():
            return HealthResult(False, "simulated health check failure")
        return HealthResult(True)

    def version(self) -> str:
        return self.agent.running_version()

    def phase(self) -> str:
        return self.agent.phase

    def device_id(self) -> str:
        try:
            credentials = self.agent.server.credentials()
        except Exception:  # unreadable: as if not enrolled
            return ""
        return credentials.device_id if credentials else ""

    def run(self, stop: threading.Event, done: Callable[[], bool]) -> None:
        failures = 0
        # Spread the first polls over one interval, as a fleet that was not switched on at once.
        stop.wait(self.rng.uniform(0, self.options.poll_interval))
        while not stop.is_set() and not done():
            if self.plan.offline():
                delay = self.options.poll_interval
            else:
                last = self.agent.state.last_result
                try:
                    result = self.agent.run_once()
                except Exception:
                    self.agent.log.exception("update cycle failed")
                    self.plan.record("error")
                    failures += 1
                    delay = self.agent.backoff(failures)
                else:
                    if result.outcome in (Outcome.OFFLINE, Outcome.ERROR):
                        self.plan.record("error")
                        failures += 1
                        delay = self.agent.backoff(failures, result.retry_after)
                    else:
                        failures = 0
                        spread = self.options.poll_interval * 0.2
                        delay = self.options.poll_interval + self.rng.uniform(-spread, spread)
                finished = self.agent.state.last_result
                if finished is not last and finished and finished.get("outcome") == "failed":
                    self.plan.record("sessions_failed")
            stop.wait(delay)


def _default_prefix() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"sim-{host}"


def _tally(devices: list[VirtualDevice]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    versions: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    for device in devices:
        try:
            versions[device.version()] += 1
        except OSError:  # the booted file is being replaced this instant
            versions["?"] += 1
        phases[device.phase()] += 1
        failures.update(device.plan.snapshot())
    return versions, phases, failures


def _line(elapsed: float, versions: Counter[str], phases: Counter[str], fails: Counter[str]) -> str:
    def fmt(counter: Counter[str]) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "-"

    return (
        f"[{elapsed:6.1f}s] versions: {fmt(versions)} | phases: {fmt(phases)} "
        f"| failures: {fmt(fails)}"
    )


def run_simulation(
    options: SimulationOptions,
    stop: threading.Event | None = None,
    out: TextIO | None = None,
) -> Summary:
    """Run the fleet until ``duration``, ``until_version`` or ``stop``; return the summary."""
    options.validate()
    stop = stop or threading.Event()
    out = out or sys.stdout
    temp: tempfile.TemporaryDirectory[str] | None = None
    if options.state_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="ota-sim-")
        root = Path(temp.name)
    else:
        root = Path(options.state_dir)
    root.mkdir(parents=True, exist_ok=True)
    prefix = options.id_prefix or _default_prefix()
    if options.tuf_root is None:
        logger.warning("simulated devices install without TUF verification (no --tuf-root)")
    started = time.monotonic()
    try:
        devices = [VirtualDevice(i, options, root, prefix) for i in range(options.devices)]
        target = options.until_version

        def all_there() -> bool:
            return target is not None and all(
                d.version() == target and d.phase() == "idle" for d in devices
            )

        threads = [
            threading.Thread(
                target=device.run, args=(stop, all_there), name=device.hardware_id, daemon=True
            )
            for device in devices
        ]
        for thread in threads:
            thread.start()
        deadline = None if options.duration is None else started + options.duration
        next_line = started
        while not stop.is_set():
            now = time.monotonic()
            if not options.quiet and now >= next_line:
                print(_line(now - started, *_tally(devices)), file=out, flush=True)
                next_line = now + options.progress_every
            if target is not None and all_there():
                break
            if deadline is not None and now >= deadline:
                break
            stop.wait(0.2)
        stop.set()
        for thread in threads:
            thread.join(timeout=max(options.poll_interval, 1.0) + 60)
        versions, phases, failures = _tally(devices)
        elapsed = time.monotonic() - started
        if not options.quiet:
            print(_line(elapsed, versions, phases, failures), file=out, flush=True)
        return Summary(
            devices=options.devices,
            elapsed=elapsed,
            versions=dict(versions),
            phases=dict(phases),
            failures={k: failures.get(k, 0) for k in (*FAILURE_KINDS, "sessions_failed")},
            reached_target=target is not None and versions.get(target, 0) == options.devices,
            state_dir=root,
            hardware_ids=[d.hardware_id for d in devices],
            device_ids=[d.device_id() for d in devices],
        )
    finally:
        if temp is not None:
            temp.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, required=True, help="how many virtual devices")
    parser.add_argument("--server", required=True, help="the server's base URL")
    tokens = parser.add_mutually_exclusive_group(required=True)
    tokens.add_argument("--enrollment-token", help="the enrollment token")
    tokens.add_argument("--enrollment-token-file", type=Path, help="a file holding the token")
    parser.add_argument("--device-type", required=True, help="the devices' type")
    parser.add_argument("--version", default="1.0.0", help="factory version (default 1.0.0)")
    parser.add_argument("--state-dir", type=Path, help="devices' folders (default: a temp folder)")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--download-failure-rate", type=float, default=0.0, metavar="F")
    parser.add_argument("--install-failure-rate", type=float, default=0.0, metavar="F")
    parser.add_argument("--health-failure-rate", type=float, default=0.0, metavar="F")
    parser.add_argument("--offline-rate", type=float, default=0.0, metavar="F")
    parser.add_argument("--duration", type=float, help="seconds to run (default: forever)")
    parser.add_argument("--until-version", help="stop when every device runs this version")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--id-prefix", help="hardware id prefix (default: sim-<host>)")
    parser.add_argument(
        "--trusted-keys", type=Path, help="signing keys file (default: trust on first use)"
    )
    parser.add_argument(
        "--tuf-root", type=Path, help="TUF root.json the devices ship with (default: no TUF)"
    )
    parser.add_argument("--seed", type=int, help="random seed for reproducible faults")


def options_from_args(args: argparse.Namespace) -> SimulationOptions:
    return SimulationOptions(
        devices=args.devices,
        server=args.server,
        device_type=args.device_type,
        enrollment_token=args.enrollment_token,
        enrollment_token_file=args.enrollment_token_file,
        version=args.version,
        state_dir=args.state_dir,
        poll_interval=args.poll_interval,
        download_failure_rate=args.download_failure_rate,
        install_failure_rate=args.install_failure_rate,
        health_failure_rate=args.health_failure_rate,
        offline_rate=args.offline_rate,
        duration=args.duration,
        until_version=args.until_version,
        quiet=args.quiet,
        id_prefix=args.id_prefix,
        trusted_keys=args.trusted_keys,
        tuf_root=args.tuf_root,
        seed=args.seed,
    )


def main(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", "INFO") == "INFO":
        # Hundreds of devices logging every step drown the progress lines: warnings only.
        logging.getLogger("ota_client").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    summary = run_simulation(options_from_args(args), stop)
    if not args.quiet:
        print(f"summary: {summary.to_dict()}", flush=True)
    return 0
