"""The live streams (metrics.consumers) through the whole ASGI application: the origin check, the
session and API-key authentication, role checks, snapshots, delivery after commit and in order,
resume with ?after, and the fleet stream's throttling.

Channels' communicator runs the consumers in this process; no async test plugin is installed, so
each test runs one coroutine with async_to_sync, and database work inside it goes through
database_sync_to_async (on this thread, with the test's connection). Transactions that must stay
open while the stream is watched run on their own thread (their own connection)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test import Client

from devices import services as device_services
from firmware import services as firmware_services
from metrics import consumers
from ota_site import apikeys
from ota_site.asgi import application
from ota_site.events import record_event
from ota_site.models import Event, EventKind
from ota_site.permissions import Role
from ota_site.roles import set_role
from rollouts import lifecycle
from tests.conftest import enroll, person
from tests.factories import FirmwareFactory

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
Header = tuple[bytes, bytes]


@pytest.fixture(autouse=True)
def _streams(settings: Any) -> Iterator[None]:
    """Fresh per-process stream state, a channel-layer namespace of this test's own (parallel
    test runs share the Redis), and short timers."""
    consumers.HORIZON.reset()
    consumers.FLEET_COUNTS.value = None
    layers = {name: {**config} for name, config in settings.CHANNEL_LAYERS.items()}
    if "CONFIG" in layers["default"]:
        layers["default"]["CONFIG"] = {
            **layers["default"]["CONFIG"],
            "prefix": f"test-streams-{uuid.uuid4().hex[:10]}",
        }
    settings.CHANNEL_LAYERS = layers
    settings.STREAM_POLL_INTERVAL = 10.0  # wake-ups, not the timer, deliver unless a test says
    settings.STREAM_GAP_GRACE = 3.0
    yield
    consumers.HORIZON.reset()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async_to_sync(scenario)()


def session_cookie(user: User) -> Header:
    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def api_key(role: Role = Role.VIEWER) -> Header:
    _, token = apikeys.create_api_key(name="stream test", role=role)
    return (b"authorization", f"ApiKey {token}".encode())


async def open_stream(path: str, *headers: Header) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN, *headers])
    connected, _ = await communicator.connect(timeout=5)
    assert connected, f"{path} was refused at the handshake"
    return communicator


async def close_code(path: str, *headers: Header) -> int:
    """The close code a refused stream is closed with (after it was accepted)."""
    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN, *headers])
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    output = await communicator.receive_output(timeout=5)
    assert output["type"] == "websocket.close", output
    await communicator.disconnect()
    return int(output["code"])


async def receive(communicator: WebsocketCommunicator, timeout: float = 3) -> dict[str, Any]:
    message: dict[str, Any] = await communicator.receive_json_from(timeout=timeout)
    return message


async def receive_for(communicator: WebsocketCommunicator, seconds: float) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if await communicator.receive_nothing(timeout=min(left, 0.05), interval=0.01):
            continue
        messages.append(await receive(communicator))
    return messages


def device_event(device_id: uuid.UUID, n: int) -> Event:
    with transaction.atomic():
        return record_event(EventKind.DEVICE_UPDATED, device_id=device_id, data={"n": n})


def in_thread(device_id: uuid.UUID, n: int, commit: threading.Event) -> threading.Thread:
    """Record an event in a transaction of another connection, and commit only on ``commit``."""
    recorded = threading.Event()

    def work() -> None:
        try:
            with transaction.atomic():
                record_event(EventKind.DEVICE_UPDATED, device_id=device_id, data={"n": n})
                recorded.set()
                commit.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=work)
    thread.start()
    assert recorded.wait(10)
    return thread


# --- Who may connect ------------------------------------------------------------------------------


def test_streams_refuse_connections_without_a_valid_credential(transactional_db: Any) -> None:
    device = enroll("stream-anon")
    paths = [
        "/api/v1/stream/fleet",
        f"/api/v1/stream/devices/{device.id}",
        f"/api/v1/stream/rollouts/{uuid.uuid4()}",
    ]

    async def scenario() -> None:
        for path in paths:
            assert await close_code(path) == 4401
            assert await close_code(path, (b"authorization", b"ApiKey ota_12345678_nope")) == 4401
            assert await close_code(path, (b"x-api-key", b"not-a-key")) == 4401
            assert await close_code(path, (b"authorization", b"Bearer not.a.jwt")) == 4401
            assert await close_code(path, (b"authorization", b"Basic dXNlcjpwdw==")) == 4401

    run(scenario)


def test_a_revoked_key_is_refused_even_with_a_valid_session(transactional_db: Any) -> None:
    key, token = apikeys.create_api_key(name="gone", role=Role.ADMIN)
    apikeys.revoke_api_key(key)
    cookie = session_cookie(person("vera", Role.VIEWER))

    async def scenario() -> None:
        header = (b"authorization", f"ApiKey {token}".encode())
        assert await close_code("/api/v1/stream/fleet", header, cookie) == 4401

    run(scenario)


def test_devices_and_people_without_a_role_are_refused_with_4403(transactional_db: Any) -> None:
    device = enroll("stream-device")
    access, _ = device_services.issue_token(device.device)
    nobody = session_cookie(person("nora", None))

    async def scenario() -> None:
        bearer = (b"authorization", f"Bearer {access}".encode())
        assert await close_code(f"/api/v1/stream/devices/{device.id}", bearer) == 4403
        assert await close_code("/api/v1/stream/fleet", bearer) == 4403
        assert await close_code("/api/v1/stream/fleet", nobody) == 4403

    run(scenario)


def test_a_viewer_session_gets_the_device_snapshot_first(transactional_db: Any) -> None:
    device = enroll("stream-viewer")
    cookie = session_cookie(person("victor", Role.VIEWER))

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{device.id}", cookie)
        snapshot = await receive(stream)
        assert snapshot["type"] == "snapshot"
        assert snapshot["stream"] == "device"
        assert snapshot["device"]["hardware_id"] == "stream-viewer"
        assert snapshot["device"]["id"] == str(device.id)
        assert snapshot["session"] is None
        newest = await database_sync_to_async(lambda: Event.objects.order_by("-id").first())()
        assert newest is not None and snapshot["id"] == newest.id
        assert await stream.receive_nothing(timeout=0.3)
        await stream.disconnect()

    run(scenario)


def test_an_api_key_may_open_the_fleet_stream(transactional_db: Any) -> None:
    enroll("stream-key-1")
    enroll("stream-key-2", version="2.0.0")
    header = api_key(Role.VIEWER)

    async def scenario() -> None:
        # Non-browser clients send no Origin.
        stream = WebsocketCommunicator(application, "/api/v1/stream/fleet", headers=[header])
        connected, _ = await stream.connect(timeout=5)
        assert connected
        snapshot = await receive(stream)
        assert snapshot["type"] == "snapshot" and snapshot["stream"] == "fleet"
        fleet = snapshot["fleet"]
        assert fleet["devices"] == 2
        assert fleet["by_status"] == {"idle": 2}
        assert {(v["version"], v["devices"]) for v in fleet["versions"]} == {
            ("1.0.0", 1),
            ("2.0.0", 1),
        }
        assert "device.registered" in [m["type"] for m in snapshot["latest"]]
        await stream.disconnect()

    run(scenario)


def test_unknown_subjects_paths_and_bad_resume_ids_are_refused(transactional_db: Any) -> None:
    header = api_key()

    async def scenario() -> None:
        assert await close_code(f"/api/v1/stream/devices/{uuid.uuid4()}", header) == 4404
        assert await close_code(f"/api/v1/stream/rollouts/{uuid.uuid4()}", header) == 4404
        for path in [
            "/api/v1/stream/devices/not-a-uuid",
            "/api/v1/stream/devices/",
            "/api/v1/stream/fleet/extra",
            "/api/v1/stream/",
            "/",
            "/api/v1/stream/%00%ff",
        ]:
            assert await close_code(path, header) == 4404, path
        for query in ["after=x", "after=-1", "after=1e3", "after=" + "9" * 30]:
            assert await close_code(f"/api/v1/stream/fleet?{query}", header) == 4400, query

    run(scenario)


def test_a_browser_from_another_origin_is_refused_at_the_handshake(transactional_db: Any) -> None:
    cookie = session_cookie(person("victor", Role.VIEWER))

    async def scenario() -> None:
        for origin in [b"https://evil.example", b"null", b"http://127.0.0.1.evil.example"]:
            stream = WebsocketCommunicator(
                application, "/api/v1/stream/fleet", headers=[(b"origin", origin), cookie]
            )
            connected, _ = await stream.connect(timeout=5)
            assert not connected, origin
        # Any port of an allowed host: the demo serves pages and streams on two ports.
        stream = await open_stream("/api/v1/stream/fleet", cookie)
        assert (await receive(stream))["type"] == "snapshot"
        await stream.disconnect()

    run(scenario)


def test_client_messages_are_ignored(transactional_db: Any) -> None:
    device = enroll("stream-chatty")
    header = api_key()

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{device.id}", header)
        await receive(stream)
        await stream.send_to(text_data="not json {")
        await stream.send_to(bytes_data=b"\x00\x01")
        event = await database_sync_to_async(device_event)(device.id, 1)
        message = await receive(stream)
        assert message["id"] == event.id
        await stream.disconnect()

    run(scenario)


# --- What streams send ----------------------------------------------------------------------------


def test_events_arrive_after_commit_in_order_and_only_for_their_device(
    transactional_db: Any, settings: Any
) -> None:
    settings.STREAM_POLL_INTERVAL = 0.2  # even the timer must not see an uncommitted row
    a, b = enroll("stream-a"), enroll("stream-b")
    operator = person("olivia", Role.OPERATOR)
    header = api_key()

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{a.id}", header)
        assert (await receive(stream))["type"] == "snapshot"

        commit = threading.Event()
        writer = await database_sync_to_async(in_thread)(a.id, 0, commit)
        assert await stream.receive_nothing(timeout=1.0)  # recorded but not committed
        commit.set()
        await database_sync_to_async(writer.join)()
        first = await receive(stream)
        assert first["type"] == "device.updated" and first["data"] == {"n": 0}

        def changes() -> list[int]:
            ids = [device_event(b.id, 99).id]  # another device's event: not on this stream
            for n in range(1, 6):
                ids.append(device_event(a.id, n).id)
            device_services.update_device(
                device_services.Device.objects.get(pk=a.id), metadata={"site": "x"}, actor=operator
            )
            ids.append(Event.objects.order_by("-id").values_list("id", flat=True)[0])
            return ids[1:]

        expected = await database_sync_to_async(changes)()
        got = [await receive(stream) for _ in expected]
        assert [m["id"] for m in got] == expected
        assert [m["data"].get("n") for m in got[:5]] == [1, 2, 3, 4, 5]
        assert got[-1]["device_id"] == str(a.id)
        assert all(m["device_id"] == str(a.id) for m in got)
        assert await stream.receive_nothing(timeout=0.5)
        await stream.disconnect()

    run(scenario)


def test_an_event_committed_late_is_sent_before_newer_ones(transactional_db: Any) -> None:
    """Event ids are taken at insert, not at commit: a newer event that commits first waits."""
    device = enroll("stream-late")
    header = api_key()

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{device.id}", header)
        await receive(stream)
        commit = threading.Event()
        writer = await database_sync_to_async(in_thread)(device.id, 1, commit)
        newer = await database_sync_to_async(device_event)(device.id, 2)
        assert await stream.receive_nothing(timeout=1.0)  # #2 is held back behind #1
        commit.set()
        await database_sync_to_async(writer.join)()
        older = await receive(stream)
        assert older["data"] == {"n": 1} and older["id"] < newer.id
        assert (await receive(stream))["id"] == newer.id
        await stream.disconnect()

    run(scenario)


def test_an_id_that_never_commits_holds_newer_events_back_only_briefly(
    transactional_db: Any, settings: Any
) -> None:
    settings.STREAM_GAP_GRACE = 0.5
    device = enroll("stream-rollback")
    header = api_key()

    def rolled_back() -> None:
        with transaction.atomic():
            record_event(EventKind.DEVICE_UPDATED, device_id=device.id, data={"n": "lost"})
            transaction.set_rollback(True)

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{device.id}", header)
        await receive(stream)
        await database_sync_to_async(rolled_back)()
        started = time.monotonic()
        event = await database_sync_to_async(device_event)(device.id, 2)
        message = await receive(stream)
        assert message["id"] == event.id and message["data"] == {"n": 2}
        assert 0.4 < time.monotonic() - started < 2.5
        await stream.disconnect()

    run(scenario)


def test_a_client_resumes_after_the_last_id_it_saw(transactional_db: Any) -> None:
    device = enroll("stream-resume")
    header = api_key()
    path = f"/api/v1/stream/devices/{device.id}"

    async def scenario() -> None:
        stream = await open_stream(path, header)
        snapshot = await receive(stream)
        seen = await database_sync_to_async(device_event)(device.id, 1)
        assert (await receive(stream))["id"] == seen.id
        await stream.disconnect()

        missed = [(await database_sync_to_async(device_event)(device.id, n)).id for n in (2, 3, 4)]
        stream = await open_stream(f"{path}?after={seen.id}", header)
        got = [(await receive(stream))["id"] for _ in missed]
        assert got == missed  # no snapshot, no repeat of #1, nothing lost
        assert await stream.receive_nothing(timeout=0.3)
        await stream.disconnect()

        # Resuming from the snapshot's id replays everything since it.
        stream = await open_stream(f"{path}?after={snapshot['id']}", header)
        got = [(await receive(stream))["id"] for _ in range(4)]
        assert got == [seen.id, *missed]
        await stream.disconnect()

    run(scenario)


def test_the_timer_delivers_when_no_wake_up_arrives(transactional_db: Any, settings: Any) -> None:
    """The embedded mode: another process's in-memory channel layer never reaches daphne."""
    settings.STREAM_POLL_INTERVAL = 0.5
    device = enroll("stream-timer")
    header = api_key()

    def silent_event() -> Event:
        # Written as another process would: the row, and a publish this process never sees.
        return Event.objects.create(kind=EventKind.DEVICE_UPDATED, device_id=device.id)

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/devices/{device.id}", header)
        await receive(stream)
        event = await database_sync_to_async(silent_event)()
        message = await receive(stream, timeout=2)
        assert message["id"] == event.id
        await stream.disconnect()

    run(scenario)


