"""last_seen through Redis: sightings buffered by the rate limiter's round trip, flushed in bulk."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from rest_framework.test import APIClient

from devices import services as device_services
from devices.models import Device
from ota_site import presence, ratelimit
from tests.conftest import DeviceActor
from tests.e2e import free_port
from tests.factories import DeviceFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("patient_redis")]


def poll(actor: DeviceActor) -> None:
    reply = actor.client.get("/api/v1/updates/check")
    assert reply.status_code == 200, reply.content


def stale(actor: DeviceActor) -> Any:
    old = timezone.now() - timedelta(hours=1)
    Device.objects.filter(pk=actor.id).update(last_seen=old)
    return old


def test_the_rate_limiters_round_trip_records_the_sighting(device_a: DeviceActor, settings):
    settings.RATE_LIMIT_DEVICE = "100/min"
    old = stale(device_a)
    # Any request with the device's token counts as a sighting, not only the poll.
    reply = device_a.client.get(f"/api/v1/devices/{device_a.id}")
    assert reply.status_code == 200, reply.content
    assert "RateLimit-Limit" in reply  # the limiter ran, and recorded it in the same script
    taken = presence.take()
    assert set(taken) == {str(device_a.id)}
    presence.done()
    assert Device.objects.get(pk=device_a.id).last_seen == old  # nothing written by the request


def test_a_poll_under_the_limiter_is_recorded_once(device_a: DeviceActor, settings, monkeypatch):
    settings.RATE_LIMIT_DEVICE = "100/min"
    stale(device_a)
    notes: list[Any] = []

    def note(device_id: Any) -> bool:
        notes.append(device_id)
        return True

    monkeypatch.setattr(presence, "note", note)
    poll(device_a)
    assert notes == []  # the poll saw the limiter's sighting and made no second round trip
    assert device_services.flush_last_seen() == 1


def test_the_flush_never_moves_last_seen_backwards(
    device_a: DeviceActor, device_b: DeviceActor, settings
) -> None:
    settings.RATE_LIMIT_DEVICE = "100/min"  # the limiter records every request's sighting
    later = timezone.now() + timedelta(minutes=5)  # e.g. a heartbeat wrote it meanwhile
    Device.objects.filter(pk=device_a.id).update(last_seen=later)
    old = stale(device_b)
    poll(device_a)
    poll(device_b)
    assert device_services.flush_last_seen() == 2
    assert Device.objects.get(pk=device_a.id).last_seen == later
    assert Device.objects.get(pk=device_b.id).last_seen > old


def test_a_flush_that_died_is_taken_again_before_new_sightings(
    device_a: DeviceActor, device_b: DeviceActor
) -> None:
    stale(device_a)
    stale(device_b)
    poll(device_a)
    assert set(presence.take()) == {str(device_a.id)}  # ... and the flush died before done()
    poll(device_b)
    assert device_services.flush_last_seen() == 1  # device a's, left aside
    assert device_services.flush_last_seen() == 1  # then device b's
    assert device_services.flush_last_seen() == 0
    fresh = timezone.now() - timedelta(minutes=1)
    assert Device.objects.filter(last_seen__gt=fresh).count() == 2


def test_entries_that_are_not_sightings_are_dropped(device_a: DeviceActor) -> None:
    client = ratelimit.redis_client(django_settings.REDIS_URL)
    client.hset(presence.key(), mapping={"not-a-uuid": "1", str(device_a.id): "not-a-time"})
    assert device_services.flush_last_seen() == 0
    assert not client.exists(presence.key()) and not client.exists(presence.key() + ":flushing")


def test_without_redis_the_request_writes_last_seen(device_a: DeviceActor, settings) -> None:
    # A Redis that refuses connections: the sighting cannot be buffered, so it is written.
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    old = stale(device_a)
    poll(device_a)
    assert Device.objects.get(pk=device_a.id).last_seen > old


def test_the_buffer_can_be_turned_off(device_a: DeviceActor, settings) -> None:
    settings.DEVICE_LAST_SEEN_BUFFER = False
    old = stale(device_a)
    poll(device_a)
    assert Device.objects.get(pk=device_a.id).last_seen > old
    assert device_services.flush_last_seen() == 0


def test_beat_flushes_every_interval() -> None:
    entry = django_settings.CELERY_BEAT_SCHEDULE["flush-last-seen"]
    assert entry["task"] == "devices.tasks.flush_last_seen"
    assert entry["schedule"] == django_settings.DEVICE_LAST_SEEN_FLUSH_INTERVAL


def test_a_token_for_another_client_is_no_sighting(device_a: DeviceActor) -> None:
    stale(device_a)
    APIClient().get("/api/v1/updates/check", HTTP_AUTHORIZATION="Bearer forged.token.value")
    assert presence.take() == {}


def test_a_large_buffer_is_flushed_in_pieces(monkeypatch, db) -> None:
    devices = [DeviceFactory.create(last_seen=None) for _ in range(5)]
    client = ratelimit.redis_client(django_settings.REDIS_URL)
    client.hset(presence.key(), mapping={str(d.id): "1700000000.5" for d in devices})
    monkeypatch.setattr(device_services, "FLUSH_BATCH", 2)
    assert device_services.flush_last_seen() == 5
    assert Device.objects.filter(last_seen__isnull=True).count() == 0
    assert not client.exists(presence.key() + ":flushing")
