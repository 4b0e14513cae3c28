"""Rollouts with ordered stages, and the update sessions that carry one device through one
update."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from devices.models import Device, DeviceGroup
from firmware.models import Firmware


class RolloutStatus(models.TextChoices):
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class Rollout(models.Model):
    """One firmware offered to a targeted part of the fleet, stage by stage.

    The engine that starts, advances and rolls back rollouts arrives with the rollout issue; the
    schema is here from the start so that sessions can name the rollout they belong to.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    firmware = models.ForeignKey(Firmware, on_delete=models.PROTECT, related_name="rollouts")
    status = models.CharField(
        max_length=16, choices=RolloutStatus.choices, default=RolloutStatus.SCHEDULED
    )
    target_groups = models.ManyToManyField(DeviceGroup, blank=True, related_name="rollouts")
    success_threshold = models.FloatField(
        default=0.95, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)]
    )
    rollback_threshold = models.FloatField(
        default=0.05, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)]
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status"], name="rollout_status_idx")]

    def __str__(self) -> str:
        return self.name


class RolloutStage(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="stages")
    position = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=100)
    percentage = models.PositiveSmallIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    min_duration = models.PositiveIntegerField(default=0, help_text="Minimum soak time, seconds.")
    start_time = models.DateTimeField(null=True, blank=True)
    completion_time = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["rollout", "position"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "position"], name="stage_unique_position")
        ]

    def __str__(self) -> str:
        return f"{self.rollout} / {self.name} ({self.percentage}%)"


class SessionStatus(models.TextChoices):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    VALIDATING = "validating"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_STATUSES = (
    SessionStatus.PENDING,
    SessionStatus.DOWNLOADING,
    SessionStatus.INSTALLING,
    SessionStatus.VALIDATING,
)
FINISHED_STATUSES = (SessionStatus.SUCCESS, SessionStatus.FAILED, SessionStatus.CANCELLED)
# A report may only move a session forward along this order; finished sessions never change.
STATUS_RANK = {
    SessionStatus.PENDING: 0,
    SessionStatus.DOWNLOADING: 1,
    SessionStatus.INSTALLING: 2,
    SessionStatus.VALIDATING: 3,
    SessionStatus.SUCCESS: 4,
    SessionStatus.FAILED: 4,
    SessionStatus.CANCELLED: 4,
}


class UpdateSession(models.Model):
    """One device taking one firmware from offer to success, failure or cancellation.

    ``id`` is sequential because hawkBit DDI clients read action ids as integers; ``uuid`` is the
    public id of our own API (the spec's UpdateSession.id).
    """

    id = models.BigAutoField(primary_key=True)
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="sessions")
    firmware = models.ForeignKey(Firmware, on_delete=models.PROTECT, related_name="sessions")
    rollout = models.ForeignKey(
        Rollout, null=True, blank=True, on_delete=models.PROTECT, related_name="sessions"
    )
    from_version = models.CharField(max_length=64, blank=True)
    # An operator-approved move to a lower version; the client refuses downgrades otherwise.
    is_rollback = models.BooleanField(default=False)
    status = models.CharField(
        max_length=16, choices=SessionStatus.choices, default=SessionStatus.PENDING
    )
    progress = models.PositiveSmallIntegerField(
        default=0, validators=[MinValueValidator(0), MaxValueValidator(100)]
    )
    error_message = models.TextField(null=True, blank=True)  # noqa: DJ001 - the spec's nullable
    started_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    duration = models.PositiveIntegerField(null=True, blank=True, help_text="Seconds.")

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [
            # A device's history, newest first; also the poll's "latest session" lookup.
            models.Index(fields=["device", "started_at"], name="session_device_started_idx"),
            # Rollout evaluation and dashboards count sessions by status.
            models.Index(fields=["status"], name="session_status_idx"),
            models.Index(fields=["rollout", "status"], name="session_rollout_status_idx"),
        ]
        constraints = [
            # At most one open session per device, even under concurrent polls.
            models.UniqueConstraint(
                fields=["device"],
                condition=models.Q(status__in=OPEN_STATUSES),
                name="session_one_open_per_device",
            )
        ]

    def __str__(self) -> str:
        return f"session {self.id} ({self.status})"

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES
