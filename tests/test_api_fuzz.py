"""Hostile input: schemathesis generates requests from /api/schema/ for every operation and sends
them to a real gunicorn, as an admin (basic auth), an operator and a viewer (API keys) and a
device (its bearer token); and from /api/ddi/schema/ as a hawkBit DDI device (its target token).
No answer may be a 5xx, and every answer must be what the schema says: a documented status code,
the documented media type, a body that validates.

The run is short (a time budget per identity) so that the suite stays within its budget; the
seed changes with each run, so CI keeps exploring. `FUZZ_SECONDS` makes it longer by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e import fresh_database, gunicorn, manage, migrate_with_admin, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("fuzz")]

ADMIN = ("fuzz-admin", "fuzz-password-123")
SECONDS = os.environ.get("FUZZ_SECONDS", "8")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with fresh_database() as database:
        env = server_env(
            tmp / "var",
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
            CACHE_KEY_PREFIX=f"fuzz-{os.getpid()}",
        )
        migrate_with_admin(env, ADMIN, "fuzz@example.com")
        with gunicorn(env, workers=2) as base:
            yield base, env


def identity(name: str, base: str, env: dict[str, str]) -> list[str]:
    """schemathesis options that authenticate as ``name``."""
    if name == "admin":
        return ["--auth", f"{ADMIN[0]}:{ADMIN[1]}"]
    if name in ("operator", "viewer"):
        key = json.loads(
            manage(env, "apikey", "create", "--name", f"fuzz-{name}", "--role", name, "--json")
        )
        return ["--header", f"Authorization: ApiKey {key['token']}"]
    token = json.loads(
        manage(env, "create_enrollment_token", "--name", "fuzz", "--device-type", "fz", "--json")
    )["token"]
    reply = requests.post(
        f"{base}/api/v1/devices/register",
        json={"enrollment_token": token, "hardware_id": "fuzz-1", "device_type": "fz"},
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    return ["--header", f"Authorization: Bearer {reply.json()['access_token']}"]


def schemathesis(tmp_path: Path, *options: str) -> None:
    """Run schemathesis with ``options`` (the schema, who, and perhaps a config file); assert that
    it found nothing."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--no-color",
        *options,
        "--checks",
        CHECKS,
        "--phases",
        "coverage,fuzzing",
        "--max-examples",
        "3",
        "--max-time",
        SECONDS,
        "--generation-database",
        "none",
    ]
    # In the test's folder: schemathesis keeps a cache in ./.schemathesis.
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    # The failures (each with a curl line that reproduces it), then the summary.
    out = result.stdout
    failures = out[out.find("FAILURES") : out.find("WARNINGS")] if "FAILURES" in out else ""
    report = failures[:8000] + out[out.rfind("SUMMARY") :] + result.stderr[-2000:]
    assert result.returncode == 0, report


@pytest.mark.parametrize("name", ["admin", "operator", "viewer", "device"])
def test_the_api_survives_generated_requests(
    server: tuple[str, dict[str, str]], name: str, tmp_path: Path
) -> None:
    base, env = server
    schemathesis(tmp_path, "run", f"{base}/api/schema/", *identity(name, base, env))


def test_the_ddi_survives_generated_requests(
    server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """A DDI device with an open action, so that most requests reach the views' own checks and
    the feedback changes a real session; now and then a path parameter is left random."""
    base, _ = server
    admin = requests.Session()
    admin.auth = ADMIN
    provisioned = admin.post(
        f"{base}/api/v1/devices/ddi",
        json={"controller_id": "fuzz-ddi", "device_type": "fz-ddi", "current_version": "1.0.0"},
        timeout=10,
    )
    assert provisioned.status_code == 201, provisioned.text
    device = provisioned.json()
    firmware = admin.post(
        f"{base}/api/v1/firmware",
        data={"device_type": "fz-ddi", "version": "1.1.0"},
        files={"file": ("fuzz-1.1.0.bin", b"fuzz image " * 100)},
        timeout=30,
    ).json()
    admin.post(f"{base}/api/v1/firmware/{firmware['id']}/publish", timeout=10).raise_for_status()
    admin.patch(
        f"{base}/api/v1/devices/{device['device']['id']}",
        json={"target_version": "1.1.0"},
        timeout=10,
    ).raise_for_status()
    token = f"TargetToken {device['target_token']}"
    poll = requests.get(
        f"{base}/DEFAULT/controller/v1/fuzz-ddi", headers={"Authorization": token}, timeout=10
    ).json()
    action = int(poll["_links"]["deploymentBase"]["href"].split("?")[0].rsplit("/", 1)[-1])
    filename = str(firmware["filename"])
    known = {
        "tenant": ["DEFAULT", "default"],
        "controllerId": ["fuzz-ddi"],
        "actionId": [action],
        "softwareModuleId": [str(firmware["id"])],
        "filename": [filename, f"{filename}.MD5SUM"],
    }
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "".join(
            f"[dictionaries.{name}]\nvalues = {json.dumps(values)}\n"
            for name, values in known.items()
        )
        + "[parameters]\n"
        + "".join(
            f'"path.{name}" = {{ dictionary = "{name}", probability = 0.9 }}\n' for name in known
        )
    )
    schemathesis(
        tmp_path,
        "--config-file",
        str(config),
        "run",
        f"{base}/api/ddi/schema/",
        "--header",
        f"Authorization: {token}",
    )
