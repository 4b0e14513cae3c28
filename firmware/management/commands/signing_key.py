"""manage.py signing_key: list, rotate, retire and rewrap the firmware signing keys."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware import signing
from firmware.models import SigningKey
from ota_site.errors import ServiceError

ACTOR = "manage.py signing_key"


def describe(key: SigningKey) -> dict[str, Any]:
    """A key's public facts and whether its private half can be used (never the key itself)."""
    return {
        "key_id": key.key_id,
        "algorithm": key.algorithm,
        "status": key.status,
        "backend": key.backend,
        "public_key": key.public_key,
        "endorsed_by": key.endorsed_by_id,
        "endorsement": key.endorsement,
        "created_at": key.created_at.isoformat(),
        "retired_at": key.retired_at.isoformat() if key.retired_at else None,
        "retired_by": key.retired_by_id,
        "firmware_signed": key.firmware_set.count(),
        "problem": signing.custody_problem(key) or None,
    }


class Command(BaseCommand):
    help = (
        "The Ed25519 keys that sign firmware manifests; their private halves are stored sealed "
        "with the master key, or kept in a PKCS#11 token (FIRMWARE_SIGNING_BACKEND=pkcs11). "
        "`list` shows them and any key that cannot be used (exit status 1); `rotate` makes a "
        "new current key endorsed by the old one (devices follow the chain; --backend chooses "
        "where it is made); `retire KEY_ID` retires a previous key (firmware it signed is "
        "re-signed by the current key); `rewrap` reseals every sealed key under the current "
        "master key after a change."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="The keys, newest first, and their health.")
        listing.add_argument("--json", action="store_true", help="Print one JSON object.")
        rotate = sub.add_parser("rotate", help="Make a new current key, endorsed by the old one.")
        rotate.add_argument(
            "--unendorsed",
            action="store_true",
            help="Only when the current key is lost: start a new chain without an endorsement. "
            "Devices must then be given the new public key by hand.",
        )
        rotate.add_argument(
            "--backend",
            choices=[choice.value for choice in SigningKey.Backend],
            help="Where to make the new key (default: FIRMWARE_SIGNING_BACKEND). The old key "
            "endorses it wherever the old one is held: `--backend pkcs11` moves into an HSM.",
        )
        rotate.add_argument("--json", action="store_true", help="Print one JSON object.")
        retire = sub.add_parser("retire", help="Retire a previous key.")
        retire.add_argument("key_id")
        retire.add_argument("--json", action="store_true", help="Print one JSON object.")
        rewrap = sub.add_parser("rewrap", help="Reseal every key under the current master key.")
        rewrap.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"do_{options['action']}")(options)
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc

    def emit(self, options: dict[str, Any], data: dict[str, Any], text: str) -> None:
        self.stdout.write(json.dumps(data) if options["json"] else text)

    def do_list(self, options: dict[str, Any]) -> None:
        keys = [describe(key) for key in SigningKey.objects.order_by("-created_at")]
        problems = [key for key in keys if key["problem"]]
        lines = [
            f"{k['key_id']}  {k['status']:<8}  {k['backend']:<6}  signed {k['firmware_signed']:>4}"
            f"  endorsed by {k['endorsed_by'] or '-':<16}  created {k['created_at'][:19]}"
            + (f"\n    PROBLEM: {k['problem']}" if k["problem"] else "")
            for k in keys
        ]
        self.emit(options, {"keys": keys}, "\n".join(lines) or "No signing keys yet.")
        if problems:
            raise CommandError(f"{len(problems)} signing key(s) cannot be used; see above.")

    def do_rotate(self, options: dict[str, Any]) -> None:
        key = signing.rotate(
            actor=ACTOR, unendorsed=options["unendorsed"], backend=options["backend"]
        )
        how = "unendorsed: give devices its public key" if not key.endorsement else "endorsed"
        how += ", in the PKCS#11 token" if key.backend == SigningKey.Backend.PKCS11 else ""
        self.emit(
            options,
            describe(key),
            f"New current signing key {key.key_id} ({how}); "
            f"the previous one is {key.endorsed_by_id or '-'}.",
        )

    def do_retire(self, options: dict[str, Any]) -> None:
        retired = signing.retire(options["key_id"], actor=ACTOR)
        self.emit(
            options,
            {**describe(retired.key), "resigned": retired.resigned},
            f"Retired {retired.key.key_id}; {retired.resigned} published firmware re-signed "
            "with the current key.",
        )

    def do_rewrap(self, options: dict[str, Any]) -> None:
        changed = signing.rewrap(actor=ACTOR)
        self.emit(
            options,
            {"rewrapped": changed},
            f"Resealed {len(changed)} key(s) under the current master key: "
            + (", ".join(changed) or "none needed"),
        )
