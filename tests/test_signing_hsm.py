"""Firmware signing keys in a PKCS#11 token (FIRMWARE_SIGNING_BACKEND=pkcs11), against a real
softhsm2 token made in a temporary folder for this module.

The token is inspected and damaged from a separate process (python-pkcs11 on its own), so what
these tests see is what the token holds, not what firmware.hsm believes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from firmware import hsm, services, signing
from firmware.models import Firmware, SigningKey
from ota_client.verifier import Offer, trusted_after, verify_signature
from ota_site import checks, keystore
from ota_site.models import Event, EventKind
from tests.conftest import DeviceActor
from tests.factories import FirmwareFactory

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"

pytestmark = pytest.mark.skipif(
    not os.path.isfile(MODULE),
    reason=f"softhsm2 is not installed ({MODULE} is missing): `make debian-packages` installs it",
)


@dataclass(frozen=True)
class Token:
    label: str
    conf: Path

    def inspect(self, script: str) -> Any:
        """Run ``script`` in another process, logged in to the token; return what it prints."""
        program = textwrap.dedent(
            f"""
            import json, pkcs11
            from pkcs11 import Attribute, ObjectClass
            lib = pkcs11.lib({MODULE!r})
            session = lib.get_token(token_label={self.label!r}).open(rw=True, user_pin={PIN!r})
            """
        ) + textwrap.dedent(script)
        done = subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(done.stdout) if done.stdout.strip() else None

    def objects(self, label: str) -> list[dict[str, Any]]:
        """The objects labelled ``label``, with the attributes that show custody."""
        return self.inspect(
            f"""
            found = []
            for item in session.get_objects({{Attribute.LABEL: {label!r}}}):
                entry = {{"class": item[Attribute.CLASS].name, "id": item[Attribute.ID].hex()}}
                if entry["class"] == "PRIVATE_KEY":
                    for name in ("EXTRACTABLE", "SENSITIVE", "NEVER_EXTRACTABLE", "TOKEN"):
                        entry[name.lower()] = bool(item[getattr(Attribute, name)])
                    try:
                        item[Attribute.VALUE]
                        entry["value_readable"] = True
                    except pkcs11.AttributeSensitive:
                        entry["value_readable"] = False
                else:
                    entry["ec_point"] = bytes(item[Attribute.EC_POINT]).hex()
                found.append(entry)
            print(json.dumps(found))
            """
        )

    def destroy(self, label: str) -> None:
        self.inspect(
            f"""
            for item in list(session.get_objects({{Attribute.LABEL: {label!r}}})):
                item.destroy()
            """
        )

    def plant_other_key(self, label: str) -> None:
        """An Ed25519 key pair that is not the recorded key, under the recorded key's label."""
        self.inspect(
            f"""
            from pkcs11 import KeyType, Mechanism
            from pkcs11.util.ec import encode_named_curve_parameters
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS,
                {{Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")}},
                local=True,
            )
            params.generate_keypair(
                store=True, label={label!r}, mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN
            )
            """
        )


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A fresh softhsm2 token for this module (per xdist worker), and a library that reads it."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nlog.level = ERROR\n")
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", "ota-test"),
            *("--pin", PIN, "--so-pin", "5678"),
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        hsm.close()  # softhsm2 reads SOFTHSM2_CONF when the library is (re)initialised
        yield Token(label="ota-test", conf=conf)
        hsm.close()


@pytest.fixture
def in_token(settings: Any, token: Token) -> Token:
    """New keys are made in the token."""
    settings.FIRMWARE_SIGNING_BACKEND = "pkcs11"
    settings.PKCS11_MODULE = MODULE
    settings.PKCS11_TOKEN_LABEL = token.label
    settings.PKCS11_PIN = PIN
    return token


@pytest.fixture
def admin_api(admin_user: User) -> APIClient:
    client = APIClient()
    client.force_login(admin_user)
    return client


def publish(version: str) -> Firmware:
    return services.publish_firmware(FirmwareFactory.create(version=version))


def endorsed(new: SigningKey, by: SigningKey) -> bool:
    statement = signing.endorsement_statement(
        key_id=new.key_id, algorithm="ed25519", public_key=new.public_key, endorsed_by=by.key_id
    )
    return new.endorsed_by_id == by.key_id and signing.verify(
        by.public_key, statement, new.endorsement
    )


# --- Custody ---------------------------------------------------------------------------------


