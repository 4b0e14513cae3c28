"""SWUpdate images: the sw-description parser, and uploads of .swu files (API and console)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from firmware.models import Firmware
from firmware.swu import (
    SW_DESCRIPTION_MAX,
    InvalidSwu,
    LibconfigError,
    SwuInfo,
    looks_like_swu,
    parse_libconfig,
    read_sw_description,
    read_upload,
    sw_description_info,
)
from tests.ddi import swupdate_support

# --- a small cpio "newc" writer -----------------------------------------------------------------


def newc_member(
    name: str, data: bytes, *, magic: bytes = b"070701", size: int | None = None
) -> bytes:
    """One member; ``size`` lies about the data length (for broken archives)."""
    encoded = name.encode() + b"\0"
    check = sum(data) & 0xFFFFFFFF if magic == b"070702" else 0
    fields = (1, 0o100644, 0, 0, 1, 0, len(data) if size is None else size, 0, 0, 0, 0)
    header = magic + b"".join(b"%08X" % value for value in (*fields, len(encoded), check))
    head = header + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def newc(*members: tuple[str, bytes], magic: bytes = b"070701") -> bytes:
    body = b"".join(newc_member(name, data, magic=magic) for name, data in members)
    return body + newc_member("TRAILER!!!", b"", magic=magic)


def description(version: str | None = "1.4.0", extra: str = "") -> str:
    version_line = f'  version = "{version}";\n' if version is not None else ""
    return (
        "software =\n{\n"
        f"{version_line}"
        '  description = "Board A image";\n'
        '  hardware-compatibility: [ "1.0", "1.2" ];\n'
        f"{extra}"
        '  images: ( { filename = "rootfs.ext4"; device = "/dev/mmcblk0p2"; } );\n'
        "};\n"
    )


PAYLOAD = hashlib.sha256(b"rootfs").digest() * 8192  # 256 KiB


def swu_image(text: str | None = None, payload: bytes = PAYLOAD) -> bytes:
    sw = (description() if text is None else text).encode()
    return newc(("sw-description", sw), ("sw-description.sig", b"sig"), ("rootfs.ext4", payload))


# --- libconfig ----------------------------------------------------------------------------------


def test_parses_the_value_kinds_and_both_assignments() -> None:
    parsed = parse_libconfig(
        'a = "text"; b: 42, c = -7L; d = 0x1F; e = 1.5e3; f = .5; g = TRUE; h = false;\n'
        'list = (1, "two", [3, 4], { x = 1; }, ()); array = ["1.0", "2.0"]; empty = [];\n'
        "group: { inner = { deep = 1 } }"
    )
    assert parsed == {
        "a": "text",
        "b": 42,
        "c": -7,
        "d": 31,
        "e": 1500.0,
        "f": 0.5,
        "g": True,
        "h": False,
        "list": [1, "two", [3, 4], {"x": 1}, []],
        "array": ["1.0", "2.0"],
        "empty": [],
        "group": {"inner": {"deep": 1}},
    }


def test_comments_of_all_three_kinds_are_skipped_but_not_inside_strings() -> None:
    parsed = parse_libconfig(
        "# shell comment\n"
        "a = 1; // C++ comment\n"
        "/* a C comment\n   over lines; b = 2; */\n"
        'url = "http://host/#frag"; /* inline */ note = "/* not a comment */";\n'
    )
    assert parsed == {"a": 1, "url": "http://host/#frag", "note": "/* not a comment */"}


def test_string_escapes_and_adjacent_strings() -> None:
    parsed = parse_libconfig(
        r'a = "say \"hi\"\\ \n\t\x41"; b = "one " "two"' "\n" r'  " three"; c = "";'
    )
    assert parsed == {"a": 'say "hi"\\ \n\tA', "b": "one two three", "c": ""}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('a = "open', "a string is not closed"),
        ("a = 1; /* open", "a /* comment is not closed"),
        ("a = 1; a = 2;", "duplicate setting 'a'"),
        ("a = [1, { b = 2; }];", "an array holds only scalar values"),
        ("a = (1 2);", "expected ',' or ')'"),
        ("a = { b = 1;", "a group is not closed"),
        ("a 1;", "expected '=' or ':'"),
        ("a =", "the text ends where a value was expected"),
        ("version = 1.0.0;", "unexpected character '1'"),
        ('a = "\\q";', "unknown escape \\q"),
        ('a = "\\x00";', "NUL"),
        ("a = 1;\0", "NUL byte"),
        ('@include "other.cfg"', "@include is not supported"),
        ("= 1;", "expected a setting name"),
        ("a = ;", "expected a value"),
    ],
)
def test_broken_libconfig_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(LibconfigError) as caught:
        parse_libconfig(text)
    assert message in str(caught.value)


def test_errors_name_the_line() -> None:
    with pytest.raises(LibconfigError) as caught:
        parse_libconfig('a = 1;\n/* two\nlines */\nb = "x" c;\n')
    assert caught.value.line == 4 and str(caught.value).startswith("line 4:")


def test_nesting_is_bounded_instead_of_exhausting_the_stack() -> None:
    with pytest.raises(LibconfigError, match="nested too deeply"):
        parse_libconfig("a = " + "(" * 5000 + ")" * 5000)
    assert parse_libconfig("a = " + "(" * 20 + ")" * 20)


# --- sw-description -----------------------------------------------------------------------------


def test_the_flat_layout() -> None:
    info = sw_description_info(description(extra='  name = "board-a-release";\n'))
    assert info == SwuInfo(
        version="1.4.0",
        hardware_compatibility=["1.0", "1.2"],
        description="Board A image",
        name="board-a-release",
    )
    assert info.as_metadata() == {
        "version": "1.4.0",
        "hardware_compatibility": ["1.0", "1.2"],
        "description": "Board A image",
    }


def test_board_sections_are_collected_per_board() -> None:
    text = """
    software = {
        version = "2.0.0";
        board-a = {
            hardware-compatibility = ["1.0"];
            stable = {
                copy1 = { hardware-compatibility = ["1.1", "1.0"];
                          images = ( { filename = "a"; } ); };
                copy2 = { images = ( { filename = "a"; } ); };
            };
        };
        board-b: { stable: { hardware-compatibility: ["rev-c"]; }; };
        scripts = ( { filename = "post.sh"; type = "shellscript"; } );
        bootenv: ( { name = "x"; value = "y"; } );
        empty-board = { stable = { images = (); }; };
    };
    """
    info = sw_description_info(text)
    assert info.version == "2.0.0" and info.description is None and info.name is None
    assert info.boards == {"board-a": ["1.0", "1.1"], "board-b": ["rev-c"]}
    assert info.hardware_compatibility == ["board-a:1.0", "board-a:1.1", "board-b:rev-c"]


def test_a_single_revision_string_counts_as_a_list() -> None:
    info = sw_description_info('software = { hardware-compatibility = "1.0"; };')
    assert info.hardware_compatibility == ["1.0"] and info.version is None


def test_a_json_sw_description() -> None:
    text = json.dumps({"software": {"version": "3.1", "hardware-compatibility": ["2"]}})
    assert sw_description_info(text).hardware_compatibility == ["2"]
    with pytest.raises(InvalidSwu, match="not valid JSON"):
        sw_description_info("{" * 100_000)
    with pytest.raises(InvalidSwu, match="NUL"):
        sw_description_info('{"software": {"version": "1.0\\u0000"}}')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('other = { version = "1.0"; };', "no 'software' group"),
        ('software = "1.0";', "no 'software' group"),
        (
            "software = { version = 1.5; };",
            "software.version in the sw-description must be a string",
        ),
        ("software = { hardware-compatibility = [1, 2]; };", "must be an array of strings"),
        ('software = { b = { hardware-compatibility = ("1", {}); }; };', "software.b.hardware"),
        ('software = { version = "1.0" ', "cannot be parsed: line 1"),
    ],
)
def test_unusable_sw_descriptions(text: str, message: str) -> None:
    with pytest.raises(InvalidSwu) as caught:
        sw_description_info(text)
    assert caught.value.code == "invalid_swu" and caught.value.status_code == 400
    assert message in caught.value.detail


# --- cpio ---------------------------------------------------------------------------------------


class CountingReader(io.BytesIO):
    """Remembers the furthest byte read, to show the payload is never read."""

    furthest = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


def test_reads_only_the_first_member() -> None:
    image = swu_image(payload=b"\xab" * (4 * 1024 * 1024))
    stream = CountingReader(image)
    info = read_sw_description(stream)
    assert info.version == "1.4.0" and info.hardware_compatibility == ["1.0", "1.2"]
    assert stream.furthest < 1024 < len(image)


def test_checksummed_archives_are_checked() -> None:
    sw = description().encode()
    good = newc(("sw-description", sw), magic=b"070702")
    assert read_sw_description(io.BytesIO(good)).version == "1.4.0"
    # Flip one byte of the text (its length and the header stay): the checksum no longer fits.
    broken = good.replace(b"Board A", b"Board B")
    with pytest.raises(InvalidSwu, match="checksum"):
        read_sw_description(io.BytesIO(broken))


def test_the_real_clients_test_images_are_read() -> None:
    """The images tests/ddi builds for Debian's swupdate (the same format the client checks)."""
    text = swupdate_support.sw_description(
        version="5.0.1",
        hardware="1.0",
        name="firmware",
        payload_name="payload.bin",
        payload_sha256="0" * 64,
        target_path=Path("/tmp/target"),
    )
    image = swupdate_support.cpio_newc(
        [("sw-description", text.encode()), ("sw-description.sig", b"x"), ("payload.bin", b"p")]
    )
    info = read_sw_description(io.BytesIO(image))
    assert info == SwuInfo("5.0.1", ["1.0"], "firmware", None)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"", "not a cpio archive in the newc format"),
        (b"070707" + b"0" * 200, "not a cpio archive in the newc format"),  # old ASCII cpio
        (b"\x1f\x8b" + b"\0" * 300, "not a cpio archive in the newc format"),
        (b"070701" + b"zz" * 52 + b"sw-description\0", "not hexadecimal"),
        (newc(("sw-description", b"x"))[:60], "not a cpio archive"),
        (newc(("rootfs.ext4", b"x"), ("sw-description", b"x")), "must be sw-description"),
        (newc(("./sw-description", b"x")), "must be sw-description"),
        (newc_member("sw-description", b"", size=SW_DESCRIPTION_MAX + 1), "at most 1048576"),
        (newc_member("sw-description", b"software = {};", size=400), "ends inside"),
        (newc_member("sw-description", b"software = { a = 1 }")[:112], "truncated name"),
        (b"070701" + b"0" * 88 + b"00000000" + b"00000000", "bad name length"),
        (newc(("sw-description", b"software = ( 1 );")), "no 'software' group"),
    ],
)
def test_broken_images_are_invalid_swu(image: bytes, message: str) -> None:
    with pytest.raises(InvalidSwu) as caught:
        read_sw_description(io.BytesIO(image))
    assert message in caught.value.detail and caught.value.code == "invalid_swu"


