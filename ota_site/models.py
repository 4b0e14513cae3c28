"""The append-only event log shared by every app, and the API keys of automation.

One event row per change of a device, firmware, rollout or update session: the history shown in
the console, the audit trail (who, from where, what, before and after), and the source the live
streams read from (a WebSocket client resumes from the last event id it saw). Rows name their
subjects by id rather than by foreign key so that history outlives the device, firmware or rollout
it describes, and so this lowest layer does not depend on the apps above it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


class EventKind(models.TextChoices):
    DEVICE_REGISTERED = "device.registered"
    DEVICE_UPDATED = "device.updated"
    DEVICE_DELETED = "device.deleted"
    DEVICE_CREDENTIALS_RESET = "device.credentials_reset"
    DEVICE_REVOKED = "device.revoked"
    DEVICE_CERTIFICATE_ISSUED = "device.certificate_issued"
    DEVICE_CERTIFICATE_REVOKED = "device.certificate_revoked"
    DEVICE_TARGET_TOKEN_ISSUED = "device.target_token_issued"
    DEVICE_TARGET_TOKEN_REVOKED = "device.target_token_revoked"
    DEVICE_ATTRIBUTES_UPDATED = "device.attributes_updated"
    DEVICE_CA_CREATED = "device_ca.created"
    GROUP_CHANGED = "group.changed"
    FIRMWARE_UPLOADED = "firmware.uploaded"
    FIRMWARE_PUBLISHED = "firmware.published"
    FIRMWARE_DELETED = "firmware.deleted"
    FIRMWARE_QUARANTINED = "firmware.quarantined"
    FIRMWARE_RESTORED = "firmware.restored"
    SIGNING_KEY_CREATED = "signing_key.created"
    SIGNING_KEY_IMPORTED = "signing_key.imported"
    SIGNING_KEY_ROTATED = "signing_key.rotated"
    SIGNING_KEY_RETIRED = "signing_key.retired"
    SIGNING_KEYS_REWRAPPED = "signing_key.rewrapped"
    SESSION_PROGRESS = "session.progress"
    SESSION_FINISHED = "session.finished"
    SESSION_CANCELLED = "session.cancelled"
    SESSION_CANCEL_ACKNOWLEDGED = "session.cancel_acknowledged"
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
    # One per archive batch (rollouts.archive, ota_site.archive): the file and what it holds.
    SESSIONS_ARCHIVED = "sessions.archived"
    EVENTS_PRUNED = "events.pruned"
    ENROLLMENT_TOKEN_CREATED = "enrollment_token.created"
    ENROLLMENT_TOKEN_REVOKED = "enrollment_token.revoked"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    USER_ROLE_CHANGED = "user.role_changed"
    TUF_ROOT_SIGNED = "tuf.root_signed"
    KEYS_REWRAPPED = "keys.rewrapped"


class ActorKind(models.TextChoices):
    """Who acted, as a class: filters and the admin ask "what did people do?" this way."""

    USER = "user"
    API_KEY = "api_key"
    DEVICE = "device"
    SYSTEM = "system"


class EventQuerySet(models.QuerySet["Event"]):
    def update(self, **kwargs: Any) -> int:
        raise TypeError("events are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("events are append-only; prune them with `manage.py events prune`")


class Event(models.Model):
    # Sequential id: streams and pollers resume "after id N", so ids must only grow.
    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=40, choices=EventKind.choices)
    actor = models.CharField(
        max_length=100, blank=True, help_text="user:<name>, key:<prefix>, device:<id> …"
    )
    actor_kind = models.CharField(
        max_length=10, choices=ActorKind.choices, default=ActorKind.SYSTEM
    )
    # From where: the client address (behind trusted proxies, the forwarded one) and the request
    # id that the access logs of nginx and gunicorn carry too. Empty for Celery and commands.
    ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    device_id = models.UUIDField(null=True, blank=True)
    firmware_id = models.UUIDField(null=True, blank=True)
    rollout_id = models.UUIDField(null=True, blank=True)
    session_id = models.BigIntegerField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)
    # Before and after: {field: [before, after]}; a creation has [null, value] per field.
    changes = models.JSONField(default=dict, blank=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        indexes = [
            # A device's or a rollout's history, read in order from a given id (streams, pages).
            models.Index(fields=["device_id", "id"], name="event_device_idx"),
            models.Index(fields=["rollout_id", "id"], name="event_rollout_idx"),
            models.Index(fields=["session_id"], name="event_session_idx"),
            # "What did people and keys do?": their rows are few next to the devices' progress
            # reports, so a partial index stays small and keeps those audit queries off a scan.
            models.Index(
                fields=["actor", "id"],
                name="event_people_idx",
                condition=models.Q(actor_kind__in=["user", "api_key"]),
            ),
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


ROLE_CHOICES = [("viewer", "viewer"), ("operator", "operator"), ("admin", "admin")]


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def usable(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiKey(models.Model):
    """A credential for automation (CI pipelines), with the role it may act with.

    The token ``ota_<prefix>_<secret>`` is shown once. Only the prefix (to find the row) and an
    HMAC-SHA256 of the secret keyed by ``API_KEY_HMAC_KEY`` are stored: a leaked database (or
    backup) holds no usable credential, and without the server key the HMAC cannot even be used to
    test guesses. ``ota_site.apikeys`` creates, checks and revokes keys.
    """

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hmac = models.CharField(max_length=64, editable=False)
    # The labels of ota_site.permissions.Role (not imported: models stay below the API layer).
    role = models.CharField(max_length=10, choices=ROLE_CHOICES)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        editable=False,
        related_name="+",
    )
    # Who created it, as the audit log names them (a user, another key or a command).
    created_by_actor = models.CharField(max_length=100, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_ip = models.GenericIPAddressField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"
