from __future__ import annotations

import copy

from rest_framework import serializers

from ota_site.validators import validate_version
from rollouts.models import SessionStatus, UpdateSession

REPORTABLE = [
    SessionStatus.DOWNLOADING,
    SessionStatus.INSTALLING,
    SessionStatus.VALIDATING,
    SessionStatus.SUCCESS,
    SessionStatus.FAILED,
]


class KeyChainLinkSerializer(serializers.Serializer):
    key_id = serializers.CharField()
    public_key = serializers.CharField(help_text="Raw Ed25519 public key, base64.")
    endorsed_by = serializers.CharField(allow_null=True)
    endorsement = serializers.CharField(
        allow_blank=True, help_text="`endorsed_by`'s signature over the endorsement statement."
    )


class RetiredKeyStatementSerializer(serializers.Serializer):
    key_id = serializers.CharField()
    retired_by = serializers.CharField()
    retirement = serializers.CharField(
        help_text="`retired_by`'s signature over the retirement statement."
    )


class UpdateCheckSerializer(serializers.Serializer):
    update_available = serializers.BooleanField()
    reason = serializers.CharField(help_text="Why (not): new, in_progress, up_to_date, …")
    poll_interval = serializers.IntegerField()
    session_id = serializers.UUIDField(required=False)
    action_id = serializers.IntegerField(required=False)
    session_status = serializers.CharField(required=False)
    firmware_id = serializers.UUIDField(required=False)
    version = serializers.CharField(required=False)
    device_type = serializers.CharField(required=False)
    url = serializers.URLField(required=False)
    size = serializers.IntegerField(required=False)
    sha256 = serializers.CharField(required=False)
    signature = serializers.CharField(required=False, help_text="Ed25519 over `manifest`, base64.")
    key_id = serializers.CharField(required=False)
    manifest = serializers.CharField(required=False, help_text="The signed canonical JSON.")
    min_version = serializers.CharField(required=False, allow_null=True)
    is_rollback = serializers.BooleanField(required=False)
    release_counter = serializers.IntegerField(
        required=False, help_text="Also in the signed manifest and the TUF target's custom."
    )
    tuf_target = serializers.CharField(
        required=False,
        allow_null=True,
        help_text="The path of this firmware in the TUF targets metadata (/tuf/metadata/).",
    )
    key_chain = KeyChainLinkSerializer(
        many=True,
        required=False,
        help_text="Endorsements from the oldest non-retired key to `key_id`, oldest first.",
    )
    retired_keys = RetiredKeyStatementSerializer(many=True, required=False)


class StatusReportSerializer(serializers.Serializer):
    session_id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=REPORTABLE)
    progress = serializers.IntegerField(min_value=0, max_value=100, required=False)
    error_message = serializers.CharField(max_length=4000, required=False, allow_blank=True)


class ValidationSerializer(serializers.Serializer):
    session_id = serializers.UUIDField()
    success = serializers.BooleanField()
    version = serializers.CharField(
        max_length=64,
        required=False,
        validators=[validate_version],
        help_text="The version the device runs after the reboot.",
    )
    error_message = serializers.CharField(max_length=4000, required=False, allow_blank=True)


class SessionSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="uuid", read_only=True)
    action_id = serializers.IntegerField(source="pk", read_only=True)
    version = serializers.CharField(source="firmware.version", read_only=True)

    def get_fields(self) -> dict[str, serializers.Field]:
        """The fields are built from the model once per class, then copied for each serializer.

        Building them is most of this serializer's cost, and it answers every device status
        report (docs/performance.md). They depend on Meta only, never on the instance or context;
        each serializer still gets its own copies, because DRF binds a field to its parent.
        """
        cls = type(self)
        built = cls.__dict__.get("_built_fields")
        if built is None:
            built = super().get_fields()
            cls._built_fields = built  # type: ignore[attr-defined]
        return copy.deepcopy(built)

    class Meta:
        model = UpdateSession
        fields = [
            "id",
            "action_id",
            "device",
            "firmware",
            "version",
            "rollout",
            "from_version",
            "is_rollback",
            "status",
            "progress",
            "error_message",
            "started_at",
            "updated_at",
            "completed_at",
            "duration",
            "cancel_acknowledged_at",
        ]
        read_only_fields = fields


class ReportReplySerializer(serializers.Serializer):
    applied = serializers.BooleanField(help_text="False when the report changed nothing.")
    session = SessionSerializer()
