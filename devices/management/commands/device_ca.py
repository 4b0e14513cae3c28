"""manage.py device_ca: create, rotate and show the CA that issues device certificates."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from devices import certificates
from devices.models import DeviceCA
from ota_site.errors import ServiceError

ACTOR = "manage.py device_ca"


def describe(issuer: DeviceCA) -> dict[str, Any]:
    return {
        "id": str(issuer.id),
        "common_name": issuer.common_name,
        "key_id": issuer.key_id,
        "fingerprint": issuer.fingerprint,
        "not_before": issuer.not_before.isoformat(),
        "not_after": issuer.not_after.isoformat(),
        "active": issuer.active,
        "certificate": issuer.certificate,
    }


class Command(BaseCommand):
    help = (
        "The device CA. `init` creates it (its key is stored sealed with the master key, never "
        "in clear); `init --rotate` replaces it for issuing while the certificates of the old one "
        "stay valid until they expire; `show` and `export-cert` print the PEM bundle of every "
        "CA still trusted, for nginx's ssl_client_certificate."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        init = sub.add_parser("init", help="Create the device CA (or rotate it with --rotate).")
        init.add_argument("--common-name", default="OTA device CA", help="The CA's CN.")
        init.add_argument(
            "--days",
            type=int,
            default=settings.DEVICE_CA_LIFETIME_DAYS,
            help="How long the CA certificate is valid (default: DEVICE_CA_LIFETIME_DAYS).",
        )
        init.add_argument(
            "--rotate",
            action="store_true",
            help="Replace the existing CA for issuing; it stays trusted until it expires.",
        )
        init.add_argument("--json", action="store_true", help="Print one JSON object.")
        show = sub.add_parser("show", help="Describe the trusted CAs and print their PEM.")
        show.add_argument("--json", action="store_true", help="Print one JSON object.")
        export = sub.add_parser("export-cert", help="Print only the PEM bundle (for nginx).")
        export.add_argument(
            "--json", action="store_true", help="One JSON object: the bundle and its CAs."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "init":
            self.init(options)
            return
        trusted = certificates.trusted_cas()
        if not trusted:
            raise CommandError("No device CA yet; create it with `manage.py device_ca init`.")
        bundle = "".join(issuer.certificate for issuer in trusted)
        if action == "export-cert":
            if options["json"]:
                cas = [describe(issuer) for issuer in trusted]
                self.stdout.write(json.dumps({"bundle": bundle, "cas": cas}))
            else:
                self.stdout.write(bundle, ending="")
            return
        if options["json"]:
            self.stdout.write(json.dumps({"cas": [describe(issuer) for issuer in trusted]}))
            return
        for issuer in trusted:
            state = "active (issues)" if issuer.active else "previous (trusted until it expires)"
            self.stdout.write(
                f"# {issuer.common_name}, key id {issuer.key_id}, {state}, "
                f"valid until {issuer.not_after.isoformat(timespec='seconds')}\n"
                f"# sha256 fingerprint {issuer.fingerprint}"
            )
            self.stdout.write(issuer.certificate, ending="")

    def init(self, options: dict[str, Any]) -> None:
        try:
            issuer = certificates.create_device_ca(
                common_name=options["common_name"],
                days=options["days"],
                rotate=options["rotate"],
                actor=ACTOR,
            )
        except ServiceError as exc:
            raise CommandError(exc.detail) from exc
        if options["json"]:
            self.stdout.write(json.dumps(describe(issuer)))
            return
        verb = "Rotated to a new" if options["rotate"] else "Created the"
        self.stdout.write(
            f"{verb} device CA {issuer.common_name!r}, key id {issuer.key_id}, valid until "
            f"{issuer.not_after.isoformat(timespec='seconds')}. Its key is sealed with the "
            "master key. Give nginx the bundle from `manage.py device_ca export-cert`."
        )
