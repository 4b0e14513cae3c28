from __future__ import annotations

from typing import Any

from rest_framework import serializers

from devices.ca import MAX_CSR_CHARS
from devices.models import DdiTarget, Device, DeviceCertificate, DeviceGroup
from ota_site.validators import (
    device_type_validator,
    hardware_id_validator,
    validate_metadata,
    validate_version,
)


class RegisterSerializer(serializers.Serializer):
    enrollment_token = serializers.CharField(max_length=200)
    hardware_id = serializers.CharField(max_length=128, validators=[hardware_id_validator])
    device_type = serializers.CharField(max_length=64, validators=[device_type_validator])
    current_version = serializers.CharField(
        max_length=64, required=False, allow_blank=True, validators=[validate_version]
    )
    metadata = serializers.JSONField(required=False, validators=[validate_metadata])


class RegisteredSerializer(serializers.Serializer):
    device_id = serializers.UUIDField()
    device_secret = serializers.CharField(help_text="Shown once; store it on the device.")
    access_token = serializers.CharField()
    token_type = serializers.CharField()
    expires_in = serializers.IntegerField()


class EnrollSerializer(RegisterSerializer):
    """Enrollment by CSR: the register fields plus a PEM certificate signing request."""

    csr = serializers.CharField(
        max_length=MAX_CSR_CHARS, trim_whitespace=False, help_text="PEM; its subject is ignored."
    )


class EnrolledSerializer(serializers.Serializer):
    device_id = serializers.UUIDField()
    certificate = serializers.CharField(help_text="PEM, CN = the device id.")
    ca_certificate = serializers.CharField(help_text="PEM of the issuing device CA.")
    access_token = serializers.CharField()
    token_type = serializers.CharField()
    expires_in = serializers.IntegerField()


class RenewSerializer(serializers.Serializer):
    csr = serializers.CharField(max_length=MAX_CSR_CHARS, trim_whitespace=False)


class CertificateSerializer(serializers.ModelSerializer):
    ca_certificate = serializers.CharField(source="ca.certificate", read_only=True)

    class Meta:
        model = DeviceCertificate
        fields = [
            "serial",
            "fingerprint",
            "not_before",
            "not_after",
            "revoked_at",
            "certificate",
            "ca_certificate",
        ]
        read_only_fields = fields


class RevokeSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True)


class TokenRequestSerializer(serializers.Serializer):
    """A secret with its device id; or nothing, with a client certificate verified by nginx."""

    device_id = serializers.UUIDField(required=False)
    secret = serializers.CharField(max_length=200, required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "secret" in attrs and "device_id" not in attrs:
            raise serializers.ValidationError({"device_id": ["This field is required."]})
        return attrs


class TokenSerializer(serializers.Serializer):
    access_token = serializers.CharField()
    token_type = serializers.CharField()
    expires_in = serializers.IntegerField()


class HeartbeatSerializer(serializers.Serializer):
    current_version = serializers.CharField(
        max_length=64, required=False, validators=[validate_version]
    )
    metadata = serializers.JSONField(required=False, validators=[validate_metadata])


class HeartbeatReplySerializer(serializers.Serializer):
    poll_interval = serializers.IntegerField(help_text="Seconds until the next poll.")
    server_time = serializers.DateTimeField()


class DdiSummarySerializer(serializers.ModelSerializer):
    """A device's hawkBit DDI state; never the token itself (only its hash is stored)."""

    token_prefix = serializers.SerializerMethodField(
        help_text="The target token's first characters; null when it has none."
    )

    class Meta:
        model = DdiTarget
        fields = [
            "token_prefix",
            "token_created_at",
            "attributes_requested",
            "attributes_updated_at",
        ]
        read_only_fields = fields

    def get_token_prefix(self, target: DdiTarget) -> str | None:
        return target.token_prefix or None


class DeviceSerializer(serializers.ModelSerializer):
    online = serializers.BooleanField(source="is_online", read_only=True)
    group: serializers.PrimaryKeyRelatedField[DeviceGroup] = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True
    )
    # Querysets that list devices select_related("ddi"), or this costs a query per row.
    ddi = DdiSummarySerializer(
        read_only=True,
        allow_null=True,
        help_text="hawkBit DDI state (target token, attributes); null for other devices.",
    )

    class Meta:
        model = Device
        fields = [
            "id",
            "hardware_id",
            "device_type",
            "current_version",
            "target_version",
            "status",
            "online",
            "last_seen",
            "group",
            "metadata",
            "revoked_at",
            "ddi",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class DeviceUpdateSerializer(serializers.Serializer):
    """What an operator may change. PUT sends every field; PATCH only the ones it changes."""

    group: serializers.PrimaryKeyRelatedField[DeviceGroup] = serializers.PrimaryKeyRelatedField(
        queryset=DeviceGroup.objects.all(), allow_null=True, required=True
    )
    target_version = serializers.CharField(
        max_length=64,
        allow_null=True,
        allow_blank=True,
        required=True,
        validators=[validate_version],
    )
    metadata = serializers.JSONField(required=True, validators=[validate_metadata])

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if isinstance(data, dict) and data.get("target_version") == "":
            data = {**data, "target_version": None}
        return super().to_internal_value(data)


class DeviceGroupSerializer(serializers.ModelSerializer):
    device_count = serializers.IntegerField(read_only=True)
    target_version = serializers.CharField(
        max_length=64, allow_null=True, required=False, validators=[validate_version]
    )

    class Meta:
        model = DeviceGroup
        fields = [
            "id",
            "name",
            "description",
            "target_version",
            "device_count",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "device_count", "created_at", "updated_at"]


# --- hawkBit DDI devices (devices/ddi.py) -------------------------------------------------------


class DdiDeviceCreateSerializer(serializers.Serializer):
    """A DDI device made by an operator; its controllerId is its hardware_id."""

    controller_id = serializers.CharField(
        max_length=128,
        validators=[hardware_id_validator],
        help_text="The client's controllerId; becomes the device's hardware_id.",
    )
    device_type = serializers.CharField(max_length=64, validators=[device_type_validator])
    current_version = serializers.CharField(
        max_length=64, required=False, allow_blank=True, validators=[validate_version]
    )
    group: serializers.PrimaryKeyRelatedField[DeviceGroup] = serializers.PrimaryKeyRelatedField(
        queryset=DeviceGroup.objects.all(), required=False, allow_null=True
    )
    metadata = serializers.JSONField(required=False, validators=[validate_metadata])


class DdiDeviceCreatedSerializer(serializers.Serializer):
    device = DeviceSerializer()
    target_token = serializers.CharField(help_text="Shown once; configure it on the device.")
    tenant = serializers.CharField()
    controller_id = serializers.CharField()


class TargetTokenSerializer(serializers.Serializer):
    target_token = serializers.CharField(help_text="Shown once; configure it on the device.")
    token_prefix = serializers.CharField()
    controller_id = serializers.CharField()
    tenant = serializers.CharField()