def test_first_key_is_made_in_the_token_and_never_leaves_it(db: Any, in_token: Token) -> None:
    firmware = publish("1.1.0")
    key = SigningKey.objects.get()
    assert firmware.signing_key_id == key.key_id
    assert key.backend == "pkcs11" and key.status == "current"
    # The database holds the public key only; no column carries anything secret.
    row = SigningKey.objects.filter(pk=key.pk).values().get()
    assert row["private_key"] == "" and row["endorsement"] == "" and row["retirement"] == ""
    # The token holds the pair under the key id; the private half cannot be read out.
    objects = {item["class"]: item for item in in_token.objects(key.key_id)}
    assert set(objects) == {"PRIVATE_KEY", "PUBLIC_KEY"}
    private = objects["PRIVATE_KEY"]
    assert private["id"] == key.key_id
    assert private["extractable"] is False and private["never_extractable"] is True
    assert private["sensitive"] is True and private["token"] is True
    assert private["value_readable"] is False
    raw = bytes.fromhex(objects["PUBLIC_KEY"]["ec_point"])[-32:]
    assert signing.key_id_of(signing.Ed25519PublicKey.from_public_bytes(raw)) == key.key_id
    # The manifest's signature verifies under the recorded public key.
    assert signing.verify(key.public_key, firmware.manifest.encode(), firmware.signature)
    assert publish("1.2.0").signing_key_id == key.key_id  # made once
    event = Event.objects.get(kind=EventKind.SIGNING_KEY_CREATED)
    assert event.data == {"key_id": key.key_id, "backend": "pkcs11"}
    # Nothing hands out a private half of a token key.
    with pytest.raises(signing.SigningUnavailable, match="never leaves"):
        signing.private_key_of(key)
    call_command("signing_key", "list")  # no problem: exits normally


def test_signing_from_threads_shares_one_session(db: Any, in_token: Token) -> None:
    key = signing.current_key()
    signer = signing.signer_of(key)  # no database in the threads: they would not see the key

    def sign(n: int) -> bool:
        data = f"manifest {n}".encode()
        return signing.verify(key.public_key, data, signing._sign_with(signer, data))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(sign, range(40)))


# python-pkcs11 ends the search that failed on the dead session from a finaliser, which reports
# the (expected) SessionHandleInvalid as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_broken_session_is_reopened(db: Any, in_token: Token) -> None:
    signing.sign(b"opens the session")
    session = hsm._state.session
    assert session is not None
    session.close()  # as if the token had dropped it
    signature, key = signing.sign(b"after")
    assert signing.verify(key.public_key, b"after", signature)
    assert hsm._state.session is not session


def test_a_forked_worker_opens_its_own_session(db: Any, in_token: Token) -> None:
    """What a preloading server (gunicorn --preload) does: the parent had a session, the
    worker must initialise the library again before it signs."""
    key = signing.current_key()
    signing.sign(b"parent")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.write(write, hsm.sign(key.key_id, b"child"))
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        signature = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signing.verify(key.public_key, b"child", base64.b64encode(signature).decode())
    assert signing.sign(b"parent again")[1] == key  # the parent's session still works


# --- Rotation across backends --------------------------------------------------------------------