def test_the_rollout_stream_starts_with_its_metrics(transactional_db: Any) -> None:
    enroll("stream-r1")
    firmware = firmware_services.publish_firmware(FirmwareFactory.create(version="1.1.0"))
    operator = person("olivia", Role.OPERATOR)
    rollout = lifecycle.create_rollout(
        lifecycle.Definition(
            name="streamed",
            firmware=firmware,
            stages=[lifecycle.StageSpec("canary", 10), lifecycle.StageSpec("all", 100)],
        ),
        actor=operator,
    )
    header = api_key()

    async def scenario() -> None:
        stream = await open_stream(f"/api/v1/stream/rollouts/{rollout.id}", header)
        snapshot = await receive(stream)
        assert snapshot["type"] == "snapshot" and snapshot["stream"] == "rollout"
        assert snapshot["rollout"]["id"] == str(rollout.id)
        assert snapshot["rollout"]["name"] == "streamed"
        assert [s["percentage"] for s in snapshot["rollout"]["stages"]] == [10, 100]
        await database_sync_to_async(lifecycle.start_rollout)(rollout, actor=operator)
        started = await receive(stream)
        assert started["type"] == "rollout.started"
        assert started["rollout_id"] == str(rollout.id)
        await stream.disconnect()

    run(scenario)


