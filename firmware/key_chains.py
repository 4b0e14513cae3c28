"""The chain of signing keys that devices follow, as offers carry it (read side, cached).

A device that trusts only an older key learns a newer one by walking endorsements
(``firmware.signing.rotate`` writes them) and drops a key when it sees a retirement statement
signed by a key it trusts. Every offer needs these facts, so they are read once and cached;
``forget`` runs whenever a rotation or a retirement changes them.
"""

from __future__ import annotations

from typing import TypedDict

from django.db import transaction

from firmware.models import SigningKey
from ota_site import cache

CHAIN_CACHE_KEY = "fw:keychain:v1"
CHAIN_CACHE_TIMEOUT = 3600


def forget() -> None:
    """Drop the cached chains now and again after commit (a reader in between cannot keep a
    stale copy)."""
    cache.delete(CHAIN_CACHE_KEY)
    transaction.on_commit(lambda: cache.delete(CHAIN_CACHE_KEY))


class ChainLink(TypedDict):
    key_id: str
    public_key: str
    endorsed_by: str | None
    endorsement: str


class RetiredKey(TypedDict):
    key_id: str
    retired_by: str
    retirement: str


class KeyChains(TypedDict):
    """Every key's public facts, cached together: the table is tiny and changes rarely."""

    keys: dict[str, ChainLink]
    order: list[str]  # oldest first
    retired: list[RetiredKey]


def chains() -> KeyChains:
    """Every key's public facts, from the cache when it holds them."""
    cached = cache.get(CHAIN_CACHE_KEY)
    if cached is not cache.MISSING:
        return cached
    keys: dict[str, ChainLink] = {}
    order: list[str] = []
    retired: list[RetiredKey] = []
    for key in SigningKey.objects.order_by("created_at", "key_id").only(
        "key_id",
        "public_key",
        "endorsed_by",
        "endorsement",
        "status",
        "retired_by",
        "retirement",
    ):
        order.append(key.key_id)
        keys[key.key_id] = ChainLink(
            key_id=key.key_id,
            public_key=key.public_key,
            endorsed_by=key.endorsed_by_id,
            endorsement=key.endorsement,
        )
        if key.status == SigningKey.Status.RETIRED and key.retired_by_id and key.retirement:
            retired.append(
                RetiredKey(
                    key_id=key.key_id, retired_by=key.retired_by_id, retirement=key.retirement
                )
            )
    chains = KeyChains(keys=keys, order=order, retired=retired)
    cache.set(CHAIN_CACHE_KEY, chains, CHAIN_CACHE_TIMEOUT)
    return chains


def key_chain(key_id: str) -> list[ChainLink]:
    """The endorsements from the oldest non-retired key to ``key_id``, oldest first.

    Walks ``endorsed_by`` back from ``key_id`` to the start of its chain, then leaves out the
    retired keys at the old end. The first link still names the (retired) key that endorsed it,
    with that endorsement made before the retirement: that is what links a device that knew only
    the retired key to the newer ones. Retired keys in the middle stay, or the chain would break.
    """
    known = chains()
    retired = {item["key_id"] for item in known["retired"]}
    links: list[ChainLink] = []
    seen: set[str] = set()
    current: str | None = key_id
    while current and current in known["keys"] and current not in seen:
        seen.add(current)
        link = known["keys"][current]
        links.append(link)
        current = link["endorsed_by"]
    links.reverse()
    while len(links) > 1 and links[0]["key_id"] in retired:
        links.pop(0)
    return links


def retired_keys() -> list[RetiredKey]:
    """The signed retirement statements, for devices to drop keys they still trust."""
    return list(chains()["retired"])
