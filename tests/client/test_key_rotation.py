"""A signing-key rotation end to end: a device that trusts only the old key follows the signed
chain to the new one, installs firmware signed by it and drops the old key once it is retired;
forged chains are refused and nothing is installed.

Runs its own server (own database) because it rotates and retires the server's keys, which the
shared live server of the other client tests must not see.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ota_client.agent import Agent
from ota_client.config import Config
from ota_client.system import FileSystemInterface
from ota_client.verifier import (
    Offer,
    endorsement_statement,
    key_id_of,
    keys_through_chain,
    load_trusted_keys,
    retirement_statement,
    trusted_after,
)
from tests.client.proxy import running_proxy
from tests.e2e import fresh_database, gunicorn, manage, migrate_with_admin, server_env

pytestmark = pytest.mark.e2e

ADMIN = ("rotation-admin", "rotation-password-123")


def image(device_type: str, version: str) -> bytes:
    return random.Random(f"{device_type}-{version}").randbytes(96 * 1024)


@dataclass
class Server:
    url: str
    env: dict[str, str]

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = requests.request(method, self.url + path, auth=ADMIN, timeout=30, **kwargs)
        assert reply.status_code < 300, (path, reply.status_code, reply.text)
        return reply.json()

    def keys(self) -> dict[str, dict[str, Any]]:
        return {key["key_id"]: key for key in self.call("GET", "/api/v1/firmware/keys")}

    def current_key(self) -> dict[str, Any]:
        [current] = [key for key in self.keys().values() if key["status"] == "current"]
        return current

    def publish(self, device_type: str, version: str) -> dict[str, Any]:
        uploaded = self.call(
            "POST",
            "/api/v1/firmware",
            data={"version": version, "device_type": device_type},
            files={"file": (f"{version}.bin", image(device_type, version))},
        )
        result: dict[str, Any] = self.call("POST", f"/api/v1/firmware/{uploaded['id']}/publish")
        return result

    def fleet(self, device_type: str, target: str) -> tuple[str, str]:
        """A group of this device type targeting ``target`` and a token that enrolls into it."""
        group = self.call(
            "POST",
            "/api/v1/groups",
            json={"name": f"{device_type}-fleet", "target_version": target},
        )
        token = json.loads(
            manage(
                self.env,
                "create_enrollment_token",
                "--name",
                device_type,
                "--device-type",
                device_type,
                "--group",
                f"{device_type}-fleet",
                "--json",
            )
        )["token"]
        return str(group["id"]), str(token)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database() as database:
        env = server_env(
            tmp_path_factory.mktemp("rotation-server"),
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"),
            CACHE_KEY_PREFIX=f"rotation-{uuid.uuid4().hex[:8]}",
            RATE_LIMIT_DEVICE="off",
            RATE_LIMIT_IP="off",
            STATIC_MANIFEST="false",
            # The first publish creates the TUF repository; devices ship with its root.
            TUF_AUTO_INIT="true",
        )
        migrate_with_admin(env, ADMIN, "rotation@example.com")
        with gunicorn(env, workers=2) as base:
            yield Server(url=base, env=env)


def make_device(
    root: Path, server_url: str, device_type: str, token: str, trusted: dict[str, str]
) -> Config:
    root.mkdir(parents=True)
    keys = root / "trusted_keys.json"
    keys.write_text(json.dumps(trusted))
    tuf_root = root / "tuf-root.json"
    reply = requests.get(f"{server_url}/tuf/metadata/1.root.json", auth=ADMIN, timeout=10)
    assert reply.status_code == 200, reply.text
    tuf_root.write_bytes(reply.content)
    return Config(
        server=server_url,
        device_type=device_type,
        hardware_id=f"rot-{uuid.uuid4().hex[:12]}",
        state_dir=root / "state",
        current_version="1.0.0",
        enrollment_token=token,
        trusted_keys=keys,
        tuf_root=tuf_root,
        progress_interval=0.2,
        min_backoff=0.1,
    ).with_overrides()


def running(config: Config) -> str:
    return Agent(config).running_version()


def test_device_that_knew_only_the_old_key_follows_the_rotation(
    server: Server, tmp_path: Path
) -> None:
    device_type = "rotation-board"
    server.publish(device_type, "1.0.0")  # makes the first key if there is none yet
    old = server.current_key()
    # The operator rotates; the new key is endorsed by the old one.
    new = server.call("POST", "/api/v1/firmware/keys/rotate")
    assert new["endorsed_by"] == old["key_id"] and new["status"] == "current"
    published = server.publish(device_type, "1.1.0")
    assert published["key_id"] == new["key_id"]
    group_id, token = server.fleet(device_type, "1.1.0")

    config = make_device(
        tmp_path / "device", server.url, device_type, token, {old["key_id"]: old["public_key"]}
    )
    agent = Agent(config)
    agent.run_once()
    assert agent.running_version() == "1.1.0", agent.state.last_result
    system = FileSystemInterface(config.state_dir / "system")
    slot = image(device_type, "1.1.0")
    assert system.slot_sha256(system.read_env().active, len(slot)) == (
        hashlib.sha256(slot).hexdigest()
    )
    assert load_trusted_keys(config.trusted_keys_path) == {
        old["key_id"]: old["public_key"],
        new["key_id"]: new["public_key"],
    }

    # The old key is retired; the device drops it on the new key's signed word.
    retired = server.call("POST", f"/api/v1/firmware/keys/{old['key_id']}/retire")
    assert retired["key"]["retired_by"] == new["key_id"]
    server.publish(device_type, "1.2.0")
    server.call("PATCH", f"/api/v1/groups/{group_id}", json={"target_version": "1.2.0"})
    agent = Agent(config)
    agent.run_once()
    assert agent.running_version() == "1.2.0", agent.state.last_result
    assert load_trusted_keys(config.trusted_keys_path) == {new["key_id"]: new["public_key"]}


def _evil() -> tuple[Ed25519PrivateKey, str, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    public = base64.b64encode(raw).decode()
    return private, public, key_id_of(public)


def _sign(private: Ed25519PrivateKey, data: bytes) -> str:
    return base64.b64encode(private.sign(data)).decode()


def endorsed_by_an_untrusted_key(offer: dict[str, Any]) -> dict[str, Any]:
    """An attacker signs the image with their own key and endorses it with that same key."""
    private, public, key_id = _evil()
    trusted_id = offer["key_chain"][0]["endorsed_by"] or offer["key_chain"][0]["key_id"]
    statement = endorsement_statement(key_id, "ed25519", public, trusted_id)
    return {
        **offer,
        "key_id": key_id,
        "signature": _sign(private, offer["manifest"].encode()),
        "key_chain": [
            {
                "key_id": key_id,
                "public_key": public,
                "endorsed_by": trusted_id,
                "endorsement": _sign(private, statement),
            }
        ],
    }


def public_key_swapped(offer: dict[str, Any]) -> dict[str, Any]:
    """The real endorsement, but the attacker's public key (and id) in the link."""
    private, public, key_id = _evil()
    link = offer["key_chain"][-1]
    return {
        **offer,
        "key_id": key_id,
        "signature": _sign(private, offer["manifest"].encode()),
        "key_chain": [*offer["key_chain"][:-1], {**link, "key_id": key_id, "public_key": public}],
    }


