"""Console pages of the devices app: the fleet list and the operator/admin actions on one device.

The device page itself (/devices/<id>/) is rendered by metrics.views.device_detail, because it
shows the device's update sessions, which live in rollouts (above devices: devices must not import
it). Its URL falls through from devices.urls to metrics.urls, so the console still reads as one
/devices/ section. The actions below only need devices.services and stay here.

hawkBit DDI devices (devices/ddi.py) are added and given target tokens here too. A new token is
shown once, on the page that answers the POST itself (never a redirect, a message or the session:
the token is not stored anywhere in clear), marked no-store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import F, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import get_script_prefix, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from devices import certificates, ddi, services
from devices.models import Device, DeviceGroup, DeviceStatus
from ota_site import cache
from ota_site.console import ConsoleView
from ota_site.errors import ServiceError
from ota_site.permissions import Role
from ota_site.validators import (
    device_type_validator,
    hardware_id_validator,
    validate_metadata,
    validate_version,
)

PAGE_SIZE = 50
# The list shows "10 000+ devices" past this: an exact COUNT over a large filtered fleet costs a
# full scan per page view, and nobody pages that far; filters narrow the list instead.
COUNT_LIMIT = 10_000
# The device types offered by the filter: a DISTINCT over the fleet, which changes rarely.
DEVICE_TYPES_CACHE_SECONDS = 60


# --- The fleet list ---------------------------------------------------------------------------

SORTS: dict[str, tuple[str, list[Any]]] = {
    # name: (label, ORDER BY). Every order ends with a unique column so that pages are stable;
    # devices that never reported come last whichever the direction.
    "-last_seen": ("Last seen, newest first", [F("last_seen").desc(nulls_last=True), "id"]),
    "last_seen": ("Last seen, oldest first", [F("last_seen").asc(nulls_last=True), "id"]),
    "hardware_id": ("Hardware id, A-Z", ["hardware_id"]),
    "-hardware_id": ("Hardware id, Z-A", ["-hardware_id"]),
    "-version": ("Version, highest first", ["-current_version_key", "id"]),
    "version": ("Version, lowest first", ["current_version_key", "id"]),
}
NO_GROUP = "none"


def device_types() -> list[str]:
    types = cache.get("console:device-types")
    if not isinstance(types, list):
        types = list(
            Device.objects.order_by("device_type").values_list("device_type", flat=True).distinct()
        )
        cache.set("console:device-types", types, DEVICE_TYPES_CACHE_SECONDS)
    return types


class DeviceFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=128, strip=True)
    device_type = forms.CharField(required=False, max_length=64)
    status = forms.ChoiceField(required=False, choices=[("", "Any"), *DeviceStatus.choices])
    group = forms.CharField(required=False, max_length=36)
    version = forms.CharField(required=False, max_length=64)
    online = forms.ChoiceField(
        required=False, choices=[("", "Any"), ("yes", "Online"), ("no", "Offline")]
    )
    sort = forms.ChoiceField(
        required=False, choices=[(key, label) for key, (label, _) in SORTS.items()]
    )
    page = forms.IntegerField(required=False, min_value=1, max_value=1_000_000)

    def clean_group(self) -> DeviceGroup | str | None:
        value: str = self.cleaned_data["group"]
        if not value:
            return None
        if value == NO_GROUP:
            return NO_GROUP
        try:
            return DeviceGroup.objects.get(pk=value)
        except (DeviceGroup.DoesNotExist, ValidationError):
            raise ValidationError("No such group.", code="invalid_group") from None


def search_q(text: str) -> Q:
    """What the search box matches, all through indexes except metadata:

    - a hardware id prefix (LIKE 'x%' on the varchar_pattern_ops index Django adds for the unique
      hardware_id);
    - a device id prefix of at least 4 hex digits (a range on the primary key);
    - ``key=value``: devices whose metadata has that key with that value (JSON containment, a scan
      of the table: ~50 ms at 100 000 devices; free text over metadata cost ~130 ms per query and
      made every search pay it, so metadata is searched only when asked for).
    """
    key, sep, value = text.partition("=")
    if sep and key.strip():
        key, value = key.strip(), value.strip()
        query = Q(metadata__contains={key: value})
        if value.lstrip("-").isdigit():
            query |= Q(metadata__contains={key: int(value)})
        return query
    query = Q(hardware_id__startswith=text)
    compact = text.replace("-", "").lower()
    if 4 <= len(compact) <= 32 and all(c in "0123456789abcdef" for c in compact):
        low = compact.ljust(32, "0")
        high = compact.ljust(32, "f")
        query |= Q(id__gte=_uuid(low), id__lte=_uuid(high))
    return query


def _uuid(hex32: str) -> str:
    return f"{hex32[:8]}-{hex32[8:12]}-{hex32[12:16]}-{hex32[16:20]}-{hex32[20:]}"


def filtered_devices(data: dict[str, Any]) -> QuerySet[Device]:
    devices = Device.objects.select_related("group")
    if data.get("q"):
        devices = devices.filter(search_q(data["q"]))
    if data.get("device_type"):
        devices = devices.filter(device_type=data["device_type"])
    if data.get("status"):
        devices = devices.filter(status=data["status"])
    group = data.get("group")
    if group == NO_GROUP:
        devices = devices.filter(group__isnull=True)
    elif isinstance(group, DeviceGroup):
        devices = devices.filter(group=group)
    if data.get("version"):
        devices = devices.filter(current_version=data["version"])
    if data.get("online"):
        since = timezone.now() - timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
        online = Q(last_seen__gte=since)
        devices = devices.filter(online if data["online"] == "yes" else ~online)
    _, order = SORTS[data.get("sort") or "-last_seen"]
    return devices.order_by(*order)


@dataclass(frozen=True)
class Page:
    number: int
    devices: list[Device]
    has_next: bool
    total: int
    total_capped: bool

    @property
    def first_index(self) -> int:
        return (self.number - 1) * PAGE_SIZE + 1 if self.devices else 0

    @property
    def last_index(self) -> int:
        return (self.number - 1) * PAGE_SIZE + len(self.devices)


def page_of(devices: QuerySet[Device], number: int) -> Page:
    """One page, with a count that stops at COUNT_LIMIT: two queries whatever the fleet size."""
    offset = (number - 1) * PAGE_SIZE
    rows = list(devices[offset : offset + PAGE_SIZE + 1])
    total = devices.order_by()[: COUNT_LIMIT + 1].count()
    return Page(
        number=number,
        devices=rows[:PAGE_SIZE],
        has_next=len(rows) > PAGE_SIZE,
        total=min(total, COUNT_LIMIT),
        total_capped=total > COUNT_LIMIT,
    )


class DeviceListView(ConsoleView):
    section = "devices"

    def get(self, request: HttpRequest) -> HttpResponse:
        form = DeviceFilterForm(request.GET)
        context: dict[str, Any] = {
            "form": form,
            "sorts": [(key, label) for key, (label, _) in SORTS.items()],
            "statuses": DeviceStatus.choices,
            "device_types": device_types(),
            "groups": list(DeviceGroup.objects.only("id", "name")),
            "online_window_minutes": settings.DEVICE_ONLINE_WINDOW // 60,
        }
        if not form.is_valid():
            # The page, with what was wrong, rather than a bare error: the filters stay editable.
            return self.render(request, "devices/list.html", context, status=400)
        data = form.cleaned_data
        page = page_of(filtered_devices(data), data.get("page") or 1)
        params = {
            key: value
            for key, value in request.GET.items()
            if key != "page" and key in form.fields and value
        }
        context.update(
            page=page,
            filtered=any(params.get(k) for k in ("q", "device_type", "status", "group", "version")),
            query=urlencode(params),
            current_sort=data.get("sort") or "-last_seen",
            current_group=request.GET.get("group", ""),
        )
        return self.render(request, "devices/list.html", context)


# --- Actions on one device (the page is metrics.views.device_detail) -----------------------------


def device_page(device_id: Any) -> str:
    return reverse("metrics:device", args=[device_id])


class DeviceActionView(ConsoleView):
    """POST only; the service refuses what the device's state does not allow, and the refusal
    is shown on the device page as a message."""

    http_method_names = ["post"]
    section = "devices"

    def post(self, request: HttpRequest, device_id: Any) -> HttpResponse:
        device = get_object_or_404(Device.objects.select_related("group"), pk=device_id)
        try:
            return self.act(request, device)
        except ServiceError as exc:
            messages.error(request, exc.detail)
        return HttpResponseRedirect(device_page(device.id))

    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        raise NotImplementedError


class RetryView(DeviceActionView):
    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        services.retry_update(device, actor=request.user)
        messages.success(request, f"{device.hardware_id} will be offered {device.target_version}.")
        return HttpResponseRedirect(device_page(device.id))


class DeviceEditForm(forms.Form):
    group = forms.CharField(required=False, max_length=36)
    target_version = forms.CharField(required=False, max_length=64, validators=[validate_version])
    metadata = forms.CharField(required=False, widget=forms.Textarea, max_length=64 * 1024)

    def clean_group(self) -> DeviceGroup | None:
        value: str = self.cleaned_data["group"]
        if not value:
            return None
        try:
            return DeviceGroup.objects.get(pk=value)
        except (DeviceGroup.DoesNotExist, ValidationError):
            raise ValidationError("No such group.", code="invalid_group") from None

    def clean_metadata(self) -> dict[str, Any]:
        text = self.cleaned_data["metadata"].strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            raise ValidationError("Metadata must be valid JSON.", code="invalid_json") from None
        validate_metadata(value)
        return dict(value)


class EditView(DeviceActionView):
    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        form = DeviceEditForm(request.POST)
        if not form.is_valid():
            for field, errors in form.errors.items():
                for error in errors:
                    messages.error(request, f"{field.replace('_', ' ').capitalize()}: {error}")
            return HttpResponseRedirect(device_page(device.id))
        data = form.cleaned_data
        services.update_device(
            device,
            actor=request.user,
            group=data["group"],
            target_version=data["target_version"] or None,
            metadata=data["metadata"],
        )
        messages.success(request, f"{device.hardware_id} was saved.")
        return HttpResponseRedirect(device_page(device.id))


class RevokeView(DeviceActionView):
    write_role = Role.ADMIN

    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        reason = request.POST.get("reason", "").strip()[:500]
        certificates.revoke_device(device, actor=request.user, reason=reason)
        messages.success(request, f"{device.hardware_id} was revoked: it can no longer connect.")
        return HttpResponseRedirect(device_page(device.id))


class DeleteView(DeviceActionView):
    write_role = Role.ADMIN

    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        name = device.hardware_id
        services.delete_device(device, actor=request.user)
        messages.success(request, f"{name} was deleted; its history stays in the event log.")
        return HttpResponseRedirect(reverse("devices:list"))


# --- hawkBit DDI devices and their target tokens (devices/ddi.py) ------------------------------


def target_token_page(
    view: ConsoleView, request: HttpRequest, device: Device, token: str, *, created: bool
) -> HttpResponse:
    """The one page that ever shows this token, with what the device's client needs."""
    server_url = request.build_absolute_uri(get_script_prefix()).rstrip("/")
    tenant = settings.DDI_TENANT
    response = view.render(
        request,
        "devices/ddi_token.html",
        {
            "device": device,
            "created": created,
            "token": token,
            "tenant": tenant,
            "controller_id": device.hardware_id,
            "server_url": server_url,
            "swupdate_command": (
                f'swupdate -u "-t {tenant} -i {device.hardware_id} -u {server_url} -k {token}"'
            ),
        },
    )
    add_never_cache_headers(response)  # no-store: no cache or back button keeps the token
    return response


