"""PKCS#11 custody of firmware signing keys: Ed25519 keys made in a token (an HSM) that never
lets their private halves out.

Used by ``firmware.signing`` only, for keys whose ``backend`` is ``pkcs11``. A key is a pair of
token objects labelled with the key id (CKA_LABEL = key id, CKA_ID = its bytes); the private one
is sensitive and not extractable, so a database dump, the master key and even this process's
memory hold nothing that signs. The token is named by settings (``PKCS11_MODULE``,
``PKCS11_TOKEN_LABEL``, ``PKCS11_PIN``); python-pkcs11 is an optional dependency (the ``hsm``
extra), imported on first use.

One session per process, opened lazily and shared under a lock: gunicorn sync workers have one
thread each, and a login per request would be slow on a real HSM and noisy in its audit log.
After an error on a session that had worked, the library is re-initialised (which also drops a
stale login) and the operation is tried once more. A failure to open a session is remembered:
a PIN the token refused is never tried again with the same settings (HSMs lock the user after a
few wrong PINs, and `signing_key list` asks about every key), any other failure for
``OPEN_RETRY_AFTER`` seconds, so a token that is down costs no time on every request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings

if TYPE_CHECKING:
    from pkcs11 import Session

logger = logging.getLogger(__name__)

ED25519_OID = "1.3.101.112"  # RFC 8410, as CKA_EC_PARAMS of the key pair
OPEN_RETRY_AFTER = 10.0  # seconds
_T = TypeVar("_T")


class HsmError(Exception):
    """The token cannot be used: settings, library, token, login or device."""


class KeyMissing(HsmError):
    """The token has no private key object with this label."""


class PinRefused(HsmError):
    """The token refused the PIN (wrong, locked, expired): never tried again as it is."""


@dataclass(frozen=True)
class _Config:
    module: str
    token_label: str
    pin: str


@dataclass(frozen=True)
class _Refusal:
    config: _Config
    reason: str
    until: float | None  # time.monotonic(); None: until the settings change


@dataclass
class _State:
    config: _Config | None = None
    session: Session | None = None
    lib: Any = None
    pid: int = 0
    refused: _Refusal | None = None


_state = _State()
# PKCS#11 sessions are not safe for concurrent use; threads of one process take turns.
_lock = threading.Lock()


def _config() -> _Config:
    missing = [
        name
        for name in ("PKCS11_MODULE", "PKCS11_TOKEN_LABEL", "PKCS11_PIN")
        if not getattr(settings, name, "")
    ]
    if missing:
        raise HsmError(f"{', '.join(missing)} not set")
    return _Config(settings.PKCS11_MODULE, settings.PKCS11_TOKEN_LABEL, settings.PKCS11_PIN)


def _describe(exc: BaseException) -> str:
    # python-pkcs11 errors often carry no message; their class names the PKCS#11 return value.
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open(config: _Config) -> Session:
    refused = _state.refused
    if refused is not None and refused.config == config:
        if refused.until is None:
            raise HsmError(f"{refused.reason} (not tried again until the PIN setting changes)")
        if time.monotonic() < refused.until:
            raise HsmError(refused.reason)
    try:
        session = _login(config)
    except HsmError as exc:
        until = None if isinstance(exc, PinRefused) else time.monotonic() + OPEN_RETRY_AFTER
        _state.refused = _Refusal(config, str(exc), until)
        raise
    _state.refused = None
    return session


def _login(config: _Config) -> Session:
    try:
        import pkcs11
    except ImportError as exc:
        raise HsmError("python-pkcs11 is not installed (pip install 'ota-server[hsm]')") from exc
    try:
        lib = pkcs11.lib(config.module)
        if _state.lib is lib and _state.pid != os.getpid():
            # A forked child (a preloading server) must initialise the library anew: PKCS#11
            # state, sessions included, is not inherited across fork.
            lib.reinitialize()
        _state.lib, _state.pid = lib, os.getpid()
        token = lib.get_token(token_label=config.token_label)
        session = token.open(rw=True, user_pin=config.pin)
    except pkcs11.NoSuchToken as exc:
        raise HsmError(f"no token labelled {config.token_label!r} in {config.module}") from exc
    except (
        pkcs11.PinIncorrect,
        pkcs11.PinInvalid,
        pkcs11.PinLenRange,
        pkcs11.PinExpired,
        pkcs11.PinLocked,
    ) as exc:
        raise PinRefused(
            f"the token {config.token_label!r} refused the PIN: {_describe(exc)}"
        ) from exc
    except (RuntimeError, OSError) as exc:  # every PKCS11Error is a RuntimeError
        raise HsmError(f"cannot open the token {config.token_label!r}: {_describe(exc)}") from exc
    _state.config, _state.session = config, session
    logger.info("opened a PKCS#11 session on token %r", config.token_label)
    return session


def _reset() -> None:
    """Forget the session; re-initialising the library drops it and its login even if broken."""
    _state.session = _state.config = None
    if _state.lib is None:
        return
    try:
        _state.lib.reinitialize()
    except RuntimeError as exc:
        logger.warning("re-initialising the PKCS#11 library failed: %s", _describe(exc))
        return
    _state.pid = os.getpid()


def _run(operation: Callable[[Session], _T]) -> _T:
    """Run ``operation`` on this process's session; once more on a fresh one if that one broke."""
    config = _config()
    with _lock:
        if _state.session is not None and (_state.config != config or _state.pid != os.getpid()):
            _reset()  # new settings, or a forked child: a fresh session on the right token
        reused = _state.session is not None
        session = _state.session if _state.session is not None else _open(config)
        try:
            return operation(session)
        except HsmError:
            raise  # an answer (no such key), not a broken session
        except RuntimeError as exc:  # every PKCS11Error is a RuntimeError
            _reset()
            if not reused:
                raise HsmError(_describe(exc)) from exc
            logger.warning("the PKCS#11 session failed (%s); opening a new one", _describe(exc))
        session = _open(config)
        try:
            return operation(session)
        except HsmError:
            raise
        except RuntimeError as exc:
            _reset()
            raise HsmError(_describe(exc)) from exc