def test_a_description_of_exactly_the_limit_is_read() -> None:
    head = 'software = { version = "1.0"; };\n'
    text = head + "#" * (SW_DESCRIPTION_MAX - len(head))
    assert read_sw_description(io.BytesIO(newc(("sw-description", text.encode())))).version == "1.0"


def test_which_uploads_are_read_as_swu() -> None:
    initramfs = newc(("init", b"#!/bin/sh"), ("bin/busybox", b"\x7fELF"))
    cases = [
        (SimpleUploadedFile("image.SWU", b"anything"), True),
        (SimpleUploadedFile("image.bin", swu_image()), True),
        (SimpleUploadedFile("initramfs.cpio", initramfs), False),
        (SimpleUploadedFile("image.bin", b"\x7fELF" * 100), False),
        (SimpleUploadedFile("tiny.bin", b"0707"), False),
    ]
    for upload, expected in cases:
        upload.seek(7)
        assert looks_like_swu(upload) is expected, upload.name
        assert upload.tell() == 0
    assert read_upload(SimpleUploadedFile("initramfs.cpio", initramfs)) is None
    upload = SimpleUploadedFile("x.swu", swu_image())
    assert read_upload(upload) == sw_description_info(description())
    assert upload.tell() == 0


# --- API uploads --------------------------------------------------------------------------------


