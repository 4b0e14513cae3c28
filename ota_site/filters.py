"""Query filters shared by the API's lists."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField


class UtcDateTimeField(IsoDateTimeField):
    """An ISO 8601 date and time, converted to UTC before it reaches the database.

    A client may send any offset Python accepts (up to ±23:59) and any year from 1 to 9999, but
    PostgreSQL refuses offsets beyond ±15:59 and a time that falls before year 1 in UTC: passed
    on as they were, they made the query fail with a 500. In UTC there is no offset left to
    refuse, and a time that does not exist in UTC is the client's 400.
    """

    def to_python(self, value: Any) -> datetime | None:
        parsed: datetime | None = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError as exc:
            raise forms.ValidationError("This time is out of range.", code="overflow") from exc


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField
