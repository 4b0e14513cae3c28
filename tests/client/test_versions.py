"""The client's copy of the version rules agrees with the server's, version for version."""

from __future__ import annotations

import itertools

import pytest

from ota_client import versions as client
from ota_site import versions as server

CORPUS = [
    "0",
    "1",
    "1.2",
    "1.2.0",
    "1.2.0.0",
    "v1.2.3",
    "1.2.3",
    "1.2.10",
    "1.10.0",
    "1.9.9",
    "2024.01.15.7",
    "2024.1.15.7",
    "1.0.0-rc.1",
    "1.0.0-rc.2",
    "1.0.0-rc.10",
    "1.0.0-rc",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-0",
    "1.0.0-00",
    "1.0.0-a-b",
    "1.0.0-a.b",
    "1.0.0+build.5",
    "1.0.0-rc.1+build.5",
    "1.0.0+20130313144700",
    "999999999.999999999.999999999.999999999",
    "1.0.0-999999999",
    # Not versions, on both sides:
    "",
    "v",
    "1.",
    ".1",
    "1..2",
    "1.2.3.4.5",
    "1000000000",
    "1.0.0-",
    "1.0.0+",
    "1.0.0-rc..1",
    "1.0.0-1000000000",
    "1.0.0_rc1",
    "V1.0.0",
    " 1.0.0",
    "1.0.0 ",
    "1.0.0\n",
    # Python's \d matches any Unicode digit, so both sides accept these as 1.0.0 (a quirk
    # of the server's rules that the copy keeps; [0-9] would refuse them).
    "\uff11.0.0",
    "1.\u0660.0",
    "x" * 65,
    "1." + "1" * 70,
]


def parse_both(text: str) -> tuple[client.Version | None, server.Version | None]:
    mine: client.Version | None
    theirs: server.Version | None
    try:
        mine = client.Version.parse(text)
    except client.InvalidVersion:
        mine = None
    try:
        theirs = server.Version.parse(text)
    except server.InvalidVersion:
        theirs = None
    return mine, theirs


@pytest.mark.parametrize("text", CORPUS)
def test_both_accept_and_refuse_the_same_texts(text: str) -> None:
    mine, theirs = parse_both(text)
    assert (mine is None) == (theirs is None)
    if mine is not None and theirs is not None:
        assert mine.release == theirs.release
        assert mine.prerelease == theirs.prerelease
        assert mine.sort_key == theirs.sort_key


def test_both_order_every_pair_the_same_way() -> None:
    valid = [text for text in CORPUS if parse_both(text)[0] is not None]
    assert len(valid) > 25
    for a, b in itertools.product(valid, repeat=2):
        ca, cb = client.Version.parse(a), client.Version.parse(b)
        sa, sb = server.Version.parse(a), server.Version.parse(b)
        assert (ca < cb, ca == cb, ca > cb) == (sa < sb, sa == sb, sa > sb), (a, b)
        assert client.compare(a, b) == (sa > sb) - (sa < sb)


def test_semver_precedence() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.9.0",
        "1.10.0",
    ]
    for lower, higher in itertools.pairwise(ordered):
        assert client.compare(lower, higher) == -1, (lower, higher)
    assert client.compare("1.2", "1.2.0.0") == 0
    assert client.compare("1.0.0+a", "1.0.0+b") == 0
    assert client.compare("v2024.01.5", "2024.1.5") == 0
