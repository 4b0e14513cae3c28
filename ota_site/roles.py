"""The three role groups and the Django admin permissions each one holds.

``ensure_role_groups`` runs after every ``migrate`` and makes the groups ``viewer``, ``operator``
and ``admin`` hold exactly the model permissions of their role, so the Django admin enforces the
same rules as the API (``ota_site.permissions``). Give a person a role by adding them to one
group (``manage.py users set-role``, or the admin's user page); ``is_staff`` only opens the admin
site's door and grants nothing by itself.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Group, Permission, User
from django.db import transaction
from django.db.models import QuerySet

from ota_site.events import actor_of, record_event
from ota_site.models import EventKind
from ota_site.permissions import ROLE_GROUPS, Role

# Models whose records operators create and change (everything else they only view).
OPERATOR_MODELS = {
    "devices.device",
    "devices.devicegroup",
    "firmware.firmware",
    "rollouts.rollout",
    "rollouts.rolloutstage",
    "rollouts.updatesession",
}
# Apps whose models everyone with a role may view (auth users and secrets are for admins).
VIEWABLE_APPS = {"devices", "firmware", "rollouts", "ota_site", "metrics"}
# Models no role below admin may even view (they hold or describe secrets).
ADMIN_ONLY_MODELS = {"ota_site.apikey", "devices.enrollmenttoken", "devices.deviceca"}


def permissions_for(role: Role) -> list[Permission]:
    perms = list(Permission.objects.select_related("content_type"))
    if role is Role.ADMIN:
        return perms
    chosen = []
    for perm in perms:
        app = perm.content_type.app_label
        model = f"{app}.{perm.content_type.model}"
        action = perm.codename.split("_", 1)[0]
        if app not in VIEWABLE_APPS or model in ADMIN_ONLY_MODELS:
            continue
        writes = role is Role.OPERATOR and model in OPERATOR_MODELS
        if action == "view" or (writes and action in {"add", "change"}):
            chosen.append(perm)
    return chosen


def ensure_role_groups(**kwargs: Any) -> None:
    """post_migrate: create the role groups and give each exactly its permissions."""
    for role in Role:
        group, _ = Group.objects.get_or_create(name=role.label)
        group.permissions.set(permissions_for(role))


def group_role(user: User) -> Role | None:
    """The role the user's groups give (what ``set_role`` set), superuser status aside."""
    names = user.groups.filter(name__in=list(ROLE_GROUPS)).values_list("name", flat=True)
    found = [ROLE_GROUPS[name] for name in names]
    return max(found) if found else None


def set_role(user: User, role: Role | None, *, actor: Any = None) -> None:
    """Make ``role`` the user's only role (None removes every role); staff access follows.

    A change is written to the audit log (``user.role_changed``, with before and after).
    """
    with transaction.atomic():
        before = group_role(user)
        role_groups = Group.objects.filter(name__in=[r.label for r in Role])
        user.groups.remove(*role_groups)
        if role is not None:
            group, created = Group.objects.get_or_create(name=role.label)
            if created:
                group.permissions.set(permissions_for(role))
            user.groups.add(group)
        user.is_staff = role is not None or user.is_superuser
        user.save(update_fields=["is_staff"])
        if before != role:
            record_event(
                EventKind.USER_ROLE_CHANGED,
                actor=actor_of(actor),
                data={"user": user.get_username()},
                changes={"role": [before.label if before else None, role.label if role else None]},
            )
    if hasattr(user, "_ota_role_cache"):
        del user._ota_role_cache


class RoleModelBackend(ModelBackend):
    """Django's model backend, with permissions from the role groups only.

    A permission given to a user directly, or through some other group, would let the admin allow
    what the API (which asks ``role_of``) refuses; here the role is the only source.
    """

    def _get_user_permissions(self, user_obj: Any) -> QuerySet[Permission]:
        return Permission.objects.none()

    def _get_group_permissions(self, user_obj: Any) -> QuerySet[Permission]:
        return Permission.objects.filter(
            group__user=user_obj, group__name__in=[role.label for role in Role]
        )
