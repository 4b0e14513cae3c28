"""manage.py users list|create|set-role: people and their roles (viewer, operator, admin).

Roles are the groups of ``ota_site.roles``; this is the scriptable way to give or take one, and
every change is written to the audit log.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from ota_site.permissions import Role, role_of
from ota_site.roles import set_role

ACTOR = "manage.py users"
ROLE_CHOICES = [*(role.label for role in Role), "none"]


def _role(label: str) -> Role | None:
    return None if label == "none" else Role.from_label(label)


class Command(BaseCommand):
    help = "List people with their roles, create a person, or set a person's role."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Every user with role, staff and active flags.")
        listing.add_argument("--json", action="store_true", help="Print a JSON array.")
        create = sub.add_parser("create", help="Create a user with a role.")
        create.add_argument("username")
        create.add_argument("--role", required=True, choices=ROLE_CHOICES)
        create.add_argument("--email", default="")
        create.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from stdin (default: none; set one with changepassword).",
        )
        set_role_parser = sub.add_parser("set-role", help="Give a user one role, or none.")
        set_role_parser.add_argument("username")
        set_role_parser.add_argument("role", choices=ROLE_CHOICES)

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "list":
            self.list(options["json"])
        elif action == "create":
            self.create(options)
        else:
            user = User.objects.filter(username=options["username"]).first()
            if user is None:
                raise CommandError(f"No user named {options['username']!r}.")
            set_role(user, _role(options["role"]), actor=ACTOR)
            self.stdout.write(f"{user.username}: {options['role']}.")

    def list(self, as_json: bool) -> None:
        rows = []
        for user in User.objects.order_by("username").prefetch_related("groups"):
            role = role_of(user) if user.is_active else None
            rows.append(
                {
                    "username": user.username,
                    "role": role.label if role else None,
                    "superuser": user.is_superuser,
                    "staff": user.is_staff,
                    "active": user.is_active,
                    "last_login": user.last_login.isoformat() if user.last_login else None,
                }
            )
        if as_json:
            self.stdout.write(json.dumps(rows))
            return
        for row in rows:
            flags = [f for f in ("superuser", "staff") if row[f]] + (
                [] if row["active"] else ["inactive"]
            )
            self.stdout.write(f"{row['username']:<24} {row['role'] or '-':<8} {' '.join(flags)}")

    def create(self, options: dict[str, Any]) -> None:
        username = options["username"]
        if User.objects.filter(username=username).exists():
            raise CommandError(f"A user named {username!r} exists; use set-role.")
        password = None
        if options["password_stdin"]:
            password = sys.stdin.readline().rstrip("\n")
            try:
                validate_password(password, User(username=username, email=options["email"]))
            except ValidationError as exc:
                raise CommandError(" ".join(exc.messages)) from exc
        with transaction.atomic():
            user = User.objects.create_user(username, email=options["email"], password=password)
            set_role(user, _role(options["role"]), actor=ACTOR)
        self.stdout.write(f"Created {username} ({options['role']}).")
