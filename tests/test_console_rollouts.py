"""Console rollout pages: the list, the create form and its preview, a rollout's page and the
operator's start/pause/resume/cancel/advance, for each role."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from devices.models import Device, DeviceGroup
from firmware import services as firmware_services
from firmware.models import Firmware
from ota_site.models import Event, EventKind
from rollouts import lifecycle
from rollouts.buckets import bucket, bucket_limit
from rollouts.models import Rollout, RolloutStatus
from tests.conftest import person
from tests.factories import DeviceFactory, DeviceGroupFactory, FirmwareFactory

pytestmark = pytest.mark.django_db


def browser(user: User | None) -> Client:
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    return client


def csrf_post(client: Client, page: str, url: str, data: dict[str, Any] | None = None) -> Any:
    client.get(page)
    return client.post(
        url, {**(data or {}), "csrfmiddlewaretoken": client.cookies["csrftoken"].value}
    )


def make_rollout(firmware: Firmware, name: str = "spring", **fields: Any) -> Rollout:
    return lifecycle.create_rollout(
        lifecycle.Definition(
            name=name,
            firmware=firmware,
            stages=[lifecycle.StageSpec("canary", 10), lifecycle.StageSpec("all", 100)],
            **fields,
        )
    )


def form_data(
    firmware: Firmware, /, stages: list[tuple[str, str, str]] | None = None, **over: Any
) -> dict[str, Any]:
    stages = stages if stages is not None else [("canary", "10", "5"), ("", "100", "")]
    data: dict[str, Any] = {
        "name": "spring wave",
        "firmware": str(firmware.pk),
        "from_version_min": "",
        "from_version_max": "",
        "metadata_filters": "",
        "success_percent": "90",
        "rollback_percent": "10",
        "min_devices": "3",
        "device_timeout_minutes": "30",
        "auto_rollback": "on",
        "start_at": "",
        "preview_id": str(uuid.uuid4()),
        "stages-TOTAL_FORMS": str(len(stages)),
        "stages-INITIAL_FORMS": "0",
        "stages-MIN_NUM_FORMS": "0",
        "stages-MAX_NUM_FORMS": "20",
    }
    for index, (name, percentage, soak) in enumerate(stages):
        data[f"stages-{index}-name"] = name
        data[f"stages-{index}-percentage"] = percentage
        data[f"stages-{index}-soak_minutes"] = soak
    data.update(over)
    return {key: value for key, value in data.items() if value is not None}


@pytest.fixture
def nobody(db: Any) -> User:
    return person("nora", None)


@pytest.fixture
def rollout(published: Firmware) -> Rollout:
    return make_rollout(published)


# --- Access -------------------------------------------------------------------------------------


def test_anonymous_goes_to_login(rollout: Rollout) -> None:
    for path in ("/rollouts/", "/rollouts/new/", f"/rollouts/{rollout.pk}/"):
        response = Client().get(path)
        assert response.status_code == 302, path
        assert response["Location"].startswith(f"/login/?next={path}")


def test_no_role_is_refused(nobody: User, rollout: Rollout) -> None:
    client = browser(nobody)
    for path in ("/rollouts/", "/rollouts/new/", f"/rollouts/{rollout.pk}/"):
        assert client.get(path).status_code == 403, path
    assert client.get("/rollouts/new/preview").status_code == 403


def test_bad_ids_are_404(operator: User, rollout: Rollout) -> None:
    client = browser(operator)
    missing = uuid.uuid4()
    assert client.get(f"/rollouts/{missing}/").status_code == 404
    assert client.get("/rollouts/nope/").status_code == 404
    assert csrf_post(client, "/rollouts/", f"/rollouts/{missing}/start/").status_code == 404
    assert csrf_post(client, "/rollouts/", f"/rollouts/{rollout.pk}/explode/").status_code == 404


# --- List ---------------------------------------------------------------------------------------


def test_list_for_each_role(viewer: User, operator: User, rollout: Rollout) -> None:
    html = browser(viewer).get("/rollouts/").content.decode()
    assert "spring" in html and "scheduled" in html
    assert "/rollouts/new/" not in html
    html = browser(operator).get("/rollouts/").content.decode()
    assert 'href="/rollouts/new/"' in html


def test_list_filters_and_empty_state(viewer: User, rollout: Rollout) -> None:
    client = browser(viewer)
    assert "spring" in client.get("/rollouts/?status=live").content.decode()
    html = client.get("/rollouts/?status=completed").content.decode()
    assert "No completed rollouts" in html
    assert client.get("/rollouts/?status=bogus&page=x").status_code == 200


def test_list_queries_are_bounded(
    viewer: User, published: Firmware, django_assert_max_num_queries: Any
) -> None:
    for n in range(10):
        group = DeviceGroupFactory.create()
        make_rollout(published, name=f"r{n}", target_groups=[group])
    client = browser(viewer)
    client.get("/rollouts/")
    with django_assert_max_num_queries(8):
        assert client.get("/rollouts/").status_code == 200


# --- A rollout's page --------------------------------------------------------------------------


def test_detail_for_viewer_has_no_controls(viewer: User, rollout: Rollout) -> None:
    html = browser(viewer).get(f"/rollouts/{rollout.pk}/").content.decode()
    assert 'data-stage="0"' in html and 'data-stage="1"' in html
    assert f'data-stream-path="/api/v1/stream/rollouts/{rollout.pk}"' in html
    assert "rollout.created" in html  # recent events
    assert 'method="post"' not in html.split("<main", 1)[1]


def test_detail_controls_follow_the_status(operator: User, rollout: Rollout) -> None:
    html = browser(operator).get(f"/rollouts/{rollout.pk}/").content.decode()
    assert f'action="/rollouts/{rollout.pk}/start/"' in html
    assert 'data-action="start" data-when="scheduled">' in html  # shown
    assert 'data-action="pause" data-when="active" hidden>' in html  # rendered hidden
    assert 'data-action="cancel" data-when="scheduled active paused">' in html


def test_operator_runs_a_rollout_from_its_page(operator: User, rollout: Rollout) -> None:
    client = browser(operator)
    page = f"/rollouts/{rollout.pk}/"
    steps = [
        ("start", {}, RolloutStatus.ACTIVE, EventKind.ROLLOUT_STARTED),
        ("pause", {"reason": "looks odd"}, RolloutStatus.PAUSED, EventKind.ROLLOUT_PAUSED),
        ("resume", {}, RolloutStatus.ACTIVE, EventKind.ROLLOUT_RESUMED),
        ("advance", {}, RolloutStatus.ACTIVE, EventKind.ROLLOUT_ADVANCED),
        (
            "cancel",
            {"reason": "done testing"},
            RolloutStatus.CANCELLED,
            EventKind.ROLLOUT_CANCELLED,
        ),
    ]
    for action, data, status, kind in steps:
        response = csrf_post(client, page, f"{page}{action}/", data)
        assert response.status_code == 302 and response["Location"] == page, action
        rollout.refresh_from_db()
        assert rollout.status == status, action
        event = Event.objects.filter(rollout_id=rollout.pk, kind=kind).get()
        assert event.actor == "user:olivia"
    assert Event.objects.get(kind=EventKind.ROLLOUT_PAUSED).data["reason"] == "looks odd"
    assert rollout.current_stage == 1
    html = client.get(page).content.decode()
    assert "cancelled" in html and "done testing" in html


def test_refused_transition_is_a_message(operator: User, rollout: Rollout) -> None:
    client = browser(operator)
    page = f"/rollouts/{rollout.pk}/"
    response = csrf_post(client, page, f"{page}pause/")
    assert response.status_code == 302
    assert "Could not pause the rollout" in client.get(page).content.decode()
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.SCHEDULED


def test_viewer_cannot_act(viewer: User, rollout: Rollout) -> None:
    response = csrf_post(browser(viewer), "/rollouts/", f"/rollouts/{rollout.pk}/start/")
    assert response.status_code == 403
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.SCHEDULED


def test_actions_need_csrf_and_post(operator: User, rollout: Rollout) -> None:
    client = browser(operator)
    assert client.post(f"/rollouts/{rollout.pk}/start/").status_code == 403
    assert client.get(f"/rollouts/{rollout.pk}/start/").status_code == 405
    rollout.refresh_from_db()
    assert rollout.status == RolloutStatus.SCHEDULED


# --- Create -------------------------------------------------------------------------------------


def test_create_form_for_operator_only(operator: User, viewer: User, published: Firmware) -> None:
    html = browser(operator).get(f"/rollouts/new/?firmware={published.pk}").content.decode()
    assert 'data-preview-url="/rollouts/new/preview"' in html
    assert "stages-TOTAL_FORMS" in html and 'name="preview_id"' in html
    assert f'<option value="{published.pk}" selected>' in html
    assert browser(viewer).get("/rollouts/new/").status_code == 403
    response = csrf_post(browser(viewer), "/rollouts/", "/rollouts/new/", form_data(published))
    assert response.status_code == 403
    assert not Rollout.objects.exists()


def test_operator_creates_a_rollout(operator: User, published: Firmware) -> None:
    group = DeviceGroupFactory.create(name="lab")
    start = (timezone.now() + timedelta(days=1)).replace(second=0, microsecond=0)
    data = form_data(
        published,
        stages=[("canary", "5", "30"), ("", "", ""), ("half", "50", "60"), ("all", "100", "")],
        target_groups=[str(group.pk)],
        from_version_min="1.0",
        metadata_filters="region=eu\nbeta=true\nrev=3",
        start_at=start.strftime("%Y-%m-%dT%H:%M"),
    )
    response = csrf_post(browser(operator), "/rollouts/new/", "/rollouts/new/", data)
    assert response.status_code == 302, response.content.decode()[:3000]
    rollout = Rollout.objects.get()
    assert response["Location"] == f"/rollouts/{rollout.pk}/"
    assert rollout.name == "spring wave" and rollout.created_by == operator
    assert [(s.name, s.percentage, s.min_duration) for s in rollout.stages.all()] == [
        ("canary", 5, 1800),
        ("half", 50, 3600),
        ("all", 100, 0),
    ]
    assert list(rollout.target_groups.all()) == [group]
    assert rollout.metadata_filters == {"region": "eu", "beta": True, "rev": 3}
    assert rollout.success_threshold == pytest.approx(0.9)
    assert rollout.rollback_threshold == pytest.approx(0.1)
    assert (rollout.min_devices, rollout.device_timeout) == (3, 1800)
    assert rollout.auto_rollback and rollout.start_at == start
    assert rollout.from_version_min == "1.0"
    event = Event.objects.get(kind=EventKind.ROLLOUT_CREATED, rollout_id=rollout.pk)
    assert event.actor == "user:olivia"


@pytest.mark.parametrize(
    ("over", "stages", "message"),
    [
        ({}, [("a", "50", ""), ("b", "20", "")], "Stage percentages must increase"),
        ({}, [], "A rollout needs at least one stage"),
        ({}, [("a", "", "10")], "Give the stage a percentage"),
        ({}, [("a", "150", "")], "less than or equal to 100"),
        ({"from_version_min": "not a version!"}, None, "version"),
        ({"from_version_min": "2.0", "from_version_max": "1.0"}, None, "from_version_min is above"),
        ({"metadata_filters": "just words"}, None, "write key=value"),
        ({"metadata_filters": "bad-key!=1"}, None, "must be 1-64 of"),
        ({"firmware": str(uuid.uuid4())}, None, "Select a valid choice"),
        ({"name": ""}, None, "This field is required"),
        ({"rollback_percent": "101"}, None, "less than or equal to 100"),
        ({"device_timeout_minutes": "0"}, None, "greater than or equal to 1"),
        ({"start_at": "2001-01-01T00:00"}, None, "start_at is in the past"),
        ({"start_at": "yesterday"}, None, "Enter a valid date/time"),
        ({"stages-TOTAL_FORMS": "abc"}, None, "ManagementForm data is missing"),
    ],
)
def test_invalid_input_is_shown_and_nothing_saved(
    operator: User, published: Firmware, over: dict[str, Any], stages: Any, message: str
) -> None:
    data = form_data(published, stages=stages, **over)
    response = csrf_post(browser(operator), "/rollouts/new/", "/rollouts/new/", data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Rollout.objects.exists()
    assert not Event.objects.filter(kind=EventKind.ROLLOUT_CREATED).exists()


def test_draft_firmware_is_not_offered(operator: User) -> None:
    draft = FirmwareFactory.create(version="7.0.0")
    data = form_data(draft)
    response = csrf_post(browser(operator), "/rollouts/new/", "/rollouts/new/", data)
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not Rollout.objects.exists()


def test_service_refusal_is_shown(operator: User, rollout: Rollout, published: Firmware) -> None:
    DeviceFactory.create()  # a board-a device both rollouts would target
    response = csrf_post(
        browser(operator), "/rollouts/new/", "/rollouts/new/", form_data(published)
    )
    assert response.status_code == 400
    assert "a device takes part in one rollout at a time" in response.content.decode()
    assert Rollout.objects.count() == 1


# --- Preview ------------------------------------------------------------------------------------


@pytest.fixture
def fleet(published: Firmware) -> dict[str, Any]:
    """15 devices: 6 in group "lab" (region eu), 4 in no group, 3 already on 1.1.0, 2 of another
    type."""
    lab = DeviceGroupFactory.create(name="lab")
    DeviceFactory.create_batch(6, group=lab, metadata={"region": "eu"})
    DeviceFactory.create_batch(4, metadata={"region": "us", "rev": 3})
    DeviceFactory.create_batch(3, current_version="1.1.0", metadata={"rev": "3"})
    DeviceFactory.create_batch(2, device_type="board-b")
    return {"lab": lab, "firmware": published}


def preview(client: Client, firmware: Firmware, /, **over: Any) -> Any:
    return client.get("/rollouts/new/preview", form_data(firmware, **over))


def expected(preview_id: str, devices: Any, percentage: int) -> int:
    return sum(1 for d in devices if bucket(d.id, preview_id) < bucket_limit(percentage))


def test_preview_counts_a_known_fleet(operator: User, fleet: dict[str, Any]) -> None:
    client = browser(operator)
    firmware = fleet["firmware"]
    preview_id = str(uuid.uuid4())
    stages = [("a", "10", ""), ("b", "50", ""), ("c", "100", "")]
    body = preview(client, firmware, stages=stages, preview_id=preview_id).json()
    targeted = list(Device.objects.filter(device_type="board-a"))
    eligible = [d for d in targeted if d.current_version == "1.0.0"]
    assert (body["targeted"], body["eligible"]) == (13, 10)
    assert body["preview_id"] == preview_id and body["device_type"] == "board-a"
    for stage, percentage in zip(body["stages"], (10, 50, 100), strict=True):
        assert stage["percentage"] == percentage
        assert stage["devices"] == expected(preview_id, targeted, percentage)
        assert stage["eligible"] == expected(preview_id, eligible, percentage)
    assert body["stages"][-1]["devices"] == 13 and body["stages"][-1]["eligible"] == 10


@pytest.mark.parametrize(
    ("over", "targeted", "eligible"),
    [
        ({"target_groups": "lab"}, 6, 6),
        ({"metadata_filters": "region=eu"}, 6, 6),
        ({"metadata_filters": "rev=3"}, 4, 4),  # the number 3, not the string
        ({"metadata_filters": 'rev="3"'}, 3, 0),
        ({"from_version_max": "1.0.0"}, 10, 10),
        ({"from_version_min": "1.1"}, 3, 0),
    ],
)
def test_preview_follows_the_targeting(
    operator: User, fleet: dict[str, Any], over: dict[str, Any], targeted: int, eligible: int
) -> None:
    if over.get("target_groups") == "lab":
        over = {"target_groups": [str(fleet["lab"].pk)]}
    body = preview(browser(operator), fleet["firmware"], stages=[("", "100", "")], **over).json()
    assert (body["targeted"], body["eligible"]) == (targeted, eligible)
    assert body["stages"][0]["devices"] == targeted


def test_preview_respects_min_version(operator: User) -> None:
    firmware = FirmwareFactory.create(version="3.0.0", metadata={"min_version": "2.0.0"})
    firmware = firmware_services.publish_firmware(firmware)
    DeviceFactory.create_batch(2, current_version="1.0.0")
    DeviceFactory.create_batch(3, current_version="2.5.0")
    body = preview(browser(operator), firmware, stages=[("", "100", "")]).json()
    assert (body["targeted"], body["eligible"]) == (5, 3)


def test_preview_query_count(
    operator: User, fleet: dict[str, Any], django_assert_max_num_queries: Any
) -> None:
    client = browser(operator)
    preview(client, fleet["firmware"])
    stages = [(str(n), str(n * 5), "") for n in range(1, 21)]
    with django_assert_max_num_queries(6):  # session, user, role, firmware, groups, the count
        response = preview(client, fleet["firmware"], stages=stages)
    assert response.status_code == 200 and len(response.json()["stages"]) == 20


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"firmware": ""}, "firmware"),
        ({"firmware": "not-a-uuid"}, "firmware"),
        ({"from_version_min": "¿?"}, "from_version_min"),
        ({"metadata_filters": "{not json"}, "metadata_filters"),
        ({"preview_id": "xyz"}, "preview_id"),
        ({"target_groups": [str(uuid.uuid4())]}, "target_groups"),
        ({"stages-0-percentage": "0"}, "stages"),
        ({"stages-0-percentage": "100"}, "stages"),  # 100 then 100: not increasing
        ({"stages-1-percentage": "5"}, "stages"),
        ({"stages-TOTAL_FORMS": None}, "stages"),
    ],
)
def test_preview_refuses_bad_input(
    operator: User, published: Firmware, over: dict[str, Any], field: str
) -> None:
    response = preview(browser(operator), published, **over)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid" and body["detail"]
    assert field in body["errors"]


def test_preview_refuses_viewers_and_strangers(viewer: User, published: Firmware) -> None:
    refused = preview(browser(viewer), published)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    anonymous = preview(Client(), published)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "not_authenticated"
    post = browser(viewer).post("/rollouts/new/preview")
    assert post.status_code in (403, 405)


def test_preview_with_no_devices(operator: User, published: Firmware) -> None:
    DeviceGroup.objects.all().delete()
    body = preview(browser(operator), published).json()
    assert body["targeted"] == 0 and [s["devices"] for s in body["stages"]] == [0, 0]


def test_the_rollout_is_created_with_the_previewed_id(operator: User, published: Firmware) -> None:
    """The stage counts the preview showed are the saved rollout's: same id, same buckets. A form
    sent twice does not make a second rollout."""
    client = browser(operator)
    data = form_data(published, name="exact")
    first = csrf_post(client, "/rollouts/new/", "/rollouts/new/", data)
    assert first.status_code == 302, first.content.decode()[:2000]
    assert Rollout.objects.get(name="exact").pk == uuid.UUID(data["preview_id"])
    again = csrf_post(client, "/rollouts/new/", "/rollouts/new/", data)
    assert again.status_code == 302 and again["Location"] == first["Location"]
    assert Rollout.objects.filter(name="exact").count() == 1
