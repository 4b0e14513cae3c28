"""manage.py firmware: upload, publish, list, delete and verify firmware from the shell.

Every subcommand calls the same services as the API and the console. ``upload`` copies the file
from disk to a private temporary file in chunks, hashing each chunk as it goes (never the whole
image in memory; the bytes stored are the bytes hashed even if the source changes meanwhile),
and validates its fields with the API's upload serializer, so both refuse the same things.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files import File
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.core.management.base import BaseCommand, CommandError, CommandParser

from firmware import services
from firmware.api.serializers import FirmwareUploadSerializer
from firmware.models import Firmware
from ota_site.errors import ServiceError
from ota_site.versions import InvalidVersion, version_key

ACTOR = "manage.py firmware"
CHUNK = 1024 * 1024


def find_firmware(text: str) -> Firmware:
    """A firmware by id, or by DEVICE_TYPE:VERSION."""
    try:
        return Firmware.objects.get(pk=uuid.UUID(text))
    except (ValueError, Firmware.DoesNotExist):
        pass
    device_type, _, version = text.partition(":")
    try:
        return Firmware.objects.get(device_type=device_type, version_key=version_key(version))
    except (Firmware.DoesNotExist, InvalidVersion) as exc:
        raise CommandError(f"No firmware {text!r} (give an id or DEVICE_TYPE:VERSION).") from exc


def describe(firmware: Firmware) -> dict[str, Any]:
    def iso(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": str(firmware.id),
        "device_type": firmware.device_type,
        "version": firmware.version,
        "filename": firmware.filename,
        "size": firmware.file_size,
        "sha256": firmware.checksum,
        "release_notes": firmware.metadata.get("release_notes", ""),
        "min_version": firmware.min_version,
        "dependencies": firmware.metadata.get("dependencies", []),
        "release_counter": firmware.release_counter,
        "published": firmware.is_published,
        "published_at": iso(firmware.published_at),
        "quarantined_at": iso(firmware.quarantined_at),
        "key_id": firmware.key_id,
        "created_at": iso(firmware.created_at),
    }


def copy_hashing(path: Path) -> tuple[TemporaryUploadedFile, dict[str, str]]:
    """The file copied to a temporary upload file, with its sha256, sha1 and md5, computed while
    copying (as firmware.uploads does for HTTP uploads). The caller closes the copy."""
    try:
        source = path.open("rb")
    except OSError as exc:
        raise CommandError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    limit = settings.FIRMWARE_MAX_UPLOAD_SIZE
    digests = {
        "sha256": hashlib.sha256(),
        "sha1": hashlib.sha1(usedforsecurity=False),
        "md5": hashlib.md5(usedforsecurity=False),
    }
    copy = TemporaryUploadedFile(path.name, "application/octet-stream", 0, None)
    try:
        with source:
            if not path.is_file():
                raise CommandError(f"{path} is not a regular file.")
            size = 0
            for chunk in iter(lambda: source.read(CHUNK), b""):
                size += len(chunk)
                if size > limit:
                    raise CommandError(
                        f"{path} is larger than FIRMWARE_MAX_UPLOAD_SIZE ({limit} bytes)."
                    )
                for digest in digests.values():
                    digest.update(chunk)
                copy.write(chunk)
        copy.flush()
        copy.seek(0)
        copy.size = size
    except BaseException:
        copy.close()  # deletes the temporary file
        raise
    return copy, {name: digest.hexdigest() for name, digest in digests.items()}


OPTION_NAMES = {"file": "FILE", "dependencies": "--dependency"}


def _field_errors(errors: dict[str, Any]) -> str:
    """Serializer errors named as the command's options."""
    lines = []
    for name, messages in errors.items():
        option = OPTION_NAMES.get(name) or "--" + name.replace("_", "-")
        if isinstance(messages, dict):  # a list field reports errors by index
            messages = [f"item {index}: {' '.join(map(str, m))}" for index, m in messages.items()]
        lines.append(f"{option}: {' '.join(str(m) for m in messages)}")
    return "; ".join(lines)


