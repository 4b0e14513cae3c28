"""Admin for devices (with their hawkBit DDI state) and device groups; every change goes through
services.py or ddi.py. Enrollment tokens and certificates: devices/admin_identity.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

# Enrollment tokens, the device CA and device certificates: registered by importing the module.
from devices import (
    admin_identity,  # noqa: F401
    certificates,
    ddi,
    services,
)
from devices.models import (
    DdiTarget,
    Device,
    DeviceGroup,
)
from ota_site.admin import ServiceModelAdmin, adopt, events_table, uuid_or_none
from ota_site.errors import ServiceError
from ota_site.models import Event
from ota_site.permissions import Role, has_role
from ota_site.validators import validate_metadata, validate_version


def _clean_target_version(value: str | None) -> str | None:
    if value:
        validate_version(value)
    return value or None


# --- Device groups ------------------------------------------------------------------------------


class DeviceGroupForm(forms.ModelForm):
    class Meta:
        model = DeviceGroup
        fields = ("name", "description", "target_version")
        help_texts = {
            "target_version": "The version every member without a target of its own should run."
        }

    def clean_target_version(self) -> str | None:
        return _clean_target_version(self.cleaned_data.get("target_version"))


@admin.register(DeviceGroup)
class DeviceGroupAdmin(ServiceModelAdmin):
    form = DeviceGroupForm
    list_display = ("name", "target_version", "target_set_at", "device_count", "updated_at")
    search_fields = ("name",)
    ordering = ("name",)
    fields = (
        "name",
        "description",
        "target_version",
        "target_set_at",
        "members",
        "created_at",
        "updated_at",
    )
    readonly_fields = ("target_set_at", "members", "created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeviceGroup]:
        return super().get_queryset(request).annotate(device_count=Count("devices"))

    @admin.display(description="Devices", ordering="device_count")
    def device_count(self, group: DeviceGroup) -> int:
        return group.device_count  # type: ignore[attr-defined]

    @admin.display(description="Members")
    def members(self, group: DeviceGroup) -> str:
        if group.pk is None or group._state.adding:
            return "-"
        url = (
            reverse("admin:devices_device_changelist")
            + "?"
            + urlencode({"group__id__exact": str(group.pk)})
        )
        count = getattr(group, "device_count", None)
        if count is None:
            count = group.devices.count()
        return format_html('<a href="{}">{} devices</a>', url, count)

    def save_model(
        self, request: HttpRequest, obj: DeviceGroup, form: DeviceGroupForm, change: bool
    ) -> None:
        data = form.cleaned_data
        if not change:
            group = services.create_group(
                name=data["name"],
                description=data.get("description", ""),
                target_version=data.get("target_version"),
                actor=request.user,
            )
            adopt(obj, group)
            return
        changes = {n: data[n] for n in form.changed_data if n in DeviceGroupForm.Meta.fields}
        if changes:
            # The form has already written its values into obj; the service compares with the
            # stored row.
            stored = DeviceGroup.objects.get(pk=obj.pk)
            services.update_group(stored, actor=request.user, **changes)
            adopt(obj, stored)

    def delete_model(self, request: HttpRequest, obj: DeviceGroup) -> None:
        services.delete_group(obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[DeviceGroup]) -> None:
        # The confirmation page already refused groups that enrollment tokens protect; what is
        # refused now got a token meanwhile and is reported one by one.
        for group in queryset:
            try:
                services.delete_group(group, actor=request.user)
            except ServiceError as exc:
                self.message_user(request, f"{group} was not deleted: {exc.detail}", messages.ERROR)


# --- Devices ------------------------------------------------------------------------------------


class DeviceForm(forms.ModelForm):
    """What an operator may change on a device; everything else is the device's own report."""

    class Meta:
        model = Device
        fields = ("group", "target_version", "metadata")
        help_texts = {
            "target_version": "Overrides the group's target. It may name a version that is not "
            'published yet. To retry a failed update, use the "Retry the assigned update" '
            "action."
        }

    def clean_target_version(self) -> str | None:
        return _clean_target_version(self.cleaned_data.get("target_version"))

    def clean_metadata(self) -> dict[str, Any]:
        value = {} if self.cleaned_data.get("metadata") is None else self.cleaned_data["metadata"]
        validate_metadata(value)
        return value


