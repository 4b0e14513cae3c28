"""The poll answer cache: unchanged devices are answered from Redis, and every change made to the
database, by any code or SQL, reaches the device's next poll (ota_site.answers).

Real PostgreSQL triggers, a real listener (in a thread, on its own connection) and real Redis.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site import answers, ratelimit
from rollouts import answer_cache, lifecycle
from rollouts.models import UpdateSession
from tests.conftest import DeviceActor
from tests.factories import DeviceGroupFactory, FirmwareFactory
from tests.rollouts_support import definition

pytestmark = [
    pytest.mark.django_db(transaction=True),  # the triggers notify on commit
    pytest.mark.usefixtures("patient_redis"),
]

CHECK = "/api/v1/updates/check"


@pytest.fixture(autouse=True)
def _postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (the cache's triggers)")


class Running:
    def __init__(self) -> None:
        self.listener = answer_cache.listener()
        self.thread = threading.Thread(target=self.listener.run, daemon=True)

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: answers.status()["live"], "the listener's epoch goes live")
        return self

    def stop(self) -> None:
        self.listener.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def listener(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    settings.CACHE_LOCAL_SECONDS = 0  # no copies in the process: a global change settles at once
    monkeypatch.setattr(answers, "SETTLE_MARGIN", 0.2)
    running = Running().start()
    yield running
    running.stop()


def wait_for(condition: Callable[[], Any], what: str, seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def poll(client: APIClient, path: str = CHECK) -> tuple[Any, int]:
    """The answer and how many queries it took."""
    with CaptureQueriesContext(connection) as queries:
        reply = client.get(path)
    return reply, len(queries)


def cached(actor: DeviceActor, path: str = CHECK) -> dict[str, Any]:
    """Poll until the answer comes from the cache (the first poll stores it), and return it."""

    def from_cache() -> Any:
        reply, queries = poll(actor.client, path)
        assert reply.status_code == 200, reply.content
        return reply.json() if queries == 0 else None

    return wait_for(from_cache, "an answer from the cache")


def changes_to(actor: DeviceActor, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll until the answer meets ``condition`` (the listener heard of the change)."""

    def answer() -> Any:
        reply, _ = poll(actor.client)
        body = reply.json()
        return body if reply.status_code == 200 and condition(body) else None

    return wait_for(answer, "the change reaches the device's poll")


def test_an_unchanged_device_is_answered_without_the_database(
    device_a: DeviceActor, listener: Running
) -> None:
    first, queries = poll(device_a.client)
    assert first.status_code == 200 and queries > 0
    answer = cached(device_a)
    assert (
        answer
        == first.json()
        == {
            "update_available": False,
            "reason": "no_assignment",
            "poll_interval": answer["poll_interval"],
        }
    )
    again, queries = poll(device_a.client)
    assert queries == 0
    # The same answer, headers included (but the request's own: id, timing).
    own = {"X-Request-ID", "Server-Timing"}
    assert {k: v for k, v in again.items() if k not in own} == {
        k: v for k, v in first.items() if k not in own
    }
    # The other spelling of the poll is its own entry.
    by_id = f"/api/v1/devices/{device_a.id}/updates"
    assert cached(device_a, by_id) == answer


def test_a_changed_device_row_reaches_its_next_poll(
    device_a: DeviceActor, v2: Firmware, listener: Running
) -> None:
    cached(device_a)
    # Raw SQL, as an operator's script would: no code path of ours is told.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE devices_device SET target_version = '1.1.0', target_set_at = now() "
            "WHERE id = %s",
            [device_a.id],
        )
    offer = changes_to(device_a, lambda body: body["update_available"])
    assert offer["version"] == "1.1.0"


def test_last_seen_alone_changes_no_answer(device_a: DeviceActor, listener: Running) -> None:
    cached(device_a)
    # The presence flush writes last_seen for the whole fleet every few seconds.
    Device.objects.filter(pk=device_a.id).update(last_seen=None)
    device_services.flush_last_seen()
    time.sleep(0.5)  # time for a notification, had there been one
    _, queries = poll(device_a.client)
    assert queries == 0


def test_a_group_assignment_reaches_its_members(
    device_a: DeviceActor, v2: Firmware, listener: Running
) -> None:
    group = DeviceGroupFactory.create(name="lab")
    device_services.update_device(device_a.refresh(), group=group)
    cached(device_a)
    device_services.update_group(group, target_version="1.1.0")
    assert changes_to(device_a, lambda body: body["update_available"])["version"] == "1.1.0"


def test_publishing_the_assigned_firmware_reaches_the_device(
    device_a: DeviceActor, listener: Running
) -> None:
    draft = FirmwareFactory.create(version="1.3.0")
    device_services.update_device(device_a.refresh(), target_version="1.3.0")
    assert cached(device_a)["reason"] == "not_published"
    firmware_services.publish_firmware(draft)
    assert changes_to(device_a, lambda body: body["update_available"])["version"] == "1.3.0"


def test_a_started_rollout_reaches_the_devices_it_targets(
    device_a: DeviceActor, v2: Firmware, listener: Running
) -> None:
    rollout = lifecycle.create_rollout(definition(v2, 100))
    assert cached(device_a)["reason"] == "no_assignment"
    lifecycle.start_rollout(rollout)
    offer = changes_to(device_a, lambda body: body["update_available"])
    assert offer["version"] == "1.1.0"
    # The offer opened a session: the device's polls now say it is in progress, not cached.
    session = UpdateSession.objects.get(device_id=device_a.id)
    reply, queries = poll(device_a.client)
    assert reply.json()["reason"] == "in_progress" and queries > 0
    # A session that ends (by SQL too) changes the answer again.
    UpdateSession.objects.filter(pk=session.pk).update(status="failed")
    assert changes_to(device_a, lambda body: body["reason"] == "already_failed")


