"""SWUpdate images (.swu): read the ``sw-description`` of an upload without loading the image.

A .swu is a cpio "newc" archive (magic ``070701``, or ``070702`` with checksums) whose first
member is ``sw-description``, a libconfig text (see /work/shared/PROTOCOLS.md). An upload only
needs that first member: the server takes the image's version from it, and keeps its description
and hardware compatibility in the firmware's metadata. So this module reads one 110-byte header,
the name and at most ``SW_DESCRIPTION_MAX`` bytes from the (temporary) uploaded file, and seeks
back to the start for storage; the payload behind it is never read.

The libconfig parser covers the grammar SWUpdate's images use: settings ``name = value`` or
``name : value`` ended by ``;`` or ``,`` (optional), groups ``{}``, lists ``()``, arrays ``[]``,
strings (with escapes, adjacent strings joined), integers (decimal and hex, ``L`` suffix), floats,
booleans and the comments ``#``, ``//`` and ``/* */``. ``@include`` is refused: an image cannot
include files from the server. PyPI's libconfig readers (libconf, last released in 2019) are not
maintained, hence this small parser.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import IO, Any

from ota_site.errors import ServiceError

NEWC_MAGICS = (b"070701", b"070702")  # 070702 carries a checksum of each member's data
SW_DESCRIPTION = "sw-description"
SW_DESCRIPTION_MAX = 1024 * 1024
_HEADER_SIZE = 110
_NAME_MAX = 4096  # PATH_MAX: a longer name is a broken header, not a file name
_HEX8 = re.compile(rb"[0-9A-Fa-f]{8}\Z")
# Sections directly under `software` that describe what to install, not a board or selection.
_INSTALL_SECTIONS = frozenset(
    {"images", "files", "scripts", "partitions", "bootenv", "uboot", "mtd", "embedded-script"}
)
_MAX_SECTION_DEPTH = 4  # software.<board>.<selection>.<mode> is the deepest SWUpdate looks


class InvalidSwu(ServiceError):
    """The upload is a .swu whose sw-description cannot be read."""

    code = "invalid_swu"


class LibconfigError(ValueError):
    """The text is not valid libconfig (in the subset this parser accepts)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class SwuInfo:
    """What the server keeps of a sw-description.

    ``hardware_compatibility`` holds the revisions of ``software.hardware-compatibility`` as
    written, followed by ``"<board>:<revision>"`` for each revision of a board section
    (``software.<board>...hardware-compatibility``, the notation of swupdate's ``-H``);
    ``boards`` has the same board revisions by board.
    """

    version: str | None
    hardware_compatibility: list[str]
    description: str | None
    name: str | None
    boards: dict[str, list[str]] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """The ``swu`` entry of Firmware.metadata."""
        return {
            "version": self.version,
            "hardware_compatibility": list(self.hardware_compatibility),
            "description": self.description,
        }


# --- cpio ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    checksum: int | None  # None for 070701
    data_offset: int  # from the start of the member's header


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _read_member_header(stream: IO[bytes]) -> _Member:
    """The first newc header and name at the stream's position; InvalidSwu if it is not one."""
    header = _read_exact(stream, _HEADER_SIZE)
    if len(header) < _HEADER_SIZE or header[:6] not in NEWC_MAGICS:
        raise InvalidSwu(
            "The image is not a cpio archive in the newc format (magic 070701 or 070702)."
        )
    fields = [header[offset : offset + 8] for offset in range(6, _HEADER_SIZE, 8)]
    if not all(_HEX8.match(value) for value in fields):
        raise InvalidSwu("The image's first cpio header is broken (a field is not hexadecimal).")
    numbers = [int(value, 16) for value in fields]
    size, name_size, checksum = numbers[6], numbers[11], numbers[12]
    if not 2 <= name_size <= _NAME_MAX:
        raise InvalidSwu("The image's first cpio header is broken (bad name length).")
    raw_name = _read_exact(stream, name_size)
    if len(raw_name) < name_size or raw_name[-1:] != b"\0":
        raise InvalidSwu("The image's first cpio header is broken (truncated name).")
    name = raw_name[:-1].decode("utf-8", errors="replace")
    data_offset = _HEADER_SIZE + name_size
    data_offset += -data_offset % 4  # the name is padded to a 4-byte boundary
    return _Member(
        name=name,
        size=size,
        checksum=checksum if header[:6] == b"070702" else None,
        data_offset=data_offset,
    )


