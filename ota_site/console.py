"""Access to console pages, written once for every app's views.py.

A console page needs a signed-in person (anonymous visitors go to /login/) with a role (a person
without one gets the 403 page). Looking needs ``viewer``; changing needs the role the API asks for
the same change (``ota_site.permissions``), so the console never allows what the API refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render
from django.views import View

from ota_site.permissions import Role, has_role

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def need(request: HttpRequest, role: Role) -> None:
    """Refuse (403 page) unless the person holds at least ``role``."""
    if not has_role(request.user, role):
        raise PermissionDenied(f"This needs the {role.label} role.")


def console_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For function views: signed in and holding a role; writes check their own role (``need``)."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not has_role(request.user, Role.VIEWER):
            raise PermissionDenied("You have no role in this console; ask an admin for one.")
        return view(request, *args, **kwargs)

    return wrapped


class ConsoleView(LoginRequiredMixin, View):
    """For class views: people with ``read_role`` may look, people with ``write_role`` may POST
    (the API's RoleByMethod rule)."""

    section = ""
    read_role = Role.VIEWER
    write_role = Role.OPERATOR

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return self.handle_no_permission()
        need(request, self.read_role if request.method in SAFE_METHODS else self.write_role)
        return super().dispatch(request, *args, **kwargs)

    def render(
        self, request: HttpRequest, template: str, context: dict[str, Any], status: int = 200
    ) -> HttpResponse:
        return render(request, template, {"section": self.section, **context}, status=status)
