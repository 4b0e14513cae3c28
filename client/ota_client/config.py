"""The client's configuration: one TOML file, with a few command-line overrides.

docs/client.md has the full reference and an example. Relative paths in the file are taken
relative to the file's folder, so a configuration and its key file can travel together.
"""

from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ota_client.system import FileSystemInterface, SystemInterface
from ota_client.versions import InvalidVersion, Version

BACKENDS = ("file", "uboot")


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has a wrong value."""


@dataclass(frozen=True)
class Config:
    server: str
    device_type: str
    hardware_id: str
    state_dir: Path
    #: The version of the image the device runs when the client first starts with no state
    #: (the factory image). Later the client knows what it wrote into each slot.
    current_version: str
    enrollment_token: str | None = None
    enrollment_token_file: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    # [polling]
    poll_interval: float = 60.0
    poll_jitter: float = 0.2  # a fraction of the interval, +/-
    min_backoff: float = 5.0
    max_backoff: float = 900.0

    # [http]
    connect_timeout: float = 10.0
    request_timeout: float = 30.0

    # [download]
    bandwidth_limit: int = 0  # bytes per second, 0 = unlimited
    progress_interval: float = 5.0
    download_deadline: float = 3600.0  # seconds for a whole download within one run
    download_attempts: int = 3  # fresh downloads of an image that fails its sha256

    # [health_check]
    health_check: tuple[str, ...] = ()  # argv, run without a shell; empty = none
    health_check_timeout: float = 60.0

    # [boot]
    trial_boots: int = 3
    backend: str = "file"
    backend_options: dict[str, Any] = field(default_factory=dict)

    # [identity]
    #: Enroll by CSR and authenticate with a device certificate over mTLS instead of a secret.
    #: (A state_dir that holds an enrolled certificate and key uses it either way.)
    use_certificate: bool = False
    #: Renew the certificate once this fraction of its lifetime has passed.
    certificate_renew_after: float = 2 / 3

    # [trust]
    trusted_keys: Path | None = None
    trust_on_first_use: bool = False
    #: The TUF root.json the device ships with (its trust anchor for /tuf/metadata/).
    tuf_root: Path | None = None
    #: Where the metadata is (default: <server>/tuf/metadata/); a mirror gets no device token.
    tuf_metadata_url: str | None = None
    tuf_deadline: float = 60.0  # seconds for all metadata of one update check
    #: Without tuf_root, updates are refused unless this is set (simulators and tests only).
    allow_without_tuf: bool = False

    @property
    def trusted_keys_path(self) -> Path:
        return self.trusted_keys or self.state_dir / "trusted_keys.json"

    def read_enrollment_token(self) -> str | None:
        if self.enrollment_token:
            return self.enrollment_token
        if self.enrollment_token_file is not None:
            try:
                return self.enrollment_token_file.read_text().strip() or None
            except OSError as exc:
                raise ConfigError(f"cannot read enrollment_token_file: {exc}") from exc
        return None

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with the given fields replaced (None values are ignored)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "state_dir" in values:
            values["state_dir"] = Path(values["state_dir"])
        return _validated(replace(self, **values))

    @classmethod
    def load(cls, path: Path | str, **overrides: Any) -> Config:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, base=path.parent, **overrides)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], *, base: Path | None = None, **overrides: Any
    ) -> Config:
        reader = _Reader(data, base or Path.cwd())
        values: dict[str, Any] = {
            "server": reader.text("server"),
            "device_type": reader.text("device_type"),
            "hardware_id": reader.hardware_id(),
            "state_dir": reader.path("state_dir"),
            "current_version": reader.text("current_version"),
            "enrollment_token": reader.text("enrollment_token", required=False),
            "enrollment_token_file": reader.path("enrollment_token_file", required=False),
            "metadata": reader.table("metadata"),
        }
        polling = reader.section("polling")
        values.update(
            poll_interval=polling.number("interval", 60.0),
            poll_jitter=polling.number("jitter", 0.2),
            min_backoff=polling.number("min_backoff", 5.0),
            max_backoff=polling.number("max_backoff", 900.0),
        )
        http = reader.section("http")
        values.update(
            connect_timeout=http.number("connect_timeout", 10.0),
            request_timeout=http.number("timeout", 30.0),
        )
        download = reader.section("download")
        values.update(
            bandwidth_limit=int(download.number("bandwidth_limit", 0)),
            progress_interval=download.number("progress_interval", 5.0),
            download_deadline=download.number("deadline", 3600.0),
            download_attempts=int(download.number("attempts", 3)),
        )
        health = reader.section("health_check")
        values.update(
            health_check=tuple(health.argv("command")),
            health_check_timeout=health.number("timeout", 60.0),
        )
        boot = reader.section("boot")
        backend = boot.text("backend", required=False) or "file"
        values.update(
            trial_boots=int(boot.number("trial_boots", 3)),
            backend=backend,
            backend_options=boot.table(backend),
        )
        identity = reader.section("identity")
        values.update(
            use_certificate=identity.flag("certificate", False),
            certificate_renew_after=identity.number("renew_after", 2 / 3),
        )
        trust = reader.section("trust")
        values.update(
            trusted_keys=trust.path("keys_file", required=False),
            trust_on_first_use=trust.flag("trust_on_first_use", False),
            tuf_root=trust.path("tuf_root", required=False),
            tuf_metadata_url=trust.text("tuf_metadata_url", required=False) or None,
            tuf_deadline=trust.number("tuf_deadline", 60.0),
            allow_without_tuf=trust.flag("allow_without_tuf", False),
        )
        config = cls(**values)
        return config.with_overrides(**overrides) if overrides else _validated(config)


def _validated(config: Config) -> Config:
    if not config.server.startswith(("http://", "https://")):
        raise ConfigError("server must be an http:// or https:// URL")
    try:
        Version.parse(config.current_version)
    except InvalidVersion as exc:
        raise ConfigError(f"current_version: {exc}") from exc
    if config.backend not in BACKENDS:
        raise ConfigError(f"boot.backend must be one of {', '.join(BACKENDS)}")
    if not 1 <= config.trial_boots <= 9:
        # The U-Boot script counts down with setexpr, which works in hexadecimal: single digits
        # are the only values on which it and decimal agree.
        raise ConfigError("boot.trial_boots must be between 1 and 9")
    if not 0 < config.certificate_renew_after < 1:
        raise ConfigError("identity.renew_after is a fraction between 0 and 1")
    if not 0 <= config.poll_jitter < 1:
        raise ConfigError("polling.jitter is a fraction between 0 and 1")
    if config.poll_interval <= 0 or config.min_backoff <= 0:
        raise ConfigError("polling.interval and polling.min_backoff must be positive")
    if config.max_backoff < config.min_backoff:
        raise ConfigError("polling.max_backoff must not be below polling.min_backoff")
    if config.bandwidth_limit < 0:
        raise ConfigError("download.bandwidth_limit must be 0 (unlimited) or positive")
    if config.download_attempts < 1:
        raise ConfigError("download.attempts must be at least 1")
    if config.progress_interval < 0 or config.download_deadline <= 0:
        raise ConfigError("download.progress_interval and download.deadline must be positive")
    if config.connect_timeout <= 0 or config.request_timeout <= 0:
        raise ConfigError("http timeouts must be positive")
    if config.tuf_deadline <= 0:
        raise ConfigError("trust.tuf_deadline must be positive")
    if config.tuf_metadata_url and not config.tuf_metadata_url.startswith(("http://", "https://")):
        raise ConfigError("trust.tuf_metadata_url must be an http:// or https:// URL")
    return replace(config, server=config.server.rstrip("/"))


def make_system(config: Config) -> SystemInterface:
    """The system backend named in the configuration."""
    options = dict(config.backend_options)
    if config.backend == "file":
        root = options.pop("root", None)
        if options:
            raise ConfigError(f"unknown [boot.file] settings: {sorted(options)}")
        return FileSystemInterface(Path(root) if root else config.state_dir / "system")
    # Imported lazily: the U-Boot backend needs fw_printenv/fw_setenv on the device, the
    # simulation does not. The module's contract: a ``from_options(dict)`` factory, or a
    # ``UBootSystemInterface`` class that takes the [boot.uboot] table as keyword arguments.
    module = importlib.import_module("ota_client.uboot")
    factory = getattr(module, "from_options", None)
    system = factory(options) if factory is not None else module.UBootSystemInterface(**options)
    if not isinstance(system, SystemInterface):
        raise ConfigError("ota_client.uboot did not build a SystemInterface")
    return system


class _Reader:
    """Typed access to one table of the TOML file, with errors that name the setting."""

    def __init__(self, data: dict[str, Any], base: Path, prefix: str = "") -> None:
        self.data = data
        self.base = base
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def section(self, key: str) -> _Reader:
        return _Reader(self.table(key), self.base, prefix=f"{self._name(key)}.")

    def table(self, key: str) -> dict[str, Any]:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self._name(key)} must be a table")
        return value

    def text(self, key: str, *, required: bool = True) -> str:
        value = self.data.get(key)
        if value is None or value == "":
            if required:
                raise ConfigError(f"{self._name(key)} is required")
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)} must be a string")
        return value

    def path(self, key: str, *, required: bool = True) -> Path | None:
        text = self.text(key, required=required)
        if not text:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._name(key)} must be a number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._name(key)} must be true or false")
        return value

    def argv(self, key: str) -> list[str]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            # A list, never a string for a shell: no quoting rules, no injection.
            raise ConfigError(f"{self._name(key)} must be a list of strings (an argv)")
        return list(value)

    def hardware_id(self) -> str:
        if self.data.get("hardware_id"):
            return self.text("hardware_id")
        source = self.path("hardware_id_file", required=False)
        if source is None:
            raise ConfigError("hardware_id (or hardware_id_file) is required")
        try:
            value = source.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read hardware_id_file: {exc}") from exc
        if not value:
            raise ConfigError(f"hardware_id_file {source} is empty")
        return value
