from __future__ import annotations

import json
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.core.validators import RegexValidator
from django.urls import reverse
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail

from firmware.models import Firmware, SigningKey
from firmware.swu import looks_like_swu
from ota_site.validators import device_type_validator, validate_version

dependency_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:\s*(?:==|!=|>=|<=|>|<)\s*v?\d[0-9A-Za-z.+-]{0,63})?\Z",
    "A dependency is a component name with an optional version constraint, like 'bootloader>=2.1'.",
    code="invalid_dependency",
)


class DependenciesField(serializers.ListField):
    """Component constraints, sent as repeated form fields or as one JSON array."""

    child = serializers.CharField(max_length=128, validators=[dependency_validator])
    max_length = 32

    def to_internal_value(self, data: Any) -> list[Any]:
        if isinstance(data, list) and len(data) == 1 and str(data[0]).lstrip().startswith("["):
            data = data[0]
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                self.fail("not_a_list", input_type="text that is not a JSON array")
        return super().to_internal_value(data)


class FirmwareUploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=False, use_url=False)
    version = serializers.CharField(
        max_length=64,
        validators=[validate_version],
        required=False,
        allow_blank=True,
        help_text="Required, except for a SWUpdate image (.swu): then it defaults to the "
        "version in its sw-description and must equal it when given.",
    )
    device_type = serializers.CharField(max_length=64, validators=[device_type_validator])
    release_notes = serializers.CharField(
        max_length=20_000, required=False, allow_blank=True, default=""
    )
    min_version = serializers.CharField(
        max_length=64, required=False, allow_blank=True, validators=[validate_version]
    )
    dependencies = DependenciesField(required=False)
    release_counter = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=2**31 - 1,
        help_text="Devices refuse firmware whose counter is below the highest they installed. "
        "Default: the highest counter of this device type.",
    )

    def to_internal_value(self, data: Any) -> Any:
        """The fields, with ``version`` required (the same errors as a required field) unless
        the file is a .swu; then a blank or missing version comes out as None."""
        errors: dict[str, Any] = {}
        values: Any = None
        try:
            values = super().to_internal_value(data)
        except serializers.ValidationError as exc:
            errors = dict(exc.detail) if isinstance(exc.detail, dict) else {}
            if not errors:
                raise
        raw = data.get("version") if hasattr(data, "get") else None
        if "version" not in errors and not str(raw or "").strip():
            upload = data.get("file") if hasattr(data, "get") else None
            if isinstance(upload, UploadedFile) and looks_like_swu(upload):
                if values is not None:
                    values["version"] = None
            else:
                key = "required" if raw is None else "blank"
                message = self.fields["version"].error_messages[key]
                errors["version"] = [ErrorDetail(str(message), code=key)]
        if errors:
            raise serializers.ValidationError(errors)
        return values


class FirmwareSerializer(serializers.ModelSerializer):
    size = serializers.IntegerField(source="file_size")
    sha256 = serializers.CharField(source="checksum")
    published = serializers.BooleanField(source="is_published")
    release_notes = serializers.SerializerMethodField()
    min_version = serializers.CharField(allow_null=True)
    dependencies = serializers.SerializerMethodField()
    key_id = serializers.CharField(allow_null=True)
    download_url = serializers.SerializerMethodField()
    swu = serializers.SerializerMethodField(
        help_text="For a SWUpdate image: version, hardware_compatibility and description from "
        "its sw-description; null otherwise."
    )

    class Meta:
        model = Firmware
        fields = [
            "id",
            "version",
            "device_type",
            "filename",
            "size",
            "sha256",
            "sha1",
            "md5",
            "release_notes",
            "min_version",
            "dependencies",
            "release_counter",
            "published",
            "published_at",
            "created_at",
            "manifest",
            "signature",
            "key_id",
            "download_url",
            "swu",
        ]
        read_only_fields = fields

    def get_release_notes(self, obj: Firmware) -> str:
        return str(obj.metadata.get("release_notes") or "")

    def get_dependencies(self, obj: Firmware) -> list[str]:
        value = obj.metadata.get("dependencies") or []
        return [str(item) for item in value]

    def get_swu(self, obj: Firmware) -> dict[str, Any] | None:
        value = obj.metadata.get("swu")
        return value if isinstance(value, dict) else None

    def get_download_url(self, obj: Firmware) -> str:
        path = reverse("firmware-download", kwargs={"firmware_id": obj.id})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class SigningKeySerializer(serializers.ModelSerializer):
    """A key's public facts, including the signed statements devices check (never the private
    half). ``endorsement`` is ``endorsed_by``'s signature over the key's endorsement statement;
    ``retirement`` is ``retired_by``'s signature over its retirement statement
    (firmware.signing)."""

    endorsed_by = serializers.CharField(source="endorsed_by_id", allow_null=True)
    retired_by = serializers.CharField(source="retired_by_id", allow_null=True)

    class Meta:
        model = SigningKey
        fields = [
            "key_id",
            "algorithm",
            "public_key",
            "is_active",
            "status",
            "endorsed_by",
            "endorsement",
            "created_at",
            "retired_at",
            "retired_by",
            "retirement",
        ]
        read_only_fields = fields


class RetiredKeySerializer(serializers.Serializer):
    key = SigningKeySerializer()
    resigned = serializers.IntegerField(
        help_text="Published firmware re-signed with the current key."
    )
