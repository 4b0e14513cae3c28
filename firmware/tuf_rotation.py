"""Rotating the TUF repository's keys: root keys (``rotate_root``) and online keys
(``rotate_online``), each as root N+1 signed so that TUF clients accept it (docs/tuf.md).

Split from ``firmware.tuf_repo``, whose helpers it uses: the repository lock, storing and loading
metadata, and recording a new root.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Role, Root

from firmware.models import TufKey, TufRole
from firmware.tuf_repo import (
    ONLINE_PURPOSE,
    ONLINE_ROLES,
    TufError,
    _check_threshold,
    _load,
    _lock,
    _now,
    _public_of,
    _record_root,
    _store,
    current_root,
    generate_key,
    signer_of,
    update_repository,
)
from ota_site import keystore


def rotate_root(
    old_signers: Sequence[CryptoSigner],
    new_signers: Sequence[CryptoSigner],
    *,
    threshold: int | None = None,
    actor: str = "system",
) -> Metadata[Root]:
    """Sign root N+1, whose root keys are the new keys, with a threshold of the old keys AND a
    threshold of the new ones, as TUF clients require. With the same keys as old and new it
    just renews the root's expiry. Online keys stay."""
    with transaction.atomic():
        if _lock() is None:
            raise TufError("The TUF repository is not initialised.", code="tuf_not_initialised")
        old_md = current_root()
        assert old_md is not None
        old = old_md.signed
        new_threshold = threshold or min(old.roles[TufRole.ROOT].threshold, len(new_signers))
        _check_threshold(len(new_signers), new_threshold)
        old_ids = set(old.roles[TufRole.ROOT].keyids)
        usable_old = [s for s in old_signers if _public_of(s).keyid in old_ids]
        if len(usable_old) < old.roles[TufRole.ROOT].threshold:
            raise TufError(
                f"Root v{old.version} needs {old.roles[TufRole.ROOT].threshold} of its keys; "
                f"{len(usable_old)} of the given keys are among them.",
                code="tuf_threshold",
            )
        root = Root(
            version=old.version + 1,
            expires=_now(None) + timedelta(seconds=settings.TUF_ROOT_EXPIRY),
            keys={},
            roles={name: Role([], 1) for name in old.roles},
            consistent_snapshot=True,
        )
        for role in ONLINE_ROLES:
            for keyid in old.roles[role].keyids:
                root.add_key(old.keys[keyid], role)
            root.roles[role].threshold = old.roles[role].threshold
        for signer in new_signers:
            public = _public_of(signer)
            root.add_key(public, TufRole.ROOT)
            TufKey.objects.get_or_create(
                keyid=public.keyid, defaults={"role": TufRole.ROOT, "public": public.to_dict()}
            )
        root.roles[TufRole.ROOT].threshold = new_threshold
        signers = {_public_of(s).keyid: s for s in [*usable_old, *new_signers]}
        row = _store(root, signers.values())
        metadata = _load(row, Root)
        # Both checks a client makes; a failure rolls the new root back.
        old.verify_delegate(TufRole.ROOT, metadata.signed_bytes, metadata.signatures)
        root.verify_delegate(TufRole.ROOT, metadata.signed_bytes, metadata.signatures)
        retired = old_ids - set(root.roles[TufRole.ROOT].keyids)
        TufKey.objects.filter(keyid__in=retired, retired_at=None).update(retired_at=timezone.now())
        _record_root(root, actor, "rotated")
    return metadata


def conflict(detail: str, code: str) -> TufError:
    return TufError(detail, code=code, status_code=409)


