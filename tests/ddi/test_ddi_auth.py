"""How hawkBit DDI devices authenticate: target tokens, the gateway token, auto-creation and a
client certificate forwarded by a trusted proxy (docs/ddi.md "Authentication")."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

import pytest
from django.test import Client

from devices import certificates, ddi
from devices import services as device_services
from devices.models import DdiTarget, Device, DeviceCA
from ota_site.errors import StateConflict
from tests.ddi.ddi_support import TENANT, Target, assert_refused, provision
from tests.ddi.test_ddi_protocol import target
from tests.test_device_certificates import make_csr

__all__ = ["target"]  # the fixture, shared with test_ddi_protocol.py

PROXY = "10.1.2.3"


# --- Authentication -----------------------------------------------------------------------------


def poll_as(authorization: str | None, controller_id: str = "ddi-1", **extra: Any) -> Any:
    headers = {"authorization": authorization} if authorization is not None else {}
    return Client(headers=headers).get(f"/{TENANT}/controller/v1/{controller_id}", **extra)


def assert_unauthorized(reply: Any, code: str | None = None) -> None:
    assert_refused(reply, 401, code)
    assert reply["WWW-Authenticate"]


class TestAuthentication:
    def test_target_token(self, target: Target) -> None:
        assert poll_as(f"TargetToken {target.token}").status_code == 200
        assert poll_as(f"targettoken  {target.token} ").status_code == 200
        assert_unauthorized(poll_as(f"TargetToken {target.token}x"), "authentication_failed")
        assert_unauthorized(poll_as(f"Bearer {target.token}"), "authentication_failed")
        assert_unauthorized(poll_as("TargetToken"), "authentication_failed")
        assert_unauthorized(poll_as(""), "credentials_missing")
        assert_unauthorized(poll_as(None), "credentials_missing")

    def test_another_devices_token(self, target: Target) -> None:
        other = provision("ddi-2")
        assert_unauthorized(poll_as(f"TargetToken {other.token}"), "authentication_failed")
        # Nor for a controller id nobody has: 401, not 404 (no probing for device names).
        assert_unauthorized(poll_as(f"TargetToken {target.token}", "nobody"))

    def test_the_token_is_stored_hashed(self, target: Target) -> None:
        stored = DdiTarget.objects.get(device=target.device)
        assert stored.token_hash != target.token
        assert stored.token_hash == hashlib.sha256(target.token.encode()).hexdigest()
        assert stored.token_prefix == target.token[:8]

    def test_a_new_token_replaces_the_old_one(self, target: Target) -> None:
        fresh = ddi.issue_target_token(target.device)
        assert_unauthorized(poll_as(f"TargetToken {target.token}"))
        assert poll_as(f"TargetToken {fresh}").status_code == 200
        assert ddi.revoke_target_token(target.device)
        assert_unauthorized(poll_as(f"TargetToken {fresh}"))

    def test_revoked_device(self, target: Target, settings: Any) -> None:
        settings.DDI_GATEWAY_TOKEN = "gateway-secret-0123456789"
        certificates.revoke_device(target.device)
        assert_unauthorized(poll_as(f"TargetToken {target.token}"), "device_revoked")
        assert_unauthorized(poll_as(f"GatewayToken {settings.DDI_GATEWAY_TOKEN}"), "device_revoked")

    def test_gateway_token(self, target: Target, settings: Any) -> None:
        settings.DDI_GATEWAY_TOKEN = "gateway-secret-0123456789"
        assert poll_as("GatewayToken gateway-secret-0123456789").status_code == 200
        assert_unauthorized(poll_as("GatewayToken gateway-secret-012345678"))
        assert_unauthorized(poll_as(f"GatewayToken {target.token}"))
        settings.DDI_GATEWAY_TOKEN = ""
        assert_unauthorized(poll_as("GatewayToken gateway-secret-0123456789"))
        assert_unauthorized(poll_as("GatewayToken "))

    def test_unknown_controller_without_auto_create(self, db: Any, settings: Any) -> None:
        settings.DDI_GATEWAY_TOKEN = "gateway-secret-0123456789"
        settings.DDI_AUTO_CREATE = False
        reply = poll_as("GatewayToken gateway-secret-0123456789", "brand-new")
        assert_refused(reply, 404, "device_not_found")
        assert not Device.objects.filter(hardware_id="brand-new").exists()

    def test_unknown_controller_with_auto_create(self, db: Any, settings: Any) -> None:
        settings.DDI_GATEWAY_TOKEN = "gateway-secret-0123456789"
        settings.DDI_AUTO_CREATE = True
        settings.DDI_DEFAULT_DEVICE_TYPE = "board-z"
        reply = poll_as("GatewayToken gateway-secret-0123456789", "brand-new")
        assert reply.status_code == 200, reply.content
        assert "configData" in reply.json()["_links"]
        device = Device.objects.get(hardware_id="brand-new")
        assert device.device_type == "board-z"
        assert DdiTarget.objects.get(device=device).attributes_requested
        # The second poll finds it; a target token still cannot name it.
        assert poll_as("GatewayToken gateway-secret-0123456789", "brand-new").status_code == 200
        assert Device.objects.filter(hardware_id="brand-new").count() == 1
        assert_unauthorized(poll_as("TargetToken whatever", "brand-new"))

    @pytest.mark.parametrize(
        "controller_id", ["x" * 129, "a%00b", "..", "bad%20id", "%C3%BCber", "-x"]
    )
    def test_invalid_controller_ids(self, db: Any, settings: Any, controller_id: str) -> None:
        """Not a hardware id anywhere else, so not here: never created, and never a 500."""
        settings.DDI_GATEWAY_TOKEN = "gateway-secret-0123456789"
        settings.DDI_AUTO_CREATE = True
        settings.DDI_DEFAULT_DEVICE_TYPE = "board-a"
        reply = poll_as("GatewayToken gateway-secret-0123456789", controller_id)
        assert_refused(reply, 404, "device_not_found")
        assert_refused(poll_as("TargetToken whatever", controller_id), 404, "device_not_found")
        assert not Device.objects.exists()

    def test_native_enrollment_cannot_take_over(self, target: Target) -> None:
        _, token = device_services.create_enrollment_token(name="take-over")
        with pytest.raises(StateConflict) as refused:
            device_services.register_device(
                enrollment_token=token, hardware_id="ddi-1", device_type="board-a"
            )
        assert refused.value.code == "device_exists"
        assert poll_as(f"TargetToken {target.token}").status_code == 200


class TestClientCertificate:
    @pytest.fixture(autouse=True)
    def _proxy(self, settings: Any) -> None:
        settings.TRUSTED_PROXIES = ["10.1.0.0/16"]

    @pytest.fixture
    def device_ca(self, db: Any) -> DeviceCA:
        return certificates.create_device_ca(common_name="Test device CA", days=30)

    def via_nginx(self, pem: str, remote: str = PROXY) -> dict[str, Any]:
        return {
            "REMOTE_ADDR": remote,
            "HTTP_X_SSL_CLIENT_VERIFY": "SUCCESS",
            "HTTP_X_SSL_CLIENT_CERT": quote(pem),
        }

    def test_certificate_names_its_own_controller(
        self, target: Target, device_ca: DeviceCA
    ) -> None:
        other = provision("ddi-2")
        pem = certificates.issue_certificate(target.device, make_csr()[1]).certificate
        reply = poll_as(None, "ddi-1", **self.via_nginx(pem))
        assert reply.status_code == 200, reply.content
        # Its device id names it too.
        assert poll_as(None, str(target.device.id), **self.via_nginx(pem)).status_code == 200
        assert_unauthorized(poll_as(None, "ddi-2", **self.via_nginx(pem)), "certificate_invalid")
        assert poll_as(f"TargetToken {other.token}", "ddi-2").status_code == 200
        # The same headers from an address that is no proxy of ours are not believed.
        reply = poll_as(None, "ddi-1", **self.via_nginx(pem, remote="192.0.2.7"))
        assert_unauthorized(reply, "credentials_missing")