class Command(BaseCommand):
    help = (
        "Firmware from the shell. `upload FILE --device-type T [--version V] [--publish]` "
        "stores an image as a draft (a .swu's version comes from its sw-description); "
        "`publish ID` signs it and offers it to devices; `list`; `delete ID`; "
        "`verify [ID ...] [--all]` re-reads stored firmware and compares its sha256 with the "
        "recorded one: a missing or changed file quarantines the firmware (withdrawn from offers "
        "and device downloads, exit status 1) until `verify ID --restore FILE` puts the right "
        "bytes back (or a later check finds them). ID is a firmware id or DEVICE_TYPE:VERSION."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        upload = sub.add_parser("upload", help="Store an image as a draft (or --publish it).")
        upload.add_argument("file", metavar="FILE", help="The image on disk.")
        upload.add_argument("--device-type", required=True, help="The devices it is for.")
        upload.add_argument(
            "--version",
            default="",
            help="Required, except for a .swu (default: its "
            "sw-description's version, which a given one must equal).",
        )
        upload.add_argument("--release-notes", default="", help="Text shown to operators.")
        upload.add_argument(
            "--min-version", default="", help="Devices below this version are not offered it."
        )
        upload.add_argument(
            "--dependency",
            action="append",
            default=[],
            dest="dependencies",
            metavar="CONSTRAINT",
            help="A component constraint like 'bootloader>=2.1' (repeatable).",
        )
        upload.add_argument(
            "--release-counter",
            type=int,
            help="Devices refuse a counter below the highest they installed "
            "(default: the highest of this device type).",
        )
        upload.add_argument("--publish", action="store_true", help="Publish it right away.")
        upload.add_argument("--json", action="store_true", help="Print one JSON object.")

        publish = sub.add_parser("publish", help="Sign a draft and offer it to devices.")
        publish.add_argument("firmware", metavar="ID", help="Id or DEVICE_TYPE:VERSION.")
        publish.add_argument("--json", action="store_true", help="Print one JSON object.")

        listing = sub.add_parser("list", help="Firmware by device type, newest version first.")
        listing.add_argument("--device-type", help="Only this device type.")
        state = listing.add_mutually_exclusive_group()
        state.add_argument("--published", action="store_true", help="Only published firmware.")
        state.add_argument("--drafts", action="store_true", help="Only drafts.")
        listing.add_argument("--json", action="store_true", help="Print a JSON array.")

        delete = sub.add_parser(
            "delete",
            help="Delete a firmware and its file (refused while a rollout or a "
            "session refers to it).",
        )
        delete.add_argument("firmware", metavar="ID", help="Id or DEVICE_TYPE:VERSION.")
        delete.add_argument("--json", action="store_true", help="Print one JSON object.")

        verify = sub.add_parser("verify", help="Check stored bytes against their checksums.")
        verify.add_argument("ids", nargs="*", metavar="ID", help="Firmware to check.")
        verify.add_argument("--all", action="store_true", help="Every published firmware.")
        verify.add_argument(
            "--restore",
            metavar="FILE",
            help="Store FILE as the firmware's bytes first (one id; must match its sha256).",
        )
        verify.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"do_{options['action']}")(options)
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} ({exc.code})") from exc

    def emit(self, options: dict[str, Any], data: Any, text: str) -> None:
        self.stdout.write(json.dumps(data) if options["json"] else text)

    @staticmethod
    def line(item: dict[str, Any]) -> str:
        state = "published" if item["published"] else "draft"
        if item["quarantined_at"]:
            state += ", QUARANTINED"
        return (
            f"{item['id']}  {item['device_type']} {item['version']}  {state}  "
            f"{item['size']} bytes  sha256 {item['sha256'][:16]}…"
        )

    # --- upload, publish, list, delete ----------------------------------------------------------

    def do_upload(self, options: dict[str, Any]) -> None:
        copy, hashes = copy_hashing(Path(options["file"]))
        with copy:
            fields: dict[str, Any] = {
                "file": copy,
                "device_type": options["device_type"],
                "release_notes": options["release_notes"],
                "min_version": options["min_version"],
            }
            if options["version"]:
                fields["version"] = options["version"]
            if options["dependencies"]:
                fields["dependencies"] = options["dependencies"]
            if options["release_counter"] is not None:
                fields["release_counter"] = options["release_counter"]
            serializer = FirmwareUploadSerializer(data=fields)
            if not serializer.is_valid():
                raise CommandError(_field_errors(serializer.errors))
            values = serializer.validated_data
            firmware = services.upload_firmware(
                file=copy,
                hashes=hashes,
                version=values.get("version") or None,  # None: a .swu's own version
                device_type=values["device_type"],
                release_notes=values.get("release_notes", ""),
                min_version=values.get("min_version") or None,
                dependencies=values.get("dependencies"),
                release_counter=values.get("release_counter"),
                actor=ACTOR,
            )
        if options["publish"]:
            try:
                firmware = services.publish_firmware(firmware, actor=ACTOR)
            except ServiceError as exc:
                raise CommandError(
                    f"Uploaded {firmware.device_type} {firmware.version} as draft {firmware.id}, "
                    f"but publishing failed: {exc.detail} ({exc.code})"
                ) from exc
        item = describe(firmware)
        verb = "Uploaded and published" if firmware.is_published else "Uploaded draft"
        self.emit(options, item, f"{verb} {firmware.device_type} {firmware.version}: {item['id']}")

    def do_publish(self, options: dict[str, Any]) -> None:
        firmware = find_firmware(options["firmware"])
        already = firmware.is_published
        firmware = services.publish_firmware(firmware, actor=ACTOR)
        verb = "was published already" if already else "published"
        self.emit(
            options,
            {**describe(firmware), "already_published": already},
            f"{firmware.device_type} {firmware.version} {verb} (key {firmware.key_id}).",
        )

    def do_list(self, options: dict[str, Any]) -> None:
        firmware = Firmware.objects.all()
        if options["device_type"]:
            firmware = firmware.filter(device_type=options["device_type"])
        if options["published"]:
            firmware = firmware.filter(published_at__isnull=False)
        elif options["drafts"]:
            firmware = firmware.filter(published_at__isnull=True)
        items = [describe(f) for f in firmware]
        if options["json"]:
            self.stdout.write(json.dumps(items))
        elif not items:
            self.stdout.write("No firmware.")
        else:
            for item in items:
                self.stdout.write(self.line(item))

    def do_delete(self, options: dict[str, Any]) -> None:
        firmware = find_firmware(options["firmware"])
        item = describe(firmware)
        services.delete_firmware(firmware, actor=ACTOR)
        self.emit(
            options,
            {**item, "deleted": True},
            f"Deleted {item['device_type']} {item['version']} ({item['id']}).",
        )

    # --- verify ---------------------------------------------------------------------------------

    def do_verify(self, options: dict[str, Any]) -> None:
        ids: list[str] = options["ids"]
        if options["all"] == bool(ids):
            raise CommandError("Name firmware ids or --all (not both).")
        if options["restore"] and len(ids) != 1:
            raise CommandError("--restore needs exactly one firmware id.")
        if options["all"]:
            results = services.verify_all_storage(actor=ACTOR)
        else:
            results = [self.verify_one(firmware_id, options["restore"]) for firmware_id in ids]
        bad = [r for r in results if not r["ok"]]
        if options["json"]:
            self.stdout.write(json.dumps({"results": results, "failed": len(bad)}))
        else:
            for r in results:
                state = "ok" if r["ok"] else f"{r['problem'].upper()}: {r['detail']}"
                quarantine = " (quarantined)" if r["quarantined"] else ""
                self.stdout.write(
                    f"{r['device_type']} {r['version']} {r['firmware_id']}: {state}{quarantine}"
                )
        if bad:
            raise CommandError(f"{len(bad)} of {len(results)} firmware failed verification.")

    def verify_one(self, firmware_id: str, restore: str | None) -> services.StorageCheck:
        firmware = find_firmware(firmware_id)
        if restore is None:
            return services.verify_storage(firmware, actor=ACTOR)
        try:
            with Path(restore).open("rb") as handle:
                return services.restore_storage(firmware, File(handle), actor=ACTOR)
        except OSError as exc:
            raise CommandError(f"Cannot read {restore}: {exc}") from exc