def public_key_tampered(offer: dict[str, Any]) -> dict[str, Any]:
    """The link keeps the new key's id but carries another public key."""
    _, public, _ = _evil()
    link = offer["key_chain"][-1]
    return {**offer, "key_chain": [*offer["key_chain"][:-1], {**link, "public_key": public}]}


@pytest.mark.parametrize(
    "forge", [endorsed_by_an_untrusted_key, public_key_swapped, public_key_tampered]
)
def test_forged_key_chain_is_refused_and_nothing_installed(
    server: Server, tmp_path: Path, forge: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    device_type = f"forge-{forge.__name__.replace('_', '-')}"[:60]
    server.publish(device_type, "1.0.0")
    old = server.current_key()
    new = server.call("POST", "/api/v1/firmware/keys/rotate")
    server.publish(device_type, "2.0.0")
    _, token = server.fleet(device_type, "2.0.0")
    trusted = {old["key_id"]: old["public_key"]}
    with running_proxy(server.url) as proxy:
        proxy.tamper_check = lambda body: forge(body) if body.get("update_available") else body
        config = make_device(tmp_path / "forged", proxy.url, device_type, token, trusted)
        agent = Agent(config)
        agent.run_once()
        assert agent.running_version() == "1.0.0"
        system = FileSystemInterface(config.state_dir / "system")
        assert system.read_env().active == "a" and system.read_env().trial == ""
        assert load_trusted_keys(config.trusted_keys_path) == trusted
        [failed] = [r for r in proxy.reports() if r and r.get("status") == "failed"]
        assert "rejected" in failed["error_message"] and "key" in failed["error_message"]
        assert not proxy.downloads()
    # The same device type, untampered: the real chain is accepted.
    config = make_device(tmp_path / "honest", server.url, device_type, token, trusted)
    agent = Agent(config)
    agent.run_once()
    assert agent.running_version() == "2.0.0", agent.state.last_result
    assert new["key_id"] in load_trusted_keys(config.trusted_keys_path)


# --- The verifier's rules, without a server ----------------------------------------------------


def _offer(key_id: str, chain: list[dict[str, Any]], retired: list[dict[str, Any]]) -> Offer:
    return Offer(
        session_id="s",
        firmware_id="f",
        version="1.1.0",
        device_type="t",
        url="u",
        size=1,
        sha256="0" * 64,
        signature="",
        key_id=key_id,
        manifest="{}",
        key_chain=chain,
        retired_keys=retired,
    )


def test_retirement_counts_only_when_a_trusted_key_signed_it() -> None:
    k1, k1_public, k1_id = _evil()
    k2, k2_public, k2_id = _evil()
    evil, _, evil_id = _evil()
    trusted = {k1_id: k1_public, k2_id: k2_public}
    forged = {
        "key_id": k1_id,
        "retired_by": evil_id,
        "retirement": _sign(evil, retirement_statement(k1_id, evil_id)),
    }
    assert trusted_after(_offer(k2_id, [], [forged]), trusted) == trusted
    wrong_signer = {**forged, "retired_by": k2_id}  # names k2, signed by the attacker
    assert trusted_after(_offer(k2_id, [], [wrong_signer]), trusted) == trusted
    # The signer of the offer is never dropped, even on a valid statement.
    self_drop = {
        "key_id": k2_id,
        "retired_by": k1_id,
        "retirement": _sign(k1, retirement_statement(k2_id, k1_id)),
    }
    assert trusted_after(_offer(k2_id, [], [self_drop]), trusted) == trusted
    real = {
        "key_id": k1_id,
        "retired_by": k2_id,
        "retirement": _sign(k2, retirement_statement(k1_id, k2_id)),
    }
    assert trusted_after(_offer(k2_id, [], [real]), trusted) == {k2_id: k2_public}


def test_chain_links_older_than_every_trusted_key_are_skipped() -> None:
    k1, k1_public, k1_id = _evil()
    k2, k2_public, k2_id = _evil()
    _, k3_public, k3_id = _evil()
    chain: list[dict[str, Any]] = [
        {"key_id": k1_id, "public_key": k1_public, "endorsed_by": None, "endorsement": ""},
        {
            "key_id": k2_id,
            "public_key": k2_public,
            "endorsed_by": k1_id,
            "endorsement": _sign(k1, endorsement_statement(k2_id, "ed25519", k2_public, k1_id)),
        },
        {
            "key_id": k3_id,
            "public_key": k3_public,
            "endorsed_by": k2_id,
            "endorsement": _sign(k2, endorsement_statement(k3_id, "ed25519", k3_public, k2_id)),
        },
    ]
    # A device provisioned with k2 only: k1's link is skipped, k3 is learned through k2.
    known = keys_through_chain(_offer(k3_id, chain, []), {k2_id: k2_public})
    assert known == {k2_id: k2_public, k3_id: k3_public}
