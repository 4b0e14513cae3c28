"""TUF verification of every update (``tuf.ngclient.Updater``), on top of the signed manifest.

Why both: the manifest signature proves which key signed an image, but not that the server's
answer is current. The TUF repository under ``/tuf/metadata/`` adds what a signature cannot:

- rollback: timestamp, snapshot and targets versions never go backwards (the client keeps the
  last trusted metadata in ``state_dir/tuf``);
- freeze: expired metadata is refused, so a mirror that keeps serving yesterday's answers is
  caught within a day (the timestamp's lifetime);
- mix-and-match: targets must be the exact version the snapshot names (consistent snapshots);
- key compromise: the root (offline keys, a threshold) can rotate every key, and a new root must
  be signed by a threshold of the old root's keys and of its own.

Per update cycle (``check_offer``): a new Updater bootstrapped with the root the device shipped
with (``trust.tuf_root``; newer roots are walked to from the cache and the server), ``refresh()``,
``get_targetinfo(offer.tuf_target)``, and the target must agree with the offer in length,
sha256, version, device type, firmware id and release counter. After the download
(``verify_file``) the file is checked against the same TargetFile. TUF does not stop an old
image that the repository still lists: the agent's release counter does.

Metadata is fetched with the device's token (``DeviceFetcher``, through ``ServerClient``) and the
whole refresh has a deadline (``trust.tuf_deadline``): python-tuf's own timeout is between bytes,
so a server that drips data would otherwise hold the device forever; UpdaterConfig's maximum
lengths bound the size of each file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
    SlowRetrievalError,
)
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from ota_client import __version__
from ota_client.api import Offline, Refused, ServerClient
from ota_client.config import Config
from ota_client.verifier import Offer, VerificationError

CHUNK = 16 * 1024


class DeviceFetcher(FetcherInterface):
    """Metadata downloads through the device's ServerClient (its token goes to the server only,
    never to another host), all of them within one deadline."""

    def __init__(
        self,
        server: ServerClient,
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.deadline = deadline
        self.clock = clock
        # The last Offline (a 429's Retry-After survives python-tuf's DownloadError this way).
        self.offline: Offline | None = None

    def _check_deadline(self, url: str) -> None:
        if self.clock() > self.deadline:
            raise SlowRetrievalError(f"the TUF metadata took too long ({url})")

    def _fetch(self, url: str) -> Iterator[bytes]:
        self._check_deadline(url)
        # No single read may wait past the deadline either.
        remaining = max(self.deadline - self.clock(), 0.1)
        connect, read = self.server.timeout
        try:
            response = self.server.open_download(
                url, {"Accept": "application/json"}, timeout=(connect, min(read, remaining))
            )
        except Refused as exc:
            raise DownloadHTTPError(str(exc), exc.status) from exc
        except Offline as exc:
            self.offline = exc
            raise DownloadError(str(exc)) from exc
        if response.status_code != 200:
            response.close()
            raise DownloadHTTPError(f"{url}: {response.status_code}", response.status_code)
        return self._chunks(url, response)

    def _chunks(self, url: str, response: requests.Response) -> Iterator[bytes]:
        # read1 returns what has arrived: read(n) would wait for n bytes, so a server dripping
        # a byte at a time would pass the deadline check only at the end.
        try:
            while True:
                chunk = response.raw.read1(CHUNK, decode_content=True)
                if not chunk:
                    return
                self._check_deadline(url)
                yield chunk
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.close()


def metadata_url(config: Config) -> str:
    return config.tuf_metadata_url or f"{config.server}/tuf/metadata/"


def check_offer(
    config: Config,
    server: ServerClient,
    offer: Offer,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Verify the repository and the offer's target; return the target to keep in the state.

    Raises VerificationError when the metadata or the target must not be trusted (a forged,
    rolled back, mixed or expired repository, or a target that differs from the offer), and
    Offline when the metadata cannot be fetched completely now (network, or over the deadline
    or the size limits: tried again next cycle, never installed meanwhile).
    """
    if config.tuf_root is None:
        raise VerificationError("no TUF root is configured (trust.tuf_root)")
    if not offer.tuf_target:
        raise VerificationError("the offer names no TUF target")
    try:
        bootstrap = config.tuf_root.read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read the TUF root {config.tuf_root}: {exc}") from exc
    cache = config.state_dir / "tuf"
    cache.mkdir(parents=True, exist_ok=True)
    fetcher = DeviceFetcher(server, clock() + config.tuf_deadline, clock)
    try:
        updater = Updater(
            str(cache),
            metadata_url(config),
            fetcher=fetcher,
            config=UpdaterConfig(app_user_agent=f"ota-client/{__version__}"),
            bootstrap=bootstrap,
        )
        updater.refresh()
        target = updater.get_targetinfo(offer.tuf_target)
    except DownloadError as exc:
        retry_after = fetcher.offline.retry_after if fetcher.offline is not None else None
        raise Offline(
            f"TUF metadata: {type(exc).__name__}: {exc}", retry_after=retry_after
        ) from exc
    except (RepositoryError, ValueError) as exc:
        message = f"TUF metadata rejected: {type(exc).__name__}: {exc}"
        if isinstance(exc, ExpiredMetadataError):
            message += _clock_hint(server.clock_offset)
        raise VerificationError(message) from exc
    if target is None:
        raise VerificationError(f"the TUF repository lists no target {offer.tuf_target!r}")
    check_target(target, offer)
    return {"path": target.path, **target.to_dict()}


# A device clock this far ahead of the server's Date is named in the refusal of "expired"
# metadata: the metadata may be valid, and the fix is the clock, not the server.
CLOCK_AHEAD_HINT = 24 * 3600


def _clock_hint(offset: float | None) -> str:
    """Expired metadata is refused whatever the clock (TUF cannot tell a wrong clock from a
    freeze attack, and the Date header is not signed); the message says which it likely is."""
    if offset is None or -offset < CLOCK_AHEAD_HINT:
        return ""
    return (
        f" (this device's clock is {-offset / 86400:.0f} days ahead of the server's Date: "
        "set it right, for example with NTP, and the update can go ahead)"
    )


def check_target(target: TargetFile, offer: Offer) -> None:
    """The TUF target must describe exactly the offered image."""
    custom = target.custom if isinstance(target.custom, dict) else {}
    pairs: list[tuple[str, Any, Any]] = [
        ("length", target.length, offer.size),
        ("sha256", target.hashes.get("sha256"), offer.sha256),
        ("version", custom.get("version"), offer.version),
        ("device_type", custom.get("device_type"), offer.device_type),
        ("release_counter", custom.get("release_counter", 0), offer.release_counter),
    ]
    if offer.firmware_id:
        pairs.append(("firmware_id", custom.get("firmware_id"), offer.firmware_id))
    for name, signed, offered in pairs:
        if signed != offered:
            raise VerificationError(
                f"the TUF target's {name} {signed!r} differs from the offer's {offered!r}"
            )


def verify_file(stored: dict[str, Any], path: Path) -> None:
    """Check a downloaded file against the TargetFile kept by ``check_offer``."""
    data = dict(stored)
    target = TargetFile.from_dict(data, str(data.pop("path")))
    try:
        with path.open("rb") as handle:
            target.verify_length_and_hashes(handle)
    except LengthOrHashMismatchError as exc:
        raise VerificationError(f"the download does not match its TUF target: {exc}") from exc
