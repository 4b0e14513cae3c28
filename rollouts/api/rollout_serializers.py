"""Rollout definitions in and out of the API."""

from __future__ import annotations

import re
from typing import Any

from django.utils import timezone
from rest_framework import serializers

from devices.models import DeviceGroup
from firmware.models import Firmware
from ota_site.validators import device_type_validator, validate_version
from rollouts.lifecycle import Definition, StageSpec
from rollouts.models import Rollout, RolloutStage

_FILTER_KEY = re.compile(r"^[A-Za-z0-9_]{1,64}\Z")


class StageSerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=100, required=False, allow_blank=True)
    percentage = serializers.IntegerField(min_value=1, max_value=100)
    min_duration = serializers.IntegerField(min_value=0, max_value=30 * 86400, required=False)

    class Meta:
        model = RolloutStage
        fields = ["position", "name", "percentage", "min_duration", "start_time", "completion_time"]
        read_only_fields = ["position", "start_time", "completion_time"]


class RolloutSerializer(serializers.ModelSerializer):
    """Create (all fields), read, and change (see lifecycle.update_rollout for what may change)."""

    firmware: serializers.PrimaryKeyRelatedField[Firmware] = serializers.PrimaryKeyRelatedField(
        queryset=Firmware.objects.all()
    )
    target_groups: serializers.PrimaryKeyRelatedField[DeviceGroup] = (
        serializers.PrimaryKeyRelatedField(
            queryset=DeviceGroup.objects.all(), many=True, required=False
        )
    )
    device_type = serializers.CharField(
        max_length=64,
        required=False,
        validators=[device_type_validator],
        help_text="Optional; must be the firmware's device type.",
    )
    stages = StageSerializer(many=True)
    from_version_min = serializers.CharField(
        max_length=64, required=False, allow_blank=True, validators=[validate_version]
    )
    from_version_max = serializers.CharField(
        max_length=64, required=False, allow_blank=True, validators=[validate_version]
    )
    metadata_filters = serializers.DictField(
        child=serializers.JSONField(), required=False, help_text="Device metadata key -> value."
    )
    success_threshold = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    rollback_threshold = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    min_devices = serializers.IntegerField(min_value=1, max_value=1_000_000, required=False)
    device_timeout = serializers.IntegerField(min_value=60, max_value=30 * 86400, required=False)
    firmware_version = serializers.CharField(source="firmware.version", read_only=True)

    class Meta:
        model = Rollout
        fields = [
            "id",
            "name",
            "status",
            "status_reason",
            "firmware",
            "firmware_version",
            "device_type",
            "target_groups",
            "from_version_min",
            "from_version_max",
            "metadata_filters",
            "stages",
            "current_stage",
            "success_threshold",
            "rollback_threshold",
            "min_devices",
            "device_timeout",
            "auto_rollback",
            "start_at",
            "created_at",
            "started_at",
            "stage_started_at",
            "completed_at",
        ]
        read_only_fields = [
            "id",
            "status",
            "status_reason",
            "current_stage",
            "created_at",
            "started_at",
            "stage_started_at",
            "completed_at",
        ]

    def validate_metadata_filters(self, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > 16:
            raise serializers.ValidationError("At most 16 metadata filters.")
        for key, item in value.items():
            if not _FILTER_KEY.match(key):
                raise serializers.ValidationError(
                    f"Filter key {key[:70]!r} must be 1-64 of [A-Za-z0-9_]."
                )
            if not isinstance(item, str | int | float | bool) or item is None:
                raise serializers.ValidationError(
                    f"Filter {key!r} must be a string, number or bool."
                )
        return value

    def validate_stages(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not value:
            raise serializers.ValidationError("A rollout needs at least one stage.")
        if len(value) > 20:
            raise serializers.ValidationError("At most 20 stages.")
        previous = 0
        for stage in value:
            if stage["percentage"] <= previous:
                raise serializers.ValidationError("Stage percentages must increase.")
            previous = stage["percentage"]
        return value

    def validate_start_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("start_at is in the past.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        firmware = attrs.get("firmware")
        device_type = attrs.pop("device_type", None)
        if firmware is not None and device_type and device_type != firmware.device_type:
            raise serializers.ValidationError(
                {"device_type": f"The firmware is for {firmware.device_type!r} devices."}
            )
        if firmware is not None and not firmware.is_published:
            raise serializers.ValidationError({"firmware": "The firmware is not published."})
        return attrs

    def to_definition(self) -> Definition:
        data = self.validated_data
        return Definition(
            name=data["name"],
            firmware=data["firmware"],
            stages=[stage_spec(stage) for stage in data["stages"]],
            target_groups=list(data.get("target_groups", [])),
            from_version_min=data.get("from_version_min", ""),
            from_version_max=data.get("from_version_max", ""),
            metadata_filters=data.get("metadata_filters", {}),
            success_threshold=data.get("success_threshold", 0.95),
            rollback_threshold=data.get("rollback_threshold", 0.05),
            min_devices=data.get("min_devices", 5),
            device_timeout=data.get("device_timeout", 3600),
            auto_rollback=data.get("auto_rollback", True),
            start_at=data.get("start_at"),
        )

    def changes(self) -> dict[str, Any]:
        """The validated fields as keyword changes for lifecycle.update_rollout."""
        changes = dict(self.validated_data)
        if "stages" in changes:
            changes["stages"] = [stage_spec(stage) for stage in changes["stages"]]
        if "target_groups" in changes:
            changes["target_groups"] = list(changes["target_groups"])
        return changes


def stage_spec(stage: dict[str, Any]) -> StageSpec:
    return StageSpec(
        name=stage.get("name") or f"{stage['percentage']}%",
        percentage=stage["percentage"],
        min_duration=stage.get("min_duration", 0),
    )


class ActionSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True)