def post(client: Any, content: bytes, name: str = "board-a.swu", **fields: Any) -> Any:
    data = {"device_type": "board-a", **fields, "file": SimpleUploadedFile(name, content)}
    return client.post("/api/v1/firmware", data, format="multipart")


def stored_bytes(firmware: Firmware) -> bytes:
    with firmware.file.storage.open(str(firmware.file.name), "rb") as handle:
        return handle.read()


def assert_nothing_stored(tmp_path: Path) -> None:
    assert not Firmware.objects.exists()
    assert not [p for p in (tmp_path / "media").rglob("*") if p.is_file()]


def test_the_version_comes_from_the_sw_description(operator_api: APIClient) -> None:
    image = swu_image(payload=hashlib.sha512(b"seed").digest() * 40_000)  # 2.5 MiB: a temp file
    reply = post(operator_api, image, release_notes="From CI.", dependencies='["boot>=2"]')
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["version"] == "1.4.0" and body["filename"] == "board-a.swu"
    assert body["swu"] == {
        "version": "1.4.0",
        "hardware_compatibility": ["1.0", "1.2"],
        "description": "Board A image",
    }
    # The other metadata is output as before.
    assert body["release_notes"] == "From CI." and body["dependencies"] == ["boot>=2"]
    assert body["min_version"] is None
    # The hashes computed while streaming are those of the whole image, as stored.
    assert body["size"] == len(image)
    assert body["sha256"] == hashlib.sha256(image).hexdigest()
    assert body["sha1"] == hashlib.sha1(image).hexdigest()
    assert body["md5"] == hashlib.md5(image).hexdigest()
    firmware = Firmware.objects.get(pk=body["id"])
    assert stored_bytes(firmware) == image
    assert (firmware.checksum, firmware.sha1, firmware.md5) == (
        hashlib.sha256(image).hexdigest(),
        hashlib.sha1(image).hexdigest(),
        hashlib.md5(image).hexdigest(),
    )
    assert firmware.metadata == {
        "release_notes": "From CI.",
        "min_version": None,
        "dependencies": ["boot>=2"],
        "swu": body["swu"],
    }
    detail = operator_api.get(f"/api/v1/firmware/{firmware.pk}").json()
    assert detail["swu"] == body["swu"] and detail["version"] == "1.4.0"


