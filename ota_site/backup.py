"""Backups of the database and the firmware storage, and their restore (``manage.py backup``).

A backup is a folder:

- ``database.dump``: PostgreSQL's ``pg_dump --format=custom`` (restored with ``pg_restore``), or,
  on SQLite, a consistent copy made with SQLite's online backup API (``database.sqlite3``);
- ``storage.tar``: every file of the default storage (firmware images, session archives), read
  through Django's storage API, so the file system and S3 are backed up alike;
- ``manifest.json``: when, which engine, and each stored file's size and sha256, which the
  restore checks before it changes anything.

What it does not hold, on purpose: the master key (``OTA_MASTER_KEY``) that seals the signing
keys and the device CA key in the database, and the TUF root keys, which live offline. Keep them
apart from the backup (docs/operations.md, "Backup and restore"): a backup that carried its own
key would hand anyone who got it the power to sign firmware.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages
from django.db import connections

from ota_site.errors import ServiceError

FORMAT = 1


class BackupError(ServiceError):
    code = "backup_failed"


@dataclass(frozen=True)
class Summary:
    folder: Path
    engine: str
    files: int
    bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "engine": self.engine,
            "files": self.files,
            "bytes": self.bytes,
        }


def _engine() -> str:
    vendor = connections["default"].vendor
    if vendor not in ("postgresql", "sqlite"):
        raise BackupError(f"cannot back up a {vendor} database")
    return vendor


def _libpq_env() -> dict[str, str]:
    """pg_dump and pg_restore reach the database the settings name, through libpq's variables."""
    settings = connections["default"].settings_dict
    env = dict(os.environ)
    for key, variable in (
        ("HOST", "PGHOST"),
        ("PORT", "PGPORT"),
        ("USER", "PGUSER"),
        ("PASSWORD", "PGPASSWORD"),
        ("NAME", "PGDATABASE"),
    ):
        if settings.get(key):
            env[variable] = str(settings[key])
    return env


def _run(command: list[str]) -> None:
    try:
        subprocess.run(  # noqa: S603 (our own command lines: pg_dump, pg_restore; no shell)
            command, env=_libpq_env(), check=True, capture_output=True, timeout=3600
        )
    except FileNotFoundError as exc:
        raise BackupError(f"{command[0]} is not installed (Debian: postgresql-client)") from exc
    except subprocess.CalledProcessError as exc:
        raise BackupError(f"{command[0]} failed: {exc.stderr.decode(errors='replace')}") from exc


def _walk(storage: Storage, folder: str = "") -> Iterator[str]:
    """Every file name of the storage (S3 has no real folders; listdir pretends)."""
    try:
        folders, files = storage.listdir(folder)
    except FileNotFoundError:
        return
    for name in files:
        yield f"{folder}/{name}" if folder else name
    for sub in folders:
        yield from _walk(storage, f"{folder}/{sub}" if folder else sub)


def create(folder: Path) -> Summary:
    """Write a backup into ``folder`` (created; it must be empty or new)."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty")
    engine = _engine()
    if engine == "postgresql":
        _run(["pg_dump", "--format=custom", "--no-owner", "--file", str(folder / "database.dump")])
    else:
        source = sqlite3.connect(connections["default"].settings_dict["NAME"])
        target = sqlite3.connect(folder / "database.sqlite3")
        with target:
            source.backup(target)
        source.close()
        target.close()
    storage = storages["default"]
    files: dict[str, dict[str, Any]] = {}
    with tarfile.open(folder / "storage.tar", "w") as archive:
        for name in sorted(_walk(storage)):
            with storage.open(name, "rb") as handle:
                content = handle.read()
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
            files[name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    manifest = {
        "format": FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "engine": engine,
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Summary(folder, engine, len(files), sum(f["size"] for f in files.values()))


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable manifest.json: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unknown backup format {manifest.get('format')!r}")
    return manifest


def _checked_files(folder: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The storage files of the backup, each checked against the manifest."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(folder / "storage.tar") as archive:
            for member in archive.getmembers():
                handle = archive.extractfile(member)
                if handle is not None:
                    found[member.name] = handle.read()
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"storage.tar cannot be read: {exc}") from exc
    expected = manifest["files"]
    if set(found) != set(expected):
        raise BackupError("storage.tar does not hold the files its manifest lists")
    for name, content in found.items():
        if hashlib.sha256(content).hexdigest() != expected[name]["sha256"]:
            raise BackupError(f"{name} in storage.tar does not match its manifest")
    return found


def restore(folder: Path) -> Summary:
    """Replace the database's contents and the storage's files with the backup's.

    Everything is checked before anything is changed. The database must be the same engine as
    the backup's; run it with the web servers and workers stopped.
    """
    manifest = _manifest(folder)
    engine = _engine()
    if manifest["engine"] != engine:
        raise BackupError(f"the backup is of a {manifest['engine']} database, this is {engine}")
    files = _checked_files(folder, manifest)
    database = folder / ("database.dump" if engine == "postgresql" else "database.sqlite3")
    if not database.is_file():
        raise BackupError(f"{database.name} is missing from {folder}")
    connections.close_all()
    if engine == "postgresql":
        _run(
            [
                "pg_restore",
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                "--exit-on-error",
                "--dbname",
                connections["default"].settings_dict["NAME"],
                str(database),
            ]
        )
    else:
        shutil.copyfile(database, connections["default"].settings_dict["NAME"])
    storage = storages["default"]
    for name in _walk(storage):
        if name not in files:
            storage.delete(name)
    for name, content in files.items():
        if storage.exists(name):
            storage.delete(name)
        saved = storage.save(name, ContentFile(content))
        if saved != name:
            raise BackupError(f"the storage saved {name} as {saved}")
    return Summary(folder, engine, len(files), sum(len(c) for c in files.values()))
