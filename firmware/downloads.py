"""Serving firmware bytes with HEAD, ETag, Range and If-Range, so devices resume cut downloads.

The views decide who may download; this module decides how the bytes go out:

- S3: a redirect to a short-lived signed URL (ota_site.storage), so the bytes never pass through
  Python. HEAD is answered here from the database.
- Local storage behind nginx (``FIRMWARE_X_ACCEL_PREFIX`` set): an empty answer whose
  ``X-Accel-Redirect`` names the file in nginx's internal location (ota_site/deploy/nginx.conf);
  nginx sends it with Range, If-Range and HEAD, and re-sends our ETag and checksum headers.
  Conditions answered without bytes (304, 416) are still decided here.
- Local storage without nginx (the embedded mode, tests): a full download is a FileResponse
  (gunicorn sends it with sendfile); a range is streamed in bounded chunks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import IO
from urllib.parse import quote

from django.conf import settings
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    StreamingHttpResponse,
)

from firmware.models import Firmware
from ota_site.errors import json_error

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One byte range as (first, last) inclusive; None to serve it all; "unsatisfiable" for 416.

    A Range header that is malformed or asks for several ranges is ignored (RFC 9110 allows it),
    so the client gets the whole file with 200.
    """
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # suffix: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


def _read_range(handle: IO[bytes], first: int, length: int) -> Iterator[bytes]:
    try:
        handle.seek(first)
        remaining = length
        while remaining > 0:
            chunk = handle.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    finally:
        handle.close()


def serve_firmware(request: HttpRequest, firmware: Firmware) -> HttpResponseBase:
    size = firmware.file_size
    name = str(firmware.file.name)
    etag = f'"{firmware.checksum}"'
    common = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{name.rsplit("/", 1)[-1]}"',
        "Cache-Control": "private, max-age=86400",
        "X-Checksum-Sha256": firmware.checksum,
    }
    if settings.STORAGE == "s3" and request.method == "GET":
        url = firmware.file.storage.url(name)
        redirect = HttpResponseRedirect(url)
        redirect["Cache-Control"] = "no-store"
        return redirect

    if_none_match = request.headers.get("If-None-Match", "")
    if if_none_match and (if_none_match.strip() == "*" or etag in if_none_match):
        not_modified = HttpResponse(status=304)
        for header in ("ETag", "Accept-Ranges", "Cache-Control"):
            not_modified[header] = common[header]
        return not_modified

    wanted: tuple[int, int] | str | None = None
    range_header = request.headers.get("Range")
    if range_header:
        if_range = request.headers.get("If-Range")
        # If-Range with another entity tag (or a date, which only nginx hands out, as
        # Last-Modified, and judges itself) means the client's partial copy is of something
        # else: send the whole current file.
        if if_range is None or if_range.strip() == etag:
            wanted = parse_range(range_header, size)
    if wanted == "unsatisfiable":
        refusal = json_error(416, "range_not_satisfiable", f"The file has {size} bytes.")
        refusal["Content-Range"] = f"bytes */{size}"
        return refusal

    if settings.FIRMWARE_X_ACCEL_PREFIX and settings.STORAGE != "s3":
        return _x_accel_redirect(name, common)

    if isinstance(wanted, tuple):
        first, last = wanted
        length = last - first + 1
        status = 206
        extra = {"Content-Range": f"bytes {first}-{last}/{size}"}
    else:
        first, length, status, extra = 0, size, 200, {}

    response: HttpResponseBase
    if request.method == "HEAD":
        response = HttpResponse(status=status, content_type="application/octet-stream")
    elif status == 200:
        whole = FileResponse(
            firmware.file.storage.open(name, "rb"), content_type="application/octet-stream"
        )
        whole.block_size = CHUNK
        response = whole
    else:
        handle = firmware.file.storage.open(name, "rb")
        response = StreamingHttpResponse(
            _read_range(handle, first, length),
            status=status,
            content_type="application/octet-stream",
        )
    for header, value in {**common, **extra}.items():
        response[header] = value
    response["Content-Length"] = str(length)
    return response


def _x_accel_redirect(name: str, headers: dict[str, str]) -> HttpResponse:
    """Hand the file to nginx. It keeps Content-Type, Content-Disposition, Cache-Control and
    Accept-Ranges from this answer; the internal location adds back ETag and X-Checksum-Sha256
    (nginx would otherwise make its own ETag from the file's mtime and size, and If-Range
    with ours would no longer match). The same for GET and HEAD, so both carry the same
    headers."""
    response = HttpResponse(b"", content_type="application/octet-stream")
    for header, value in headers.items():
        response[header] = value
    response["X-Accel-Redirect"] = settings.FIRMWARE_X_ACCEL_PREFIX + quote(name)
    return response
