"""Console: layout, login and roles, and the dashboard (fleet figures, rollouts, events, charts)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.test import Client
from django.utils import timezone

from devices.models import Device, DeviceStatus
from metrics import queries
from ota_site.versions import version_key
from rollouts import lifecycle
from tests.conftest import DeviceActor

pytestmark = pytest.mark.django_db


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def html(response: Any) -> str:
    return response.content.decode()


def test_anonymous_is_sent_to_login_and_can_sign_in(viewer: User) -> None:
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/"

    login = Client().get("/login/?next=/")
    assert login.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in html(login)
    assert 'aria-current="page"' not in html(login)  # no navigation before signing in

    client = Client()
    bad = client.post("/login/", {"username": "victor", "password": "wrong", "next": "/"})
    assert bad.status_code == 200 and "did not match" in html(bad)
    good = client.post("/login/", {"username": "victor", "password": "pw-victor-1", "next": "/"})
    assert good.status_code == 302 and good["Location"] == "/"
    assert client.get("/").status_code == 200


def test_a_user_without_a_role_gets_403_not_the_dashboard() -> None:
    nobody = User.objects.create_user("nobody", password="pw-nobody-1")
    response = client_for(nobody).get("/")
    assert response.status_code == 403
    page = html(response)
    assert "has no console role" in page
    assert 'href="/devices/"' not in page  # no navigation for people without a role


def test_dashboard_renders_for_each_role(
    viewer: User, operator: User, admin_user: User, device_a: DeviceActor
) -> None:
    for user, role in ((viewer, "viewer"), (operator, "operator"), (admin_user, "admin")):
        response = client_for(user).get("/")
        assert response.status_code == 200
        page = html(response)
        assert f'title="Your role">{role}</span>' in page
        assert 'aria-current="page">Dashboard' in page
        assert "console/vendor/chart.umd.js" in page
        assert 'data-live-stream="/api/v1/stream/fleet"' in page
        assert 'action="/logout/"' in page
        # Only operators are invited to create a rollout.
        assert ("Create a rollout" in page) == (role != "viewer")


def test_dashboard_post_is_refused(viewer: User, operator: User) -> None:
    assert client_for(viewer).post("/").status_code == 403
    assert client_for(operator).post("/").status_code == 405


def test_dashboard_figures(viewer: User) -> None:
    now = timezone.now()
    Device.objects.bulk_create(
        [
            Device(
                hardware_id=f"d{i}",
                device_type="board-a",
                current_version="1.0.0" if i < 3 else "1.1.0",
                current_version_key=version_key("1.0.0" if i < 3 else "1.1.0"),
                status=DeviceStatus.FAILED if i == 0 else DeviceStatus.IDLE,
                last_seen=now if i % 2 else now - timedelta(days=1),
            )
            for i in range(5)
        ]
    )
    response = client_for(viewer).get("/")
    summary = response.context["summary"]
    assert summary["total"] == 5
    assert summary["online"] == 2 and summary["offline"] == 3
    assert summary["failed"] == 1
    assert [(v["version"], v["n"]) for v in summary["versions"]] == [("1.0.0", 3), ("1.1.0", 2)]
    page = html(response)
    start = page.index('<script id="chart-data" type="application/json">')
    payload = page[start:].split(">", 1)[1].split("</script>", 1)[0]
    assert json.loads(payload)["versions"]["counts"] == [3, 2]
    assert 'id="stat-total">5<' in page


def test_dashboard_empty_states(viewer: User) -> None:
    page = html(client_for(viewer).get("/"))
    assert "No devices yet" in page
    assert "No rollout in progress" in page


def test_dashboard_shows_active_rollouts_and_recent_events(
    operator: User, device_a: DeviceActor, published: Any
) -> None:
    definition = lifecycle.Definition(
        name="Spring update",
        firmware=published,
        stages=[
            lifecycle.StageSpec(name="Canary", percentage=10),
            lifecycle.StageSpec(name="All", percentage=100),
        ],
    )
    rollout = lifecycle.create_rollout(definition, actor=operator)
    lifecycle.start_rollout(rollout, actor=operator)
    page = html(client_for(operator).get("/"))
    assert "Spring update" in page
    assert "Canary" in page and 'class="progress"' in page
    assert f'href="/rollouts/{rollout.id}/"' in page
    assert "rollout.started" in page
    assert f'href="/devices/{device_a.id}/"' in page  # device.registered links to the device


def test_fleet_summary_is_cached_briefly(viewer: User, django_assert_num_queries: Any) -> None:
    Device.objects.create(hardware_id="one", device_type="board-a")
    first = queries.fleet_summary()
    Device.objects.create(hardware_id="two", device_type="board-a")
    with django_assert_num_queries(0):
        assert queries.fleet_summary()["total"] == first["total"] == 1


def test_dashboard_with_a_few_thousand_devices(
    viewer: User, django_assert_max_num_queries: Any
) -> None:
    now = timezone.now()
    Device.objects.bulk_create(
        [
            Device(
                hardware_id=f"bulk-{i:05d}",
                device_type=f"board-{i % 3}",
                current_version=f"1.{i % 12}.0",
                current_version_key=version_key(f"1.{i % 12}.0"),
                last_seen=now - timedelta(minutes=i % 60),
            )
            for i in range(4000)
        ],
        batch_size=2000,
    )
    client = client_for(viewer)
    with django_assert_max_num_queries(10):
        response = client.get("/")
    assert response.status_code == 200
    summary = response.context["summary"]
    assert summary["total"] == 4000
    assert len(summary["versions"]) == queries.TOP_VERSIONS
    assert summary["other_versions"] == 4000 - sum(v["n"] for v in summary["versions"])


def test_static_assets_are_vendored() -> None:
    for path in ("console/console.css", "console/console.js", "console/vendor/chart.umd.js"):
        assert finders.find(path), path
    chart = finders.find("console/vendor/chart.umd.js")
    assert isinstance(chart, str)
    with open(chart, encoding="utf-8") as handle:
        text = handle.read()
    assert "Chart.js v4" in text[:200]
    # A sourceMappingURL to a file we do not ship would break collectstatic's manifest.
    assert "sourceMappingURL" not in text
