"""Streaming an image to ``download.part``, resuming wherever it stopped.

- **Dropped connection**: the download asks again with ``Range: bytes=<have>-`` and
  ``If-Range: <ETag>``, a few times in a row (more as long as each try makes progress).
- **Process restart or power cut**: the caller persists ``ResumePoint`` (the ETag and the number
  of bytes fsynced to the part file) every ``SYNC_BYTES`` and at every progress report. On the
  next start the part file is cut back to that length, since bytes written after the last fsync
  may not have reached the disk intact, the kept bytes are hashed again, and the download goes on
  from there.
- A ``200`` where a ``206`` was asked for (the image changed, so If-Range did not match) starts
  over from byte zero, as does ``416`` (the part file is longer than the image). An answer that
  would make the file longer than the manifest's size is rejected.
- The sha256 is computed while the bytes arrive; the caller compares it with the manifest.
- A bandwidth limit (a token bucket that starts empty, so N bytes take at least N/limit seconds),
  a progress callback at most every ``progress_interval`` seconds, and a deadline for the whole
  download: a server that drips bytes just fast enough to dodge the read timeout is cut off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests
import urllib3

from ota_client import faults
from ota_client.api import Offline, ServerClient

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
SYNC_BYTES = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadRejected(Exception):
    """The server sent something that cannot be the image (too long, wrong range)."""


@dataclass(frozen=True)
class ResumePoint:
    """What survives a restart: the entity tag of the partial bytes and how many are on disk."""

    etag: str | None = None
    synced: int = 0


class TokenBucket:
    """Limits a byte stream to ``rate`` bytes/s with bursts of at most ``capacity`` bytes."""

    def __init__(
        self,
        rate: float,
        capacity: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.sleep = sleep
        self.tokens = 0.0  # empty at the start: the first bytes wait too
        self.last = clock()

    def consume(self, amount: int) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= amount
        if self.tokens < 0:
            # Pay the debt now; the bucket is then empty at the moment we wake up.
            self.sleep(-self.tokens / self.rate)
            self.tokens = 0.0
            self.last = self.clock()


class _Dropped(Exception):
    """The connection broke while reading the body."""


class Downloader:
    def __init__(
        self,
        server: ServerClient,
        part_path: Path,
        *,
        bandwidth_limit: int = 0,
        progress_interval: float = 5.0,
        deadline: float = 3600.0,
        on_progress: Callable[[int], None] | None = None,
        on_sync: Callable[[ResumePoint], None] | None = None,
        reconnects: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server
        self.part_path = part_path
        self.bandwidth_limit = bandwidth_limit
        self.progress_interval = progress_interval
        self.deadline = deadline
        self.on_progress = on_progress or (lambda _done: None)
        self.on_sync = on_sync or (lambda _point: None)
        self.reconnects = reconnects
        self.clock = clock
        self.sleep = sleep

    def download(self, url: str, size: int, resume: ResumePoint) -> str:
        """Fetch ``url`` into the part file until it has ``size`` bytes; return its sha256.

        Raises Offline when the server cannot be reached (the part file is kept for the next
        try), Refused when it refuses the download, DownloadRejected for impossible answers.
        """
        deadline = self.clock() + self.deadline
        read_size = READ_SIZE
        bucket = None
        if self.bandwidth_limit > 0:
            read_size = max(1024, min(READ_SIZE, self.bandwidth_limit // 8))
            bucket = TokenBucket(
                self.bandwidth_limit, read_size, clock=self.clock, sleep=self.sleep
            )
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        with self.part_path.open("a+b") as part:
            digest, offset, etag = self._prepare(part, resume, size)
            synced = offset
            last_progress = self.clock()
            failures = 0
            restarts = 0  # starts from byte 0 forced by the server (200, 416), bounded
            while offset < size:
                if self.clock() > deadline:
                    raise Offline(f"the download did not finish within {self.deadline:.0f} s")
                headers = {"Accept-Encoding": "identity"}
                if offset > 0:
                    headers["Range"] = f"bytes={offset}-"
                    headers["If-Range"] = etag or ""
                before = offset
                try:
                    response = self.server.open_download(url, headers)
                except Offline:
                    failures += 1
                    if failures > self.reconnects:
                        raise
                    self.sleep(min(2.0**failures, 30.0))
                    continue
                with response:
                    start = self._start_of(response, offset, size)
                    if start != offset:
                        restarts += 1
                        if restarts > self.reconnects:
                            raise DownloadRejected(
                                f"the download had to start over {restarts} times "
                                f"(last: HTTP {response.status_code} at byte {offset})"
                            )
                        logger.info(
                            "restarting the download from byte 0 (HTTP %s at byte %s)",
                            response.status_code,
                            offset,
                        )
                        digest, offset, synced = hashlib.sha256(), 0, 0
                        self._truncate(part, 0)
                    etag = _strong_etag(response.headers.get("ETag"))
                    self.on_sync(ResumePoint(etag=etag, synced=synced))
                    if start is None:  # 416, or a range we did not ask for: ask again from 0
                        failures += 1
                        if failures > self.reconnects:
                            raise DownloadRejected(
                                f"the server keeps refusing the range (HTTP {response.status_code})"
                            )
                        continue
                    raw = response.raw
                    read = getattr(raw, "read1", None) or raw.read
                    try:
                        while True:
                            chunk = self._read(read, read_size)
                            if not chunk:
                                break
                            if offset + len(chunk) > size:
                                raise DownloadRejected(
                                    f"the server sent more than the manifest's {size} bytes"
                                )
                            if bucket is not None:
                                bucket.consume(len(chunk))
                            part.write(chunk)
                            digest.update(chunk)
                            offset += len(chunk)
                            now = self.clock()
                            tick = now - last_progress >= self.progress_interval
                            if tick or offset - synced >= SYNC_BYTES:
                                synced = self._sync(part, etag, offset)
                                faults.checkpoint("mid-download")
                            if tick:
                                last_progress = now
                                self.on_progress(offset)
                            if now > deadline:
                                self._sync(part, etag, offset)  # keep what we have
                                raise Offline(
                                    f"the download did not finish within {self.deadline:.0f} s"
                                )
                    except _Dropped as exc:
                        logger.info("the download broke at byte %s: %s", offset, exc)
                failures = 0 if offset > before else failures + 1
                if offset < size and failures > self.reconnects:
                    synced = self._sync(part, etag, offset)
                    raise Offline(f"the download keeps breaking at byte {offset}")
                if offset < size and failures:
                    self.sleep(min(2.0**failures, 30.0))
            self._sync(part, etag, offset)
        self.on_progress(offset)
        return digest.hexdigest()

    # --- Helpers ------------------------------------------------------------------------------

    def _prepare(
        self, part: IO[bytes], resume: ResumePoint, size: int
    ) -> tuple[Any, int, str | None]:
        """Cut the part file back to what was synced and hash it again."""
        part.seek(0, os.SEEK_END)
        have = part.tell()
        keep = min(have, resume.synced) if resume.etag else 0
        if keep > size:
            keep = 0  # longer than the image: not a prefix of it
        if keep != have:
            self._truncate(part, keep)
        digest = hashlib.sha256()
        part.seek(0)
        remaining = keep
        while remaining > 0:
            chunk = part.read(min(1024 * 1024, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        part.seek(0, os.SEEK_END)
        if keep:
            logger.info("resuming the download at byte %s", keep)
        return digest, keep, resume.etag if keep else None

    @staticmethod
    def _start_of(response: requests.Response, offset: int, size: int) -> int | None:
        """Where this answer's body starts in the image: 0 for a whole image (200), the range's
        start for a 206, None when the body is of no use and the download must start over
        (416: the part file is longer than the image; a range we did not ask for)."""
        if response.status_code == 200:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != size:
                raise DownloadRejected(f"the server's file has {length} bytes, the manifest {size}")
            return 0
        if response.status_code != 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) != size:
                raise DownloadRejected(f"the server's file has {total} bytes, the manifest {size}")
            return None
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if match is None:
            return None
        first, total = int(match[1]), match[3]
        if total != "*" and int(total) != size:
            raise DownloadRejected(f"the server's file has {total} bytes, the manifest says {size}")
        return first if first == offset else None

    @staticmethod
    def _read(read: Callable[[int], bytes], amount: int) -> bytes:
        try:
            return read(amount)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            # Only network errors come out of read(); file errors happen in write() outside.
            raise _Dropped(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _truncate(part: IO[bytes], length: int) -> None:
        part.flush()
        part.truncate(length)
        part.seek(0, os.SEEK_END)

    def _sync(self, part: IO[bytes], etag: str | None, offset: int) -> int:
        part.flush()
        os.fsync(part.fileno())
        self.on_sync(ResumePoint(etag=etag, synced=offset))
        return offset


def _strong_etag(value: str | None) -> str | None:
    # A weak tag cannot be used with If-Range (RFC 9110 13.1.5): without one we never resume.
    if not value or value.startswith("W/"):
        return None
    return value
