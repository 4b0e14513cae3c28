"""Versions compare as versions, never as text."""

from __future__ import annotations

import random

import pytest

from ota_site.versions import InvalidVersion, Version, version_key

ORDERED = [
    "0.9",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.2.0",
    "1.9.0",
    "1.10.0",
    "2",
    "2.0.0.1",
    "2024.1.15.7",
]


def test_semver_precedence() -> None:
    shuffled = ORDERED[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=Version.parse) == ORDERED


def test_the_database_key_sorts_like_the_versions() -> None:
    shuffled = ORDERED[:]
    random.Random(11).shuffle(shuffled)
    assert sorted(shuffled, key=version_key) == ORDERED


@pytest.mark.parametrize(
    ("a", "b"), [("1.2", "1.2.0"), ("v1.2.3", "1.2.3"), ("1.0.0+build.5", "1.0.0"), ("01.2", "1.2")]
)
def test_equal_versions(a: str, b: str) -> None:
    assert Version.parse(a) == Version.parse(b)
    assert version_key(a) == version_key(b)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "latest",
        "1..2",
        "1.2.3.4.5",
        "1.2.3-",
        "1.2.3+",
        " 1.2",
        "1.2 ",
        "1234567890.1",
        "1.0.0-rc.1234567890",
        "1.0-ü",
        "x" * 65,
        "1.2.3\n",
        "\uff11.\u0660.0",  # non-ASCII digits
    ],
)
def test_invalid_versions(text: str) -> None:
    with pytest.raises(InvalidVersion):
        Version.parse(text)
    assert version_key(text) == ""
