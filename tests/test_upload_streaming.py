"""A multi-megabyte firmware upload is streamed to disk: never held whole in memory."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

from django.test import Client
from django.test.client import ClientHandler

from firmware.models import Firmware

SIZE = 32 * 1024 * 1024
BOUNDARY = "ota-test-boundary-7MA4YWxkTrZu0gW"


def write_multipart(path: Path, size: int) -> str:
    """Write a multipart body with a `size`-byte file to disk, in chunks; return its sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB of bytes that do not compress
    with path.open("wb") as body:
        for name, value in (("version", "7.0.0"), ("device_type", "board-a")):
            head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            body.write(f"{head}{value}\r\n".encode())
        body.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.img"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            body.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        body.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return digest.hexdigest()


def test_a_32_mib_upload_peaks_far_below_its_size(operator, tmp_path: Path) -> None:
    body_path = tmp_path / "body"
    sha256 = write_multipart(body_path, SIZE)
    client = Client()
    client.force_login(operator)
    cookie = "; ".join(f"{k}={v.value}" for k, v in client.cookies.items())
    # Django's WSGI request and multipart parser, fed from a file (as gunicorn feeds a socket);
    # ClientHandler only keeps the test's database connection open.
    handler = ClientHandler(enforce_csrf_checks=False)
    with body_path.open("rb") as stream:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/api/v1/firmware",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_COOKIE": cookie,
            "CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}",
            "CONTENT_LENGTH": str(os.path.getsize(body_path)),
            "wsgi.input": stream,
            "wsgi.url_scheme": "http",
            "wsgi.errors": open(os.devnull, "w"),  # noqa: SIM115
        }
        tracemalloc.start()
        try:
            response = handler(environ)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 201, response.getvalue()[:500]
    firmware = Firmware.objects.get(version="7.0.0")
    assert firmware.file_size == SIZE and firmware.checksum == sha256
    # Streaming in 64 KiB chunks: the peak is a few MiB at most, nowhere near the 32 MiB file.
    assert peak < 4 * 1024 * 1024, f"peak Python allocation {peak} bytes"
