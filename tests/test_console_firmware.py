"""Console firmware pages: the list, upload (through the API with the session), a firmware's page,
publish and delete, for each role."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone

from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts import lifecycle
from tests.conftest import person
from tests.factories import DeviceFactory, FirmwareFactory

pytestmark = pytest.mark.django_db


def browser(user: User | None) -> Client:
    """A client that checks CSRF like a browser session does."""
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    return client


def csrf_post(client: Client, page: str, url: str, data: dict[str, Any] | None = None) -> Any:
    """POST as the page's form would: the token from the page's CSRF cookie."""
    client.get(page)
    token = client.cookies["csrftoken"].value
    return client.post(url, {**(data or {}), "csrfmiddlewaretoken": token})


@pytest.fixture
def nobody(db: Any) -> User:
    return person("nora", None)


@pytest.fixture
def draft(db: Any) -> Firmware:
    return FirmwareFactory.create(version="1.2.0", metadata={"release_notes": "Fixes *Wi-Fi*."})


# --- Access -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/firmware/", "/firmware/upload/"])
def test_anonymous_goes_to_login(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith(f"/login/?next={path}")


def test_anonymous_detail_goes_to_login(published: Firmware) -> None:
    response = Client().get(f"/firmware/{published.pk}/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_no_role_is_refused(nobody: User, published: Firmware) -> None:
    client = browser(nobody)
    for path in ("/firmware/", "/firmware/upload/", f"/firmware/{published.pk}/"):
        assert client.get(path).status_code == 403, path
    publish = csrf_post(client, "/firmware/", f"/firmware/{published.pk}/publish/")
    assert publish.status_code == 403


def test_bad_ids_are_404(operator: User, admin_user: User) -> None:
    client = browser(admin_user)
    missing = uuid.uuid4()
    assert client.get(f"/firmware/{missing}/").status_code == 404
    assert client.get("/firmware/not-a-uuid/").status_code == 404
    assert csrf_post(client, "/firmware/", f"/firmware/{missing}/publish/").status_code == 404
    assert csrf_post(client, "/firmware/", f"/firmware/{missing}/delete/").status_code == 404


def test_get_on_actions_is_refused(operator: User, draft: Firmware) -> None:
    response = browser(operator).get(f"/firmware/{draft.pk}/publish/")
    assert response.status_code == 405
    draft.refresh_from_db()
    assert not draft.is_published


# --- List ---------------------------------------------------------------------------------------


def test_list_shows_firmware_and_where_it_runs(
    viewer: User, published: Firmware, draft: Firmware
) -> None:
    DeviceFactory.create_batch(3, current_version="1.1.0")
    DeviceFactory.create_batch(2, current_version="1.1")  # the same version, written otherwise
    DeviceFactory.create(current_version="1.1.0", device_type="board-b")  # another type
    FirmwareFactory.create(version="9.0.0", device_type="board-b", quarantined_at=timezone.now())
    response = browser(viewer).get("/firmware/")
    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-running="{published.pk}">5<' in html
    assert f'data-running="{draft.pk}">0<' in html
    assert "published" in html and "draft" in html and "quarantined" in html
    assert "Upload firmware" not in html  # viewers do not upload


def test_list_filters_by_device_type(viewer: User, published: Firmware) -> None:
    other = FirmwareFactory.create(version="3.0.0", device_type="board-b")
    html = browser(viewer).get("/firmware/?device_type=board-b").content.decode()
    assert f"/firmware/{other.pk}/" in html and f"/firmware/{published.pk}/" not in html
    empty = browser(viewer).get("/firmware/?device_type=nope&page=abc")
    assert empty.status_code == 200 and "No firmware for device type" in empty.content.decode()


def test_list_controls_per_role(operator: User) -> None:
    html = browser(operator).get("/firmware/").content.decode()
    assert 'href="/firmware/upload/"' in html
    assert "No firmware yet" in html  # the empty state


def test_list_queries_are_bounded(viewer: User, django_assert_max_num_queries: Any) -> None:
    for n in range(30):
        FirmwareFactory.create(version=f"5.{n}.0")
    DeviceFactory.create_batch(10, current_version="5.3.0")
    client = browser(viewer)
    client.get("/firmware/")  # session and role lookups warm
    with django_assert_max_num_queries(8):
        response = client.get("/firmware/")
    assert response.status_code == 200


# --- Detail -------------------------------------------------------------------------------------


def test_detail_for_viewer_has_facts_and_no_controls(viewer: User, published: Firmware) -> None:
    DeviceFactory.create_batch(2, current_version="1.1.0", status="success")
    DeviceFactory.create(current_version="1.1.0", status="failed")
    html = browser(viewer).get(f"/firmware/{published.pk}/").content.decode()
    assert published.signature in html
    assert f"<code>{published.signing_key_id}</code>" in html
    assert published.checksum in html
    assert "&quot;release_counter&quot;" in html  # the manifest, escaped
    assert 'data-devices="success">2<' in html and 'data-devices="failed">1<' in html
    assert "/publish/" not in html and "/delete/" not in html


def test_detail_controls_per_role(operator: User, admin_user: User, draft: Firmware) -> None:
    html = browser(operator).get(f"/firmware/{draft.pk}/").content.decode()
    assert f'action="/firmware/{draft.pk}/publish/"' in html
    assert "/delete/" not in html
    assert "Fixes *Wi-Fi*." in html  # release notes
    html = browser(admin_user).get(f"/firmware/{draft.pk}/").content.decode()
    assert f'action="/firmware/{draft.pk}/publish/"' in html
    assert f'action="/firmware/{draft.pk}/delete/"' in html


def test_detail_shows_sessions_and_rollouts(viewer: User, published: Firmware) -> None:
    rollout = lifecycle.create_rollout(
        lifecycle.Definition(
            name="spring", firmware=published, stages=[lifecycle.StageSpec("all", 100)]
        )
    )
    html = browser(viewer).get(f"/firmware/{published.pk}/").content.decode()
    assert f"/rollouts/{rollout.pk}/" in html and "spring" in html


# --- Publish and delete --------------------------------------------------------------------------


def test_operator_publishes_through_the_page(operator: User, draft: Firmware) -> None:
    client = browser(operator)
    page = f"/firmware/{draft.pk}/"
    response = csrf_post(client, page, f"/firmware/{draft.pk}/publish/")
    assert response.status_code == 302 and response["Location"] == page
    draft.refresh_from_db()
    assert draft.is_published and draft.signature
    event = Event.objects.get(kind=EventKind.FIRMWARE_PUBLISHED, firmware_id=draft.pk)
    assert event.actor == "user:olivia"
    assert "Published" in client.get(page).content.decode()


def test_publish_needs_csrf(operator: User, draft: Firmware) -> None:
    response = browser(operator).post(f"/firmware/{draft.pk}/publish/")
    assert response.status_code == 403
    draft.refresh_from_db()
    assert not draft.is_published


def test_viewer_cannot_publish(viewer: User, draft: Firmware) -> None:
    response = csrf_post(browser(viewer), "/firmware/", f"/firmware/{draft.pk}/publish/")
    assert response.status_code == 403
    draft.refresh_from_db()
    assert not draft.is_published


def test_publish_refusal_is_a_message(operator: User) -> None:
    broken = FirmwareFactory.create(version="1.3.0")
    Firmware.objects.filter(pk=broken.pk).update(checksum="0" * 64)
    client = browser(operator)
    page = f"/firmware/{broken.pk}/"
    response = csrf_post(client, page, f"{page}publish/")
    assert response.status_code == 302
    html = client.get(page).content.decode()
    assert "Not published" in html and "does not match its recorded checksum" in html
    broken.refresh_from_db()
    assert not broken.is_published


def test_admin_deletes_through_the_page(admin_user: User, draft: Firmware) -> None:
    client = browser(admin_user)
    response = csrf_post(client, f"/firmware/{draft.pk}/", f"/firmware/{draft.pk}/delete/")
    assert response.status_code == 302 and response["Location"] == "/firmware/"
    assert not Firmware.objects.filter(pk=draft.pk).exists()
    assert Event.objects.filter(kind=EventKind.FIRMWARE_DELETED, firmware_id=draft.pk).exists()


def test_operator_cannot_delete(operator: User, draft: Firmware) -> None:
    response = csrf_post(browser(operator), "/firmware/", f"/firmware/{draft.pk}/delete/")
    assert response.status_code == 403
    assert Firmware.objects.filter(pk=draft.pk).exists()


def test_firmware_in_use_is_not_deleted(admin_user: User, published: Firmware) -> None:
    lifecycle.create_rollout(
        lifecycle.Definition(
            name="uses it", firmware=published, stages=[lifecycle.StageSpec("all", 100)]
        )
    )
    client = browser(admin_user)
    page = f"/firmware/{published.pk}/"
    response = csrf_post(client, page, f"{page}delete/")
    assert response.status_code == 302 and response["Location"] == page
    assert Firmware.objects.filter(pk=published.pk).exists()
    assert "Not deleted" in client.get(page).content.decode()


# --- Upload ---------------------------------------------------------------------------------------


def test_upload_page_for_operator_only(operator: User, viewer: User) -> None:
    html = browser(operator).get("/firmware/upload/").content.decode()
    assert 'data-endpoint="/api/v1/firmware"' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert "console/upload.js" in html
    assert browser(viewer).get("/firmware/upload/").status_code == 403


def _token_of_upload_page(client: Client) -> str:
    html = client.get("/firmware/upload/").content.decode()
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert match
    return match.group(1)


def test_upload_through_the_pages_endpoint(operator: User) -> None:
    client = browser(operator)
    token = _token_of_upload_page(client)
    response = client.post(
        "/api/v1/firmware",
        {
            "file": SimpleUploadedFile("image.bin", b"\x7fELF firmware bytes" * 100),
            "version": "4.0.0",
            "device_type": "board-z",
            "release_notes": "First build.",
        },
        HTTP_X_CSRFTOKEN=token,
        HTTP_ACCEPT="application/json",
    )
    assert response.status_code == 201, response.content
    firmware = Firmware.objects.get(pk=response.json()["id"])
    assert firmware.file_size == 1900 and not firmware.is_published
    assert firmware.created_by == operator
    # The page the script goes to next.
    assert browser(operator).get(f"/firmware/{firmware.pk}/").status_code == 200


def test_upload_errors_come_back_as_json(operator: User, published: Firmware) -> None:
    client = browser(operator)
    token = _token_of_upload_page(client)
    bad = client.post(
        "/api/v1/firmware",
        {"file": SimpleUploadedFile("a.bin", b"x"), "version": "not a version!"},
        HTTP_X_CSRFTOKEN=token,
    )
    assert bad.status_code == 400
    body = bad.json()
    assert body["code"] == "invalid" and {"version", "device_type"} <= set(body["errors"])
    duplicate = client.post(
        "/api/v1/firmware",
        {"file": SimpleUploadedFile("a.bin", b"x"), "version": "1.1.0", "device_type": "board-a"},
        HTTP_X_CSRFTOKEN=token,
    )
    assert duplicate.status_code == 409 and duplicate.json()["code"] == "duplicate_version"


def test_upload_without_csrf_token_is_refused(operator: User) -> None:
    response = browser(operator).post(
        "/api/v1/firmware",
        {"file": SimpleUploadedFile("a.bin", b"x"), "version": "4.0.1", "device_type": "b"},
    )
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert not Firmware.objects.filter(version="4.0.1").exists()


def test_viewer_upload_is_refused(viewer: User) -> None:
    client = browser(viewer)
    client.get("/firmware/")
    response = client.post(
        "/api/v1/firmware",
        {"file": SimpleUploadedFile("a.bin", b"x"), "version": "4.0.2", "device_type": "b"},
        HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value,
    )
    assert response.status_code == 403
    assert not firmware_services.Firmware.objects.filter(version="4.0.2").exists()