def parse_online_roles(value: str | Iterable[str] | None) -> list[str]:
    """``"targets,snapshot"`` (or a list) as online roles in signing order; TufError otherwise."""
    if value is None:
        return [str(role) for role in ONLINE_ROLES]
    names = value.split(",") if isinstance(value, str) else list(value)
    wanted = {name.strip() for name in names if name.strip()}
    unknown = sorted(wanted - {str(role) for role in ONLINE_ROLES})
    if unknown or not wanted:
        raise conflict(
            f"Unknown online role {', '.join(unknown) or '(none given)'}: choose among "
            f"{', '.join(ONLINE_ROLES)}.",
            "tuf_unknown_role",
        )
    return [str(role) for role in ONLINE_ROLES if role in wanted]


def rotate_online(
    root_signers: Sequence[CryptoSigner],
    roles: str | Iterable[str] | None = None,
    *,
    actor: str = "system",
) -> Metadata[Root]:
    """Give ``roles`` (default: all online roles) new online keys.

    Writes root N+1 naming the new keys (root keys unchanged, so a threshold of them signs it
    once), retires the old key rows and re-signs the rotated roles with the new keys: a new
    targets makes a new snapshot, a new snapshot a new timestamp. Nothing needs the old online
    keys, so this is also the way out after the master key that sealed them is lost: the roles
    downstream of a rotated one (snapshot after targets, timestamp after snapshot) are re-signed
    too, so rotate all of them when the old keys cannot be unsealed. One transaction under the
    repository lock: a refusal writes nothing.
    """
    chosen = parse_online_roles(roles)
    moment = _now(None)
    with transaction.atomic():
        if _lock() is None:
            raise conflict("The TUF repository is not initialised.", "tuf_not_initialised")
        old_md = current_root()
        assert old_md is not None
        old = old_md.signed
        root_role = old.roles[TufRole.ROOT]
        usable = {
            _public_of(s).keyid: s for s in root_signers if _public_of(s).keyid in root_role.keyids
        }
        if len(usable) < root_role.threshold:
            raise conflict(
                f"Root v{old.version} needs {root_role.threshold} of its keys; "
                f"{len(usable)} of the given keys are among them.",
                "tuf_threshold",
            )
        root = Root(
            version=old.version + 1,
            expires=moment + timedelta(seconds=settings.TUF_ROOT_EXPIRY),
            keys={},
            roles={name: Role([], 1) for name in old.roles},
            consistent_snapshot=True,
        )
        for name, role in old.roles.items():
            if name in chosen:
                continue
            for keyid in role.keyids:
                root.add_key(old.keys[keyid], name)
            root.roles[name].threshold = role.threshold
        retired: list[str] = []
        for name in chosen:
            retired += old.roles[name].keyids
            private = generate_key()
            public = _public_of(signer_of(private))
            root.add_key(public, name)
            TufKey.objects.create(
                keyid=public.keyid,
                role=name,
                public=public.to_dict(),
                private_key=keystore.seal_private_key(private, purpose=ONLINE_PURPOSE),
            )
        TufKey.objects.filter(role__in=chosen, retired_at=None).exclude(
            keyid__in=[k for name in chosen for k in root.roles[name].keyids]
        ).update(retired_at=timezone.now())
        row = _store(root, usable.values())
        metadata = _load(row, Root)
        # Both checks a client makes; a failure rolls everything back.
        old.verify_delegate(TufRole.ROOT, metadata.signed_bytes, metadata.signatures)
        root.verify_delegate(TufRole.ROOT, metadata.signed_bytes, metadata.signatures)
        try:
            result = update_repository(now=moment)
        except keystore.KeystoreError as exc:
            raise conflict(
                f"A role downstream of {', '.join(chosen)} must be re-signed but its online key "
                f"cannot be unsealed ({exc}); rotate it too (--roles "
                f"{','.join(ONLINE_ROLES)}).",
                "tuf_no_key",
            ) from exc
        missing = [name for name in chosen if name not in result.written]
        assert not missing, f"rotated roles not re-signed: {missing}"
        _record_root(
            root,
            actor,
            "online keys rotated",
            roles=chosen,
            online_keyids={name: root.roles[name].keyids for name in chosen},
            retired_keyids=retired,
            written=result.written,
        )
    return metadata
