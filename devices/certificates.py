"""The device CA, device certificates and revocation: every state change of them (views, admin and
commands call these, also through their re-exports in devices.services).

Enrollment by CSR builds on devices.services.register_device; the certificate checks themselves
(CSR rules, issuing, verifying a forwarded certificate) are in devices.ca.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from devices import ca
from devices.models import Device, DeviceCA, DeviceCertificate
from devices.services import AuthenticationError, check_credentials, register_device
from ota_site import keystore
from ota_site.errors import ServiceError, StateConflict
from ota_site.events import actor_of, record_event
from ota_site.models import EventKind


def active_ca() -> DeviceCA:
    """The CA that issues now; ServiceError (503) until an admin has run ``device_ca init``."""
    issuer = DeviceCA.objects.filter(active=True).first()
    if issuer is None:
        raise ServiceError(
            "No device CA exists yet; an admin creates it with `manage.py device_ca init`.",
            code="device_ca_missing",
            status_code=503,
        )
    return issuer


def trusted_cas() -> list[DeviceCA]:
    """The CAs whose certificates devices may still present: every CA that has not expired.

    After a rotation the former CA stays here until it expires, so the certificates it issued
    keep working until they expire or are renewed (by the new CA).
    """
    return list(DeviceCA.objects.filter(not_after__gt=timezone.now()).order_by("-created_at"))


def create_device_ca(
    *, common_name: str, days: int, rotate: bool = False, actor: Any = None
) -> DeviceCA:
    """Create the device CA; with ``rotate``, a new one that replaces the active one for issuing.

    Refused while a CA exists unless ``rotate``: a second CA by accident would split the fleet.
    """
    if not common_name or len(common_name) > 64:
        raise ServiceError("The common name must have 1 to 64 characters.", code="invalid_name")
    key, certificate = ca.create_ca(common_name, days=days)
    sealed = keystore.seal_private_key(key, purpose=ca.KEY_PURPOSE)
    with transaction.atomic():
        current = DeviceCA.objects.select_for_update().filter(active=True).first()
        if current is not None and not rotate:
            raise StateConflict(
                "A device CA exists. Use --rotate to replace it (certificates it issued stay "
                "valid until they expire).",
                code="device_ca_exists",
            )
        if current is not None:
            DeviceCA.objects.filter(pk=current.pk).update(active=False)
        try:
            with transaction.atomic():
                issuer = DeviceCA.objects.create(
                    common_name=common_name,
                    certificate=ca.to_pem(certificate),
                    private_key=sealed,
                    key_id=ca.subject_key_id(certificate),
                    fingerprint=ca.fingerprint(certificate),
                    not_before=certificate.not_valid_before_utc,
                    not_after=certificate.not_valid_after_utc,
                    active=True,
                )
        except IntegrityError as exc:  # another init won the race
            raise StateConflict(
                "A device CA was created meanwhile.", code="device_ca_exists"
            ) from exc
        record_event(
            EventKind.DEVICE_CA_CREATED,
            actor=actor_of(actor),
            data={
                "ca": str(issuer.id),
                "key_id": issuer.key_id,
                "fingerprint": issuer.fingerprint,
                "not_after": issuer.not_after.isoformat(),
                "replaces": str(current.id) if current is not None else None,
            },
        )
    return issuer


def issue_certificate(device: Device, csr_pem: str, *, actor: Any = None) -> DeviceCertificate:
    """Sign a device's CSR with the active CA (the CSR is checked by devices.ca.load_csr)."""
    csr = ca.load_csr(csr_pem)
    issuer = active_ca()
    try:
        ca_key = keystore.unseal_private_key(issuer.private_key, purpose=ca.KEY_PURPOSE)
    except keystore.KeystoreError as exc:
        raise ServiceError(
            f"The device CA key cannot be opened: {exc}.",
            code="device_ca_unavailable",
            status_code=503,
        ) from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ServiceError(
            "The device CA key is not an EC key.", code="device_ca_unavailable", status_code=503
        )
    issued = ca.issue(
        csr,
        device_id=device.id,
        ca_certificate=ca.load_certificate(issuer.certificate),
        ca_key=ca_key,
        days=settings.DEVICE_CERT_LIFETIME_DAYS,
    )
    with transaction.atomic():
        record = DeviceCertificate.objects.create(
            device=device,
            ca=issuer,
            serial=issued.serial,
            fingerprint=issued.fingerprint,
            not_before=issued.certificate.not_valid_before_utc,
            not_after=issued.certificate.not_valid_after_utc,
            certificate=issued.pem,
        )
        record_event(
            EventKind.DEVICE_CERTIFICATE_ISSUED,
            actor=actor_of(actor) if actor is not None else f"device:{device.id}",
            device_id=device.id,
            data={
                "serial": record.serial,
                "fingerprint": record.fingerprint,
                "ca": issuer.key_id,
                "not_after": record.not_after.isoformat(),
            },
        )
    return record


