"""Firmware images and the keys that sign them."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class SigningKey(models.Model):
    """A public key that firmware manifests are signed with; devices trust keys by key_id.

    The private half lives outside the database (FIRMWARE_SIGNING_KEY_PATH).
    """

    class Algorithm(models.TextChoices):
        ED25519 = "ed25519"

    key_id = models.CharField(max_length=32, primary_key=True)
    algorithm = models.CharField(
        max_length=16, choices=Algorithm.choices, default=Algorithm.ED25519
    )
    public_key = models.CharField(max_length=100, help_text="Raw public key, base64.")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.key_id}"


class Firmware(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    version = models.CharField(max_length=64)
    # ota_site.versions sort key: 1.10.0 sorts after 1.9.0, and 1.2 == 1.2.0 for uniqueness.
    version_key = models.CharField(max_length=128, editable=False)
    device_type = models.CharField(max_length=64)
    file = models.FileField(max_length=300, upload_to="firmware/")  # name set by the service
    filename = models.CharField(max_length=255, help_text="The uploaded file's name.")
    file_size = models.PositiveBigIntegerField()
    checksum = models.CharField("SHA-256", max_length=64)
    # sha1 and md5 too: hawkBit DDI clients expect all three in an artifact's hashes.
    sha1 = models.CharField(max_length=40)
    md5 = models.CharField(max_length=32)
    metadata = models.JSONField(
        default=dict, blank=True, help_text="release_notes, min_version, dependencies."
    )
    # The canonical manifest (compact JSON, sorted keys) exactly as signed, and its signature.
    manifest = models.TextField(blank=True, editable=False)
    signature = models.CharField(max_length=100, blank=True, editable=False)
    signing_key = models.ForeignKey(
        SigningKey, null=True, blank=True, on_delete=models.PROTECT, editable=False
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["device_type", "-version_key"]
        constraints = [
            models.UniqueConstraint(
                fields=["device_type", "version_key"], name="firmware_unique_type_version"
            )
        ]
        indexes = [
            models.Index(fields=["version"], name="firmware_version_idx"),
            # "Latest published firmware for a device type".
            models.Index(
                fields=["device_type", "published_at"], name="firmware_type_published_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.device_type} {self.version}"

    @property
    def is_published(self) -> bool:
        return self.published_at is not None

    @property
    def min_version(self) -> str | None:
        value = self.metadata.get("min_version")
        return value if isinstance(value, str) and value else None

    @property
    def key_id(self) -> str | None:
        return self.signing_key_id