def read_sw_description_bytes(stream: IO[bytes]) -> bytes:
    """The raw sw-description: the first member of the newc archive that starts at the
    stream's position, which must be named ``sw-description`` and be at most 1 MiB."""
    start = stream.tell()
    member = _read_member_header(stream)
    if member.name != SW_DESCRIPTION:
        raise InvalidSwu(
            f"The first file of a .swu must be {SW_DESCRIPTION}, not {member.name[:100]!r}."
        )
    if member.size > SW_DESCRIPTION_MAX:
        raise InvalidSwu(
            f"The image's {SW_DESCRIPTION} is {member.size} bytes; at most "
            f"{SW_DESCRIPTION_MAX} are accepted."
        )
    stream.seek(start + member.data_offset)
    data = _read_exact(stream, member.size)
    if len(data) < member.size:
        raise InvalidSwu(f"The image ends inside its {SW_DESCRIPTION}.")
    if member.checksum is not None and sum(data) & 0xFFFFFFFF != member.checksum:
        raise InvalidSwu(f"The cpio checksum of the image's {SW_DESCRIPTION} does not match.")
    return data


# --- libconfig ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n\f\v]+)
    | (?P<comment>(?:\#|//)[^\n]*|/\*.*?\*/)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<float>[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?(?![A-Za-z0-9_.])
        | [-+]?[0-9]+[eE][-+]?[0-9]+(?![A-Za-z0-9_.]))
    | (?P<hex>0[xX][0-9A-Fa-f]+L{0,2}(?![A-Za-z0-9_.]))
    | (?P<integer>[-+]?[0-9]+L{0,2}(?![A-Za-z0-9_.]))
    | (?P<boolean>(?i:true|false)(?![-A-Za-z0-9_*]))
    | (?P<name>[A-Za-z*][-A-Za-z0-9_*]*)
    | (?P<punct>[=:;,{}()\[\]])
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t", "f": "\f", "a": "\a", "b": "\b"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.)", re.DOTALL)
_MAX_DEPTH = 64  # deeper nesting is not a real sw-description; bounds the recursion


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    line: int


def _unescape(body: str, line: int) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] == "x" and len(escape) == 3:
            char = chr(int(escape[1:], 16))
        elif escape in _ESCAPES:
            char = _ESCAPES[escape]
        else:
            raise LibconfigError(f"unknown escape \\{escape} in a string", line)
        if char == "\0":
            raise LibconfigError("a string may not contain a NUL character", line)
        return char

    return _ESCAPE.sub(replace, body)


