"""The append-only event log shared by every app.

One row per change of a device, firmware, rollout or update session: the history shown in the
console, the audit trail, and the source the live streams read from (a WebSocket client resumes
from the last event id it saw). Rows name their subjects by id rather than by foreign key so that
history outlives the device, firmware or rollout it describes, and so this lowest layer does not
depend on the apps above it.
"""

from __future__ import annotations

from typing import Any

from django.db import models


class EventKind(models.TextChoices):
    DEVICE_REGISTERED = "device.registered"
    DEVICE_UPDATED = "device.updated"
    DEVICE_DELETED = "device.deleted"
    DEVICE_CREDENTIALS_RESET = "device.credentials_reset"
    GROUP_CHANGED = "group.changed"
    FIRMWARE_UPLOADED = "firmware.uploaded"
    FIRMWARE_PUBLISHED = "firmware.published"
    FIRMWARE_DELETED = "firmware.deleted"
    SESSION_PROGRESS = "session.progress"
    SESSION_FINISHED = "session.finished"
    SESSION_CANCELLED = "session.cancelled"
    ROLLOUT_CREATED = "rollout.created"
    ROLLOUT_UPDATED = "rollout.updated"
    ROLLOUT_STARTED = "rollout.started"
    ROLLOUT_PAUSED = "rollout.paused"
    ROLLOUT_RESUMED = "rollout.resumed"
    ROLLOUT_ADVANCED = "rollout.advanced"
    ROLLOUT_COMPLETED = "rollout.completed"
    ROLLOUT_CANCELLED = "rollout.cancelled"
    ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
    SESSIONS_TIMED_OUT = "sessions.timed_out"
    ENROLLMENT_TOKEN_CREATED = "enrollment_token.created"
    ENROLLMENT_TOKEN_REVOKED = "enrollment_token.revoked"


class EventQuerySet(models.QuerySet["Event"]):
    def update(self, **kwargs: Any) -> int:
        raise TypeError("events are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("events are append-only; archive them with a management command")


class Event(models.Model):
    # Sequential id: streams and pollers resume "after id N", so ids must only grow.
    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=40, choices=EventKind.choices)
    actor = models.CharField(max_length=100, blank=True, help_text="user:<name>, device:<id> …")
    device_id = models.UUIDField(null=True, blank=True)
    firmware_id = models.UUIDField(null=True, blank=True)
    rollout_id = models.UUIDField(null=True, blank=True)
    session_id = models.BigIntegerField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [
            # A device's or a rollout's history, read in order from a given id (streams, pages).
            models.Index(fields=["device_id", "id"], name="event_device_idx"),
            models.Index(fields=["rollout_id", "id"], name="event_rollout_idx"),
            models.Index(fields=["session_id"], name="event_session_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise TypeError("events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise TypeError("events are append-only")

    def as_message(self) -> dict[str, Any]:
        """The typed JSON message that streams send for this event."""
        return {
            "type": self.kind,
            "id": self.id,
            "at": self.created_at.isoformat(),
            "device_id": str(self.device_id) if self.device_id else None,
            "firmware_id": str(self.firmware_id) if self.firmware_id else None,
            "rollout_id": str(self.rollout_id) if self.rollout_id else None,
            "session_id": self.session_id,
            "data": self.data,
        }
