"""``ota-client``: the device client's command line (docs/client.md).

    ota-client run    --config FILE   poll and update forever (the systemd service)
    ota-client once   --config FILE   one cycle: step until idle, offline, or waiting for a reboot
    ota-client status --config FILE   print the state as JSON
    ota-client enroll --config FILE [--csr]
                                      enroll now (by CSR with --csr: a device key and certificate)
    ota-client simulate --devices N --server URL --enrollment-token T --device-type T ...
                                      a fleet of virtual devices in threads (ota_client.simulate)

With the file backend a "reboot" is the simulated bootloader's ``boot()``, which returns, so
``once`` can go through a whole update, trial boot and validation included.

Exit codes of ``once``: 0 idle (up to date, or an update finished) or rebooting; 2 configuration
error; 69 the server refused us (EX_UNAVAILABLE); 75 the server is unreachable (EX_TEMPFAIL).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ota_client import __version__, simulate
from ota_client.agent import Agent, Outcome
from ota_client.config import Config, ConfigError

EXIT_CONFIG = 2
EXIT_REFUSED = 69
EXIT_OFFLINE = 75


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the client's TOML configuration file")
    parser.add_argument("--server", help="override: the server's base URL")
    parser.add_argument("--state-dir", help="override: where the client keeps its state")
    parser.add_argument("--hardware-id", help="override: this device's hardware id")
    parser.add_argument("--enrollment-token", help="override: the enrollment token")
    parser.add_argument(
        "--bandwidth-limit", type=int, help="override: download limit in bytes/s (0: none)"
    )
    parser.add_argument("--poll-interval", type=float, help="override: seconds between polls")


def load_config(args: argparse.Namespace) -> Config:
    return Config.load(
        args.config,
        server=args.server,
        state_dir=args.state_dir,
        hardware_id=args.hardware_id,
        enrollment_token=args.enrollment_token,
        bandwidth_limit=args.bandwidth_limit,
        poll_interval=args.poll_interval,
    )


def cmd_run(args: argparse.Namespace) -> int:
    agent = Agent(load_config(args))
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %s: stopping after this step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run_forever(stop)
    return 0


def cmd_once(args: argparse.Namespace) -> int:
    agent = Agent(load_config(args))
    result = agent.run_once()
    print(json.dumps({"outcome": result.outcome.value, "detail": result.detail}))
    if result.outcome is Outcome.OFFLINE:
        return EXIT_OFFLINE
    if result.outcome is Outcome.ERROR:
        return EXIT_REFUSED
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    agent = Agent(load_config(args))
    print(json.dumps(agent_status(agent), indent=2, sort_keys=True))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    return simulate.main(args)


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll now, with the enrollment token; --csr (or [identity] certificate = true) makes a
    device key and gets a certificate instead of a secret. A device that is enrolled already
    keeps its credentials."""
    from ota_client.api import Offline, Refused, ServerClient

    config = load_config(args)
    if args.csr:
        config = config.with_overrides(use_certificate=True)
    client = ServerClient(config)
    try:
        credentials = client.ensure_enrolled()
    except Offline as exc:
        print(f"ota-client: {exc}", file=sys.stderr)
        return EXIT_OFFLINE
    except Refused as exc:
        print(f"ota-client: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    identity = client.identity
    result = {
        "device_id": credentials.device_id,
        "enrolled_now": client.enrolled_now,
        "certificate": str(identity.certificate_path)
        if identity is not None and identity.has_certificate()
        else None,
    }
    print(json.dumps(result))
    return 0


# Subcommands by name. `simulate` runs N virtual devices on this client code: agents are
# independent objects (own Config, state_dir, FileSystemInterface, health check and reboot
# hook), so many run in threads.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "once": cmd_once,
    "status": cmd_status,
    "simulate": cmd_simulate,
    "enroll": cmd_enroll,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota-client", description="Device client for the OTA update server."
    )
    parser.add_argument("--version", action="version", version=f"ota-client {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_arguments(
        commands.add_parser("run", help="poll for updates and install them, forever")
    )
    add_config_arguments(
        commands.add_parser("once", help="one cycle: until idle or waiting for a reboot")
    )
    add_config_arguments(commands.add_parser("status", help="print the client's state as JSON"))
    enroll = commands.add_parser("enroll", help="enroll now (with --csr: by certificate)")
    add_config_arguments(enroll)
    enroll.add_argument(
        "--csr",
        action="store_true",
        help="make a device key and enroll by CSR: the device authenticates by certificate",
    )
    simulate.add_arguments(
        commands.add_parser(
            "simulate", help="run N virtual devices against a server (docs/client.md)"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"ota-client: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def agent_status(agent: Agent) -> dict[str, Any]:
    """What `ota-client status` prints: the persisted state and the device's boot facts."""
    env = agent.system.read_env()
    return {
        "state": agent.state.to_dict(),
        "booted_slot": agent.system.booted_slot(),
        "running_version": agent.running_version(),
        "boot_env": {
            "ota_active": env.active,
            "ota_trial": env.trial,
            "ota_trial_left": env.trial_left,
        },
        "queued_reports": [{"kind": r.kind, **r.body} for r in agent.outbox.pending()],
    }


if __name__ == "__main__":
    sys.exit(main())
