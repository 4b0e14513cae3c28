"""The three role groups and the Django admin permissions each one holds.

``ensure_role_groups`` runs after every ``migrate`` and makes the groups ``viewer``, ``operator``
and ``admin`` hold exactly the model permissions of their role, so the Django admin enforces the
same rules as the API (``ota_site.permissions``). Give a person a role by adding them to one
group (``manage.py users set-role``, or the admin's user page); ``is_staff`` only opens the admin
site's door and grants nothing by itself.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, Permission, User

from ota_site.permissions import Role

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


def set_role(user: User, role: Role | None) -> None:
    """Make ``role`` the user's only role (None removes every role); staff access follows."""
    role_groups = Group.objects.filter(name__in=[r.label for r in Role])
    user.groups.remove(*role_groups)
    if role is not None:
        group, created = Group.objects.get_or_create(name=role.label)
        if created:
            group.permissions.set(permissions_for(role))
        user.groups.add(group)
    user.is_staff = role is not None or user.is_superuser
    user.save(update_fields=["is_staff"])
    if hasattr(user, "_ota_role_cache"):
        del user._ota_role_cache
