"""Admin for how devices prove who they are: enrollment tokens, the device CA and the device
certificates it issued; every change goes through services.py or certificates.py. Registered by
devices/admin.py, which imports this module."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import F, Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from devices import certificates, services
from devices.models import (
    DeviceCA,
    DeviceCertificate,
    EnrollmentToken,
)
from ota_site.admin import ServiceModelAdmin, adopt
from ota_site.permissions import Role, has_role
from ota_site.validators import device_type_validator

# --- Enrollment tokens --------------------------------------------------------------------------


class EnrollmentTokenForm(forms.ModelForm):
    max_uses = forms.IntegerField(required=False, min_value=1, help_text="Blank: unlimited.")

    class Meta:
        model = EnrollmentToken
        fields = ("name", "device_type", "group", "expires_at", "max_uses")

    def clean_device_type(self) -> str:
        value: str = self.cleaned_data.get("device_type") or ""
        if value:
            device_type_validator(value)
        return value

    def clean_expires_at(self) -> Any:
        # The service refuses this too; asking here keeps the operator's input on the page.
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now():
            raise forms.ValidationError("The expiry is in the past.", code="expired")
        return value


class TokenStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> Iterable[tuple[str, str]]:
        return (
            ("active", "Active"),
            ("revoked", "Revoked"),
            ("expired", "Expired"),
            ("exhausted", "Exhausted"),
        )

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        # The same order of precedence as EnrollmentToken.state.
        now = timezone.now()
        revoked = Q(revoked_at__isnull=False)
        expired = Q(expires_at__isnull=False, expires_at__lte=now)
        exhausted = Q(max_uses__isnull=False, uses__gte=F("max_uses"))
        value = self.value()
        if value == "active":
            return queryset.exclude(revoked | expired | exhausted)
        if value == "revoked":
            return queryset.filter(revoked)
        if value == "expired":
            return queryset.filter(expired).exclude(revoked)
        if value == "exhausted":
            return queryset.filter(exhausted).exclude(revoked | expired)
        return queryset


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(ServiceModelAdmin):
    """Tokens are created (shown once) and revoked; nothing else about them changes."""

    form = EnrollmentTokenForm
    list_display = (
        "name",
        "prefix",
        "state",
        "device_type",
        "group",
        "uses",
        "max_uses",
        "expires_at",
        "created_by",
        "created_at",
    )
    list_filter = (TokenStateFilter, "device_type", "group")
    list_select_related = ("group", "created_by")
    search_fields = ("name", "=prefix")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    actions = ("revoke_tokens",)
    add_fields = ("name", "device_type", "group", "expires_at", "max_uses")
    view_fields = (
        "name",
        "prefix",
        "state",
        "device_type",
        "group",
        "expires_at",
        "max_uses",
        "uses",
        "revoked_at",
        "created_by",
        "created_at",
    )
    # token_hash is never shown: it is of no use to a person.
    readonly_fields = ("prefix", "state", "uses", "revoked_at", "created_by", "created_at")

    def get_fields(self, request: HttpRequest, obj: EnrollmentToken | None = None) -> Any:
        return self.add_fields if obj is None else self.view_fields

    def has_change_permission(
        self, request: HttpRequest, obj: EnrollmentToken | None = None
    ) -> bool:
        return False  # no service edits a token; revoke it and create another

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("devices.change_enrollmenttoken") and has_role(
            request.user, Role.ADMIN
        )

    def save_model(
        self, request: HttpRequest, obj: EnrollmentToken, form: EnrollmentTokenForm, change: bool
    ) -> None:
        data = form.cleaned_data
        token, plaintext = services.create_enrollment_token(
            name=data["name"],
            device_type=data.get("device_type") or "",
            group=data.get("group"),
            expires_at=data.get("expires_at"),
            max_uses=data.get("max_uses"),
            actor=request.user,
        )
        adopt(obj, token)
        messages.success(
            request,
            format_html(
                "The enrollment token is <code>{}</code> — copy it now: it is stored only as a "
                "hash and cannot be shown again.",
                plaintext,
            ),
        )

    def delete_model(self, request: HttpRequest, obj: EnrollmentToken) -> None:
        services.delete_enrollment_token(obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[EnrollmentToken]) -> None:
        for token in queryset:
            services.delete_enrollment_token(token, actor=request.user)

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[EnrollmentToken]) -> None:
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            services.revoke_enrollment_token(token, actor=request.user)
            count += 1
        self.message_user(request, f"Revoked {count} token(s).", messages.SUCCESS)


# --- Device CA and certificates -----------------------------------------------------------------


@admin.register(DeviceCA)
class DeviceCAAdmin(admin.ModelAdmin):
    """View only: the CA is created and rotated by `manage.py device_ca`; its key is never
    shown (it is a sealed envelope anyway)."""

    list_display = ("common_name", "key_id", "active", "not_before", "not_after", "created_at")
    list_filter = ("active",)
    fields = (
        "common_name",
        "active",
        "key_id",
        "fingerprint",
        "not_before",
        "not_after",
        "created_at",
        "certificate",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # certificates refer to it (PROTECT); it expires instead


class CertificateStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> Iterable[tuple[str, str]]:
        return (("valid", "Valid"), ("revoked", "Revoked"), ("expired", "Expired"))

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "valid":
            return queryset.filter(revoked_at__isnull=True, not_after__gt=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, not_after__lte=now)
        return queryset


@admin.register(DeviceCertificate)
class DeviceCertificateAdmin(admin.ModelAdmin):
    """Issued by enrollment and renewal only; an admin can revoke one (a leaked device key)."""

    list_display = ("serial", "device", "state", "not_before", "not_after", "revoked_at", "ca")
    list_filter = (CertificateStateFilter, "ca")
    list_select_related = ("device", "ca")
    search_fields = ("=serial", "=fingerprint", "device__hardware_id")
    ordering = ("-created_at",)
    actions = ("revoke_certificates",)
    fields = (
        "device",
        "serial",
        "fingerprint",
        "state",
        "not_before",
        "not_after",
        "revoked_at",
        "ca",
        "created_at",
        "certificate",
    )
    readonly_fields = fields
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the record is what refuses a revoked certificate

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, Role.ADMIN)

    @admin.display(description="State")
    def state(self, certificate: DeviceCertificate) -> str:
        return certificate.state

    @admin.action(description="Revoke selected certificates", permissions=["revoke"])
    def revoke_certificates(
        self, request: HttpRequest, queryset: QuerySet[DeviceCertificate]
    ) -> None:
        count = sum(
            certificates.revoke_certificate(certificate, actor=request.user)
            for certificate in queryset.filter(revoked_at__isnull=True)
        )
        self.message_user(request, f"Revoked {count} certificate(s).", messages.SUCCESS)