def test_a_blank_version_is_taken_from_the_sw_description(operator_api: APIClient) -> None:
    reply = post(operator_api, swu_image(), version="")
    assert reply.status_code == 201, reply.content
    assert reply.json()["version"] == "1.4.0"


def test_an_equal_version_is_accepted_as_given(operator_api: APIClient) -> None:
    reply = post(operator_api, swu_image(description(version="v1.4")), version="1.4.0")
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["version"] == "1.4.0" and body["swu"]["version"] == "v1.4"


def test_a_different_version_is_refused(operator_api: APIClient, tmp_path: Path) -> None:
    reply = post(operator_api, swu_image(), version="1.5.0")
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == "swu_version_mismatch"
    assert "'1.5.0'" in body["detail"] and "'1.4.0'" in body["detail"]
    assert_nothing_stored(tmp_path)


def test_a_sw_description_version_the_server_cannot_read(operator_api: APIClient) -> None:
    image = swu_image(description(version="release-7"))
    reply = post(operator_api, image)
    assert reply.status_code == 400 and reply.json()["code"] == "invalid_swu"
    assert "'release-7'" in reply.json()["detail"]
    mismatch = post(operator_api, image, version="7.0.0")
    assert mismatch.status_code == 400 and mismatch.json()["code"] == "swu_version_mismatch"


def test_a_sw_description_without_version(operator_api: APIClient) -> None:
    image = swu_image(description(version=None))
    reply = post(operator_api, image)
    assert reply.status_code == 400 and reply.json()["code"] == "version_required"
    given = post(operator_api, image, version="2.0.0")
    assert given.status_code == 201, given.content
    assert given.json()["swu"]["version"] is None and given.json()["version"] == "2.0.0"


@pytest.mark.parametrize(
    ("content", "name", "detail"),
    [
        (b"x" * 5000, "board-a.swu", "not a cpio archive"),
        (newc(("rootfs.ext4", b"x"), ("sw-description", b"x")), "board-a.swu", "must be"),
        (swu_image('software = { version = "1.0"\n'), "board-a.swu", "cannot be parsed"),
        (swu_image('software = { version = "1.0"\n'), "image.bin", "cannot be parsed"),
        (newc_member("sw-description", b"", size=2 * 1024 * 1024), "board-a.swu", "at most"),
    ],
)
def test_an_unreadable_swu_is_refused(
    operator_api: APIClient, tmp_path: Path, content: bytes, name: str, detail: str
) -> None:
    for version in ({}, {"version": "1.0.0"}):
        reply = post(operator_api, content, name, **version)
        assert reply.status_code == 400, reply.content
        assert reply.json()["code"] == "invalid_swu" and detail in reply.json()["detail"]
    assert_nothing_stored(tmp_path)


