"""A small HTTP proxy in front of the live server that records what the client sends and breaks
firmware downloads on request: it cuts the connection after some bytes or flips a byte.

The client reaches the server through it; the server builds the offer's download URL from the
Host header the proxy passes on, so downloads come through the proxy too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int
    range: str | None = None
    if_range: str | None = None
    body: Any = None


@dataclass
class Fault:
    """What to do to the body of the next firmware download that reaches the proxy."""

    # "cut": close the connection after `at` bytes; "corrupt": flip the byte at `at`;
    # "ignore-range": drop Range and If-Range, as a cache that cannot do ranges would;
    # "slow": send at most `at` bytes a second, so a test can act during the download.
    kind: str
    at: int = 0


@dataclass
class Proxy:
    upstream: str
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    download_faults: list[Fault] = field(default_factory=list)
    # While set, the server is "away": every new connection is dropped unanswered, and a
    # download in progress is cut (counted in `dropped`).
    down: bool = False
    dropped: int = 0
    # Rewrites the JSON of update-check answers (to forge offers).
    tamper_check: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # Which paths are firmware downloads (faults apply to them): our API's by default; the
    # hawkBit DDI tests pass their artifact paths.
    is_download: Callable[[str], bool] = lambda path: path.endswith("/download")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def downloads(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and self.is_download(s.path)]

    def reports(self) -> list[Any]:
        return [
            s.body
            for s in self.seen
            if s.method == "POST" and s.path in ("/api/v1/status", "/api/v1/validation")
        ]

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.download_faults.pop(0) if self.download_faults else None


def _handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.forward()

        def do_HEAD(self) -> None:
            self.forward()

        def do_POST(self) -> None:
            self.forward()

        def do_PUT(self) -> None:
            self.forward()

        def hang_up(self) -> None:
            with proxy.lock:
                proxy.dropped += 1
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

        def forward(self) -> None:
            if proxy.down:
                self.hang_up()
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            is_download = self.command == "GET" and proxy.is_download(self.path.split("?")[0])
            fault = proxy.next_fault() if is_download else None
            if fault is not None and fault.kind == "ignore-range":
                headers = {
                    k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")
                }
            upstream = requests.request(
                self.command,
                proxy.upstream + self.path,
                headers=headers,
                data=body,
                stream=True,
                allow_redirects=False,
                timeout=30,
            )
            parsed: Any = None
            if body:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
            with proxy.lock:
                proxy.seen.append(
                    Seen(
                        method=self.command,
                        path=self.path.split("?")[0],
                        status=upstream.status_code,
                        range=self.headers.get("Range"),
                        if_range=self.headers.get("If-Range"),
                        body=parsed,
                    )
                )
            content: bytes | None = None
            if self.path.startswith("/api/v1/updates/check") and proxy.tamper_check:
                answer = proxy.tamper_check(upstream.json())
                content = json.dumps(answer).encode()
            self.send_response(upstream.status_code)
            for key, value in upstream.headers.items():
                if key.lower() in HOP_BY_HOP or (content is not None and key == "Content-Length"):
                    continue
                self.send_header(key, value)
            if content is not None:
                self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if content is not None:
                self.wfile.write(content)
                return
            sent = 0
            for chunk in upstream.raw.stream(64 * 1024, decode_content=False):
                if proxy.down:
                    upstream.close()
                    self.hang_up()
                    return
                if fault is not None and fault.kind == "cut" and sent + len(chunk) >= fault.at:
                    self.wfile.write(chunk[: fault.at - sent])
                    self.wfile.flush()
                    # The client sees the connection close before Content-Length bytes came.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    upstream.close()
                    return
                if (
                    fault is not None
                    and fault.kind == "corrupt"
                    and sent <= fault.at < sent + len(chunk)
                ):
                    index = fault.at - sent
                    chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]
                if fault is not None and fault.kind == "slow":
                    for start in range(0, len(chunk), 16 * 1024):
                        self.wfile.write(chunk[start : start + 16 * 1024])
                        self.wfile.flush()
                        time.sleep(16 * 1024 / fault.at)
                else:
                    self.wfile.write(chunk)
                sent += len(chunk)
            upstream.close()

    return Handler


@contextmanager
def running_proxy(
    upstream: str, is_download: Callable[[str], bool] | None = None
) -> Iterator[Proxy]:
    proxy = Proxy(upstream=upstream)
    if is_download is not None:
        proxy.is_download = is_download
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