def test_rotation_moves_into_the_token_and_devices_follow(
    db: Any, token: Token, settings: Any, device_a: DeviceActor, capsys: Any
) -> None:
    old_master = keystore.generate_master_key()
    settings.OTA_MASTER_KEY = old_master
    # An installation that started with sealed keys...
    k1 = signing.current_key()
    old_firmware = publish("1.1.0")
    assert k1.backend == "sealed"
    # ...configures its HSM and rotates into it: the sealed key endorses the token key.
    settings.PKCS11_MODULE = MODULE
    settings.PKCS11_TOKEN_LABEL = token.label
    settings.PKCS11_PIN = PIN
    call_command("signing_key", "rotate", "--backend", "pkcs11", "--json")
    k2 = SigningKey.objects.get(pk=json.loads(capsys.readouterr().out)["key_id"])
    assert k2.backend == "pkcs11" and k2.private_key == ""
    assert endorsed(k2, by=k1)
    assert Event.objects.get(kind=EventKind.SIGNING_KEY_ROTATED).data["backend"] == "pkcs11"
    # From now on the token makes the keys: HSM -> HSM, endorsed inside the token.
    settings.FIRMWARE_SIGNING_BACKEND = "pkcs11"
    k3 = signing.rotate()
    assert k3.backend == "pkcs11" and endorsed(k3, by=k2)
    # A device that only knew the sealed key follows the chain to firmware the token signed.
    publish("1.2.0")
    device_a.device.target_version = "1.2.0"
    device_a.device.save(update_fields=["target_version"])
    body = device_a.client.get(f"/api/v1/devices/{device_a.id}/updates").json()
    assert body["update_available"] and body["key_id"] == k3.key_id, body
    offer = Offer.from_check(body)
    assert verify_signature(offer, {k1.key_id: k1.public_key})["version"] == "1.2.0"
    # Retiring the sealed key: the token signs the retirement and re-signs its firmware.
    signing.retire(k1.key_id)
    k1.refresh_from_db()
    statement = signing.retirement_statement(key_id=k1.key_id, retired_by=k3.key_id)
    assert k1.retired_by_id == k3.key_id and signing.verify(k3.public_key, statement, k1.retirement)
    old_firmware.refresh_from_db()
    assert old_firmware.signing_key_id == k3.key_id
    assert signing.verify(k3.public_key, old_firmware.manifest.encode(), old_firmware.signature)
    body = device_a.client.get(f"/api/v1/devices/{device_a.id}/updates").json()
    trusted = trusted_after(Offer.from_check(body), {k1.key_id: k1.public_key})
    assert set(trusted) == {k2.key_id, k3.key_id}  # the device dropped the retired sealed key
    # The way back out of the token works the same way.
    k4 = signing.rotate(backend="sealed")
    assert k4.backend == "sealed" and k4.private_key and endorsed(k4, by=k3)
    # Rewrap reseals the sealed keys and leaves the token keys alone (they have no envelope).
    settings.OTA_MASTER_KEY = keystore.generate_master_key()
    settings.OTA_MASTER_KEYS_OLD = [old_master]
    assert sorted(signing.rewrap()) == sorted([k1.key_id, k4.key_id])
    assert SigningKey.objects.get(pk=k2.key_id).private_key == ""
    assert signing.custody_problem(SigningKey.objects.get(pk=k2.key_id)) == ""


def test_rotation_through_the_api_uses_the_configured_backend(
    db: Any, in_token: Token, admin_api: APIClient
) -> None:
    k1 = signing.current_key()
    reply = admin_api.post("/api/v1/firmware/keys/rotate")
    assert reply.status_code == 201, reply.content
    k2 = SigningKey.objects.get(pk=reply.json()["key_id"])
    assert (k1.backend, k2.backend) == ("pkcs11", "pkcs11") and endorsed(k2, by=k1)
    assert [item["class"] for item in in_token.objects(k2.key_id)].count("PRIVATE_KEY") == 1


def test_unknown_backend_for_a_rotation_is_refused(db: Any, in_token: Token) -> None:
    signing.current_key()
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("signing_key", "rotate", "--backend", "vault")
    with pytest.raises(signing.ServiceError, match="Unknown signing key backend"):
        signing.rotate(backend="vault")
    assert SigningKey.objects.count() == 1


# --- A token that lost the key, or holds another one ---------------------------------------------


def test_missing_token_object_is_503_and_never_a_new_key(
    db: Any, in_token: Token, operator_api: APIClient, capsys: Any
) -> None:
    key = publish("1.1.0").signing_key
    assert key is not None
    in_token.destroy(key.key_id)  # the token was reset, or the wrong token is configured
    draft = FirmwareFactory.create(version="1.2.0")
    reply = operator_api.post(f"/api/v1/firmware/{draft.id}/publish")
    assert reply.status_code == 503, reply.content
    body = reply.json()
    assert body["code"] == "signing_key_unavailable" and set(body) >= {"code", "detail"}
    assert "not in the PKCS#11 token" in body["detail"]
    draft.refresh_from_db()
    assert not draft.is_published
    assert SigningKey.objects.count() == 1
    # `signing_key list` names the problem and exits 1.
    with pytest.raises(CommandError, match="cannot be used"):
        call_command("signing_key", "list", "--json")
    [listed] = json.loads(capsys.readouterr().out)["keys"]
    assert listed["backend"] == "pkcs11" and "not in the PKCS#11 token" in listed["problem"]
    # An endorsed rotation needs the lost key: refused, and the key it made is not left behind.
    labels = "print(json.dumps(sorted(o[Attribute.LABEL] for o in session.get_objects({}))))"
    before = in_token.inspect(labels)
    with pytest.raises(signing.SigningUnavailable, match="not in the PKCS#11 token"):
        signing.rotate()
    assert SigningKey.objects.count() == 1
    assert in_token.inspect(labels) == before
    # The way out is an explicit new chain.
    new = signing.rotate(unendorsed=True)
    assert new.backend == "pkcs11" and new.endorsed_by is None
    assert publish("1.3.0").signing_key_id == new.key_id