def enroll_with_csr(
    *,
    enrollment_token: str,
    hardware_id: str,
    device_type: str,
    csr: str,
    current_version: str = "",
    metadata: dict[str, Any] | None = None,
) -> tuple[Device, DeviceCertificate]:
    """Enroll a device by CSR: the register_device rules, answered with a certificate.

    The CSR and the CA are checked before the enrollment token is used, and the enrollment and the
    certificate are one transaction, so a refusal costs the token no use. The device also gets a
    random secret that nobody learns: it marks the row as enrolled (a second enrollment of the
    same hardware is refused), while the device authenticates with its certificate.
    """
    ca.load_csr(csr)
    active_ca()
    with transaction.atomic():
        device, _unused_secret = register_device(
            enrollment_token=enrollment_token,
            hardware_id=hardware_id,
            device_type=device_type,
            current_version=current_version,
            metadata=metadata,
        )
        certificate = issue_certificate(device, csr)
    return device, certificate


def renew_certificate(device_id: Any, generation: int, csr_pem: str) -> DeviceCertificate:
    """A device asks for a new certificate with its access token (before the old one expires).

    Earlier certificates stay valid until they expire: a device that loses power before storing
    the new one must still be able to connect. Revoking the device revokes them all.
    """
    device = Device.objects.filter(pk=device_id).first()
    if device is None:
        raise AuthenticationError("This device no longer exists.", code="device_not_found")
    check_credentials(device, generation)
    return issue_certificate(device, csr_pem)


def authenticate_certificate(forwarded_pem: str) -> Device:
    """The device a client certificate (verified by nginx, forwarded by it) belongs to.

    Checked again here: a certificate this server issued and recorded (found by fingerprint),
    signed by that CA, within its validity and the CA's, not revoked, its device not revoked, and
    its subject that device's id.
    """
    refused = "The client certificate is not accepted: {}."
    try:
        certificate = ca.parse_forwarded(forwarded_pem)
    except ca.CertificateError as exc:
        raise AuthenticationError(exc.detail, code=exc.code) from exc
    record = (
        DeviceCertificate.objects.select_related("ca", "device")
        .filter(fingerprint=ca.fingerprint(certificate))
        .first()
    )
    if record is None:
        raise AuthenticationError(
            refused.format("this server did not issue it"), code="certificate_unknown"
        )
    problem = ca.problem_with(certificate, ca.load_certificate(record.ca.certificate))
    if problem is not None:
        code = "certificate_expired" if "expired" in problem else "certificate_invalid"
        raise AuthenticationError(refused.format(problem), code=code)
    if ca.device_id_of(certificate) != record.device_id:
        raise AuthenticationError(
            refused.format("it names another device"), code="certificate_invalid"
        )
    if record.revoked_at is not None:
        raise AuthenticationError(refused.format("it is revoked"), code="certificate_revoked")
    if record.device.revoked_at is not None:
        raise AuthenticationError("This device has been revoked.", code="device_revoked")
    return record.device


def revoke_certificate(certificate: DeviceCertificate, *, actor: Any = None) -> bool:
    """Revoke one certificate (a key that leaked); False if it was revoked already."""
    with transaction.atomic():
        updated = DeviceCertificate.objects.filter(
            pk=certificate.pk, revoked_at__isnull=True
        ).update(revoked_at=timezone.now())
        if updated:
            record_event(
                EventKind.DEVICE_CERTIFICATE_REVOKED,
                actor=actor_of(actor),
                device_id=certificate.device_id,
                data={"serial": certificate.serial, "fingerprint": certificate.fingerprint},
            )
    certificate.refresh_from_db(fields=["revoked_at"])
    return bool(updated)


def revoke_device(device: Device, *, actor: Any = None, reason: str = "") -> Device:
    """Lock a device out for good: no secret, no valid certificate, no valid token.

    Bumping credential_generation refuses its tokens at once on every endpoint that reads the
    device row (poll, heartbeat, status, validation, renewal), and everywhere else when they
    expire (DEVICE_JWT_LIFETIME, 15 minutes by default). The row and its history stay; deleting
    it lets the hardware enroll again as a new device.
    """
    now = timezone.now()
    with transaction.atomic():
        updated = Device.objects.filter(pk=device.pk, revoked_at__isnull=True).update(
            revoked_at=now,
            secret_hash="",
            credential_generation=F("credential_generation") + 1,
            updated_at=now,
        )
        if not updated:
            raise StateConflict("The device is already revoked.", code="already_revoked")
        certificates = DeviceCertificate.objects.filter(device=device, revoked_at__isnull=True)
        serials = list(certificates.values_list("serial", flat=True))
        certificates.update(revoked_at=now)
        record_event(
            EventKind.DEVICE_REVOKED,
            actor=actor_of(actor),
            device_id=device.id,
            data={"hardware_id": device.hardware_id, "certificates": serials, "reason": reason},
        )
    device.refresh_from_db()
    return device