class DdiDeviceForm(forms.Form):
    controller_id = forms.CharField(max_length=128, validators=[hardware_id_validator])
    device_type = forms.CharField(max_length=64, validators=[device_type_validator])
    current_version = forms.CharField(required=False, max_length=64, validators=[validate_version])
    group = forms.CharField(required=False, max_length=36)

    def clean_group(self) -> DeviceGroup | None:
        value: str = self.cleaned_data["group"]
        if not value:
            return None
        try:
            return DeviceGroup.objects.get(pk=value)
        except (DeviceGroup.DoesNotExist, ValidationError):
            raise ValidationError("No such group.", code="invalid_group") from None


class AddDdiDeviceView(ConsoleView):
    """POST from the device list: a DDI device with its target token, shown once."""

    http_method_names = ["post"]
    section = "devices"

    def post(self, request: HttpRequest) -> HttpResponse:
        form = DdiDeviceForm(request.POST)
        if not form.is_valid():
            for field, errors in form.errors.items():
                for error in errors:
                    messages.error(request, f"{field.replace('_', ' ').capitalize()}: {error}")
            return HttpResponseRedirect(reverse("devices:list"))
        data = form.cleaned_data
        try:
            device, token = ddi.provision_device(
                controller_id=data["controller_id"],
                device_type=data["device_type"],
                current_version=data["current_version"],
                group=data["group"],
                actor=request.user,
            )
        except ServiceError as exc:
            messages.error(request, exc.detail)
            return HttpResponseRedirect(reverse("devices:list"))
        return target_token_page(self, request, device, token, created=True)


class TargetTokenView(DeviceActionView):
    """Create or replace the device's target token; the old one stops working at once."""

    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        token = ddi.issue_target_token(device, actor=request.user)
        return target_token_page(self, request, device, token, created=False)


class RevokeTargetTokenView(DeviceActionView):
    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        if ddi.revoke_target_token(device, actor=request.user):
            messages.success(request, f"The target token of {device.hardware_id} was revoked.")
        else:
            messages.info(request, f"{device.hardware_id} had no target token.")
        return HttpResponseRedirect(device_page(device.id))


class RequestAttributesView(DeviceActionView):
    def act(self, request: HttpRequest, device: Device) -> HttpResponse:
        ddi.request_attributes(device, actor=request.user)
        messages.success(
            request, f"{device.hardware_id} will be asked for its attributes on its next poll."
        )
        return HttpResponseRedirect(device_page(device.id))
