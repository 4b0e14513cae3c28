"""The client's side of the device API (docs/api.md), on requests.

Two kinds of failure, because the agent treats them differently:

``Offline``
    The server could not be reached or could not answer now: connection errors, timeouts, 5xx,
    and 429/503 (with the server's ``Retry-After`` in ``retry_after``). Try again later; nothing
    is wrong with the request. A 429 is ``RateLimited``, a kind of ``Offline``.
``Refused``
    The server answered 4xx with its ``{code, detail}``. Sending the same request again will not
    help.

Authentication is handled here: the device enrolls once (credentials in
``state_dir/credentials.json``, mode 0600, written atomically), trades its secret for short-lived
access tokens, fetches a new token when one expires (401 ``token_expired``), and enrolls again
when an operator reset its credentials (401 ``credentials_reset``) if an enrollment token is
configured. Every call has a timeout.

Rate limits: a 429 whose ``Retry-After`` is at most ``RATE_LIMIT_MAX_WAIT`` is waited out (plus a
little jitter, so devices behind one address do not come back at the same instant) and the
request sent once more; it is not a failure of anything. A longer wait, or a second 429, raises
``RateLimited`` and the agent comes back after ``retry_after``. Calls made while a download stream
is open pass ``wait=False``: sleeping there would stall the stream.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from ota_client import __version__
from ota_client.config import Config
from ota_client.identity import Identity, IdentityError
from ota_client.system import atomic_write_json

logger = logging.getLogger(__name__)

USER_AGENT = f"ota-client/{__version__}"
# Refresh a little before the server's expiry so a token never dies in the middle of a call.
TOKEN_MARGIN = 30.0
MAX_REDIRECTS = 3
# The longest Retry-After of a 429 that a call waits out itself before it gives up for this cycle.
RATE_LIMIT_MAX_WAIT = 60.0


class ServerError(Exception):
    """Base class of the errors below."""


class Offline(ServerError):
    """The server is unreachable or cannot answer now; try again later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Offline):
    """429: the device (or its address) made too many requests; come back after retry_after."""


class Refused(ServerError):
    """The server answered 4xx: this request will not succeed as it is."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Credentials:
    device_id: str
    device_secret: str


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def clock_offset(date: str | None) -> float | None:
    """The server's time minus this device's, in seconds, from an HTTP ``Date`` header; None
    without a readable one. For telling a wrong device clock apart in messages only: the header
    is not signed, so no decision rests on it."""
    if not date:
        return None
    try:
        when = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp() - time.time()


def error_of(response: requests.Response) -> tuple[str, str]:
    """The server's ``{code, detail}``, or a stand-in for a body that is not ours (a proxy's)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return body["code"], str(body.get("detail", ""))
    return f"http_{response.status_code}", response.reason or ""


