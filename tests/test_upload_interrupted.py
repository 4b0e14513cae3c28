"""Uploads cut off over a real connection leave nothing behind: no firmware row, no stored file,
no temporary file; and the next upload works (issue 9, "Durability").

gunicorn serves the embedded mode directly (no nginx, which would buffer the body and never pass
a cut upload on): the harshest case, where Django is reading the body when the client goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e import gunicorn, manage, server_env

pytestmark = pytest.mark.e2e

BOUNDARY = "ota-cut-boundary-1b2c3d"
SIZE = 4 * 1024 * 1024


def multipart(version: str, content: bytes) -> bytes:
    parts = []
    for name, value in (("version", version), ("device_type", "board-a")):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    parts.append(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return "".join(parts).encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


class Installation:
    def __init__(self, base: str, key: str, var: Path) -> None:
        self.base, self.key, self.var = base, key, var

    def send_part(self, body: bytes, keep: int) -> None:
        """Announce the whole body, send its first ``keep`` bytes, and hang up."""
        host, port = self.base.removeprefix("http://").split(":")
        head = (
            "POST /api/v1/firmware HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            f"Authorization: ApiKey {self.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + body[:keep])
            time.sleep(0.2)  # the server is reading the body when the connection goes

    def firmware(self) -> list[dict]:
        reply = requests.get(
            f"{self.base}/api/v1/firmware",
            headers={"Authorization": f"ApiKey {self.key}"},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        return list(reply.json()["results"])

    def leftovers(self) -> list[str]:
        stored = self.var / "media" / "firmware"
        temporary = self.var / "uploads"
        return [
            str(p) for folder in (stored, temporary) if folder.exists() for p in folder.iterdir()
        ]


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    var = tmp_path_factory.mktemp("cut-uploads")
    (var / "uploads").mkdir()
    env = server_env(var, FILE_UPLOAD_TEMP_DIR=str(var / "uploads"))
    manage(env, "migrate", "--noinput")
    key = json.loads(
        manage(env, "apikey", "create", "--name", "ci", "--role", "operator", "--json")
    )
    with gunicorn(env) as base:
        yield Installation(base, key["token"], var)


@pytest.mark.parametrize(
    "where",
    ["in the form fields", "in the file's part header", "early in the file", "at the file's end"],
)
def test_a_cut_upload_leaves_nothing(installation: Installation, where: str) -> None:
    content = os.urandom(SIZE)
    body = multipart("2.0.0", content)
    file_at = body.index(b"\r\n\r\n", body.index(b'name="file"')) + 4
    keep = {
        "in the form fields": 40,
        "in the file's part header": file_at - 30,
        "early in the file": file_at + 64 * 1024,
        "at the file's end": len(body) - 10,  # everything but the closing boundary
    }[where]
    installation.send_part(body, keep)
    time.sleep(0.5)
    assert installation.firmware() == []
    assert installation.leftovers() == []


def test_after_cut_uploads_a_whole_one_is_stored(installation: Installation) -> None:
    content = os.urandom(SIZE)
    installation.send_part(multipart("3.0.0", content), SIZE // 2)
    reply = requests.post(
        f"{installation.base}/api/v1/firmware",
        headers={
            "Authorization": f"ApiKey {installation.key}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        },
        data=multipart("3.0.0", content),
        timeout=30,
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["sha256"] == hashlib.sha256(content).hexdigest()
    (stored,) = installation.firmware()
    assert stored["version"] == "3.0.0"
    assert [Path(p).parent.name for p in installation.leftovers()] == ["firmware"]
