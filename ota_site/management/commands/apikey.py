"""manage.py apikey create|list|revoke: API keys for CI pipelines.

The token is printed once at creation and stored only as an HMAC; ``list`` shows prefixes, roles
and last use, never a secret.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ota_site import apikeys
from ota_site.errors import ServiceError
from ota_site.models import ApiKey
from ota_site.permissions import Role

ACTOR = "manage.py apikey"


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def key_record(key: ApiKey) -> dict[str, Any]:
    return {
        "prefix": key.prefix,
        "name": key.name,
        "role": key.role,
        "state": key.state,
        "created_by": key.created_by_actor,
        "created_at": _iso(key.created_at),
        "expires_at": _iso(key.expires_at),
        "revoked_at": _iso(key.revoked_at),
        "last_used_at": _iso(key.last_used_at),
        "last_used_ip": key.last_used_ip,
    }


class Command(BaseCommand):
    help = "Create, list and revoke API keys (Authorization: ApiKey <token>)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create a key; its token is printed once.")
        create.add_argument("--name", required=True, help="What the key is for, e.g. 'ci'.")
        create.add_argument(
            "--role", required=True, choices=[role.label for role in Role], help="Its role."
        )
        create.add_argument(
            "--expires-days", type=int, help="Lifetime in days (default: never expires)."
        )
        create.add_argument("--json", action="store_true", help="Print one JSON object.")
        listing = sub.add_parser("list", help="List keys (never their secrets).")
        listing.add_argument("--json", action="store_true", help="Print a JSON array.")
        revoke = sub.add_parser("revoke", help="Revoke a key at once.")
        revoke.add_argument("prefix", help="The key's prefix (the 8 hex digits after ota_).")
        revoke.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            self.create(options)
        elif action == "list":
            self.list(options)
        else:
            self.revoke(options["prefix"], as_json=options["json"])

    def create(self, options: dict[str, Any]) -> None:
        days = options["expires_days"]
        if days is not None and not 1 <= days <= 3650:
            raise CommandError("--expires-days must be between 1 and 3650.")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        try:
            key, token = apikeys.create_api_key(
                name=options["name"],
                role=Role.from_label(options["role"]),
                expires_at=expires_at,
                actor=ACTOR,
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        if options["json"]:
            self.stdout.write(json.dumps({**key_record(key), "token": token}))
            return
        expiry = f"expires {_iso(key.expires_at)}" if key.expires_at else "never expires"
        self.stdout.write(f"API key {key.name!r} ({key.role}, {expiry}):")
        self.stdout.write(token)
        self.stdout.write(
            "It is shown only this once. Send it as 'Authorization: ApiKey <token>' or "
            "'X-API-Key: <token>'."
        )

    def list(self, options: dict[str, Any]) -> None:
        records = [key_record(key) for key in ApiKey.objects.order_by("-created_at")]
        if options["json"]:
            self.stdout.write(json.dumps(records))
            return
        if not records:
            self.stdout.write("No API keys.")
            return
        for r in records:
            used = (
                f"last used {r['last_used_at']} from {r['last_used_ip']}"
                if r["last_used_at"]
                else "never used"
            )
            self.stdout.write(
                f"{r['prefix']}  {r['role']:<8}  {r['state']:<7}  {r['name']}  ({used})"
            )

    def revoke(self, prefix: str, *, as_json: bool) -> None:
        key = ApiKey.objects.filter(prefix=prefix.strip().removeprefix("ota_")[:16]).first()
        if key is None:
            raise CommandError(f"No API key with prefix {prefix!r}.")
        already = key.revoked_at is not None
        if not already:
            key = apikeys.revoke_api_key(key, actor=ACTOR)
        if as_json:
            self.stdout.write(json.dumps({**key_record(key), "already_revoked": already}))
        elif already:
            self.stdout.write(f"{key.prefix} was revoked already ({_iso(key.revoked_at)}).")
        else:
            self.stdout.write(f"Revoked {key.prefix} ({key.name}).")