def _private_key(session: Session, label: str) -> Any:
    import pkcs11

    try:
        return session.get_key(
            object_class=pkcs11.ObjectClass.PRIVATE_KEY,
            key_type=pkcs11.KeyType.EC_EDWARDS,
            label=label,
        )
    except pkcs11.NoSuchKey as exc:
        raise KeyMissing(f"no private key labelled {label!r} in the token") from exc
    except pkcs11.MultipleObjectsReturned as exc:
        raise HsmError(f"more than one private key labelled {label!r} in the token") from exc


def _raw_point(encoded: bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 CKA_EC_POINT (a DER OCTET STRING, or raw on some tokens)."""
    if len(encoded) == 34 and encoded[:2] == b"\x04\x20":
        return encoded[2:]
    if len(encoded) == 32:
        return encoded
    raise HsmError(f"the token returned an Ed25519 public key of {len(encoded)} bytes")


def generate(label_of: Callable[[bytes], str]) -> tuple[str, bytes]:
    """Make an Ed25519 key pair in the token; return its label and its raw public key.

    ``label_of`` names the pair from its public key (the key id), which is known only once the
    token has made it; the pair is relabelled before anyone can look it up.
    """

    def make(session: Session) -> tuple[str, bytes]:
        import pkcs11
        from pkcs11 import Attribute
        from pkcs11.util.ec import encode_named_curve_parameters

        params = session.create_domain_parameters(
            pkcs11.KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
            local=True,
        )
        public, private = params.generate_keypair(
            store=True,
            label="ota-pending",
            mechanism=pkcs11.Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            public_template={Attribute.VERIFY: True, Attribute.PRIVATE: False},
            # Sensitive and never extractable: the token signs, nobody reads the key out.
            private_template={
                Attribute.SIGN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
        try:
            raw = _raw_point(public[Attribute.EC_POINT])
            label = label_of(raw)
            for item in (public, private):
                item[Attribute.LABEL] = label
                item[Attribute.ID] = bytes.fromhex(label)
        except BaseException:
            for item in (private, public):
                item.destroy()
            raise
        return label, raw

    return _run(make)


def sign(label: str, data: bytes) -> bytes:
    """Sign with the token's private key labelled ``label`` (pure EdDSA, 64 bytes)."""

    def do_sign(session: Session) -> bytes:
        import pkcs11

        return bytes(_private_key(session, label).sign(data, mechanism=pkcs11.Mechanism.EDDSA))

    return _run(do_sign)


def destroy(label: str) -> int:
    """Remove the key pair labelled ``label`` (after a key that was never recorded); the count."""

    def remove(session: Session) -> int:
        from pkcs11 import Attribute

        found = list(session.get_objects({Attribute.LABEL: label}))
        for item in found:
            item.destroy()
        return len(found)

    return _run(remove)


def close() -> None:
    """Close this process's session and forget refusals (tests, and a clean shutdown)."""
    with _lock:
        _reset()
        _state.refused = None
