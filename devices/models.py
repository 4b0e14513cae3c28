"""Devices, device groups, enrollment tokens, the device CA and the certificates it issued."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from ota_site.versions import version_key


class DeviceStatus(models.TextChoices):
    IDLE = "idle"
    UPDATING = "updating"
    FAILED = "failed"
    SUCCESS = "success"


class DeviceGroup(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    # The version every member without a target of its own should run (explicit assignment).
    # As in the spec's model, null means "no assignment".
    target_version = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    # When target_version was last set: an assignment made after a failed attempt retries it.
    target_set_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Device(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    hardware_id = models.CharField(max_length=128, unique=True)
    device_type = models.CharField(max_length=64)
    current_version = models.CharField(max_length=64, blank=True)
    # ota_site.versions sort key of current_version: version order and ranges in SQL.
    current_version_key = models.CharField(max_length=128, blank=True, editable=False)
    # As in the spec's model, null means "no assignment".
    target_version = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    target_set_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=DeviceStatus.choices, default=DeviceStatus.IDLE
    )
    last_seen = models.DateTimeField(null=True, blank=True)
    group = models.ForeignKey(
        DeviceGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )
    metadata = models.JSONField(default=dict, blank=True)
    # sha256 of the device secret; empty once an operator resets the credentials, which lets the
    # same hardware_id enroll again.
    secret_hash = models.CharField(max_length=64, blank=True, editable=False)
    # Bumped when credentials are reset. Tokens carry it: the poll and the heartbeat refuse an
    # older generation at once; other calls stop accepting it when the token expires.
    credential_generation = models.PositiveIntegerField(default=1, editable=False)
    # Set by an admin who revokes the device: it loses every credential (secret, certificates,
    # tokens) and cannot enroll again under this hardware_id; delete it to let the board back in.
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["hardware_id"]
        indexes = [
            # Fleet filters and rollout targeting: "devices of type T in status S".
            models.Index(fields=["device_type", "status"], name="device_type_status_idx"),
            # Online/offline counts and "not seen since" filters.
            models.Index(fields=["last_seen"], name="device_last_seen_idx"),
            # PostgreSQL also has device_recent_idx for the console's list (migration 0003).
            # Versions in the field and version-range targeting, per device type.
            models.Index(
                fields=["device_type", "current_version_key"], name="device_type_version_idx"
            ),
        ]

    def __str__(self) -> str:
        return self.hardware_id

    def set_current_version(self, version: str) -> None:
        self.current_version = version
        self.current_version_key = version_key(version)

    @property
    def is_online(self) -> bool:
        if self.last_seen is None:
            return False
        window = timedelta(seconds=settings.DEVICE_ONLINE_WINDOW)
        return timezone.now() - self.last_seen < window

    @property
    def effective_target_version(self) -> str | None:
        """The explicitly assigned version: the device's own, else its group's."""
        if self.target_version:
            return self.target_version
        if self.group is not None and self.group.target_version:
            return self.group.target_version
        return None


class EnrollmentToken(models.Model):
    """A shared secret that lets devices register, scoped and limited by an admin.

    The token is shown once, as ``ota_enroll_<prefix>_<secret>``; only its sha256 is stored.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, unique=True, editable=False)
    token_hash = models.CharField(max_length=64, editable=False)
    device_type = models.CharField(
        max_length=64, blank=True, help_text="Only devices of this type may use it (blank: any)."
    )
    group = models.ForeignKey(
        DeviceGroup,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        help_text="Devices that enroll with it join this group.",
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    max_uses = models.PositiveIntegerField(null=True, blank=True, help_text="Blank: unlimited.")
    uses = models.PositiveIntegerField(default=0, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "exhausted"
        return "active"


class DeviceCA(models.Model):
    """The server's own certificate authority for device certificates (devices.ca).

    Its private key is stored only as an ota_site.keystore envelope (purpose ``device-ca``). One CA
    is active and issues; after a rotation the former ones stay trusted for the certificates they
    issued until those expire, so nginx's bundle (``device_ca export-cert``) lists them all.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    common_name = models.CharField(max_length=64)
    certificate = models.TextField(help_text="PEM")
    private_key = models.TextField(editable=False, help_text="A keystore envelope, never clear.")
    # Subject key identifier (hex): issued certificates name their CA by it (AuthorityKeyId).
    key_id = models.CharField(max_length=64, unique=True)
    fingerprint = models.CharField(max_length=64, unique=True, help_text="sha256 of the DER")
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "device CA"
        verbose_name_plural = "device CAs"
        constraints = [
            # Exactly one CA issues at a time; a rotation swaps it in one transaction.
            models.UniqueConstraint(
                fields=["active"], condition=models.Q(active=True), name="one_active_device_ca"
            )
        ]

    def __str__(self) -> str:
        return f"{self.common_name} ({self.key_id[:16]})"


class DeviceCertificate(models.Model):
    """A certificate the device CA issued to a device; kept so the app can refuse revoked ones."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="certificates")
    ca = models.ForeignKey(DeviceCA, on_delete=models.PROTECT, related_name="certificates")
    serial = models.CharField(max_length=40, unique=True, help_text="hex")
    # sha256 of the DER: how a certificate forwarded by nginx is found (unique index).
    fingerprint = models.CharField(max_length=64, unique=True)
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    certificate = models.TextField(help_text="PEM")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # A device's certificates, newest first (admin, revocation).
            models.Index(fields=["device", "-created_at"], name="devicecert_device_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.serial[:16]} ({self.device_id})"

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        now = timezone.now()
        if self.not_after <= now:
            return "expired"
        if self.not_before > now:
            return "not yet valid"
        return "valid"


class DdiTarget(models.Model):
    """A device that speaks hawkBit's DDI protocol (SWUpdate, rauc-hawkbit-updater, Zephyr).

    ``token_hash`` is the sha256 of its target token (``Authorization: TargetToken ...``), shown
    once when created; empty when the device authenticates with the gateway token or its client
    certificate only. ``attributes_requested`` asks the device, on its next poll, to send its
    attributes (configData), which land in ``Device.metadata``.
    """

    device = models.OneToOneField(
        Device, primary_key=True, on_delete=models.CASCADE, related_name="ddi"
    )
    token_hash = models.CharField(max_length=64, blank=True, editable=False)
    token_prefix = models.CharField(
        max_length=12, blank=True, editable=False, help_text="The token's first characters."
    )
    token_created_at = models.DateTimeField(null=True, blank=True, editable=False)
    attributes_requested = models.BooleanField(default=True)
    attributes_updated_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "DDI target"

    def __str__(self) -> str:
        return f"DDI {self.device_id}"