def test_a_swu_by_content_alone(operator_api: APIClient) -> None:
    image = swu_image()
    reply = post(operator_api, image, "update.img")
    assert reply.status_code == 201, reply.content
    assert reply.json()["version"] == "1.4.0" and reply.json()["swu"]["version"] == "1.4.0"


def test_other_images_are_unchanged(operator_api: APIClient) -> None:
    content = b"\x7fELF" + bytes(range(256)) * 100
    missing = post(operator_api, content, "image.bin")
    assert missing.status_code == 400
    assert missing.json() == {
        "code": "invalid",
        "detail": "The request is not valid.",
        "errors": {"version": ["This field is required."]},
    }
    blank = post(operator_api, content, "image.bin", version=" ")
    assert blank.json()["errors"] == {"version": ["This field may not be blank."]}
    # With another invalid field, both errors come back at once, as before.
    both = post(operator_api, content, "image.bin", device_type="no spaces allowed")
    assert set(both.json()["errors"]) == {"version", "device_type"}
    reply = post(operator_api, content, "image.bin", version="3.0.0", release_notes="n")
    assert reply.status_code == 201, reply.content
    firmware = Firmware.objects.get(pk=reply.json()["id"])
    assert (
        reply.json()["swu"] is None
        and reply.json()["sha256"] == hashlib.sha256(content).hexdigest()
    )
    assert firmware.metadata == {"release_notes": "n", "min_version": None, "dependencies": []}
    # A cpio archive that is not a .swu (an initramfs) is stored like any image.
    initramfs = newc(("init", b"#!/bin/sh\n"), ("bin/busybox", b"\x7fELF"))
    cpio = post(operator_api, initramfs, "initramfs.cpio", version="3.0.1")
    assert cpio.status_code == 201 and cpio.json()["swu"] is None
    assert post(operator_api, initramfs, "initramfs.cpio").json()["errors"] == {
        "version": ["This field is required."]
    }


def test_a_swu_with_the_version_of_an_existing_firmware_is_a_duplicate(
    operator_api: APIClient,
) -> None:
    assert post(operator_api, swu_image()).status_code == 201
    again = post(operator_api, swu_image())
    assert again.status_code == 409 and again.json()["code"] == "duplicate_version"


def test_viewers_cannot_upload_a_swu(viewer: User) -> None:
    client = APIClient()
    client.force_login(viewer)
    assert post(client, swu_image()).status_code == 403
    assert not Firmware.objects.exists()


# --- console ------------------------------------------------------------------------------------


def test_the_console_form_leaves_the_version_to_the_swu(operator: User) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    html = client.get("/firmware/upload/").content.decode()
    version_input = re.search(r'<input type="text" name="version"[^>]*>', html)
    assert version_input and "required" not in version_input.group()
    assert "sw-description" in html
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert token
    image = swu_image()
    # upload.js sends the whole form: a blank version field included.
    reply = client.post(
        "/api/v1/firmware",
        {
            "file": SimpleUploadedFile("board-a.swu", image),
            "version": "",
            "device_type": "board-a",
        },
        HTTP_X_CSRFTOKEN=token.group(1),
        HTTP_ACCEPT="application/json",
    )
    assert reply.status_code == 201, reply.content
    firmware = Firmware.objects.get(pk=reply.json()["id"])
    assert firmware.version == "1.4.0" and firmware.created_by == operator
    assert firmware.sha1 == hashlib.sha1(image).hexdigest()
    assert client.get(f"/firmware/{firmware.pk}/").status_code == 200
    refused = client.post(
        "/api/v1/firmware",
        {"file": SimpleUploadedFile("x.swu", b"junk"), "version": "", "device_type": "board-a"},
        HTTP_X_CSRFTOKEN=token.group(1),
    )
    assert refused.status_code == 400 and refused.json()["code"] == "invalid_swu"
