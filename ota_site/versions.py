"""Firmware versions, compared as versions (1.10.0 > 1.9.0), never as text.

Accepted: ``[v]MAJOR[.MINOR[.PATCH[.BUILD]]][-PRERELEASE][+METADATA]`` with numeric parts of up to
nine digits, which covers SemVer 2.0 and the usual four-part embedded versions. Precedence follows
SemVer: missing parts are zero (1.2 == 1.2.0), leading zeros are ignored (2024.01 == 2024.1),
numeric pre-release identifiers have at most nine digits, a pre-release sorts before its release
(1.0.0-rc.1 < 1.0.0), pre-release identifiers compare numerically when numeric, and build metadata
is ignored.

``sort_key`` encodes that order as a string so the database can sort and filter versions with
plain string comparison (``Device.current_version_key``, ``Firmware.version_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

MAX_LENGTH = 64
_NUMERIC_WIDTH = 9
_PARTS = 4

_VERSION_RE = re.compile(
    r"""
    ^v?
    (?P<release>[0-9]{1,9}(?:\.[0-9]{1,9}){0,3})
    (?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?
    (?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?
    \Z""",
    re.VERBOSE,
)


class InvalidVersion(ValueError):
    pass


@total_ordering
@dataclass(frozen=True)
class Version:
    release: tuple[int, ...]
    prerelease: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Version:
        if not isinstance(text, str) or not text or len(text) > MAX_LENGTH:
            raise InvalidVersion(f"a version is 1 to {MAX_LENGTH} characters")
        match = _VERSION_RE.match(text)
        if match is None:
            raise InvalidVersion(f"{text!r} is not a version like 1.2.3, 1.2.3-rc.1 or 2024.1.15.7")
        release = tuple(int(part) for part in match["release"].split("."))
        release = release + (0,) * (_PARTS - len(release))
        prerelease = tuple(match["pre"].split(".")) if match["pre"] else ()
        if any(ident.isdigit() and len(ident) > _NUMERIC_WIDTH for ident in prerelease):
            raise InvalidVersion(f"{text!r} has a numeric pre-release part over nine digits")
        return cls(release=release, prerelease=prerelease, text=text)

    @property
    def sort_key(self) -> str:
        """A string whose lexical order is the version order (see the module docstring)."""
        release = ".".join(f"{part:0{_NUMERIC_WIDTH}d}" for part in self.release)
        if not self.prerelease:
            return release + "~"  # '~' sorts after every pre-release character
        parts = []
        for ident in self.prerelease:
            if ident.isdigit():
                parts.append("0" + f"{int(ident):0{_NUMERIC_WIDTH}d}")
            else:
                parts.append("1" + ident)
        return release + "-" + "!".join(parts)

    def _cmp_key(self) -> tuple[tuple[int, ...], int, tuple[tuple[int, int, str], ...]]:
        pre = tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in self.prerelease)
        return (self.release, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._cmp_key() < other._cmp_key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._cmp_key() == other._cmp_key()

    def __hash__(self) -> int:
        return hash(self._cmp_key())

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    return Version.parse(text)


def version_key(text: str) -> str:
    """sort_key of a version, or "" for text that is not a version (a device that never said)."""
    try:
        return Version.parse(text).sort_key
    except InvalidVersion:
        return ""
