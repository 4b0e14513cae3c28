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
    # Stopped by its rollback threshold with auto_rollback on: the devices that installed the new
    # firmware were offered their previous one. Final, like cancelled: fix the firmware and start
    # a new rollout.
    ROLLED_BACK = "rolled_back"


# Rollouts that still decide what devices get (the poll and the one-rollout-per-device rule).
LIVE_ROLLOUT_STATUSES = (RolloutStatus.SCHEDULED, RolloutStatus.ACTIVE, RolloutStatus.PAUSED)
FINAL_ROLLOUT_STATUSES = (
    RolloutStatus.COMPLETED,
    RolloutStatus.CANCELLED,
    RolloutStatus.ROLLED_BACK,
)


class Rollout(models.Model):
    """One firmware offered to a targeted part of the fleet, stage by stage.

    Targeting: the firmware's device type, optionally only members of ``target_groups``, devices
    whose current version lies in [from_version_min, from_version_max], and devices whose metadata
    has every key/value of ``metadata_filters``. Stage membership is deterministic: a device is in
    once ota_bucket(device, rollout) < the current stage's percentage x 100 (rollouts.buckets).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    firmware = models.ForeignKey(Firmware, on_delete=models.PROTECT, related_name="rollouts")
    device_type = models.CharField(max_length=64, help_text="Always the firmware's device type.")
    status = models.CharField(
        max_length=16, choices=RolloutStatus.choices, default=RolloutStatus.SCHEDULED
    )
    target_groups = models.ManyToManyField(DeviceGroup, blank=True, related_name="rollouts")
    from_version_min = models.CharField(max_length=64, blank=True)
    from_version_max = models.CharField(max_length=64, blank=True)
    metadata_filters = models.JSONField(default=dict, blank=True)
    success_threshold = models.FloatField(
        default=0.95, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)]
    )
    rollback_threshold = models.FloatField(
        default=0.05, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)]
    )
    min_devices = models.PositiveIntegerField(
        default=5, help_text="Finished devices a stage needs before it is judged."
    )
    device_timeout = models.PositiveIntegerField(
        default=3600, help_text="Seconds a session may stay open before it counts as failed."
    )
    auto_rollback = models.BooleanField(default=True)
    start_at = models.DateTimeField(null=True, blank=True)
    # Index into the ordered stages; null until the rollout starts.
    current_stage = models.PositiveSmallIntegerField(null=True, blank=True)
    stage_started_at = models.DateTimeField(null=True, blank=True)
    status_reason = models.TextField(blank=True, help_text="Why it last paused or stopped.")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status"], name="rollout_status_idx")]

    def __str__(self) -> str:
        return self.name

    @property
    def is_live(self) -> bool:
        return self.status in LIVE_ROLLOUT_STATUSES


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
    # The rollout stage that was current when the device joined: per-stage rates in one GROUP BY.
    stage = models.PositiveSmallIntegerField(null=True, blank=True)
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
    # hawkBit DDI devices confirm a cancellation (cancelAction feedback); until then their poll
    # carries the cancel instead of a new action.
    cancel_acknowledged_at = models.DateTimeField(null=True, blank=True)

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
