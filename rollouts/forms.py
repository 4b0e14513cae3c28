"""The console's rollout form: HTML input in, the API serializer's validation, the service out.

The form only turns what a browser sends (percentages, minutes, ``key=value`` lines, a local
date-time) into the API's shape; ``RolloutSerializer`` then validates it exactly as the API does,
and ``lifecycle.create_rollout`` applies the rules every entry point shares. So the console can
accept nothing the API would refuse, and the three layers' messages appear on the page.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

from django import forms
from django.core.exceptions import ValidationError

from devices.models import DeviceGroup
from firmware.models import Firmware
from ota_site.validators import validate_version
from rollouts.api.rollout_serializers import RolloutSerializer

MAX_STAGES = 20


class FirmwareChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Firmware) -> str:
        return f"{obj.device_type} {obj.version}"


def parse_metadata_filters(text: str) -> dict[str, Any]:
    """``key=value`` per line (or one JSON object). A value that reads as a JSON number, boolean
    or quoted string is that value; anything else is a plain string, so ``region=eu`` works.
    Filters compare as JSON does: ``rev=3`` matches the number 3, ``rev="3"`` the string."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"Not a JSON object: {exc}.") from exc
        if not isinstance(value, dict):
            raise ValidationError("Give a JSON object or key=value lines.")
        return value
    filters: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        key, sep, raw = line.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValidationError(f"Line {number}: write key=value.")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, list | dict) or value is None:
            value = raw  # only scalars filter; keep what was typed as text
        filters[key] = value
    return filters


def format_metadata_filters(filters: dict[str, Any]) -> str:
    return "\n".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in filters.items()
    )


class TargetingForm(forms.Form):
    """Which devices: also what the preview endpoint reads."""

    firmware = FirmwareChoiceField(
        queryset=Firmware.objects.none(),
        empty_label="Choose published firmware",
        help_text="Published firmware only; its device type is the rollout's.",
    )
    target_groups = forms.ModelMultipleChoiceField(
        queryset=DeviceGroup.objects.none(),
        required=False,
        help_text="None selected: every group (and devices in no group).",
    )
    from_version_min = forms.CharField(
        max_length=64, required=False, validators=[validate_version], label="From version ≥"
    )
    from_version_max = forms.CharField(
        max_length=64, required=False, validators=[validate_version], label="From version ≤"
    )
    metadata_filters = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "placeholder": "region=eu\nbeta=true"}),
        help_text="One key=value per line; every one must match the device's metadata.",
    )
    # The rollout id the preview hashes devices with (stage membership depends on it).
    preview_id = forms.UUIDField(required=False, widget=forms.HiddenInput)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        firmware_field = self.fields["firmware"]
        assert isinstance(firmware_field, forms.ModelChoiceField)
        firmware_field.queryset = Firmware.objects.filter(
            published_at__isnull=False, quarantined_at__isnull=True
        ).order_by("device_type", "-version_key")
        groups_field = self.fields["target_groups"]
        assert isinstance(groups_field, forms.ModelMultipleChoiceField)
        groups_field.queryset = DeviceGroup.objects.order_by("name")

    def clean_metadata_filters(self) -> dict[str, Any]:
        return parse_metadata_filters(self.cleaned_data.get("metadata_filters") or "")

    def clean_preview_id(self) -> uuid.UUID:
        return self.cleaned_data.get("preview_id") or uuid.uuid4()


class RolloutForm(TargetingForm):
    name = forms.CharField(max_length=200)
    success_percent = forms.FloatField(
        min_value=0,
        max_value=100,
        initial=95,
        label="Success threshold (%)",
        help_text="A stage advances once this share of its finished devices succeeded.",
    )
    rollback_percent = forms.FloatField(
        min_value=0,
        max_value=100,
        initial=5,
        label="Rollback threshold (%)",
        help_text="A failure rate above this stops the rollout.",
    )
    min_devices = forms.IntegerField(
        min_value=1,
        max_value=1_000_000,
        initial=5,
        help_text="Finished devices a stage needs before it is judged.",
    )
    device_timeout_minutes = forms.IntegerField(
        min_value=1,
        max_value=30 * 1440,
        initial=60,
        label="Device timeout (minutes)",
        help_text="A session open longer than this counts as failed.",
    )
    auto_rollback = forms.BooleanField(
        required=False,
        initial=True,
        help_text="On failure, offer updated devices their previous firmware (else pause).",
    )
    start_at = forms.DateTimeField(
        required=False,
        label="Start at (UTC)",
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"],
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        help_text="Blank: start it by hand from its page.",
    )

    field_order = [
        "name",
        "firmware",
        "target_groups",
        "from_version_min",
        "from_version_max",
        "metadata_filters",
        "success_percent",
        "rollback_percent",
        "min_devices",
        "device_timeout_minutes",
        "auto_rollback",
        "start_at",
    ]


