"""The Django admin site, opened only to people with a role.

Django lets in any active ``is_staff`` user; here the user must also hold a role (viewer,
operator or admin, ``ota_site.permissions.role_of``), so staff status set by hand, or left over
after a role was taken away, opens nothing. Installed in place of ``django.contrib.admin``
(``OtaAdminConfig`` in INSTALLED_APPS); ``admin.site`` is this site.
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest


class OtaAdminSite(admin.AdminSite):
    def has_permission(self, request: HttpRequest) -> bool:
        # Imported here: this module is loaded with INSTALLED_APPS, before any model exists.
        from ota_site.permissions import role_of

        return super().has_permission(request) and role_of(request.user) is not None


class OtaAdminConfig(AdminConfig):
    default_site = "ota_site.admin_site.OtaAdminSite"
