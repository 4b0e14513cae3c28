"""API keys for automation: create, check, revoke.

A key is shown once, as ``ota_<prefix>_<secret>``. The prefix (8 hex digits) is stored in clear
to find the row and to name the key in the audit log (``key:<prefix>``); the secret is stored only
as HMAC-SHA256 keyed by ``API_KEY_HMAC_KEY`` (a server secret that is not in the database), so a
leaked database or backup yields neither a usable credential nor a way to test guesses offline.
The secret has 256 random bits, so no slow password hash is needed.

A request carries a key as ``Authorization: ApiKey <token>`` or ``X-API-Key: <token>``
(``ota_site.auth.ApiKeyAuthentication``) and acts with the key's role (``ApiKeyUser.ota_role``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from ota_site.errors import NotAllowed, ServiceError
from ota_site.events import actor_of, created, record_event
from ota_site.models import ApiKey, EventKind
from ota_site.permissions import Role, role_of

TOKEN_PREFIX = "ota_"
_TOKEN = re.compile(r"^ota_([0-9a-f]{8})_([A-Za-z0-9_-]{20,100})$")
# last_used_at/last_used_ip are written at most this often per key: a CI job making hundreds of
# calls must not turn every one of them into an UPDATE.
LAST_USED_INTERVAL = timedelta(seconds=60)


class ApiKeyError(ServiceError):
    status_code: int = 401
    code = "api_key_invalid"


@dataclass(frozen=True)
class ApiKeyUser:
    """The authenticated API key, as DRF's ``request.user``: a principal with a role."""

    key_id: int
    prefix: str
    name: str
    ota_role: Role

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False

    @property
    def pk(self) -> int:
        return self.key_id

    @property
    def audit_name(self) -> str:
        return f"key:{self.prefix}"

    def get_username(self) -> str:
        return self.audit_name

    def has_perm(self, perm: str, obj: Any = None) -> bool:
        return False  # keys act only through the API, never in the Django admin

    def __str__(self) -> str:
        return self.audit_name


def secret_hmac(prefix: str, secret: str) -> str:
    """HMAC of the secret bound to its prefix (a secret moved to another row does not match)."""
    key = settings.API_KEY_HMAC_KEY.encode()
    return hmac.new(key, f"{prefix}:{secret}".encode(), hashlib.sha256).hexdigest()


def create_api_key(
    *,
    name: str,
    role: Role,
    expires_at: datetime | None = None,
    actor: Any = None,
) -> tuple[ApiKey, str]:
    """Create a key; return it and its token, which is never shown again.

    Nobody hands out more than they hold: a key (or a person) may create keys up to its own role.
    Commands act as the system (``actor`` a string or None) and may create any role.
    """
    name = name.strip()
    if not name:
        raise ServiceError("A key needs a name.", code="invalid")
    if expires_at is not None and expires_at <= timezone.now():
        raise ServiceError("expires_at is in the past.", code="expired")
    if actor is not None and not isinstance(actor, str):
        own = role_of(actor)
        if own is None or role > own:
            raise NotAllowed(
                f"You cannot create a key with the {role.label} role.", code="role_too_high"
            )
    secret = secrets.token_urlsafe(32)
    for _attempt in range(5):  # 32-bit prefixes: a collision is rare, but must not be a 500
        prefix = secrets.token_hex(4)
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(
                    name=name[:100],
                    prefix=prefix,
                    secret_hmac=secret_hmac(prefix, secret),
                    role=role.label,
                    expires_at=expires_at,
                    created_by=actor if isinstance(actor, User) else None,
                    created_by_actor=actor_of(actor) if actor is not None else "system",
                )
                record_event(
                    EventKind.API_KEY_CREATED,
                    actor=actor_of(actor) if actor is not None else "system",
                    data={"api_key": prefix, "name": key.name},
                    changes=created(
                        {"name": key.name, "role": key.role, "expires_at": key.expires_at}
                    ),
                )
        except IntegrityError:
            continue
        return key, f"{TOKEN_PREFIX}{prefix}_{secret}"
    raise ServiceError("Could not create a key; try again.", code="conflict", status_code=409)


def revoke_api_key(key: ApiKey, *, actor: Any = None) -> ApiKey:
    """Revoke a key at once (idempotent: revoking a revoked key changes nothing)."""
    now = timezone.now()
    with transaction.atomic():
        if ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now):
            record_event(
                EventKind.API_KEY_REVOKED,
                actor=actor_of(actor) if actor is not None else "system",
                data={"api_key": key.prefix, "name": key.name},
                changes={"revoked_at": [None, now.isoformat()]},
            )
    key.refresh_from_db(fields=["revoked_at"])
    return key


def authenticate(token: str, *, ip: str | None = None) -> ApiKeyUser:
    """The key a token names, if it is valid, unexpired and not revoked; else ApiKeyError."""
    match = _TOKEN.match(token)
    if match is None:
        raise ApiKeyError("The API key is not valid.")
    prefix, secret = match.groups()
    key = ApiKey.objects.filter(prefix=prefix).first()
    # Compare even for an unknown prefix, so timing does not tell which prefixes exist.
    stored = key.secret_hmac if key is not None else "0" * 64
    if not hmac.compare_digest(stored, secret_hmac(prefix, secret)) or key is None:
        raise ApiKeyError("The API key is not valid.")
    state = key.state
    if state != "active":
        raise ApiKeyError(f"The API key is {state}.", code=f"api_key_{state}")
    _note_use(key, ip)
    return ApiKeyUser(
        key_id=key.pk, prefix=key.prefix, name=key.name, ota_role=Role.from_label(key.role)
    )


def _note_use(key: ApiKey, ip: str | None) -> None:
    now = timezone.now()
    stale_before = now - LAST_USED_INTERVAL
    if key.last_used_at is not None and key.last_used_at >= stale_before:
        return
    # Conditional, so several web workers serving the same key write one row once a minute.
    ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before), pk=key.pk
    ).update(last_used_at=now, last_used_ip=ip)
