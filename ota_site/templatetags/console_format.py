"""Small formatting helpers for the console's templates: ``{% load console_format %}``.

``{{ when|ago }}``              "just now" under a minute, else Django's timesince + " ago".
``{% device_ref id label %}``   a short, linked device reference: ``label`` (a hardware id) or
                                the first 8 hex digits of the id, linking to /devices/<id>/, the
                                full id in its title (static/console/rollout.js builds the same).
``{% actor_ref actor shown %}`` an event's actor: ``device:<id>`` as a device_ref (nothing when
                                it is ``shown``, the device the row names already), else text.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.timesince import timesince

register = template.Library()

DEVICE_PREFIX = "device:"


@register.filter
def ago(value: datetime | None) -> str:
    if not value:
        return ""
    if timezone.now() - value < timedelta(minutes=1):  # also a clock a little ahead
        return "just now"
    return f"{timesince(value)} ago"


@register.simple_tag
def device_ref(device_id: Any, label: Any = None) -> SafeString | str:
    if not device_id:
        return ""
    full = str(device_id)
    return format_html(
        '<a class="mono device-ref" href="/devices/{}/" title="device {}">{}</a>',
        full,
        full,
        label or full.replace("-", "")[:8],
    )


@register.simple_tag
def actor_ref(actor: str | None, shown: Any = None) -> SafeString | str:
    if not actor:
        return ""
    if actor.startswith(DEVICE_PREFIX):
        try:
            device_id = uuid.UUID(actor[len(DEVICE_PREFIX) :])
        except ValueError:
            return actor
        if shown and str(shown) == str(device_id):
            return ""
        return device_ref(device_id)
    return actor