class StageForm(forms.Form):
    name = forms.CharField(max_length=100, required=False)
    percentage = forms.IntegerField(min_value=1, max_value=100, required=False)
    soak_minutes = forms.IntegerField(
        min_value=0, max_value=30 * 1440, required=False, label="Soak (minutes)"
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("percentage") is None and (data.get("name") or data.get("soak_minutes")):
            self.add_error("percentage", "Give the stage a percentage, or clear the row.")
        return data


class BaseStageFormSet(forms.BaseFormSet):
    def stages(self) -> list[dict[str, Any]]:
        """The filled rows, in order, in the API's shape (blank rows are left out)."""
        result = []
        for form in self.forms:
            data = getattr(form, "cleaned_data", {}) or {}
            if data.get("percentage") is None:
                continue
            result.append(
                {
                    "name": data.get("name") or "",
                    "percentage": data["percentage"],
                    "min_duration": (data.get("soak_minutes") or 0) * 60,
                }
            )
        return result

    def clean(self) -> None:
        if any(self.errors) or not self.management_form.is_valid():
            return
        stages = self.stages()
        if not stages:
            raise ValidationError("A rollout needs at least one stage.")
        previous = 0
        for stage in stages:
            if stage["percentage"] <= previous:
                raise ValidationError("Stage percentages must increase from stage to stage.")
            previous = stage["percentage"]


StageFormSet = cast(
    type[BaseStageFormSet],
    forms.formset_factory(
        StageForm,
        formset=BaseStageFormSet,
        extra=0,
        max_num=MAX_STAGES,
        validate_max=True,
        absolute_max=MAX_STAGES,
    ),
)

DEFAULT_STAGES = [
    {"name": "Canary", "percentage": 1, "soak_minutes": 60},
    {"name": "Early", "percentage": 10, "soak_minutes": 120},
    {"name": "Everyone", "percentage": 100, "soak_minutes": 0},
]

# Serializer field -> form field, for showing the API's refusals next to the right input.
_FIELD_OF = {
    "name": "name",
    "firmware": "firmware",
    "device_type": "firmware",
    "target_groups": "target_groups",
    "from_version_min": "from_version_min",
    "from_version_max": "from_version_max",
    "metadata_filters": "metadata_filters",
    "success_threshold": "success_percent",
    "rollback_threshold": "rollback_percent",
    "min_devices": "min_devices",
    "device_timeout": "device_timeout_minutes",
    "auto_rollback": "auto_rollback",
    "start_at": "start_at",
}


def validated_serializer(form: RolloutForm, formset: BaseStageFormSet) -> RolloutSerializer | None:
    """Run the API's validation on the form's values; its errors land on the form (or on the
    formset for stages). Returns the valid serializer, or None."""
    data = form.cleaned_data
    payload: dict[str, Any] = {
        "name": data["name"],
        "firmware": str(data["firmware"].pk),
        "target_groups": [str(group.pk) for group in data["target_groups"]],
        "from_version_min": data["from_version_min"],
        "from_version_max": data["from_version_max"],
        "metadata_filters": data["metadata_filters"],
        "stages": formset.stages(),
        "success_threshold": data["success_percent"] / 100,
        "rollback_threshold": data["rollback_percent"] / 100,
        "min_devices": data["min_devices"],
        "device_timeout": data["device_timeout_minutes"] * 60,
        "auto_rollback": data["auto_rollback"],
        "start_at": data["start_at"].isoformat() if data["start_at"] else None,
    }
    serializer = RolloutSerializer(data=payload)
    if serializer.is_valid():
        return serializer
    for field, errors in serializer.errors.items():
        if field == "stages":
            formset.stage_errors = flatten_stage_errors(errors)  # type: ignore[attr-defined]
            form.add_error(None, "The stages are not valid; see below.")
            continue
        target = _FIELD_OF.get(field)
        for message in _messages(errors):
            form.add_error(target, message if target else f"{field}: {message}")
    return None


def flatten_stage_errors(errors: Any) -> list[str]:
    if isinstance(errors, dict):  # {"non_field_errors": [...]} or per-index
        errors = list(errors.values())
    messages: list[str] = []
    for index, item in enumerate(errors if isinstance(errors, list) else [errors]):
        if isinstance(item, dict):
            for field, text in item.items():
                messages += [f"Stage {index + 1}, {field}: {m}" for m in _messages(text)]
        else:
            messages += _messages(item)
    return messages


def _messages(errors: Any) -> list[str]:
    if isinstance(errors, list | tuple):
        return [str(m) for item in errors for m in _messages(item)]
    if isinstance(errors, dict):
        return [f"{k}: {m}" for k, v in errors.items() for m in _messages(v)]
    return [str(errors)]