def test_a_burst_of_fleet_events_gives_few_up_to_date_messages(transactional_db: Any) -> None:
    device = enroll("stream-fleet")
    header = api_key()

    def burst() -> int:
        with transaction.atomic():
            for n in range(500):
                record_event(EventKind.SESSION_PROGRESS, device_id=device.id, data={"n": n})
        return int(Event.objects.order_by("-id").values_list("id", flat=True)[0])

    async def scenario() -> None:
        stream = await open_stream("/api/v1/stream/fleet", header)
        snapshot = await receive(stream)
        newest = await database_sync_to_async(burst)()
        messages = await receive_for(stream, 2.0)
        assert 1 <= len(messages) <= 3, [m["type"] for m in messages]
        assert all(m["type"] == "fleet.update" for m in messages)
        assert messages[-1]["id"] == newest
        assert messages[0]["after"] == snapshot["id"]
        assert sum(m["events"]["count"] for m in messages) == 500
        assert messages[-1]["events"]["latest"][-1]["data"] == {"n": 499}
        assert messages[-1]["fleet"]["devices"] == 1
        await stream.disconnect()

    run(scenario)


def test_fleet_updates_are_spaced_by_the_interval(transactional_db: Any) -> None:
    device = enroll("stream-fleet-steady")
    header = api_key()

    async def scenario() -> None:
        stream = await open_stream("/api/v1/stream/fleet", header)
        await receive(stream)
        times: list[float] = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # a device reporting every 50 ms
            await database_sync_to_async(device_event)(device.id, 0)
            while not await stream.receive_nothing(timeout=0.05, interval=0.01):
                assert (await receive(stream))["type"] == "fleet.update"
                times.append(time.monotonic())
        assert 2 <= len(times) <= 4
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))
        await stream.disconnect()

    run(scenario)


def test_an_open_stream_closes_when_its_key_is_revoked_or_its_role_removed(
    transactional_db: Any, settings: Any
) -> None:
    settings.STREAM_RECHECK_INTERVAL = 0.3
    key, token = apikeys.create_api_key(name="short-lived", role=Role.VIEWER)
    header = (b"authorization", f"ApiKey {token}".encode())
    viewer = person("vera", Role.VIEWER)
    cookie = session_cookie(viewer)

    async def closed_with(stream: WebsocketCommunicator) -> int:
        while True:  # the snapshot and any events first, then the close
            output = await stream.receive_output(timeout=5)
            if output["type"] == "websocket.close":
                return int(output["code"])

    async def scenario() -> None:
        by_key = await open_stream("/api/v1/stream/fleet", header)
        by_session = await open_stream("/api/v1/stream/fleet", cookie)
        await database_sync_to_async(apikeys.revoke_api_key)(key)
        await database_sync_to_async(set_role)(viewer, None)
        assert await closed_with(by_key) == 4401
        assert await closed_with(by_session) == 4403
        await by_key.disconnect()
        await by_session.disconnect()

    run(scenario)