class _Parser:
    """Recursive descent over tokens read one at a time (a 1 MiB text is never a token list)."""

    def __init__(self, text: str) -> None:
        if "\0" in text:
            line = text[: text.index("\0")].count("\n") + 1
            raise LibconfigError("the text contains a NUL byte", line)
        self.text = text
        self.position = 0
        self.line = 1
        self.current: _Token | None = None
        self._advance()

    def _advance(self) -> None:
        """Move ``current`` to the next token (None at the end), skipping blanks and comments."""
        text = self.text
        while self.position < len(text):
            match = _TOKEN.match(text, self.position)
            if match is None:
                self._unexpected()
            assert match is not None
            kind, value = match.lastgroup or "", match.group()
            line = self.line
            self.line += value.count("\n")
            self.position = match.end()
            if kind not in ("space", "comment"):
                self.current = _Token(kind, value, line)
                return
        self.current = None

    def _unexpected(self) -> None:
        rest = self.text[self.position : self.position + 8]
        if rest.startswith("/*"):
            raise LibconfigError("a /* comment is not closed", self.line)
        if rest.startswith('"'):
            raise LibconfigError("a string is not closed", self.line)
        if rest.startswith("@include"):
            raise LibconfigError("@include is not supported", self.line)
        raise LibconfigError(f"unexpected character {rest[0]!r}", self.line)

    def _next(self, what: str) -> _Token:
        token = self.current
        if token is None:
            raise LibconfigError(f"the text ends where {what} was expected", self.line)
        self._advance()
        return token

    def _at(self, punct: str) -> bool:
        token = self.current
        return token is not None and token.kind == "punct" and token.text == punct

    def configuration(self) -> dict[str, Any]:
        return self._settings(depth=0, closing=None)

    def _settings(self, *, depth: int, closing: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            if self.current is None:
                if closing is not None:
                    raise LibconfigError(f"a group is not closed with {closing!r}", self.line)
                return result
            if closing is not None and self._at(closing):
                self._advance()
                return result
            name = self._next("a setting name")
            if name.kind not in ("name", "boolean"):  # `TRUE_x`-like names lex as names anyway
                raise LibconfigError(f"expected a setting name, found {name.text!r}", name.line)
            separator = self._next("'=' or ':'")
            if separator.kind != "punct" or separator.text not in ("=", ":"):
                raise LibconfigError(
                    f"expected '=' or ':' after {name.text!r}, found {separator.text!r}",
                    separator.line,
                )
            if name.text in result:
                raise LibconfigError(f"duplicate setting {name.text!r}", name.line)
            result[name.text] = self._value(depth)
            if self._at(";") or self._at(","):
                self._advance()

    def _value(self, depth: int) -> Any:
        if depth >= _MAX_DEPTH:
            raise LibconfigError("the settings are nested too deeply", self.line)
        token = self._next("a value")
        if token.kind == "punct":
            if token.text == "{":
                return self._settings(depth=depth + 1, closing="}")
            if token.text == "(":
                return self._sequence(")", depth, scalars_only=False)
            if token.text == "[":
                return self._sequence("]", depth, scalars_only=True)
            raise LibconfigError(f"expected a value, found {token.text!r}", token.line)
        return self._scalar(token)

    def _sequence(self, closing: str, depth: int, *, scalars_only: bool) -> list[Any]:
        items: list[Any] = []
        while not self._at(closing):
            if scalars_only:
                token = self._next("a value")
                if token.kind in ("punct", "name"):
                    raise LibconfigError(
                        f"an array holds only scalar values, found {token.text!r}", token.line
                    )
                items.append(self._scalar(token))
            else:
                items.append(self._value(depth + 1))
            if self._at(","):
                self._advance()
            elif not self._at(closing):
                token = self._next(repr(closing))
                raise LibconfigError(
                    f"expected ',' or {closing!r}, found {token.text!r}", token.line
                )
        self._advance()
        return items

    def _scalar(self, token: _Token) -> Any:
        if token.kind == "string":
            parts = [_unescape(token.text[1:-1], token.line)]
            # Adjacent strings are one string, as in C.
            while self.current is not None and self.current.kind == "string":
                following = self._next("a string")
                parts.append(_unescape(following.text[1:-1], following.line))
            return "".join(parts)
        if token.kind == "integer":
            return int(token.text.rstrip("L"))
        if token.kind == "hex":
            return int(token.text.rstrip("L"), 16)
        if token.kind == "float":
            return float(token.text)
        if token.kind == "boolean":
            return token.text.lower() == "true"
        raise LibconfigError(f"expected a value, found {token.text!r}", token.line)


def parse_libconfig(text: str) -> dict[str, Any]:
    """A libconfig document as Python values: groups are dicts, lists and arrays are lists.

    Raises LibconfigError (with the line) for anything outside the grammar.
    """
    return _Parser(text).configuration()


# --- sw-description ----------------------------------------------------------------------------


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # `hardware-compatibility = "1.0"`: one revision
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidSwu(f"{where} must be an array of strings.")
    return list(value)


def _optional_string(software: dict[str, Any], key: str) -> str | None:
    value = software.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidSwu(f"software.{key} in the sw-description must be a string.")
    return value


def _board_revisions(section: dict[str, Any], path: str, depth: int) -> list[str]:
    """The hardware-compatibility revisions of a board section and its selections, in order."""
    revisions: list[str] = []
    if "hardware-compatibility" in section:
        revisions += _string_list(
            section["hardware-compatibility"], f"{path}.hardware-compatibility"
        )
    if depth < _MAX_SECTION_DEPTH:
        for key, value in section.items():
            if isinstance(value, dict) and key not in _INSTALL_SECTIONS:
                revisions += _board_revisions(value, f"{path}.{key}", depth + 1)
    return list(dict.fromkeys(revisions))


def sw_description_info(text: str) -> SwuInfo:
    """What the server keeps of a sw-description text (libconfig, or JSON like SWUpdate's
    CONFIG_JSON builds read). InvalidSwu when it cannot be parsed or has no software group."""
    try:
        if text.lstrip().startswith("{"):
            root: Any = json.loads(text)
        else:
            root = parse_libconfig(text)
    except LibconfigError as exc:
        raise InvalidSwu(f"The image's {SW_DESCRIPTION} cannot be parsed: {exc}.") from exc
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError, or absurd nesting
        raise InvalidSwu(f"The image's {SW_DESCRIPTION} is not valid JSON: {exc}.") from exc
    software = root.get("software") if isinstance(root, dict) else None
    if not isinstance(software, dict):
        raise InvalidSwu(f"The image's {SW_DESCRIPTION} has no 'software' group.")
    hardware = []
    if "hardware-compatibility" in software:
        hardware = _string_list(
            software["hardware-compatibility"], "software.hardware-compatibility"
        )
    boards: dict[str, list[str]] = {}
    for key, value in software.items():
        if isinstance(value, dict) and key not in _INSTALL_SECTIONS:
            revisions = _board_revisions(value, f"software.{key}", depth=1)
            if revisions:
                boards[key] = revisions
    for board, revisions in boards.items():
        hardware += [f"{board}:{revision}" for revision in revisions]
    info = SwuInfo(
        version=_optional_string(software, "version"),
        hardware_compatibility=list(dict.fromkeys(hardware)),
        description=_optional_string(software, "description"),
        name=_optional_string(software, "name"),
        boards=boards,
    )
    texts = [info.version, info.description, info.name, *info.hardware_compatibility]
    if not all(_storable(text) for text in texts if text is not None):
        raise InvalidSwu(
            f"The image's {SW_DESCRIPTION} has a NUL character or a lone surrogate in a string."
        )
    return info


def _storable(text: str) -> bool:
    """Whether PostgreSQL's jsonb can hold the text (JSON input can escape NUL and surrogates)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_sw_description(stream: IO[bytes]) -> SwuInfo:
    """Parse the sw-description of the .swu that starts at the stream's position.

    Reads the first cpio member only; the stream is left wherever reading stopped.
    """
    data = read_sw_description_bytes(stream)
    # Structure and keys are ASCII; a stray byte in a description must not refuse the image.
    return sw_description_info(data.decode("utf-8", errors="replace"))


# --- uploads -----------------------------------------------------------------------------------


def looks_like_swu(upload: Any) -> bool:
    """Whether an uploaded file is to be read as a .swu: its name ends with ``.swu``, or it is
    a newc archive whose first member is ``sw-description``. (Another cpio archive, such as an
    initramfs image, is stored as any firmware.) Leaves the file at its start."""
    try:
        if str(getattr(upload, "name", "") or "").lower().endswith(".swu"):
            return True
        upload.seek(0)
        return _read_member_header(upload).name == SW_DESCRIPTION
    except InvalidSwu:
        return False
    finally:
        upload.seek(0)


def read_upload(upload: Any) -> SwuInfo | None:
    """The sw-description of an uploaded .swu, or None for any other image.

    Reads only the first cpio member from the uploaded (temporary) file and seeks back to its
    start, so storing it afterwards copies the whole image. InvalidSwu for a .swu whose
    sw-description cannot be read.
    """
    if not looks_like_swu(upload):
        return None
    try:
        upload.seek(0)
        return read_sw_description(upload)
    finally:
        upload.seek(0)
