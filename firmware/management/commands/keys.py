"""manage.py keys: every sealed private key of the installation, after a master key change.

    manage.py keys status [--json]   which master key sealed each key
    manage.py keys rewrap [--json]   reseal everything under the current OTA_MASTER_KEY

The firmware signing keys, the TUF online keys and the device CA keys are all sealed with the
master key (ota_site.keystore). To change the master key: set the new one as OTA_MASTER_KEY, list
the old one in OTA_MASTER_KEYS_OLD, run `keys rewrap`, check `keys status`, then drop the old key.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from devices import ca
from devices.models import DeviceCA
from firmware import signing, tuf_repo
from firmware.models import SigningKey, TufKey
from ota_site import keystore
from ota_site.errors import ServiceError
from ota_site.events import record_event
from ota_site.models import EventKind

# (label, model, envelope field, keystore purpose)
SEALED = (
    ("tuf", TufKey, "private_key", tuf_repo.ONLINE_PURPOSE),
    ("device-ca", DeviceCA, "private_key", ca.KEY_PURPOSE),
)


class Command(BaseCommand):
    help = "Show or reseal the private keys sealed with the master key (after changing it)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        for name, text in (
            ("status", "which master key sealed each key"),
            ("rewrap", "reseal every key under the current master key"),
        ):
            action = sub.add_parser(name, help=text)
            action.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            current = keystore.kek_id(keystore.master_key())
        except (ValueError, OSError) as exc:
            raise CommandError(f"the master key is not usable: {exc}") from exc
        result = self.rewrap(current) if options["action"] == "rewrap" else self.status(current)
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2, sort_keys=True))
            return
        for line in result["lines"]:
            self.stdout.write(line)

    def status(self, current: str) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for key in SigningKey.objects.exclude(private_key=""):
            keys.append(
                {"kind": "signing", "id": key.key_id, "kek": keystore.envelope_kek(key.private_key)}
            )
        for label, model, field, _purpose in SEALED:
            for row in model.objects.exclude(**{field: ""}):
                envelope = getattr(row, field)
                keys.append(
                    {"kind": label, "id": str(row.pk), "kek": keystore.envelope_kek(envelope)}
                )
        stale = [key for key in keys if key["kek"] != current]
        lines = [f"master key {current}: {len(keys)} sealed key(s), {len(stale)} to rewrap"]
        lines += [f"  {k['kind']:<10} {k['id']}  sealed by {k['kek']}" for k in stale]
        return {"kek": current, "keys": keys, "stale": len(stale), "lines": lines}

    def rewrap(self, current: str) -> dict[str, Any]:
        try:
            with transaction.atomic():
                changed = {"signing": signing.rewrap(actor="command:keys")}
                for label, model, field, purpose in SEALED:
                    changed[label] = keystore.rewrap_field(
                        model.objects.all(), field, purpose=purpose
                    )
                if changed["tuf"] or changed["device-ca"]:
                    record_event(
                        EventKind.KEYS_REWRAPPED,
                        actor="command:keys",
                        data={
                            "kek": current,
                            "tuf": changed["tuf"],
                            "device_ca": changed["device-ca"],
                        },
                    )
        except (keystore.KeystoreError, ServiceError) as exc:
            raise CommandError(f"nothing was resealed: {exc}") from exc
        total = sum(len(ids) for ids in changed.values())
        lines = [f"resealed {total} key(s) under master key {current}"]
        lines += [f"  {kind}: {', '.join(ids)}" for kind, ids in changed.items() if ids]
        return {"kek": current, "resealed": changed, "lines": lines}