def test_another_key_under_the_label_signs_nothing(db: Any, in_token: Token) -> None:
    key = signing.current_key()
    in_token.destroy(key.key_id)
    in_token.plant_other_key(key.key_id)
    with pytest.raises(signing.SigningUnavailable, match="is not that key"):
        signing.sign(b"manifest")
    assert "is not that key" in signing.custody_problem(key)


def test_unusable_token_settings_are_503_with_the_reason(
    db: Any, in_token: Token, settings: Any
) -> None:
    key = signing.current_key()
    settings.PKCS11_PIN = "0000"
    with pytest.raises(signing.SigningUnavailable, match="refused the PIN: PinIncorrect"):
        signing.sign(b"x")
    # A refused PIN is not tried again (an HSM locks after a few): not by signing, not by list.
    with pytest.raises(signing.SigningUnavailable, match="not tried again"):
        signing.sign(b"x")
    assert "not tried again" in signing.custody_problem(key)
    settings.PKCS11_PIN = PIN
    settings.PKCS11_TOKEN_LABEL = "no-such-token"
    with pytest.raises(signing.SigningUnavailable, match="no token labelled"):
        signing.sign(b"x")
    settings.PKCS11_TOKEN_LABEL = in_token.label
    settings.PKCS11_MODULE = "/nonexistent/libpkcs11.so"
    with pytest.raises(signing.SigningUnavailable, match="cannot open the token"):
        signing.sign(b"x")
    settings.PKCS11_MODULE = ""
    with pytest.raises(signing.SigningUnavailable, match="PKCS11_MODULE not set"):
        signing.sign(b"x")
    assert "PKCS11_MODULE" in signing.custody_problem(key)
    settings.PKCS11_MODULE = MODULE
    signature, used = signing.sign(b"x")  # good settings again: a new session, the same key
    assert used == key and signing.verify(key.public_key, b"x", signature)
    assert SigningKey.objects.count() == 1


# --- Configuration checks -----------------------------------------------------------------------


def e040(settings: Any) -> list[str]:
    return [m.msg for m in checks.check_configuration() if m.id == "ota.E040"]


def test_good_settings_pass_the_check(in_token: Token, settings: Any) -> None:
    assert e040(settings) == []
    settings.FIRMWARE_SIGNING_BACKEND = "sealed"
    settings.PKCS11_MODULE = settings.PKCS11_TOKEN_LABEL = settings.PKCS11_PIN = ""
    assert e040(settings) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"FIRMWARE_SIGNING_BACKEND": "vault"}, "is not 'sealed' or 'pkcs11'"),
        ({"PKCS11_MODULE": ""}, "PKCS11_MODULE (the PKCS#11 library"),
        ({"PKCS11_MODULE": "/nonexistent/libpkcs11.so"}, "is not a file"),
        ({"PKCS11_TOKEN_LABEL": ""}, "PKCS11_TOKEN_LABEL is not set"),
        ({"PKCS11_PIN": ""}, "PKCS11_PIN (or PKCS11_PIN_FILE) is not set"),
    ],
)
def test_bad_settings_fail_the_check(
    in_token: Token, settings: Any, change: dict[str, str], message: str
) -> None:
    for name, value in change.items():
        setattr(settings, name, value)
    [error] = e040(settings)
    assert message in error


def test_missing_python_pkcs11_fails_the_check_and_signing(
    db: Any, in_token: Token, settings: Any
) -> None:
    hsm.close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "pkcs11", None)  # what an install without the extra sees
        [error] = e040(settings)
        assert "python-pkcs11 is not installed" in error
        with pytest.raises(signing.SigningUnavailable, match="python-pkcs11 is not installed"):
            signing.current_key()
    assert SigningKey.objects.count() == 0
    hsm.close()  # forget the refusal, for the next test in this process