class ServerClient:
    """One device's connection to the server. Not shared between threads: one per agent."""

    def __init__(
        self,
        config: Config,
        *,
        session: requests.Session | None = None,
        running_version: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rate_limit_max_wait: float = RATE_LIMIT_MAX_WAIT,
    ) -> None:
        self.config = config
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        # Registration tells the server what the device runs; the agent knows, not the config.
        self.running_version = running_version or (lambda: config.current_version)
        self.clock = clock
        self.sleep = sleep
        self.rate_limit_max_wait = rate_limit_max_wait
        self.credentials_path = config.state_dir / "credentials.json"
        # With [identity] certificate = true, or once enrolled by CSR (`ota-client enroll --csr`
        # without it): enrolled by CSR, tokens by mTLS (no secret).
        identity = Identity(config.state_dir)
        self.identity = identity if config.use_certificate or identity.has_certificate() else None
        self._use_client_certificate()
        self._token: str | None = None
        # The server's clock minus ours, from the last answer's Date header (clock_offset).
        self.clock_offset: float | None = None
        self._token_expires = 0.0
        self.enrolled_now = False  # set when this process enrolled (for trust-on-first-use)

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.request_timeout)

    # --- Credentials ------------------------------------------------------------------------

    def credentials(self) -> Credentials | None:
        try:
            data = json.loads(self.credentials_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # A broken file cannot be repaired by us; enrolling again needs an operator's reset.
            raise Refused(0, "credentials_unreadable", f"{self.credentials_path}: {exc}") from exc
        # A device enrolled by CSR has no secret: its certificate is its credential.
        return Credentials(device_id=data["device_id"], device_secret=data.get("device_secret", ""))

    def device_id(self) -> str:
        return self.ensure_enrolled().device_id

    def ensure_enrolled(self) -> Credentials:
        return self.credentials() or self.enroll()

    def enroll(self) -> Credentials:
        """Register with the enrollment token and store the device's credentials."""
        token = self.config.read_enrollment_token()
        if not token:
            raise Refused(
                0, "not_enrolled", "the device has no credentials and no enrollment token"
            )
        body = {
            "enrollment_token": token,
            "hardware_id": self.config.hardware_id,
            "device_type": self.config.device_type,
            "current_version": self.running_version(),
            "metadata": self.config.metadata,
        }
        if self.identity is not None:
            body["csr"] = self.identity.csr()
            path = "/api/v1/devices/enroll"
        else:
            path = "/api/v1/devices/register"
        reply = self._checked(self._send("POST", self._url(path), json=body))
        if self.identity is not None:
            self._save_certificate(reply)
        credentials = Credentials(
            device_id=str(reply["device_id"]), device_secret=str(reply.get("device_secret") or "")
        )
        self._save_credentials(credentials)
        self._remember_token(reply)
        self.enrolled_now = True
        logger.info("enrolled as device %s", credentials.device_id)
        return credentials

    def _save_credentials(self, credentials: Credentials) -> None:
        data = {
            "device_id": credentials.device_id,
            "device_secret": credentials.device_secret,
            "hardware_id": self.config.hardware_id,
            "server": self.config.server,
        }
        # atomic_write_json creates the file with mkstemp, so it is 0600 from the first byte.
        atomic_write_json(self.credentials_path, data)
        os.chmod(self.credentials_path, 0o600)

    def _remember_token(self, reply: Mapping[str, Any]) -> None:
        self._token = str(reply["access_token"])
        lifetime = float(reply.get("expires_in") or 0)
        self._token_expires = self.clock() + max(lifetime - TOKEN_MARGIN, 0.0)

    def access_token(self) -> str:
        if self._token is not None and self.clock() < self._token_expires:
            return self._token
        credentials = self.ensure_enrolled()
        if self._token is not None and self.clock() < self._token_expires:
            return self._token  # enrolling just now came with a token
        if credentials.device_secret:
            body = {"device_id": credentials.device_id, "secret": credentials.device_secret}
        else:
            # No secret: the TLS connection carries the device certificate (mTLS via nginx).
            body = {"device_id": credentials.device_id}
        response = self._send("POST", self._url("/api/v1/devices/token"), json=body)
        if response.status_code == 401 and self.config.read_enrollment_token():
            # The credential no longer works: an operator reset the device's credentials.
            logger.warning("the device credential was refused; enrolling again")
            self.enroll()
            assert self._token is not None
            return self._token
        self._remember_token(self._checked(response))
        assert self._token is not None
        return self._token

    def _use_client_certificate(self) -> None:
        cert = self.identity.client_cert() if self.identity is not None else None
        if cert is not None:
            self.http.cert = cert

    def _save_certificate(self, reply: Mapping[str, Any]) -> None:
        assert self.identity is not None
        try:
            self.identity.save_certificate(
                str(reply["certificate"]), str(reply.get("ca_certificate") or "")
            )
        except (KeyError, IdentityError) as exc:
            raise Refused(0, "certificate_invalid", f"the issued certificate: {exc}") from exc
        self._use_client_certificate()

    def renew_certificate(self) -> None:
        """Ask for a new certificate for the device key (before the current one expires).

        The key stays, and the certificate file is replaced atomically (Identity.save_certificate)
        only once the new one is checked: a power cut leaves the old certificate with the same
        key, which the server accepts until it expires."""
        if self.identity is None:
            return
        path = f"/api/v1/devices/{self.device_id()}/certificate"
        reply = self.call("POST", path, json={"csr": self.identity.csr()})
        self._save_certificate(self._dict(reply))

    def certificate_renewal_due(self) -> bool:
        """True when the device has a certificate that is due for renewal
        (``[identity] renew_after`` of its lifetime has passed)."""
        if self.identity is None or not self.identity.has_certificate():
            return False
        return self.identity.needs_renewal(fraction=self.config.certificate_renew_after)

    # --- Calls ---------------------------------------------------------------------------------

    def check(self) -> dict[str, Any]:
        return self._dict(self.call("GET", "/api/v1/updates/check"))

    def heartbeat(self, current_version: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
        path = f"/api/v1/devices/{self.device_id()}/heartbeat"
        body = {"current_version": current_version, "metadata": dict(metadata)}
        return self._dict(self.call("POST", path, json=body))

    def report_status(self, body: Mapping[str, Any], *, wait: bool = True) -> dict[str, Any]:
        return self._dict(self.call("POST", "/api/v1/status", json=dict(body), wait=wait))

    def report_validation(self, body: Mapping[str, Any], *, wait: bool = True) -> dict[str, Any]:
        return self._dict(self.call("POST", "/api/v1/validation", json=dict(body), wait=wait))

    def public_keys(self) -> list[dict[str, Any]]:
        reply = self.call("GET", "/api/v1/firmware/keys")
        if not isinstance(reply, list):
            raise Offline("the key list is not a JSON list")
        return [item for item in reply if isinstance(item, dict)]

    def call(self, method: str, path: str, *, json: Any = None, wait: bool = True) -> Any:
        """An authenticated call; refreshes the token or enrolls again when the server asks.
        ``wait=False``: a 429 raises RateLimited at once instead of being waited out."""
        refreshed = reenrolled = False
        while True:
            headers = {"Authorization": f"Bearer {self.access_token()}"}
            response = self._send(method, self._url(path), json=json, headers=headers, wait=wait)
            if response.status_code == 401:
                code, _ = error_of(response)
                if code in ("token_expired", "token_invalid") and not refreshed:
                    refreshed = True
                    self._token = None
                    continue
                if (
                    code == "credentials_reset"
                    and not reenrolled
                    and self.config.read_enrollment_token()
                ):
                    reenrolled = True
                    logger.warning("the server reset the device's credentials; enrolling")
                    self.enroll()
                    continue
            return self._checked(response)

    def open_download(
        self, url: str, headers: Mapping[str, str], *, timeout: tuple[float, float] | None = None
    ) -> requests.Response:
        """GET the image as a stream. Follows redirects (to S3 or a CDN) by hand, so the device's
        token goes to the server only, never to a storage host."""
        current = url
        refreshed = False
        for _ in range(MAX_REDIRECTS + 1):
            send = dict(headers)
            if self._same_origin(current):
                send["Authorization"] = f"Bearer {self.access_token()}"
            response = self._send(
                "GET", current, headers=send, stream=True, timeout=timeout or self.timeout
            )
            if response.status_code in (301, 302, 303, 307, 308) and "Location" in response.headers:
                response.close()
                current = urljoin(current, response.headers["Location"])
                continue
            if response.status_code == 401 and not refreshed and self._same_origin(current):
                code, _ = error_of(response)
                response.close()
                if code in ("token_expired", "token_invalid"):
                    refreshed = True
                    self._token = None
                    continue
                raise Refused(401, code, "the download was refused")
            if response.status_code in (200, 206, 416):
                return response
            try:
                self._checked(response)
            finally:
                response.close()
            raise Refused(response.status_code, "unexpected_status", "unexpected download answer")
        raise Refused(310, "too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

    # --- Plumbing ------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.config.server + path

    def _same_origin(self, url: str) -> bool:
        a, b = urlsplit(url), urlsplit(self.config.server)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def _send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        timeout: tuple[float, float] | None = None,
        wait: bool = True,
    ) -> requests.Response:
        """Send once; after a 429 with a short enough Retry-After, wait and send once more."""
        waited = False
        while True:
            try:
                response = self.http.request(
                    method,
                    url,
                    json=json,
                    headers=dict(headers or {}),
                    timeout=timeout or self.timeout,
                    stream=stream,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                path = urlsplit(url).path
                raise Offline(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
            offset = clock_offset(response.headers.get("Date"))
            if offset is not None:
                self.clock_offset = offset
            if response.status_code != 429 or waited or not wait:
                return response
            delay = retry_after_seconds(response.headers.get("Retry-After"))
            if delay is None or delay > self.rate_limit_max_wait:
                return response
            response.close()
            waited = True
            delay += random.uniform(0.0, 0.5 + delay * 0.1)  # noqa: S311 (jitter)
            logger.info("rate limited on %s %s; retrying in %.1f s", method, url, delay)
            self.sleep(delay)

    def _checked(self, response: requests.Response) -> Any:
        status = response.status_code
        if status == 429:
            code, detail = error_of(response)
            raise RateLimited(
                f"{status} {code}: {detail}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status == 503 or status >= 500:
            code, detail = error_of(response)
            raise Offline(
                f"{status} {code}: {detail}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status >= 400:
            code, detail = error_of(response)
            raise Refused(status, code, detail)
        if status == 204 or not response.content:
            return {}
        try:
            return response.json()
        except ValueError as exc:
            raise Offline(f"{status}: the answer is not JSON") from exc

    @staticmethod
    def _dict(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Offline("the answer is not a JSON object")
        return value
