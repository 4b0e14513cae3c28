"""Bad configuration is reported by a system check at start-up, naming the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core import checks

from tests.e2e import ROOT, server_env


def check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=server_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_embedded_default_is_valid(tmp_path: Path) -> None:
    result = check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("env", "check_id"),
    [
        ({"DATABASE_URL": "mysql2://nobody@nowhere/x"}, "ota.E002"),
        ({"DATABASE_URL": "oracle://u:p@h/db"}, "ota.E002"),
        ({"STORAGE": "ftp"}, "ota.E003"),
        ({"STORAGE": "s3"}, "ota.E004"),
        ({"FIRMWARE_MAX_UPLOAD_SIZE": "0"}, "ota.E005"),
        ({"DEVICE_JWT_LIFETIME": "0"}, "ota.E006"),
        ({"FIRMWARE_SIGNING_KEY_PATH": "/etc"}, "ota.E007"),  # a folder, not a key file
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "ota.E008"),
        ({"DEVICE_POLL_INTERVAL": "-5"}, "ota.E009"),
        ({"DJANGO_SECRET_KEY_FILE": "/nonexistent/secret"}, "ota.E001"),
        ({"DEVICE_JWT_LIFETIME": "abc"}, "ota.E010"),
        ({"FIRMWARE_MAX_UPLOAD_SIZE": "2GB"}, "ota.E010"),
    ],
)
def test_bad_settings_fail_the_checks(tmp_path: Path, env: dict[str, str], check_id: str) -> None:
    result = check(tmp_path, **env)
    assert result.returncode != 0
    assert check_id in result.stderr, result.stderr


def test_a_long_token_lifetime_is_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, DEVICE_JWT_LIFETIME="3600")
    assert result.returncode == 0 and "ota.W006" in result.stderr


def test_the_wsgi_server_refuses_to_start_with_bad_configuration(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import ota_site.wsgi"],
        cwd=ROOT,
        env=server_env(tmp_path, STORAGE="ftp"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "ota.E003" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name", ["FIRMWARE_VERIFY_INTERVAL", "DEVICE_CERT_LIFETIME_DAYS", "DEVICE_CA_LIFETIME_DAYS"]
)
def test_intervals_and_lifetimes_must_be_positive(settings: Any, name: str) -> None:
    setattr(settings, name, 0)
    assert "ota.E009" in [message.id for message in checks.run_checks()]


def test_production_without_a_master_key_is_warned(settings: Any) -> None:
    # The test run itself is on PostgreSQL: a master key file made on first use is what the
    # warning is about.
    settings.OTA_MASTER_KEY = ""
    assert "ota.W011" in [message.id for message in checks.run_checks()]
    settings.OTA_MASTER_KEY = "A" * 43 + "="
    assert "ota.W011" not in [message.id for message in checks.run_checks()]
