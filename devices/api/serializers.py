from __future__ import annotations

from typing import Any

from rest_framework import serializers

from devices.ca import MAX_CSR_CHARS
from devices.models import Device, DeviceCertificate, DeviceGroup
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


class DeviceSerializer(serializers.ModelSerializer):
    online = serializers.BooleanField(source="is_online", read_only=True)
    group: serializers.PrimaryKeyRelatedField[DeviceGroup] = serializers.PrimaryKeyRelatedField(
        read_only=True
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