def test_a_reset_credential_is_refused(device_a: DeviceActor, listener: Running) -> None:
    cached(device_a)
    device_services.reset_credentials(device_a.refresh())
    # Refused as soon as the listener hears of the change (milliseconds).
    wait_for(lambda: poll(device_a.client)[0].status_code == 401, "the old token is refused")


def test_another_token_of_the_same_credential_shares_the_answer(
    device_a: DeviceActor, listener: Running
) -> None:
    answer = cached(device_a)
    token, _ = device_services.issue_token(device_a.refresh())
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    reply, queries = poll(other)
    assert reply.json() == answer and queries == 0


def test_a_store_loses_to_a_change_made_after_its_lookup(
    device_a: DeviceActor, listener: Running, rf: Any
) -> None:
    device = str(device_a.id)

    def lookup() -> answers.Lookup:
        client = ratelimit.redis_client(ratelimit.settings.REDIS_URL)
        epoch, entry = (client.get(key) for key in answers.lookup_keys(device))
        text = [value.decode() if isinstance(value, bytes) else None for value in (epoch, entry)]
        return answers.Lookup(device, 1, text[0], text[1], at=time.monotonic())

    before = lookup()
    listener.listener.apply([f"d:{device}"])  # the device changed meanwhile
    response = answers.mark(answer_response())
    assert not answers.store(rf.get(CHECK), before, response)
    # Without the change, the same store lands.
    assert answers.store(rf.get(CHECK), lookup(), response)


def answer_response() -> Any:
    from django.http import JsonResponse

    return JsonResponse({"update_available": False, "reason": "no_assignment"})


def test_without_a_listener_polls_read_the_database(
    device_a: DeviceActor, listener: Running
) -> None:
    cached(device_a)
    listener.stop()
    assert not answers.status()["live"]  # a listener that stops takes its epoch with it
    _, queries = poll(device_a.client)
    assert queries > 0


def test_a_listener_that_dies_leaves_the_cache_off_within_seconds(
    device_a: DeviceActor, listener: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached(device_a)
    monkeypatch.setattr(answers, "EPOCH_SECONDS", 1)
    # Frozen (as a killed process would be): it neither renews nor releases its epoch.
    monkeypatch.setattr(listener.listener, "_renew", lambda: listener.listener.stopping.wait(30))
    client = ratelimit.redis_client(ratelimit.settings.REDIS_URL)
    client.expire(answers.epoch_key(), 1)
    wait_for(lambda: not answers.status()["live"], "the epoch expires", seconds=5)
    _, queries = poll(device_a.client)
    assert queries > 0


def test_a_second_listener_stands_by(device_a: DeviceActor, listener: Running) -> None:
    held = answers.status()["epoch"]
    second = Running()
    second.thread.start()
    time.sleep(1.5)
    assert answers.status()["epoch"] == held  # the first keeps it
    listener.stop()
    # The second takes over once the first let go.
    wait_for(lambda: answers.status()["live"], "the standby takes over")
    assert answers.status()["epoch"] != held
    second.stop()


def test_the_status_command(listener: Running, capsys: pytest.CaptureFixture[str]) -> None:
    call_command("answer_cache", "status", "--json")
    state = json.loads(capsys.readouterr().out)
    assert state["enabled"] and state["live"]


def test_the_cache_can_be_turned_off(device_a: DeviceActor, listener: Running, settings) -> None:
    settings.POLL_ANSWER_CACHE_SECONDS = 0
    poll(device_a.client)
    _, queries = poll(device_a.client)
    assert queries > 0


def heard(statements: list[tuple[str, list[Any]]]) -> set[str]:
    """What the triggers notify for these statements, each committed on its own."""
    import psycopg

    with psycopg.connect(autocommit=True, **answers.connection_params()) as listening:
        listening.execute(f"LISTEN {answers.CHANNEL}")
        with connection.cursor() as cursor:
            for sql, args in statements:
                cursor.execute(sql, args)
        return {n.payload for n in listening.notifies(timeout=0.3)}


def test_the_triggers_notify_what_a_poll_depends_on(device_a: DeviceActor, v2: Firmware) -> None:
    device = str(device_a.id)
    group = DeviceGroupFactory.create(name="lab")
    # Presence flushes and bookkeeping are no change.
    assert (
        heard(
            [
                (
                    "UPDATE devices_device SET last_seen = now(), updated_at = now() WHERE id = %s",
                    [device],
                ),
                ("UPDATE devices_devicegroup SET updated_at = now() WHERE id = %s", [group.id]),
            ]
        )
        == set()
    )
    assert heard(
        [('UPDATE devices_device SET metadata = \'{"site": "b"}\' WHERE id = %s', [device])]
    ) == {f"d:{device}"}
    assert heard(
        [("UPDATE devices_devicegroup SET target_version = '1.1.0' WHERE id = %s", [group.id])]
    ) == {answers.GLOBAL}
    (payload,) = heard(
        [("UPDATE firmware_firmware SET quarantined_at = now() WHERE id = %s", [v2.id])]
    )
    assert answers.firmware_payload(payload) == {
        "id": str(v2.id),
        "device_type": v2.device_type,
        "version_key": v2.version_key,
    }
    rollout = lifecycle.create_rollout(definition(v2, 100))
    assert heard(
        [("UPDATE rollouts_rolloutstage SET percentage = 50 WHERE rollout_id = %s", [rollout.id])]
    ) == {answers.GLOBAL}
    assert heard([("DELETE FROM devices_device WHERE id = %s", [device])]) == {f"d:{device}"}
