"""The checks an offer passes before anything is downloaded (``Agent``'s idle step).

An update check's answer becomes an ``Offer`` only if it is signed by a trusted key, its manifest
matches the answer, it is for this device type and allowed by the version rules and min_version
(``verifier.verify_offer``), its release counter is not below the device's, and the TUF
repository names the same target (``tuf_client.check_offer``). Only then may it teach the device
a new signing key (``verifier.trusted_after``). Any refusal is a ``VerificationError``.
"""

from __future__ import annotations

from typing import Any

from ota_client import tuf_client
from ota_client.api import Offline, ServerClient
from ota_client.config import Config
from ota_client.link import ServerLink
from ota_client.outcome import DeviceLog
from ota_client.verifier import (
    Offer,
    VerificationError,
    save_trusted_keys,
    trusted_after,
    verify_offer,
)


class OfferGate:
    def __init__(
        self, config: Config, server: ServerClient, link: ServerLink, log: DeviceLog
    ) -> None:
        self.config, self.server, self.link, self.log = config, server, link, log
        self._warned_without_tuf = False

    def accept(
        self, body: dict[str, Any], *, installed_version: str, release_counter: int
    ) -> tuple[Offer, dict[str, Any] | None]:
        """The offer and its TUF target (None without TUF, where allowed); VerificationError
        when any check fails, Offline when the keys or the TUF metadata cannot be fetched."""
        offer = Offer.from_check(body)
        trusted = self.link.trusted_keys()
        verify_offer(
            offer,
            trusted_keys=trusted,
            device_type=self.config.device_type,
            installed_version=installed_version,
        )
        if offer.release_counter < release_counter:
            raise VerificationError(
                f"release counter {offer.release_counter} of {offer.version} is below this "
                f"device's {release_counter}: that image may never be installed again"
            )
        tuf_target = self._check_tuf(offer)
        # Only an offer that passed every check may teach the device a new signing key.
        self._learn_keys(offer, trusted)
        return offer, tuf_target

    def _check_tuf(self, offer: Offer) -> dict[str, Any] | None:
        """The offer's TUF target (tuf_client.check_offer), or None where TUF is not set up and
        ``allow_without_tuf`` permits it (simulators and tests only)."""
        if self.config.tuf_root is None:
            if not self.config.allow_without_tuf:
                raise VerificationError(
                    "no TUF root is configured (trust.tuf_root): updates are refused without "
                    "TUF verification"
                )
            if not self._warned_without_tuf:
                self._warned_without_tuf = True
                self.log.warning("installing without TUF verification (allow_without_tuf)")
            return None
        try:
            return tuf_client.check_offer(self.config, self.server, offer)
        except Offline as exc:
            self.log.warning("TUF metadata unavailable, not installing now: %s", exc)
            raise

    def _learn_keys(self, offer: Offer, trusted: dict[str, str]) -> None:
        """After a verified offer: trust the keys its chain endorsed, drop the keys a trusted
        key signed the retirement of (``verifier.trusted_after``); one atomic write."""
        updated = trusted_after(offer, trusted)
        if updated == trusted:
            return
        save_trusted_keys(self.config.trusted_keys_path, updated)
        added = sorted(set(updated) - set(trusted))
        dropped = sorted(set(trusted) - set(updated))
        self.log.warning(
            "signing keys: now trusting %s; dropped retired %s",
            ", ".join(added) or "-",
            ", ".join(dropped) or "-",
        )
