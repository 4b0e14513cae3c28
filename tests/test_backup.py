"""Backup and restore (`make backup`, manage.py backup; docs/operations.md "Backup and restore"),
exercised the way an operator recovers: back up, then restore onto a new, empty installation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.e2e import fresh_database, manage, server_env

pytestmark = pytest.mark.e2e


def populate(env: dict[str, str], folder: Path) -> dict[str, str]:
    """Migrate, then a published firmware, an enrollment token and a draft; their ids."""
    manage(env, "migrate", "--noinput")
    image = folder / "image.bin"
    image.write_bytes(b"backup-me" * 50_000)
    published = json.loads(
        manage(
            env, "firmware", "upload", str(image), "--device-type", "bk-board",
            "--version", "1.0.0", "--publish", "--json",
        )
    )  # fmt: skip
    draft = folder / "draft.bin"
    draft.write_bytes(b"draft" * 1000)
    manage(env, "firmware", "upload", str(draft), "--device-type", "bk-board", "--version", "1.1.0")
    manage(env, "create_enrollment_token", "--name", "kept", "--json")
    return {"firmware": published["id"], "sha256": published["sha256"]}


def firmware_versions(env: dict[str, str]) -> list[str]:
    return sorted(row["version"] for row in json.loads(manage(env, "firmware", "list", "--json")))


def check_restored(env: dict[str, str], ids: dict[str, str]) -> None:
    assert firmware_versions(env) == ["1.0.0", "1.1.0"]
    # The stored bytes are the published ones (sha256 and signature checked by the command).
    verified = json.loads(manage(env, "firmware", "verify", "--all", "--json"))
    assert verified["failed"] == 0 and [r["ok"] for r in verified["results"]] == [True]


@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
def test_backup_then_restore_on_a_new_installation(tmp_path: Path, engine: str) -> None:
    backup = tmp_path / "backup"
    if engine == "postgresql":
        with fresh_database() as first, fresh_database() as second:
            old = server_env(tmp_path / "old", DATABASE_URL=first)
            new = server_env(tmp_path / "new", DATABASE_URL=second)
            run(old, new, backup, tmp_path)
        return
    old = server_env(tmp_path / "old")
    run(old, server_env(tmp_path / "new"), backup, tmp_path)
    # The same backup with one bit of each stored file flipped: refused before anything changes
    # (here, on the installation it came from, whose firmware must stay as it is).
    damage(backup)
    with pytest.raises(AssertionError, match="does not match its manifest"):
        manage(old, "backup", "restore", str(backup), "--yes")
    assert firmware_versions(old) == ["1.0.0", "1.1.0"]


def run(old: dict[str, str], new: dict[str, str], backup: Path, tmp_path: Path) -> None:
    ids = populate(old, tmp_path)
    made = json.loads(manage(old, "backup", "create", "--out", str(backup), "--json"))
    assert made["files"] == 2 and made["bytes"] == 450_000 + 5_000
    manifest = json.loads((backup / "manifest.json").read_text())
    assert ids["sha256"] in {f["sha256"] for f in manifest["files"].values()}

    # The new installation has the same master key (kept apart from backups), nothing else.
    key = Path(old["OTA_VAR_DIR"]) / "keys" / "master.key"
    if key.exists():
        (Path(new["OTA_VAR_DIR"]) / "keys").mkdir(parents=True, exist_ok=True)
        (Path(new["OTA_VAR_DIR"]) / "keys" / "master.key").write_bytes(key.read_bytes())
    with pytest.raises(AssertionError, match="--yes"):
        manage(new, "backup", "restore", str(backup))
    restored = json.loads(manage(new, "backup", "restore", str(backup), "--yes", "--json"))
    assert restored["files"] == 2
    check_restored(new, ids)


def damage(backup: Path) -> None:
    """Flip the last bit of every file in the backup's storage archive."""
    with tarfile.open(backup / "storage.tar") as archive:
        members = [(m, archive.extractfile(m)) for m in archive.getmembers()]
        contents = [(m, f.read()) for m, f in members if f is not None]
    with tarfile.open(backup / "storage.tar", "w") as archive:
        for member, content in contents:
            flipped = content[:-1] + bytes([content[-1] ^ 1])
            archive.addfile(member, io.BytesIO(flipped))


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    env = server_env(tmp_path / "var")
    manage(env, "migrate", "--noinput")
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "something").write_text("mine")
    with pytest.raises(AssertionError, match="is not empty"):
        manage(env, "backup", "create", "--out", str(folder))
    assert (folder / "something").read_text() == "mine"
