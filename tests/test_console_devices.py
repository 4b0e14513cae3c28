"""Console: the devices list (search, filters, sort, pages) and the device page with its actions."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from devices.models import Device, DeviceGroup, DeviceStatus
from ota_site.models import Event, EventKind
from ota_site.versions import version_key
from tests.conftest import DeviceActor
from tests.factories import DeviceFactory, DeviceGroupFactory, UpdateSessionFactory

pytestmark = pytest.mark.django_db


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def html(response: Any) -> str:
    return response.content.decode()


def bulk_devices(n: int, **fields: Any) -> None:
    now = timezone.now()
    Device.objects.bulk_create(
        [
            Device(
                hardware_id=f"bulk-{i:06d}",
                device_type="board-a" if i % 3 else "board-b",
                current_version=f"1.{i % 4}.0",
                current_version_key=version_key(f"1.{i % 4}.0"),
                status=DeviceStatus.FAILED if i % 10 == 0 else DeviceStatus.IDLE,
                last_seen=now - timedelta(minutes=i % 30) if i % 7 else None,
                metadata={"site": f"plant-{i % 5}"},
                **fields,
            )
            for i in range(n)
        ],
        batch_size=2000,
    )


# --- Access -----------------------------------------------------------------------------------


def test_anonymous_is_sent_to_login(device_a: DeviceActor) -> None:
    for url in ("/devices/", f"/devices/{device_a.id}/"):
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/login/?next=")


def test_a_user_without_a_role_gets_403() -> None:
    nobody = User.objects.create_user("nobody", password="pw-nobody-1")
    response = client_for(nobody).get("/devices/")
    assert response.status_code == 403
    assert "has no console role" in html(response)


def test_list_renders_for_each_role(
    viewer: User, operator: User, admin_user: User, device_a: DeviceActor
) -> None:
    for user in (viewer, operator, admin_user):
        response = client_for(user).get("/devices/")
        assert response.status_code == 200
        page = html(response)
        assert "device-a" in page
        assert f'href="/devices/{device_a.id}/"' in page
        assert 'aria-current="page">Devices' in page


def test_device_page_shows_controls_by_role(
    viewer: User, operator: User, admin_user: User, device_a: DeviceActor
) -> None:
    url = f"/devices/{device_a.id}/"
    seen = html(client_for(viewer).get(url))
    assert "device-a" in seen
    assert "/edit/" not in seen and "/revoke/" not in seen and "/delete/" not in seen

    operated = html(client_for(operator).get(url))
    assert f"/devices/{device_a.id}/edit/" in operated
    assert "/revoke/" not in operated and "/delete/" not in operated

    administered = html(client_for(admin_user).get(url))
    assert f"/devices/{device_a.id}/edit/" in administered
    assert f"/devices/{device_a.id}/revoke/" in administered
    assert f"/devices/{device_a.id}/delete/" in administered
    assert 'class="confirm danger"' in administered


def test_retry_is_offered_only_with_an_assigned_version(
    operator: User, device_a: DeviceActor
) -> None:
    url = f"/devices/{device_a.id}/"
    assert "/retry/" not in html(client_for(operator).get(url))
    Device.objects.filter(pk=device_a.id).update(target_version="1.1.0")
    assert f"/devices/{device_a.id}/retry/" in html(client_for(operator).get(url))


def test_viewer_posts_are_refused(viewer: User, device_a: DeviceActor) -> None:
    client = client_for(viewer)
    for action in ("retry", "edit", "revoke", "delete"):
        response = client.post(f"/devices/{device_a.id}/{action}/", {"group": ""})
        assert response.status_code == 403, action
    assert Device.objects.filter(pk=device_a.id, revoked_at__isnull=True).exists()


def test_operator_cannot_revoke_or_delete(operator: User, device_a: DeviceActor) -> None:
    client = client_for(operator)
    assert client.post(f"/devices/{device_a.id}/revoke/").status_code == 403
    assert client.post(f"/devices/{device_a.id}/delete/").status_code == 403
    assert Device.objects.filter(pk=device_a.id, revoked_at__isnull=True).exists()


def test_actions_need_csrf(operator: User, device_a: DeviceActor) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    response = client.post(f"/devices/{device_a.id}/edit/", {"target_version": "1.1.0"})
    assert response.status_code == 403
    assert Device.objects.get(pk=device_a.id).target_version is None


# --- Actions ----------------------------------------------------------------------------------


def test_operator_edits_group_target_and_metadata(operator: User, device_a: DeviceActor) -> None:
    group = DeviceGroupFactory.create(name="lab")
    client = client_for(operator)
    response = client.post(
        f"/devices/{device_a.id}/edit/",
        {"group": str(group.id), "target_version": "1.1.0", "metadata": '{"site": "lab-1"}'},
    )
    assert response.status_code == 302
    assert response["Location"] == f"/devices/{device_a.id}/"
    device = device_a.refresh()
    assert device.group == group
    assert device.target_version == "1.1.0"
    assert device.metadata == {"site": "lab-1"}
    event = Event.objects.filter(device_id=device.id, kind=EventKind.DEVICE_UPDATED).last()
    assert event is not None and event.actor == "user:olivia"
    page = html(client.get(response["Location"]))
    assert "device-a was saved." in page


def test_edit_with_bad_input_changes_nothing(operator: User, device_a: DeviceActor) -> None:
    client = client_for(operator)
    before = Event.objects.count()
    for data in (
        {"metadata": "{not json"},
        {"metadata": "[1, 2]"},
        {"metadata": '{"bad key!": 1}'},
        {"target_version": "not a version!"},
        {"group": "not-a-uuid"},
        {"group": str(uuid.uuid4())},
    ):
        response = client.post(f"/devices/{device_a.id}/edit/", data, follow=True)
        assert response.status_code == 200, data
        assert 'class="error"' in html(response), data
    assert Event.objects.count() == before
    assert device_a.refresh().metadata == {}


def test_operator_retries_an_update(operator: User, device_a: DeviceActor) -> None:
    client = client_for(operator)
    refused = client.post(f"/devices/{device_a.id}/retry/", follow=True)
    assert "no assigned version" in html(refused)
    Device.objects.filter(pk=device_a.id).update(target_version="1.1.0")
    response = client.post(f"/devices/{device_a.id}/retry/")
    assert response.status_code == 302
    event = Event.objects.filter(device_id=device_a.id, kind=EventKind.DEVICE_UPDATED).last()
    assert event is not None and event.data == {"target_version": "1.1.0", "retry": True}


def test_admin_revokes_then_deletes(admin_user: User, device_a: DeviceActor) -> None:
    client = client_for(admin_user)
    response = client.post(f"/devices/{device_a.id}/revoke/", {"reason": "stolen"}, follow=True)
    assert response.status_code == 200
    assert device_a.refresh().revoked_at is not None
    assert "badge-revoked" in html(response)
    event = Event.objects.get(device_id=device_a.id, kind=EventKind.DEVICE_REVOKED)
    assert event.data["reason"] == "stolen"

    again = client.post(f"/devices/{device_a.id}/revoke/", follow=True)
    assert "already revoked" in html(again)

    response = client.post(f"/devices/{device_a.id}/delete/")
    assert response.status_code == 302 and response["Location"] == "/devices/"
    assert not Device.objects.filter(pk=device_a.id).exists()
    assert Event.objects.filter(device_id=device_a.id, kind=EventKind.DEVICE_DELETED).exists()


def test_actions_answer_get_with_405(operator: User, device_a: DeviceActor) -> None:
    assert client_for(operator).get(f"/devices/{device_a.id}/retry/").status_code == 405


# --- The device page --------------------------------------------------------------------------


def test_device_page_shows_sessions_events_and_credentials(
    viewer: User, device_a: DeviceActor, published: Any
) -> None:
    UpdateSessionFactory.create(
        device=device_a.device, firmware=published, status="failed", error_message="disk full"
    )
    Device.objects.filter(pk=device_a.id).update(metadata={"site": "plant-9"})
    page = html(client_for(viewer).get(f"/devices/{device_a.id}/"))
    assert "1.1.0" in page and "disk full" in page and "badge-failed" in page
    assert "plant-9" in page
    assert "device.registered" in page
    assert "badge-active" in page  # credentials: the enrollment secret is set
    assert f'data-live-stream="/api/v1/stream/devices/{device_a.id}"' in page


def test_device_page_empty_states(viewer: User) -> None:
    device = DeviceFactory.create(last_seen=None, secret_hash="")
    page = html(client_for(viewer).get(f"/devices/{device.id}/"))
    assert "No update sessions" in page
    assert "No metadata" in page
    assert "No events yet" in page
    assert "never" in page
    assert "badge-reset" in page


def test_unknown_or_malformed_device_ids_are_404(viewer: User) -> None:
    client = client_for(viewer)
    assert client.get(f"/devices/{uuid.uuid4()}/").status_code == 404
    assert client.get("/devices/not-a-uuid/").status_code == 404
    response = client_for(User.objects.get(pk=viewer.pk)).post(f"/devices/{uuid.uuid4()}/edit/")
    assert response.status_code == 403  # a viewer learns nothing about ids by posting


def test_operator_post_for_unknown_device_is_404(operator: User) -> None:
    assert client_for(operator).post(f"/devices/{uuid.uuid4()}/retry/").status_code == 404


# --- The list: search, filters, sort, pages ---------------------------------------------------


def test_search_by_hardware_id_device_id_and_metadata(viewer: User) -> None:
    alpha = DeviceFactory.create(hardware_id="alpha-001", metadata={"site": "north"})
    beta = DeviceFactory.create(hardware_id="beta-001", metadata={"site": "south"})
    client = client_for(viewer)

    page = html(client.get("/devices/", {"q": "alpha"}))
    assert "alpha-001" in page and "beta-001" not in page

    page = html(client.get("/devices/", {"q": str(beta.id)[:8]}))
    assert "beta-001" in page and "alpha-001" not in page

    page = html(client.get("/devices/", {"q": "site=north"}))
    assert "alpha-001" in page and "beta-001" not in page
    assert alpha.id  # both exist
    # Free text is not searched in metadata (a scan of every row); key=value is.
    assert "No device matches" in html(client.get("/devices/", {"q": "north"}))


def test_filters_and_sort(viewer: User) -> None:
    group = DeviceGroupFactory.create(name="pilot")
    now = timezone.now()
    DeviceFactory.create(
        hardware_id="d-old", current_version="1.0.0", last_seen=now - timedelta(days=2)
    )
    DeviceFactory.create(
        hardware_id="d-new",
        current_version="2.0.0",
        last_seen=now,
        group=group,
        current_version_key=version_key("2.0.0"),
    )
    DeviceFactory.create(
        hardware_id="d-failed", status=DeviceStatus.FAILED, device_type="board-b", last_seen=None
    )
    client = client_for(viewer)

    def names(**params: Any) -> list[str]:
        response = client.get("/devices/", params)
        assert response.status_code == 200, params
        return [d.hardware_id for d in response.context["page"].devices]

    assert names(status="failed") == ["d-failed"]
    assert names(device_type="board-b") == ["d-failed"]
    assert names(group=str(group.id)) == ["d-new"]
    assert set(names(group="none")) == {"d-old", "d-failed"}
    assert names(version="2.0.0") == ["d-new"]
    assert names(online="yes") == ["d-new"]
    assert set(names(online="no")) == {"d-old", "d-failed"}
    # Newest first, never-seen devices last whichever the direction.
    assert names() == ["d-new", "d-old", "d-failed"]
    assert names(sort="last_seen") == ["d-old", "d-new", "d-failed"]
    assert names(sort="hardware_id") == ["d-failed", "d-new", "d-old"]
    assert names(sort="-version")[0] == "d-new"


def test_empty_states_of_the_list(viewer: User) -> None:
    client = client_for(viewer)
    assert "No devices yet" in html(client.get("/devices/"))
    DeviceFactory.create()
    assert "No device matches these filters" in html(client.get("/devices/", {"q": "zzz"}))


@pytest.mark.parametrize(
    "params",
    [
        {"page": "abc"},
        {"page": "0"},
        {"page": "-3"},
        {"status": "exploded"},
        {"online": "maybe"},
        {"sort": "password"},
        {"group": "not-a-uuid"},
        {"group": str(uuid.UUID(int=1))},
        {"q": "x" * 200},
    ],
)
def test_bad_filters_are_a_400_page(viewer: User, params: dict[str, str]) -> None:
    response = client_for(viewer).get("/devices/", params)
    assert response.status_code == 400
    page = html(response)
    assert 'class="field-errors"' in page
    assert "<form" in page  # the filters stay editable


def test_pages_with_a_few_thousand_devices(
    viewer: User, django_assert_max_num_queries: Any
) -> None:
    bulk_devices(3000)
    client = client_for(viewer)
    client.get("/devices/")  # warm the session, role and device-type caches
    with django_assert_max_num_queries(8):
        response = client.get("/devices/", {"sort": "hardware_id", "page": "3"})
    assert response.status_code == 200
    page = response.context["page"]
    assert [d.hardware_id for d in page.devices][:2] == ["bulk-000100", "bulk-000101"]
    assert page.total == 3000 and not page.total_capped and page.has_next
    assert "Devices 101\u2013150 of 3000" in html(response)

    with django_assert_max_num_queries(8):
        filtered = client.get(
            "/devices/", {"status": "failed", "online": "yes", "q": "site=plant-0"}
        )
    assert filtered.status_code == 200
    assert all(d.status == "failed" for d in filtered.context["page"].devices)

    past_the_end = client.get("/devices/", {"page": "999"})
    assert past_the_end.status_code == 200
    assert "past the end" in html(past_the_end)


def test_the_count_stops_at_its_limit(viewer: User, settings: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr("devices.views.COUNT_LIMIT", 100)
    bulk_devices(150)
    response = client_for(viewer).get("/devices/")
    assert response.context["page"].total_capped
    assert "More than 100 devices" in html(response)


def test_group_filter_offers_groups(viewer: User) -> None:
    DeviceGroup.objects.create(name="field-trial")
    assert "field-trial" in html(client_for(viewer).get("/devices/"))