class OnlineFilter(admin.SimpleListFilter):
    title = "online"
    parameter_name = "online"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> Iterable[tuple[str, str]]:
        return (("yes", "Online"), ("no", "Offline"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # The same window as Device.is_online; last_seen is indexed.
        since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
        if self.value() == "yes":
            return queryset.filter(last_seen__gt=since)
        if self.value() == "no":
            return queryset.filter(Q(last_seen__lte=since) | Q(last_seen__isnull=True))
        return queryset


class DdiTargetInline(admin.TabularInline):
    """A device's hawkBit DDI state, view only: tokens are issued by the action "Create or replace
    DDI target token" (ddi.issue_target_token) and the hash is never shown."""

    model = DdiTarget
    verbose_name = verbose_name_plural = "hawkBit DDI"
    fields = (
        "token_prefix",
        "token_created_at",
        "attributes_requested",
        "attributes_updated_at",
        "created_at",
    )
    readonly_fields = fields
    can_delete = False
    extra = 0

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# Each token of the DDI action is shown once in a message (kept in the session until shown).
MAX_TARGET_TOKENS_PER_ACTION = 20


@admin.register(Device)
class DeviceAdmin(ServiceModelAdmin):
    form = DeviceForm
    inlines = (DdiTargetInline,)
    list_display = (
        "hardware_id",
        "device_type",
        "current_version",
        "target_version",
        "group",
        "status",
        "online",
        "last_seen",
    )
    list_filter = ("status", OnlineFilter, "device_type", "group", "current_version")
    list_select_related = ("group",)
    search_fields = ("hardware_id",)
    search_help_text = "Part of a hardware id, or a device id."
    ordering = ("hardware_id",)
    actions = ("reset_credentials", "retry_update", "revoke_devices", "issue_target_tokens")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "hardware_id",
                    "id",
                    "device_type",
                    "status",
                    "current_version",
                    "last_seen",
                    "credentials",
                    "certificates",
                )
            },
        ),
        ("Assignment", {"fields": ("group", "target_version", "target_set_at", "metadata")}),
        ("History", {"fields": ("recent_events", "created_at", "updated_at")}),
    )
    readonly_fields = (
        "hardware_id",
        "id",
        "device_type",
        "status",
        "current_version",
        "last_seen",
        "credentials",
        "certificates",
        "target_set_at",
        "recent_events",
        "created_at",
        "updated_at",
    )
    # A fleet of 100k devices: no second, unfiltered COUNT per page, and no facet counts.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # devices enroll themselves with an enrollment token

    def get_inline_instances(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        # The inline is view only: a saved device form has nothing in it to save, so its
        # management form is not asked for (a script may post the device's fields alone).
        if request.method == "POST":
            return []
        return super().get_inline_instances(request, obj)

    @admin.display(description="Online", boolean=True, ordering="last_seen")
    def online(self, device: Device) -> bool:
        return device.is_online

    @admin.display(description="Credentials")
    def credentials(self, device: Device) -> str:
        if device.revoked_at is not None:
            return f"revoked {device.revoked_at.isoformat(timespec='seconds')}"
        if device.secret_hash:
            return f"enrolled (generation {device.credential_generation})"
        return "reset: the device may enroll again"

    @admin.display(description="Certificates")
    def certificates(self, device: Device) -> str:
        """The certificates the device CA issued to it, newest first (a table, not an inline:
        certificates are issued and revoked by services, never edited in a form)."""
        issued = list(device.certificates.order_by("-created_at")[:10])
        if not issued:
            return "-"
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:devices_devicecertificate_change", args=[cert.pk]),
                    cert.serial[:16],
                    cert.state,
                    cert.not_after.isoformat(timespec="seconds"),
                )
                for cert in issued
            ),
        )
        url = (
            reverse("admin:devices_devicecertificate_changelist")
            + "?"
            + urlencode({"device__id__exact": str(device.pk)})
        )
        return format_html('<table>{}</table><a href="{}">All certificates</a>', rows, url)

    @admin.display(description="Recent events")
    def recent_events(self, device: Device) -> str:
        return events_table(
            Event.objects.filter(device_id=device.id).order_by("-id")[:20],
            filters={"device_id": str(device.id)},
            label="All events of this device",
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Device], search_term: str
    ) -> tuple[QuerySet[Device], bool]:
        device_id = uuid_or_none(search_term)
        if device_id is not None:
            return queryset.filter(pk=device_id), False
        return super().get_search_results(request, queryset, search_term)

    def get_deleted_objects(
        self, objs: Sequence[Device] | QuerySet[Device], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        to_delete, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # A device's session history goes with it (delete_device decides that), although no one
        # may delete sessions on their own: only the permission on devices counts here.
        perms_needed = {name for name in perms_needed if name == self.opts.verbose_name}
        return to_delete, counts, perms_needed, protected

    def save_model(self, request: HttpRequest, obj: Device, form: DeviceForm, change: bool) -> None:
        data = form.cleaned_data
        # Only what the operator changed: the event records exactly that, and a target_version
        # that is saved again unchanged must not count as a new assignment (which would retry).
        changes = {n: data[n] for n in form.changed_data if n in DeviceForm.Meta.fields}
        if changes:
            # The form has already written its values into obj; the service compares with the
            # stored row.
            stored = Device.objects.get(pk=obj.pk)
            services.update_device(stored, actor=request.user, **changes)
            adopt(obj, stored)

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("devices.change_device") and has_role(
            request.user, Role.OPERATOR
        )

    @admin.action(description="Retry the assigned update", permissions=["operate"])
    def retry_update(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        retried = 0
        for device in queryset.select_related("group"):
            try:
                services.retry_update(device, actor=request.user)
                retried += 1
            except ServiceError as exc:
                self.message_user(request, f"{device}: {exc.detail}", messages.ERROR)
        if retried:
            self.message_user(request, f"Retrying on {retried} device(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Device) -> None:
        services.delete_device(obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        for device in queryset:
            services.delete_device(device, actor=request.user)

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, Role.ADMIN)

    @admin.action(description="Revoke selected devices (lock them out)", permissions=["revoke"])
    def revoke_devices(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        count = 0
        for device in queryset.filter(revoked_at__isnull=True):
            certificates.revoke_device(device, actor=request.user, reason="admin action")
            count += 1
        self.message_user(
            request,
            f"Revoked {count} device(s): their tokens and certificates no longer work.",
            messages.SUCCESS,
        )

    @admin.action(description="Create or replace DDI target token", permissions=["operate"])
    def issue_target_tokens(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        """A new target token for each device (the old one stops working), each shown once."""
        if queryset.count() > MAX_TARGET_TOKENS_PER_ACTION:
            self.message_user(
                request,
                f"Select at most {MAX_TARGET_TOKENS_PER_ACTION} devices: each new token is shown "
                "once, in a message.",
                messages.ERROR,
            )
            return
        for device in queryset.order_by("hardware_id"):
            try:
                token = ddi.issue_target_token(device, actor=request.user)
            except ServiceError as exc:
                self.message_user(request, f"{device}: {exc.detail}", messages.ERROR)
                continue
            self.message_user(
                request,
                format_html(
                    "Target token of <strong>{}</strong> (tenant <code>{}</code>, controller id "
                    "<code>{}</code>): <code>{}</code> — copy it now: it is stored only as a hash "
                    "and cannot be shown again; any earlier token no longer works.",
                    device.hardware_id,
                    settings.DDI_TENANT,
                    device.hardware_id,
                    token,
                ),
                messages.SUCCESS,
            )

    @admin.action(description="Reset credentials (allow re-enrollment)", permissions=["operate"])
    def reset_credentials(self, request: HttpRequest, queryset: QuerySet[Device]) -> None:
        count = 0
        for device in queryset:
            services.reset_credentials(device, actor=request.user)
            count += 1
        self.message_user(
            request,
            f"Reset the credentials of {count} device(s); they may enroll again.",
            messages.SUCCESS,
        )
