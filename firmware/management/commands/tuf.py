"""manage.py tuf: create and operate the TUF repository (docs/security.md "TUF").

    tuf init --root-keys 3 --threshold 2 --out /secure/usb [--passphrase-env VAR] [--json]
    tuf keygen --count 3 --out /secure/usb/new [--passphrase-env VAR] [--json]
    tuf rotate-root --old-key F [F ...] --new-key F [F ...] [--threshold T] [--json]
    tuf rotate-online [--roles targets,snapshot,timestamp] --root-key F [F ...] [--json]
    tuf export-root [--version N] --out root.json      (what devices ship with: trust.tuf_root)
    tuf refresh [--force] [--json]                     (what the beat task runs)
    tuf status [--json]

Root keys are offline: the server never stores their private halves. Run init, rotate-root and
rotate-online on a machine that can reach the database with the key files mounted only for that
moment. rotate-online replaces the sealed online keys (a suspected server compromise, a lost
master key): it needs a threshold of the root keys and nothing of the old online keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware import tuf_repo, tuf_rotation
from ota_site.errors import ServiceError
from ota_site.keystore import KeystoreError

ACTOR = "manage.py tuf"


def _passphrase(options: dict[str, Any]) -> str | None:
    name = options.get("passphrase_env")
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise CommandError(f"--passphrase-env {name}: the variable is not set or empty.")
    return value


class Command(BaseCommand):
    help = (
        "Create and operate the TUF repository: init, keygen, rotate-root, rotate-online, "
        "export-root, refresh, status."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        init = sub.add_parser("init", help="Create the repository with new offline root keys.")
        init.add_argument("--root-keys", type=int, default=1, help="How many root keys (1).")
        init.add_argument("--threshold", type=int, default=1, help="Root signatures needed (1).")
        init.add_argument("--out", required=True, help="Folder for the root key files (0600).")
        init.add_argument("--passphrase-env", help="Encrypt the key files with this variable.")
        init.add_argument("--json", action="store_true")

        keygen = sub.add_parser("keygen", help="Make new root key files (for rotate-root).")
        keygen.add_argument("--count", type=int, default=1)
        keygen.add_argument("--out", required=True)
        keygen.add_argument("--passphrase-env")
        keygen.add_argument("--json", action="store_true")

        rotate = sub.add_parser("rotate-root", help="Sign root N+1 with old and new keys.")
        rotate.add_argument("--old-key", nargs="+", required=True, type=Path)
        rotate.add_argument("--new-key", nargs="+", required=True, type=Path)
        rotate.add_argument("--threshold", type=int, help="New root threshold (default: kept).")
        rotate.add_argument("--passphrase-env")
        rotate.add_argument("--json", action="store_true")

        online = sub.add_parser(
            "rotate-online", help="New online keys, listed by root N+1 (signed by root keys)."
        )
        online.add_argument(
            "--roles",
            default=",".join(tuf_repo.ONLINE_ROLES),
            help="Comma-separated online roles to rotate (default: targets,snapshot,timestamp).",
        )
        online.add_argument("--root-key", nargs="+", required=True, type=Path)
        online.add_argument("--passphrase-env")
        online.add_argument("--json", action="store_true")

        export = sub.add_parser("export-root", help="Write a root as served (default: newest).")
        export.add_argument("--version", type=int)
        export.add_argument("--out", required=True, type=Path)
        export.add_argument("--json", action="store_true")

        refresh = sub.add_parser("refresh", help="Re-sign what is due (as the beat task does).")
        refresh.add_argument("--force", action="store_true", help="Re-sign snapshot+timestamp.")
        refresh.add_argument("--json", action="store_true")

        status = sub.add_parser("status", help="Versions, expiry and root keys.")
        status.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, "_" + options["action"].replace("-", "_"))(options)
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        except KeystoreError as exc:
            raise CommandError(f"An online key cannot be unsealed: {exc}") from exc

    def _emit(self, options: dict[str, Any], data: dict[str, Any], text: str) -> None:
        self.stdout.write(json.dumps(data) if options.get("json") else text)

    def _init(self, options: dict[str, Any]) -> None:
        count, threshold = options["root_keys"], options["threshold"]
        if not 1 <= threshold <= count:
            raise CommandError("--threshold must be between 1 and --root-keys.")
        if tuf_repo.is_initialised():
            raise CommandError("The TUF repository exists already; use rotate-root.")
        passphrase = _passphrase(options)
        keys = [tuf_repo.generate_key() for _ in range(count)]
        signers = [tuf_repo.signer_of(key) for key in keys]
        files = [tuf_repo.write_key_file(Path(options["out"]), k, passphrase) for k in keys]
        try:
            root = tuf_repo.initialise(signers, threshold=threshold, actor=ACTOR)
        except BaseException:
            for path in files:  # keys of a repository that was not created are worthless
                path.unlink(missing_ok=True)
            raise
        data = {
            "root_version": root.signed.version,
            "threshold": threshold,
            "key_files": [str(p) for p in files],
            "keyids": root.signed.roles["root"].keyids,
        }
        self._emit(
            options,
            data,
            f"TUF repository created: root v1, {threshold} of {count} root keys.\n"
            + "\n".join(f"  {p}" for p in files)
            + "\nMove the key files offline now; the server does not need them.",
        )

    def _keygen(self, options: dict[str, Any]) -> None:
        if options["count"] < 1:
            raise CommandError("--count must be at least 1.")
        passphrase = _passphrase(options)
        files = [
            tuf_repo.write_key_file(Path(options["out"]), tuf_repo.generate_key(), passphrase)
            for _ in range(options["count"])
        ]
        self._emit(options, {"key_files": [str(p) for p in files]}, "\n".join(map(str, files)))

    def _rotate_root(self, options: dict[str, Any]) -> None:
        passphrase = _passphrase(options)
        old = [tuf_repo.load_key_file(p, passphrase) for p in options["old_key"]]
        new = [tuf_repo.load_key_file(p, passphrase) for p in options["new_key"]]
        root = tuf_rotation.rotate_root(old, new, threshold=options["threshold"], actor=ACTOR)
        data = {
            "root_version": root.signed.version,
            "threshold": root.signed.roles["root"].threshold,
            "keyids": root.signed.roles["root"].keyids,
        }
        self._emit(options, data, f"TUF root v{root.signed.version} signed and published.")

    def _rotate_online(self, options: dict[str, Any]) -> None:
        roles = tuf_rotation.parse_online_roles(options["roles"])
        if not tuf_repo.is_initialised():
            raise CommandError("The TUF repository is not initialised (manage.py tuf init).")
        passphrase = _passphrase(options)
        signers = [tuf_repo.load_key_file(p, passphrase) for p in options["root_key"]]
        root = tuf_rotation.rotate_online(signers, roles, actor=ACTOR)
        data = {
            "root_version": root.signed.version,
            "roles": roles,
            "keyids": {role: root.signed.roles[role].keyids for role in roles},
            "versions": {
                role: version
                for role in tuf_repo.ONLINE_ROLES
                if (version := getattr(tuf_repo.latest(role), "version", None)) is not None
            },
        }
        self._emit(
            options,
            data,
            f"TUF root v{root.signed.version} signed and published with new online keys for "
            f"{', '.join(roles)}; the old keys are retired.",
        )

    def _export_root(self, options: dict[str, Any]) -> None:
        content = tuf_repo.root_bytes(options["version"])
        if content is None:
            raise CommandError("No such root: is the TUF repository initialised?")
        out: Path = options["out"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(content)
        signed = json.loads(content)["signed"]
        self._emit(
            options,
            {
                "path": str(out),
                "version": signed["version"],
                "expires": signed["expires"],
                "sha256": hashlib.sha256(content).hexdigest(),
            },
            str(out),
        )

    def _refresh(self, options: dict[str, Any]) -> None:
        if not tuf_repo.is_initialised():
            raise CommandError("The TUF repository is not initialised (manage.py tuf init).")
        result = tuf_repo.update_repository(force=options["force"])
        self._emit(
            options,
            {"written": result.written},
            f"re-signed: {', '.join(result.written) or 'nothing was due'}",
        )

    def _status(self, options: dict[str, Any]) -> None:
        data = tuf_repo.status()
        if options.get("json"):
            self.stdout.write(json.dumps(data))
            return
        if not data["initialised"]:
            self.stdout.write("TUF repository: not initialised (manage.py tuf init).")
            return
        lines = [
            f"TUF repository: root keys {data['root_threshold']} of "
            f"{len(data['root_keyids'])}, {data.get('targets', 0)} targets"
        ]
        for role, info in data["roles"].items():
            lines.append(f"  {role:<9} v{info['version']:<5} expires {info['expires']}")
        self.stdout.write("\n".join(lines))
