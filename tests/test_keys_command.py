"""manage.py keys: after a master key change, every sealed key is resealed and keeps working."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from devices import certificates
from firmware import services as firmware_services
from firmware import signing, tuf_repo
from firmware.models import TufKey
from ota_site import keystore
from ota_site.models import Event, EventKind
from tests.factories import FirmwareFactory


@pytest.fixture
def sealed_everything(settings: Any, tmp_path: Path, db: Any) -> str:
    """A signing key, the TUF online keys and a device CA, all sealed with master key A."""
    old = keystore.generate_master_key()
    settings.OTA_MASTER_KEY = old
    settings.OTA_MASTER_KEYS_OLD = []
    settings.TUF_AUTO_INIT = True
    settings.TUF_ROOT_KEY_DIR = tmp_path / "tuf-root"
    firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    certificates.create_device_ca(common_name="Fleet CA", days=30)
    assert TufKey.objects.exclude(private_key="").count() == 3
    return old


def keys(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command("keys", *args, "--json", stdout=out)
    result: dict[str, Any] = json.loads(out.getvalue())
    return result


def test_rewrap_moves_every_sealed_key_to_the_new_master_key(
    settings: Any, sealed_everything: str
) -> None:
    assert keys("status")["stale"] == 0
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    settings.OTA_MASTER_KEYS_OLD = [sealed_everything]
    status = keys("status")
    assert status["stale"] == 5  # the signing key, three TUF online keys, the CA
    assert {key["kind"] for key in status["keys"]} == {"signing", "tuf", "device-ca"}

    resealed = keys("rewrap")["resealed"]
    assert len(resealed["signing"]) == 1 and len(resealed["tuf"]) == 3
    assert len(resealed["device-ca"]) == 1
    assert Event.objects.filter(kind=EventKind.KEYS_REWRAPPED).exists()
    assert keys("status")["stale"] == 0
    assert keys("rewrap")["resealed"] == {"signing": [], "tuf": [], "device-ca": []}

    # The old master key can go: everything still opens and signs.
    settings.OTA_MASTER_KEYS_OLD = []
    signing.sign(b"still signs")
    firmware_services.publish_firmware(FirmwareFactory.create(version="1.2.0"))
    assert tuf_repo.update_repository(force=True).written
    certificates.active_ca()
    key = certificates.active_ca().private_key
    assert keystore.unseal_private_key(key, purpose="device-ca")


def test_rewrap_is_all_or_nothing(settings: Any, sealed_everything: str) -> None:
    # The old key is not configured: nothing can be opened, so nothing may change.
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    before = list(TufKey.objects.values_list("private_key", flat=True))
    with pytest.raises(CommandError, match="nothing was resealed"):
        call_command("keys", "rewrap")
    assert list(TufKey.objects.values_list("private_key", flat=True)) == before


def test_a_bad_master_key_is_a_clear_error(settings: Any, db: Any) -> None:
    settings.OTA_MASTER_KEY = "not a key"
    with pytest.raises(CommandError, match="master key is not usable"):
        call_command("keys", "status")
