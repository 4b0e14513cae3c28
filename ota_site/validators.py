"""Input rules shared by the API serializers, the admin and the manage.py commands."""

from __future__ import annotations

import json
import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

from ota_site.versions import InvalidVersion, Version

hardware_id_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z",
    "A hardware id is 1-128 letters, digits, '.', '_', ':' or '-', starting with a letter "
    "or digit.",
    code="invalid_hardware_id",
)
device_type_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z",
    "A device type is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
    code="invalid_device_type",
)
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")


def validate_version(value: str) -> None:
    try:
        Version.parse(value)
    except InvalidVersion as exc:
        raise ValidationError(str(exc), code="invalid_version") from exc


def validate_metadata(value: Any) -> None:
    """A flat-ish JSON object of bounded size with simple keys."""
    if not isinstance(value, dict):
        raise ValidationError("metadata must be a JSON object.", code="invalid_metadata")
    for key in value:
        if not _METADATA_KEY.match(key):
            raise ValidationError(
                f"metadata key {key[:70]!r} must be 1-64 letters, digits or '_.:-'.",
                code="invalid_metadata",
            )
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > settings.DEVICE_METADATA_MAX_BYTES:
        raise ValidationError(
            f"metadata is {size} bytes; the limit is {settings.DEVICE_METADATA_MAX_BYTES}.",
            code="metadata_too_large",
        )
