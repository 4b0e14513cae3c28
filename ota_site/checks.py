"""Configuration checks with stable ids, run by every manage.py command and at server start-up.

A bad deployment fails at start with a message naming the setting, never on the first request.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import sys
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core import checks

from ota_site.keystore import parse_master_key


@checks.register(checks.Tags.compatibility)
def check_configuration(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = [
        checks.Error(message, id=check_id) for check_id, message in settings.CONFIG_ERRORS
    ]
    if settings.STORAGE not in {"local", "s3"}:
        errors.append(
            checks.Error(f"STORAGE={settings.STORAGE!r} is not 'local' or 's3'.", id="ota.E003")
        )
    elif settings.STORAGE == "s3" and not settings.AWS_STORAGE_BUCKET_NAME:
        errors.append(
            checks.Error("STORAGE=s3 needs AWS_STORAGE_BUCKET_NAME.", id="ota.E004"),
        )
    if settings.FIRMWARE_MAX_UPLOAD_SIZE <= 0:
        errors.append(checks.Error("FIRMWARE_MAX_UPLOAD_SIZE must be positive.", id="ota.E005"))
    if settings.DEVICE_JWT_LIFETIME <= 0:
        errors.append(checks.Error("DEVICE_JWT_LIFETIME must be positive.", id="ota.E006"))
    elif settings.DEVICE_JWT_LIFETIME > 900:
        errors.append(
            checks.Warning(
                "DEVICE_JWT_LIFETIME is over 15 minutes: a device whose credentials were reset "
                "keeps some access that long.",
                id="ota.W006",
            )
        )
    key_path = settings.FIRMWARE_SIGNING_KEY_PATH
    # Signing keys live sealed in the database (firmware.signing); this setting only names the
    # unencrypted key file of an older install, imported on first use. If it is there, it must be
    # readable, or that key (which devices trust) could not be imported. `manage.py signing_key
    # list` reports keys in the database that cannot be unsealed.
    if key_path.exists() and (not key_path.is_file() or not os.access(key_path, os.R_OK)):
        errors.append(
            checks.Error(
                f"FIRMWARE_SIGNING_KEY_PATH={key_path} (an older install's signing key, imported "
                "into the database on first use) is not a readable file.",
                id="ota.E007",
            )
        )
    if settings.REDIS_URL:
        scheme = urlparse(settings.REDIS_URL).scheme
        if scheme not in {"redis", "rediss", "unix"}:
            errors.append(
                checks.Error(
                    f"REDIS_URL scheme {scheme!r} is not redis://, rediss:// or unix://.",
                    id="ota.E008",
                )
            )
    errors.extend(_check_secrets_at_rest())
    errors.extend(_check_signing_backend())
    errors.extend(_check_ddi())
    for name in (
        "DEVICE_LAST_SEEN_INTERVAL",
        "DEVICE_LAST_SEEN_FLUSH_INTERVAL",
        "DEVICE_POLL_INTERVAL",
        "DEVICE_ONLINE_WINDOW",
        "ROLLOUT_EVALUATION_INTERVAL",
        "FIRMWARE_VERIFY_INTERVAL",
        "DEVICE_CERT_LIFETIME_DAYS",
        "DEVICE_CA_LIFETIME_DAYS",
    ):
        if getattr(settings, name) <= 0:
            errors.append(checks.Error(f"{name} must be positive.", id="ota.E009"))
    if settings.CACHE_LOCAL_SECONDS < 0:
        errors.append(checks.Error("CACHE_LOCAL_SECONDS must not be negative.", id="ota.E009"))
    return errors


def _check_ddi() -> list[checks.CheckMessage]:
    """hawkBit DDI: a usable tenant name; auto-created devices need a type (ota.E050, E051)."""
    errors: list[checks.CheckMessage] = []
    tenant = settings.DDI_TENANT
    if not tenant or "/" in tenant or len(tenant) > 64:
        errors.append(
            checks.Error(
                f"DDI_TENANT={tenant!r} must be a name of 1 to 64 characters without '/'.",
                id="ota.E050",
            )
        )
    if settings.DDI_AUTO_CREATE and not settings.DDI_DEFAULT_DEVICE_TYPE:
        errors.append(
            checks.Error(
                "DDI_AUTO_CREATE is on but DDI_DEFAULT_DEVICE_TYPE is empty: a device created on "
                "its first DDI poll needs a device type.",
                id="ota.E051",
            )
        )
    return errors


def _check_secrets_at_rest() -> list[checks.CheckMessage]:
    """The master key and the trusted proxy list must parse (ota.E011, ota.E012)."""
    errors: list[checks.CheckMessage] = []
    for name, values in (
        ("OTA_MASTER_KEY", [settings.OTA_MASTER_KEY] if settings.OTA_MASTER_KEY else []),
        ("OTA_MASTER_KEYS_OLD", settings.OTA_MASTER_KEYS_OLD),
    ):
        for value in values:
            try:
                parse_master_key(value)
            except ValueError as exc:
                errors.append(checks.Error(f"{name}: {exc}.", id="ota.E011"))
    if not settings.OTA_MASTER_KEY and settings.DATABASES["default"]["ENGINE"].endswith(
        "postgresql"
    ):
        errors.append(
            checks.Warning(
                f"OTA_MASTER_KEY is not set: private keys are sealed with a key file made on "
                f"first use at {settings.OTA_MASTER_KEY_PATH}. Web nodes and workers that do not "
                "share that file cannot open each other's keys, and it sits next to the data it "
                "protects. Set OTA_MASTER_KEY or OTA_MASTER_KEY_FILE from a secret.",
                id="ota.W011",
            )
        )
    for item in settings.TRUSTED_PROXIES:
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            errors.append(
                checks.Error(
                    f"TRUSTED_PROXIES: {item!r} is not an address or a network.", id="ota.E012"
                )
            )
    return errors


def _check_signing_backend() -> list[checks.CheckMessage]:
    """The signing backend is known; pkcs11 has python-pkcs11, a module, a token, a PIN (ota.E040).

    Only what can be known without opening the token: logging in at every manage.py command
    would spend PIN attempts. `manage.py signing_key list` opens it and reports a key it lacks.
    """
    backend = settings.FIRMWARE_SIGNING_BACKEND
    if backend not in {"sealed", "pkcs11"}:
        return [
            checks.Error(
                f"FIRMWARE_SIGNING_BACKEND={backend!r} is not 'sealed' or 'pkcs11'.", id="ota.E040"
            )
        ]
    if backend != "pkcs11":
        return []
    problems: list[str] = []
    if importlib.util.find_spec("pkcs11") is None:
        problems.append("python-pkcs11 is not installed (pip install 'ota-server[hsm]')")
    module = settings.PKCS11_MODULE
    if not module:
        problems.append("PKCS11_MODULE (the PKCS#11 library, a .so file) is not set")
    elif not os.path.isfile(module):
        problems.append(f"PKCS11_MODULE={module!r} is not a file")
    if not settings.PKCS11_TOKEN_LABEL:
        problems.append("PKCS11_TOKEN_LABEL is not set")
    if not settings.PKCS11_PIN:
        problems.append("PKCS11_PIN (or PKCS11_PIN_FILE) is not set")
    return [
        checks.Error(f"FIRMWARE_SIGNING_BACKEND=pkcs11: {problem}.", id="ota.E040")
        for problem in problems
    ]


def fail_fast_on_config_errors() -> None:
    """Run the checks when a server process starts; refuse to serve with a broken configuration.

    gunicorn and daphne do not run Django's checks themselves, so the WSGI/ASGI modules call this.
    """
    messages = checks.run_checks(include_deployment_checks=False)
    serious = [m for m in messages if m.is_serious()]
    if serious:
        for message in serious:
            print(f"configuration error: {message}", file=sys.stderr)
        raise SystemExit(1)
