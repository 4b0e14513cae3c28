"""The hawkBit DDI adapter as clients see it: poll, actions, cancellation, attributes, files.

Every reply shape is checked against what SWUpdate and rauc-hawkbit-updater need
(/work/shared/PROTOCOLS.md, docs/ddi.md), with Django's test client on the real database. A DDI
device takes part in rollouts like a native one, so the rollback and cancel paths are driven end
to end here. Feedback parsing and the status mapping are in test_ddi_feedback.py, how devices
authenticate in test_ddi_auth.py.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.http import HttpResponseBase
from django.test import Client, RequestFactory
from django.urls import resolve

from devices import ddi
from devices import services as device_services
from devices.models import DdiTarget
from firmware import services as firmware_services
from firmware.models import Firmware
from rollouts import lifecycle
from rollouts.ddi import urls as ddi_urls
from rollouts.models import Rollout, RolloutStatus, SessionStatus
from tests.conftest import content_of
from tests.ddi.ddi_support import (
    Target,
    action_of,
    assert_refused,
    attributes_sent,
    provision,
    report,
    session_of,
)
from tests.factories import DeviceFactory, FirmwareFactory, firmware_bytes
from tests.rollouts_support import evaluate, run_device, started


@pytest.fixture
def target(db: Any) -> Target:
    return provision("ddi-1")


@pytest.fixture
def rollout(v1: Firmware, v2: Firmware, target: Target) -> Rollout:
    """1.0.0 → 1.1.0 over every board-a device, judged as soon as one device finished."""
    return started(v2, 100, min_devices=1)


# --- Poll ---------------------------------------------------------------------------------------


class TestPoll:
    def test_sleep_comes_from_the_poll_interval(self, target: Target, settings: Any) -> None:
        settings.DEVICE_POLL_INTERVAL = 3725
        reply = target.get()
        assert reply.status_code == 200
        assert reply.json()["config"] == {"polling": {"sleep": "01:02:05"}}
        settings.DEVICE_POLL_INTERVAL = 60
        assert target.poll()["config"]["polling"]["sleep"] == "00:01:00"
        # Within what HH:MM:SS can say, and never "sleep 0" (a client would spin).
        settings.DEVICE_POLL_INTERVAL = 3 * 86400
        assert target.poll()["config"]["polling"]["sleep"] == "23:59:59"
        settings.DEVICE_POLL_INTERVAL = 0
        assert target.poll()["config"]["polling"]["sleep"] == "00:00:01"

    def test_nothing_offered(self, target: Target, v2: Firmware) -> None:
        attributes_sent(target)
        body = target.poll()
        # No link at all: no action, nothing installed, attributes already here.
        assert body == {"config": {"polling": {"sleep": "00:01:00"}}}

    def test_a_rollout_offers_a_numeric_action(self, target: Target, rollout: Rollout) -> None:
        action_id = target.offered()
        session = session_of(action_id)
        assert session.device_id == target.device.id
        assert session.rollout_id == rollout.id
        assert session.status == SessionStatus.PENDING
        # The same open action on every poll until it ends.
        assert target.offered() == action_id

    def test_config_data_only_while_attributes_are_wanted(self, target: Target) -> None:
        links = target.links()
        assert links["configData"]["href"] == f"http://testserver{target.base}/configData"
        attributes_sent(target)
        assert "configData" not in target.links()
        ddi.request_attributes(target.device)
        assert "configData" in target.links()

    def test_cancel_action_wins_over_deployment(self, target: Target, rollout: Rollout) -> None:
        action_id = target.offered()
        lifecycle.cancel_rollout(rollout)
        links = target.links()
        assert "deploymentBase" not in links
        href = links["cancelAction"]["href"]
        # The client appends /feedback to this href: no query string.
        assert urlsplit(href).query == ""
        assert action_of(href, "cancelAction") == action_id

    def test_tenant_is_case_insensitive(self, target: Target) -> None:
        for tenant in ("default", "Default", "DEFAULT"):
            reply = target.client.get(f"/{tenant}/controller/v1/ddi-1")
            assert reply.status_code == 200, (tenant, reply.content)

    def test_unknown_tenant(self, target: Target) -> None:
        reply = target.client.get("/acme/controller/v1/ddi-1")
        assert_refused(reply, 404, "tenant_not_found")

    def test_installed_base_after_success(self, target: Target, rollout: Rollout) -> None:
        action_id = target.offered()
        assert "installedBase" not in target.links()
        assert_refused(target.get(f"/installedBase/{action_id}"), 404, "action_not_installed")
        assert target.feedback(action_id, report("closed", "success")).status_code == 200
        links = target.links()
        assert "deploymentBase" not in links
        assert action_of(links["installedBase"]["href"], "installedBase") == action_id
        reply = target.get(f"/installedBase/{action_id}")
        assert reply.status_code == 200, reply.content
        assert reply.json()["id"] == str(action_id)
        assert reply.json()["deployment"]["chunks"][0]["version"] == "1.1.0"

    def test_query_budget(
        self, target: Target, rollout: Rollout, django_assert_max_num_queries: Any
    ) -> None:
        """The poll is the hot path: four reads (the device, its latest session, the offer,
        installedBase) and at most the coalesced last_seen write."""
        attributes_sent(target)
        target.poll()  # opens the session
        for _ in range(2):
            with django_assert_max_num_queries(5):
                target.poll()
        lifecycle.cancel_rollout(rollout)
        for _ in range(2):
            with django_assert_max_num_queries(5):
                target.poll()

    def test_poll_other_methods(self, target: Target) -> None:
        reply = target.send("post", "", {})
        assert_refused(reply, 405, "method_not_allowed")
        assert reply["Allow"] == "GET"


# --- deploymentBase -----------------------------------------------------------------------------


class TestDeploymentBase:
    def test_shape(self, target: Target, rollout: Rollout, v2: Firmware) -> None:
        action_id = target.offered()
        reply = target.get(f"/deploymentBase/{action_id}?c={action_id:x}")
        assert reply.status_code == 200, reply.content
        body = reply.json()
        assert body["id"] == str(action_id)
        assert body["id"].isdigit()
        deployment = body["deployment"]
        assert deployment["download"] == "forced"
        assert deployment["update"] == "forced"
        assert len(deployment["chunks"]) == 1
        chunk = deployment["chunks"][0]
        assert chunk["part"] == "os"
        assert chunk["version"] == "1.1.0"
        assert chunk["name"] == "board-a"
        assert len(chunk["artifacts"]) == 1
        artifact = chunk["artifacts"][0]
        assert artifact["filename"] == v2.filename
        assert artifact["size"] == v2.file_size
        assert type(artifact["size"]) is int
        hashes = artifact["hashes"]
        content = firmware_bytes("1.1.0")
        assert hashes == {
            "sha1": hashlib.sha1(content).hexdigest(),
            "md5": hashlib.md5(content).hexdigest(),
            "sha256": hashlib.sha256(content).hexdigest(),
        }
        assert hashes == {"sha1": v2.sha1, "md5": v2.md5, "sha256": v2.checksum}
        for name, length in (("sha1", 40), ("md5", 32), ("sha256", 64)):
            assert re.fullmatch(f"[0-9a-f]{{{length}}}", hashes[name]), (name, hashes[name])

    def test_chunk_part_per_device_type(
        self, target: Target, rollout: Rollout, settings: Any
    ) -> None:
        """Zephyr accepts only "bApp"; the part is set per device type."""
        action_id = target.offered()
        settings.DDI_CHUNK_PARTS = {"board-a": "bApp", "board-b": "rootfs"}
        assert target.action(action_id)["deployment"]["chunks"][0]["part"] == "bApp"
        settings.DDI_CHUNK_PARTS = {}
        settings.DDI_CHUNK_PART = "rootfs"
        assert target.action(action_id)["deployment"]["chunks"][0]["part"] == "rootfs"

    def test_hashes_are_lower_case_whatever_is_stored(
        self, target: Target, rollout: Rollout, v2: Firmware
    ) -> None:
        Firmware.objects.filter(pk=v2.pk).update(sha1=v2.sha1.upper(), md5=v2.md5.upper())
        hashes = target.action(target.offered())["deployment"]["chunks"][0]["artifacts"][0][
            "hashes"
        ]
        assert hashes["sha1"] == v2.sha1 and hashes["md5"] == v2.md5

    def test_artifact_links_work_with_the_same_auth(
        self, target: Target, rollout: Rollout, v2: Firmware
    ) -> None:
        action_id = target.offered()
        artifact = target.action(action_id)["deployment"]["chunks"][0]["artifacts"][0]
        links = artifact["_links"]
        download = target.client.get(links["download-http"]["href"])
        assert download.status_code == 200
        assert content_of(download) == firmware_bytes("1.1.0")
        md5sum = target.client.get(links["md5sum-http"]["href"])
        assert md5sum.status_code == 200
        assert md5sum.content.decode() == f"{v2.md5}  {v2.filename}\n"
        # Without the device's credentials the same links are refused.
        assert_refused(Client().get(links["download-http"]["href"]), 401)

    def test_another_devices_action(self, target: Target, rollout: Rollout) -> None:
        other = provision("ddi-2")
        action_id = target.offered()
        assert_refused(other.get(f"/deploymentBase/{action_id}"), 404, "action_not_found")
        assert_refused(other.feedback(action_id, report("closed", "failure")), 404)
        assert session_of(action_id).status == SessionStatus.PENDING

    def test_unknown_and_non_numeric_ids(self, target: Target, rollout: Rollout) -> None:
        action_id = target.offered()
        assert_refused(target.get(f"/deploymentBase/{action_id + 1000}"), 404, "action_not_found")
        assert_refused(target.get("/deploymentBase/abc"), 404)
        assert_refused(target.get("/deploymentBase/12ab"), 404)


# --- Rollouts -----------------------------------------------------------------------------------


class TestRolloutSemantics:
    def test_failures_roll_back_and_successes_get_the_old_firmware(
        self, v1: Firmware, v2: Firmware
    ) -> None:
        targets = [provision(f"ddi-{n}") for n in range(4)]
        rollout = started(v2, 100, min_devices=4, rollback_threshold=0.3)
        actions = [t.offered() for t in targets]
        for t, action_id in zip(targets[:2], actions[:2], strict=True):
            assert t.feedback(action_id, report("closed", "success")).status_code == 200
        assert evaluate(rollout) == ""  # two of four finished: below min_devices
        for t, action_id in zip(targets[2:], actions[2:], strict=True):
            failure = report("closed", "failure", details=["sha256 mismatch"])
            assert t.feedback(action_id, failure).status_code == 200
        assert evaluate(rollout) == "rolled_back"
        rollout.refresh_from_db()
        assert rollout.status == RolloutStatus.ROLLED_BACK
        for t, old in zip(targets[:2], actions[:2], strict=True):
            assert t.refresh().current_version == "1.1.0"
            new = t.offered()
            assert new != old
            chunk = t.action(new)["deployment"]["chunks"][0]
            assert chunk["version"] == "1.0.0"
            assert chunk["artifacts"][0]["hashes"]["sha256"] == v1.checksum
            assert session_of(new).is_rollback
            assert t.feedback(new, report("closed", "success")).status_code == 200
            assert t.refresh().current_version == "1.0.0"
        for t in targets[2:]:
            links = t.links()
            assert "deploymentBase" not in links and "cancelAction" not in links
            assert t.refresh().current_version == "1.0.0"

    @pytest.mark.parametrize(
        ("outcomes", "verdict"),
        [
            (("success", "success", "success"), "completed"),  # 1 of 4 failed: 25 %
            (("success", "success", "failure"), "rolled_back"),  # 2 of 4 failed: 50 %
        ],
    )
    def test_ddi_and_native_devices_count_alike(
        self, v1: Firmware, v2: Firmware, outcomes: tuple[str, ...], verdict: str
    ) -> None:
        """A native failure plus DDI results, judged against a 30 % rollback threshold."""
        native = DeviceFactory.create()
        targets = [provision(f"ddi-{n}") for n in range(3)]
        rollout = started(v2, 100, min_devices=4, rollback_threshold=0.3, success_threshold=0.7)
        assert run_device(native, "failed") == "new"
        for t, outcome in zip(targets, outcomes, strict=True):
            assert t.feedback(t.offered(), report("closed", outcome)).status_code == 200
        assert evaluate(rollout) == verdict

    def test_cancelling_the_rollout_cancels_the_action(
        self, target: Target, rollout: Rollout
    ) -> None:
        action_id = target.offered()
        assert target.feedback(action_id, report("proceeding")).status_code == 200
        lifecycle.cancel_rollout(rollout)
        assert action_of(target.links()["cancelAction"]["href"], "cancelAction") == action_id
        reply = target.get(f"/cancelAction/{action_id}")
        assert reply.status_code == 200, reply.content
        assert reply.json() == {"id": str(action_id), "cancelAction": {"stopId": str(action_id)}}
        # "Still working on it" is no answer yet.
        assert (
            target.feedback(action_id, report("proceeding"), on="cancelAction").status_code == 200
        )
        assert session_of(action_id).cancel_acknowledged_at is None
        assert "cancelAction" in target.links()
        reply = target.feedback(action_id, report("closed", "success"), on="cancelAction")
        assert reply.status_code == 200
        session = session_of(action_id)
        assert session.status == SessionStatus.CANCELLED
        assert session.cancel_acknowledged_at is not None
        links = target.links()
        assert "cancelAction" not in links and "deploymentBase" not in links
        # Acknowledged twice: still 200, nothing changes.
        acknowledged = session.cancel_acknowledged_at
        reply = target.feedback(action_id, report("closed", "success"), on="cancelAction")
        assert reply.status_code == 200
        assert session_of(action_id).cancel_acknowledged_at == acknowledged

    def test_a_new_assignment_under_an_open_action_is_cancelled_first(
        self, target: Target, rollout: Rollout
    ) -> None:
        """As with hawkBit: the device is told to stop the running action, and only after it
        confirms is the newly assigned firmware offered."""
        action_id = target.offered()
        assert target.feedback(action_id, report("proceeding")).status_code == 200
        v3 = firmware_services.publish_firmware(FirmwareFactory.create(version="1.2.0"))
        device_services.update_device(target.device, target_version="1.2.0")
        for _ in range(2):  # the same answer until the device confirms
            links = target.links()
            assert "deploymentBase" not in links, links
            assert action_of(links["cancelAction"]["href"], "cancelAction") == action_id
        assert session_of(action_id).status == SessionStatus.CANCELLED
        reply = target.feedback(action_id, report("closed", "success"), on="cancelAction")
        assert reply.status_code == 200
        new_action = target.offered()
        assert new_action != action_id
        assert session_of(new_action).firmware_id == v3.id

    def test_a_rejected_cancel_is_settled_and_the_install_counts(
        self, target: Target, rollout: Rollout
    ) -> None:
        action_id = target.offered()
        lifecycle.cancel_rollout(rollout)
        rejected = report("rejected", details=["too late, installing"])
        assert target.feedback(action_id, rejected, on="cancelAction").status_code == 200
        assert session_of(action_id).cancel_acknowledged_at is not None
        assert "cancelAction" not in target.links()
        # It went on installing and says so on the action itself.
        reply = target.feedback(action_id, report("closed", "success"))
        assert reply.status_code == 200
        assert session_of(action_id).status == SessionStatus.CANCELLED
        assert target.refresh().current_version == "1.1.0"

    def test_success_on_a_cancelled_action_before_acknowledging(
        self, target: Target, rollout: Rollout
    ) -> None:
        action_id = target.offered()
        lifecycle.cancel_rollout(rollout)
        assert target.feedback(action_id, report("closed", "success")).status_code == 200
        session = session_of(action_id)
        assert session.status == SessionStatus.CANCELLED
        assert target.refresh().current_version == "1.1.0"
        # A failure on a cancelled action changes nothing either.
        assert target.feedback(action_id, report("closed", "failure")).status_code == 200
        assert session_of(action_id).status == SessionStatus.CANCELLED
        assert target.refresh().current_version == "1.1.0"

    def test_cancel_action_of_an_action_not_cancelled(
        self, target: Target, rollout: Rollout
    ) -> None:
        action_id = target.offered()
        assert_refused(target.get(f"/cancelAction/{action_id}"), 404, "no_cancel")
        reply = target.feedback(action_id, report("closed", "success"), on="cancelAction")
        assert_refused(reply, 404, "no_cancel")
        assert session_of(action_id).status == SessionStatus.PENDING


# --- configData ---------------------------------------------------------------------------------


class TestConfigData:
    @pytest.fixture
    def described(self, db: Any) -> Target:
        return provision("ddi-attrs", metadata={"hwRevision": "1", "site": "north"})

    def put(self, target: Target, body: Any) -> Any:
        return target.send("put", "/configData", body)

    def test_merge_is_the_default(self, described: Target) -> None:
        reply = self.put(described, {"data": {"hwRevision": "2", "serial": 42}})
        assert reply.status_code == 200, reply.content
        assert described.refresh().metadata == {"hwRevision": "2", "site": "north", "serial": 42}
        self.put(described, {"data": {"flag": True}, "mode": "merge"})
        assert described.refresh().metadata["flag"] is True
        target = DdiTarget.objects.get(device=described.device)
        assert not target.attributes_requested
        assert target.attributes_updated_at is not None

    def test_replace(self, described: Target) -> None:
        reply = self.put(described, {"data": {"only": "this"}, "mode": "replace"})
        assert reply.status_code == 200, reply.content
        assert described.refresh().metadata == {"only": "this"}

    def test_remove(self, described: Target) -> None:
        reply = self.put(described, {"data": {"site": "", "absent": ""}, "mode": "REMOVE"})
        assert reply.status_code == 200, reply.content
        assert described.refresh().metadata == {"hwRevision": "1"}

    @pytest.mark.parametrize(
        "body",
        [
            "not json",
            "",
            "[1, 2]",
            {"mode": "merge"},
            {"data": "hwRevision=2"},
            {"data": {"nested": {"a": 1}}},
            {"data": {"list": [1, 2]}},
            {"data": {"a": "1"}, "mode": "append"},
            {"data": {"a": "1"}, "mode": 3},
            {"data": {"k" * 129: "1"}},
            # Python's json reads these; PostgreSQL's jsonb cannot hold them.
            '{"data": {"x": NaN}}',
            '{"data": {"x": Infinity}}',
            '{"data": {"x": 1e400}}',
            {"data": {"x": "a\u0000b"}},
            {"data": {"a\u0000": "b"}},
        ],
    )
    def test_bad_bodies(self, described: Target, body: Any) -> None:
        assert_refused(self.put(described, body), 400)
        assert described.refresh().metadata == {"hwRevision": "1", "site": "north"}
        assert DdiTarget.objects.get(device=described.device).attributes_requested

    def test_oversize_metadata(self, described: Target, settings: Any) -> None:
        settings.DEVICE_METADATA_MAX_BYTES = 200
        assert_refused(
            self.put(described, {"data": {"blob": "x" * 300}}), 400, "metadata_too_large"
        )
        assert described.refresh().metadata == {"hwRevision": "1", "site": "north"}
        # Replacing with something small fits.
        assert self.put(described, {"data": {"a": "b"}, "mode": "replace"}).status_code == 200

    def test_only_put(self, described: Target) -> None:
        reply = described.get("/configData")
        assert_refused(reply, 405, "method_not_allowed")
        assert reply["Allow"] == "PUT"


# --- Artifacts ----------------------------------------------------------------------------------


class TestArtifacts:
    @pytest.fixture
    def url(self, target: Target, rollout: Rollout, v2: Firmware) -> str:
        target.offered()
        return f"{target.base}/softwaremodules/{v2.id}/artifacts/{v2.filename}"

    def test_head_has_headers_and_no_body(self, target: Target, url: str, v2: Firmware) -> None:
        reply = target.client.head(url)
        assert reply.status_code == 200
        assert reply["Content-Length"] == str(v2.file_size)
        assert reply["ETag"] == f'"{v2.checksum}"'
        # The test client strips HEAD bodies like a web server would: ask the view itself.
        for path in (url, url + ".MD5SUM"):
            direct = view_reply(target, "head", path)
            assert direct.status_code == 200
            assert not getattr(direct, "streaming", False)
            assert direct.content == b"", path  # type: ignore[attr-defined]
            assert int(direct["Content-Length"]) > 0

    def test_range_resumes(self, target: Target, url: str, v2: Firmware) -> None:
        size = v2.file_size
        reply = target.client.get(url, headers={"range": "bytes=1000-"})
        assert reply.status_code == 206
        assert reply["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
        assert content_of(reply) == firmware_bytes("1.1.0")[1000:]
        assert reply["Content-Length"] == str(size - 1000)

    def test_range_beyond_the_end(self, target: Target, url: str, v2: Firmware) -> None:
        reply = target.client.get(url, headers={"range": f"bytes={v2.file_size}-"})
        assert_refused(reply, 416, "range_not_satisfiable")
        assert reply["Content-Range"] == f"bytes */{v2.file_size}"

    def test_if_none_match(self, target: Target, url: str, v2: Firmware) -> None:
        reply = target.client.get(url, headers={"if-none-match": f'"{v2.checksum}"'})
        assert reply.status_code == 304
        assert content_of(reply) == b""

    def test_md5sum(self, target: Target, url: str, v2: Firmware) -> None:
        reply = target.client.get(url + ".MD5SUM")
        assert reply.status_code == 200
        line = f"{v2.md5}  image.bin\n".encode()
        assert reply.content == line
        head = target.client.head(url + ".MD5SUM")
        assert head.status_code == 200
        assert head["Content-Length"] == str(len(line))

    def test_only_offered_firmware(
        self, target: Target, url: str, v1: Firmware, v2: Firmware
    ) -> None:
        never = f"{target.base}/softwaremodules/{v1.id}/artifacts/{v1.filename}"
        assert_refused(target.client.get(never), 404)
        assert_refused(target.client.get(never + ".MD5SUM"), 404)
        other = provision("ddi-2", version="1.1.0")  # up to date: never offered 1.1.0
        path = f"{other.base}/softwaremodules/{v2.id}/artifacts/{v2.filename}"
        assert_refused(other.client.get(path), 404)
        assert_refused(target.client.get(url.replace("image.bin", "other.bin")), 404)
        assert_refused(target.client.get(url.replace(str(v2.id), "not-a-uuid")), 404)

    def test_quarantined_firmware_is_not_served(
        self, target: Target, url: str, v2: Firmware
    ) -> None:
        v2.file.storage.delete(str(v2.file.name))
        assert firmware_services.verify_storage(v2)["quarantined"]
        assert_refused(target.client.get(url), 404)
        assert_refused(target.client.get(url + ".MD5SUM"), 404)

    def test_only_get_and_head(self, target: Target, url: str) -> None:
        reply = target.client.post(url)
        assert_refused(reply, 405, "method_not_allowed")
        assert reply["Allow"] == "GET, HEAD"


def view_reply(target: Target, method: str, path: str) -> HttpResponseBase:
    """The view's own response, without the test client's stripping of HEAD bodies."""
    match = resolve(path)
    request = getattr(RequestFactory(), method)(
        path, headers={"authorization": f"TargetToken {target.token}"}
    )
    response: HttpResponseBase = match.func(request, *match.args, **match.kwargs)
    return response


# --- The OpenAPI document -----------------------------------------------------------------------


def test_the_openapi_document_describes_every_route(client: Client, settings: Any) -> None:
    """/api/ddi/schema/ (what tests/test_api_fuzz.py fuzzes against) keeps up with the routes."""
    settings.DDI_TENANT = "acme"
    reply = client.get("/api/ddi/schema/")
    assert reply.status_code == 200 and reply["Content-Type"] == "application/json"
    document = reply.json()
    assert document["openapi"].startswith("3.0")
    assert len(document["paths"]) == len(ddi_urls.urlpatterns)
    assert document["components"]["parameters"]["tenant"]["schema"]["example"] == "acme"
    assert client.head("/api/ddi/schema/").status_code == 200
    assert_refused(client.post("/api/ddi/schema/"), 405, "method_not_allowed")
