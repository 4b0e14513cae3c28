"""The admin site's titles, the event log (view only), API keys, and the pieces every app's
admin shares.

The admin is the power-user console. It writes only through the apps' services.py, like the API
and the manage.py commands, so a refusal there (``ServiceError``) must reach the operator as an
error message, never as a 500. Who may do what follows the roles (``ota_site.permissions``): the
site admits only people with a role (``ota_site.admin_site``), model permissions come only from
the role groups (``ota_site.roles``), and actions that change state also ask ``role_allows``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from ota_site import apikeys
from ota_site.errors import ServiceError
from ota_site.models import ApiKey, Event
from ota_site.permissions import Role, has_role

admin.site.site_header = "OTA update server"
admin.site.site_title = "OTA update server"
admin.site.index_title = "Fleet administration"


class ServiceModelAdmin(admin.ModelAdmin):
    """A ModelAdmin whose saves and deletes call services that may refuse with a ServiceError.

    Both views run in a transaction, so letting the error leave the view rolls back everything the
    admin wrote around the service call (its LogEntry included); the operator is sent back to the
    page with the service's own words. Ask the form for what a form can check, so this stays the
    rare path (e.g. a race with another operator).
    """

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)
            opts = self.opts
            url = reverse(
                f"admin:{opts.app_label}_{opts.model_name}_change",
                args=[object_id],
                current_app=self.admin_site.name,
            )
            return HttpResponseRedirect(url)


def role_allows(request: HttpRequest, role: Role) -> bool:
    """Whether the admin user holds ``role``: admin actions ask this as well as the model
    permission, so an action never allows more than the same change through the API."""
    return has_role(request.user, role)


def adopt(instance: models.Model, saved: models.Model) -> None:
    """Turn the admin's form instance into the row a service created or saved.

    ModelAdmin keeps using the instance it passed to ``save_model`` (for the log entry, the
    message and the redirect), so it must carry the saved row's primary key and values.
    """
    for field in instance._meta.concrete_fields:
        setattr(instance, field.attname, getattr(saved, field.attname))
    instance._state.adding = False
    instance._state.db = saved._state.db


def uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


def pretty_json(value: Any) -> str:
    return format_html(
        '<pre style="white-space: pre-wrap; margin: 0">{}</pre>',
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False),
    )


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    """The append-only event log: viewing only, for everyone, superusers included."""

    list_display = (
        "id",
        "created_at",
        "kind",
        "actor",
        "actor_kind",
        "ip",
        "subject",
        "session_id",
    )
    list_filter = ("kind", "actor_kind", ("created_at", admin.DateFieldListFilter))
    search_fields = ("actor",)
    search_help_text = "Actor text, or the id of a device, firmware, rollout or session."
    # Newest first by primary key: the table only grows and id order is creation order.
    ordering = ("-id",)
    fields = (
        "id",
        "created_at",
        "kind",
        "actor",
        "actor_kind",
        "ip",
        "request_id",
        "device_id",
        "firmware_id",
        "rollout_id",
        "session_id",
        "pretty_changes",
        "pretty_data",
    )
    readonly_fields = fields
    # Counting the whole log on every page would cost a full scan of the largest table.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Event | None = None) -> bool:
        return False

    @admin.display(description="Subject")
    def subject(self, event: Event) -> str:
        if event.device_id:
            return f"device {event.device_id}"
        if event.firmware_id:
            return f"firmware {event.firmware_id}"
        if event.rollout_id:
            return f"rollout {event.rollout_id}"
        return "-"

    @admin.display(description="Data")
    def pretty_data(self, event: Event) -> str:
        return pretty_json(event.data)

    @admin.display(description="Changes (before, after)")
    def pretty_changes(self, event: Event) -> str:
        return pretty_json(event.changes)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Event], search_term: str
    ) -> tuple[QuerySet[Event], bool]:
        # Ids are matched exactly on their own indexed columns; Django's default would cast every
        # id column to text and scan the whole log.
        term = search_term.strip()
        subject = uuid_or_none(term)
        if subject is not None:
            return (
                queryset.filter(
                    models.Q(device_id=subject)
                    | models.Q(firmware_id=subject)
                    | models.Q(rollout_id=subject)
                ),
                False,
            )
        if term.isdigit() and len(term) <= 18:  # fits a bigint
            return queryset.filter(models.Q(session_id=int(term)) | models.Q(pk=int(term))), False
        return super().get_search_results(request, queryset, search_term)


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("name", "role", "expires_at")


@admin.register(ApiKey)
class ApiKeyAdmin(ServiceModelAdmin):
    """API keys for automation: created here (token shown once), revoked, never edited; the rows
    stay after revocation because the audit log names keys by prefix."""

    form = ApiKeyForm
    list_display = (
        "prefix",
        "name",
        "role",
        "state",
        "created_by_actor",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "last_used_ip",
    )
    list_filter = ("role", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("=prefix", "name")
    ordering = ("-created_at",)
    actions = ("revoke_keys",)
    add_fields = ("name", "role", "expires_at")
    view_fields = (
        "prefix",
        "name",
        "role",
        "state",
        "created_by_actor",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "last_used_ip",
    )
    readonly_fields = view_fields

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fields if obj is None else self.view_fields

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return () if obj is None else self.view_fields

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke a key and create another

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # the audit log names keys by prefix: keep them, revoked

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("ota_site.change_apikey") and role_allows(request, Role.ADMIN)

    @admin.display(description="State")
    def state(self, key: ApiKey) -> str:
        return key.state

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ApiKeyForm, change: bool) -> None:
        data = form.cleaned_data
        key, token = apikeys.create_api_key(
            name=data["name"],
            role=Role.from_label(data["role"]),
            expires_at=data.get("expires_at"),
            actor=request.user,
        )
        adopt(obj, key)
        messages.success(
            request,
            format_html(
                "The API key is <code>{}</code> — copy it now: it is stored only as an HMAC and "
                "cannot be shown again.",
                token,
            ),
        )

    @admin.action(description="Revoke selected keys", permissions=["revoke"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            apikeys.revoke_api_key(key, actor=request.user)
            count += 1
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


def events_table(events: Iterable[Event], *, filters: dict[str, str], label: str) -> str:
    """A small table of events with a link to all of them in the event log's changelist."""
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                event.created_at.isoformat(timespec="seconds"),
                event.kind,
                event.actor,
                json.dumps(event.data, sort_keys=True)[:200],
            )
            for event in events
        ),
    )
    url = reverse("admin:ota_site_event_changelist") + "?" + urlencode(filters)
    return format_html('<table>{}</table><a href="{}">{}</a>', rows, url, label)
