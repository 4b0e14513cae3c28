"""Admin for firmware and signing keys: view, publish and delete; uploads go through the API."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from firmware import services, signing
from firmware.models import Firmware, SigningKey
from ota_site.admin import ServiceModelAdmin, pretty_json, role_allows, uuid_or_none
from ota_site.errors import ServiceError
from ota_site.permissions import Role, has_role


class PublishedFilter(admin.SimpleListFilter):
    title = "published"
    parameter_name = "published"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> Iterable[tuple[str, str]]:
        return (("yes", "Published"), ("no", "Draft"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(published_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(published_at__isnull=True)
        return queryset


@admin.register(Firmware)
class FirmwareAdmin(ServiceModelAdmin):
    """Firmware is uploaded through the API (streamed and hashed on the way in) and never edited:
    the signed manifest covers its bytes and metadata."""

    list_display = (
        "device_type",
        "version",
        "published",
        "size",
        "filename",
        "key_id",
        "created_by",
        "created_at",
        "published_at",
    )
    list_filter = (PublishedFilter, "device_type", "signing_key")
    list_select_related = ("created_by",)
    search_fields = ("version", "device_type", "filename", "=checksum")
    search_help_text = "Version, device type, file name, SHA-256 or firmware id."
    date_hierarchy = "created_at"
    ordering = ("device_type", "-version_key")
    actions = ("publish_selected",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "device_type",
                    "version",
                    "id",
                    "filename",
                    "size",
                    "checksum",
                    "sha1",
                    "md5",
                    "pretty_metadata",
                    "created_by",
                    "created_at",
                )
            },
        ),
        (
            "Publication",
            {"fields": ("published_at", "signing_key", "signature", "pretty_manifest")},
        ),
        ("History", {"fields": ("events",)}),
    )
    readonly_fields = (
        "device_type",
        "version",
        "id",
        "filename",
        "size",
        "checksum",
        "sha1",
        "md5",
        "pretty_metadata",
        "created_by",
        "created_at",
        "published_at",
        "signing_key",
        "signature",
        "pretty_manifest",
        "events",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Firmware | None = None) -> bool:
        return False

    def has_publish_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("firmware.change_firmware") and role_allows(
            request, Role.OPERATOR
        )

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        hint = format_html(
            "Upload firmware with <code>POST /api/v1/firmware</code> (multipart: file, version, "
            'device_type); see the <a href="{}">API documentation</a>. Publish it here or with '
            "<code>POST /api/v1/firmware/&lt;id&gt;/publish</code>.",
            reverse("api-docs"),
        )
        return super().changelist_view(request, {"subtitle": hint, **(extra_context or {})})

    @admin.display(description="Published", boolean=True, ordering="published_at")
    def published(self, firmware: Firmware) -> bool:
        return firmware.is_published

    @admin.display(description="Size", ordering="file_size")
    def size(self, firmware: Firmware) -> str:
        return f"{filesizeformat(firmware.file_size)} ({firmware.file_size} bytes)"

    @admin.display(description="Key id")
    def key_id(self, firmware: Firmware) -> str:
        return firmware.signing_key_id or "-"

    @admin.display(description="Metadata")
    def pretty_metadata(self, firmware: Firmware) -> str:
        return pretty_json(firmware.metadata)

    @admin.display(description="Signed manifest")
    def pretty_manifest(self, firmware: Firmware) -> str:
        return format_html("<code>{}</code>", firmware.manifest) if firmware.manifest else "-"

    @admin.display(description="Events")
    def events(self, firmware: Firmware) -> str:
        query = urlencode({"firmware_id": str(firmware.id)})
        url = f"{reverse('admin:ota_site_event_changelist')}?{query}"
        return format_html('<a href="{}">Events of this firmware</a>', url)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Firmware], search_term: str
    ) -> tuple[QuerySet[Firmware], bool]:
        firmware_id = uuid_or_none(search_term)
        if firmware_id is not None:
            return queryset.filter(pk=firmware_id), False
        return super().get_search_results(request, queryset, search_term)

    def delete_model(self, request: HttpRequest, obj: Firmware) -> None:
        # A ServiceError (in use since the confirmation page was shown) leaves delete_view and
        # becomes an error message there (ServiceModelAdmin).
        services.delete_firmware(obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Firmware]) -> None:
        # The confirmation page already refused firmware that rollouts or sessions protect; what
        # is refused now was taken into use meanwhile and is reported one by one.
        for firmware in queryset:
            try:
                services.delete_firmware(firmware, actor=request.user)
            except ServiceError as exc:
                self.message_user(
                    request, f"{firmware} was not deleted: {exc.detail}", messages.ERROR
                )

    @admin.action(description="Publish selected firmware", permissions=["publish"])
    def publish_selected(self, request: HttpRequest, queryset: QuerySet[Firmware]) -> None:
        published = skipped = 0
        for firmware in queryset:
            if firmware.is_published:
                skipped += 1
                continue
            try:
                services.publish_firmware(firmware, actor=request.user)
            except ServiceError as exc:
                self.message_user(request, f"{firmware}: {exc.detail}", messages.ERROR)
            else:
                published += 1
        if published:
            self.message_user(request, f"Published {published} firmware.", messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} were published already.", messages.INFO)


@admin.register(SigningKey)
class SigningKeyAdmin(admin.ModelAdmin):
    """Keys are never edited here (the private half is sealed and never shown); admins rotate
    and retire them with the actions, which call firmware.signing like the API and manage.py."""

    list_display = (
        "key_id",
        "algorithm",
        "status",
        "endorsed_by",
        "firmware_count",
        "created_at",
        "retired_at",
    )
    list_filter = ("status", "algorithm")
    search_fields = ("key_id",)
    fields = (
        "key_id",
        "algorithm",
        "status",
        "public_key",
        "is_active",
        "endorsed_by",
        "endorsement",
        "created_at",
        "retired_at",
        "retired_by",
        "retirement",
    )
    readonly_fields = fields
    actions = ("rotate_key", "retire_selected")

    def get_queryset(self, request: HttpRequest) -> QuerySet[SigningKey]:
        return super().get_queryset(request).annotate(firmware_count=Count("firmware"))

    @admin.display(description="Firmware signed", ordering="firmware_count")
    def firmware_count(self, key: SigningKey) -> int:
        return key.firmware_count  # type: ignore[attr-defined]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SigningKey | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: SigningKey | None = None) -> bool:
        return False

    def has_keys_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, Role.ADMIN)

    @admin.action(
        description="Rotate: make a new current key, endorsed by the current one",
        permissions=["keys"],
    )
    def rotate_key(self, request: HttpRequest, queryset: QuerySet[SigningKey]) -> None:
        # The selection does not matter (Django's actions need one); the current key is rotated.
        try:
            key = signing.rotate(actor=request.user)
        except ServiceError as exc:
            self.message_user(request, exc.detail, messages.ERROR)
            return
        self.message_user(
            request,
            f"New current signing key {key.key_id}, endorsed by {key.endorsed_by_id}.",
            messages.SUCCESS,
        )

    @admin.action(description="Retire selected keys", permissions=["keys"])
    def retire_selected(self, request: HttpRequest, queryset: QuerySet[SigningKey]) -> None:
        for key in queryset:
            try:
                retired = signing.retire(key.key_id, actor=request.user)
            except ServiceError as exc:
                self.message_user(request, f"{key.key_id}: {exc.detail}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Retired {key.key_id}; {retired.resigned} firmware re-signed.",
                    messages.SUCCESS,
                )
