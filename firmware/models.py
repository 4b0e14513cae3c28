"""Firmware images and the keys that sign them."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class SigningKey(models.Model):
    """An Ed25519 key that signs firmware manifests; devices trust keys by key_id.

    The private half is stored sealed (``ota_site.keystore``: AES-GCM under the master key), never
    in the clear; or, with the ``pkcs11`` backend, it is generated in and never leaves a PKCS#11
    token (an HSM), where the key object is labelled with the key id (``firmware.hsm``). One key
    is ``current`` and signs new firmware. Rotation makes a new current key *endorsed* by the one
    before (``endorsement`` is the old key's signature over the new key's statement), so a device
    that trusts only the old key can learn the new one through a signed chain. A ``previous`` key
    still verifies what it signed; a ``retired`` key signs and endorses nothing more and devices
    drop it once they know a newer key.
    """

    class Algorithm(models.TextChoices):
        ED25519 = "ed25519"

    class Status(models.TextChoices):
        CURRENT = "current"
        PREVIOUS = "previous"
        RETIRED = "retired"

    class Backend(models.TextChoices):
        SEALED = "sealed", "sealed in the database"
        PKCS11 = "pkcs11", "PKCS#11 token (HSM)"

    key_id = models.CharField(max_length=32, primary_key=True)
    algorithm = models.CharField(
        max_length=16, choices=Algorithm.choices, default=Algorithm.ED25519
    )
    public_key = models.CharField(max_length=100, help_text="Raw public key, base64.")
    # Kept so existing API clients keep working: True unless retired.
    is_active = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CURRENT)
    # Where the private half lives. Per key, not a global switch: an installation that moves into
    # an HSM keeps verifying (and can retire) its older sealed keys.
    backend = models.CharField(
        max_length=16, choices=Backend.choices, default=Backend.SEALED, editable=False
    )
    private_key = models.TextField(
        blank=True,
        editable=False,
        help_text="The private key, sealed (an envelope); never plain. Empty for pkcs11 keys.",
    )
    endorsed_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="endorsed"
    )
    endorsement = models.CharField(
        max_length=100, blank=True, help_text="The endorsing key's signature (base64)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    # The retirement statement is signed by the key that was current then, so a device can drop
    # a retired key on the word of a key it trusts, never on the server's unsigned say-so.
    retired_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    retirement = models.CharField(
        max_length=100, blank=True, help_text="The retiring key's signature (base64)."
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["status"],
                condition=models.Q(status="current"),
                name="signingkey_one_current",
            )
        ]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.key_id}"


class TufRole(models.TextChoices):
    ROOT = "root"
    TARGETS = "targets"
    SNAPSHOT = "snapshot"
    TIMESTAMP = "timestamp"


class TufKey(models.Model):
    """A key of the TUF repository. Online keys (targets, snapshot, timestamp) keep their private
    half sealed here so the server can sign; root keys are offline: only the public half is known
    to the server, and root metadata is signed by whoever holds the key files."""

    keyid = models.CharField(max_length=64, primary_key=True)
    role = models.CharField(max_length=16, choices=TufRole.choices)
    public = models.JSONField(
        help_text="The key as TUF metadata lists it (keytype, scheme, keyval)."
    )
    private_key = models.TextField(
        blank=True, editable=False, help_text="Sealed; empty if offline."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["role", "created_at"]

    def __str__(self) -> str:
        return f"{self.role}:{self.keyid[:16]}"


class TufMetadata(models.Model):
    """One signed version of one TUF role, stored exactly as served under /tuf/metadata/."""

    id = models.BigAutoField(primary_key=True)
    role = models.CharField(max_length=16, choices=TufRole.choices)
    version = models.PositiveIntegerField()
    content = models.BinaryField(help_text="The JSON bytes served to clients.")
    expires = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["role", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["role", "version"], name="tufmetadata_role_version")
        ]

    def __str__(self) -> str:
        return f"{self.version}.{self.role}.json"


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
    # A security counter (like Android's rollback index): devices refuse firmware whose counter
    # is below the highest they have installed. New firmware inherits its type's highest counter;
    # an operator raises it when older images must never be installed again.
    release_counter = models.PositiveIntegerField(default=0)
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
    # Set when the stored bytes no longer match the checksum (firmware.services.verify_storage):
    # the firmware is withdrawn from offers and downloads until its bytes are restored.
    quarantined_at = models.DateTimeField(null=True, blank=True, editable=False)

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
