"""The console in a real browser (Debian's headless Chromium through Playwright), against the real
servers: gunicorn and daphne on a fresh PostgreSQL database with Redis, a Celery worker with beat
driving the rollout, and simulated devices running the real client (``ota_client.simulate``).

An operator signs in, watches the dashboard pick up devices as they enroll, creates a rollout
through the form (the preview counts the devices), starts it behind its confirmation and sees
the devices' progress arrive on the rollout page, all without the page reloading and without a
JavaScript error.

With ``OTA_SCREENSHOTS=1`` (``make screenshots``) the same run saves the pictures in
docs/screenshots/ that README.md and docs/console.md show: taken from a real run, they cannot drift
from what the console really looks like.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from ota_client.simulate import SimulationOptions, run_simulation
from tests.e2e import ROOT, celery_worker, daphne, fresh_database, gunicorn, manage, server_env

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = os.environ.get("OTA_SCREENSHOTS") == "1"
SHOTS = ROOT / "docs" / "screenshots"
LAPTOP = ViewportSize(width=1280, height=800)
TABLET = ViewportSize(width=820, height=1180)

OPERATOR = ("ops", "console-password-4821")
DEVICE_TYPE = "demo-board"  # demo_setup's firmware and plain fleet
GROUP = "field-trial"
SIM_DEVICES = 3
# What a person waits for at most; the whole test takes ~30 s here.
WAIT_MS = 30_000
GROUP_SCRIPT = (
    "from devices import services; "
    f"services.create_group(name={GROUP!r}, description='Devices of the browser test.', "
    "actor='tests/test_console_browser.py')"
)


@dataclass
class Console:
    """The servers of one run and what the test set up on them."""

    base: str
    env: dict[str, str]
    admin: tuple[str, str]
    enrollment_token: str


@dataclass
class Watched:
    """A page with everything that went wrong in it and how often it (re)loaded."""

    page: Page
    errors: list[str] = field(default_factory=list)
    loads: int = 0
    loads_at_mark: int = -1

    def mark(self) -> None:
        """A marker only a full page load can remove: later checks prove no reload happened."""
        self.page.evaluate("window.__otaNoReload = true")
        self.loads_at_mark = self.loads

    def assert_not_reloaded(self) -> None:
        assert self.page.evaluate("window.__otaNoReload === true"), "the page reloaded"
        assert self.loads == self.loads_at_mark, "the page loaded again"


def watch(page: Page) -> Watched:
    watched = Watched(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(f"console error: {message.text} at {message.location}")

    def on_load(_page: Page) -> None:
        watched.loads += 1

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(f"page error: {error}"))
    page.on("load", on_load)
    return watched


def shoot(page: Page, name: str) -> None:
    """One PNG of what the viewport shows, when pictures were asked for."""
    if SCREENSHOTS:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False, animations="disabled")


def prepare(env: dict[str, str]) -> tuple[tuple[str, str], str]:
    """Migrate; demo_setup's data (its admin, groups, published demo-board firmware 1.0.0-1.2.0
    and a fleet of plain device rows, so the pages show a fleet); an operator who signs in; and a
    group for the simulated devices with an enrollment token into it. Returns the admin's basic
    auth and the token."""
    manage(env, "migrate", "--noinput")
    demo = json.loads(manage(env, "demo_setup", "--devices", "200", "--json"))
    created = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "users",
            "create",
            OPERATOR[0],
            "--role",
            "operator",
            "--password-stdin",
        ],
        cwd=ROOT,
        env=env,
        input=OPERATOR[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    # The group is made by the same service the API and the admin use.
    manage(env, "shell", "-c", GROUP_SCRIPT)
    token = json.loads(
        manage(
            env,
            "create_enrollment_token",
            "--name",
            "field trial",
            "--device-type",
            DEVICE_TYPE,
            "--group",
            GROUP,
            "--json",
        )
    )["token"]
    return ("admin", demo["password"]), str(token)


@contextmanager
def servers(tmp_path: Path) -> Iterator[Console]:
    """gunicorn + daphne + a Celery worker with beat on a fresh database, as in production."""
    with fresh_database() as database:
        env = server_env(
            tmp_path,
            DATABASE_URL=database,
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"),
            CACHE_KEY_PREFIX=f"browser-{uuid.uuid4().hex[:8]}",
            CELERY_QUEUE=f"browser-{uuid.uuid4().hex[:8]}",
            ROLLOUT_EVALUATION_INTERVAL="0.5",
            ROLLOUT_CACHE_TIMEOUT="1",
        )
        admin, token = prepare(env)
        with daphne(env) as ws_base:
            # The pages open their streams on daphne's own port, as `make demo` runs them.
            web = {**env, "CONSOLE_STREAM_URL": ws_base}
            with gunicorn(web, workers=3) as base, celery_worker(web):
                yield Console(base=base, env=web, admin=admin, enrollment_token=token)


@contextmanager
def simulated_fleet(console: Console, tmp_path: Path) -> Iterator[None]:
    """SIM_DEVICES devices on firmware 1.0.0 running the real client, polling every second."""
    stop = threading.Event()
    options = SimulationOptions(
        devices=SIM_DEVICES,
        server=console.base,
        device_type=DEVICE_TYPE,
        enrollment_token=console.enrollment_token,
        version="1.0.0",
        state_dir=tmp_path / "fleet",
        poll_interval=1.0,
        quiet=True,
        id_prefix=GROUP,
        seed=7,
    )
    out = io.StringIO()
    thread = threading.Thread(target=run_simulation, args=(options, stop, out), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@contextmanager
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: `make debian-packages` installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Page, base: str) -> None:
    """From the dashboard's address: the sign-in page, a wrong password refused on the page,
    then the right one, back where the person was going."""
    page.goto(f"{base}/")
    expect(page).to_have_url(f"{base}/login/?next=/")
    page.get_by_label("User name").fill(OPERATOR[0])
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("did not match")
    page.get_by_label("Password").fill(OPERATOR[1])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{base}/")
    expect(page.get_by_role("heading", name="Fleet")).to_be_visible()


def fill_rollout_form(page: Page) -> None:
    """Two stages (half the group, then all of it) with thresholds a small trial can pass."""
    page.get_by_label("Name").first.fill(f"{DEVICE_TYPE} 1.1.0 field trial")
    page.get_by_label("Firmware").select_option(label=f"{DEVICE_TYPE} 1.1.0")
    page.get_by_label("Target groups").select_option(label=GROUP)
    page.get_by_label("Success threshold (%)").fill("90")
    page.get_by_label("Rollback threshold (%)").fill("34")
    page.get_by_label("Min devices").fill("2")
    rows = page.locator("#stage-rows .stage-form-row")
    # The form offers three default stages; keep two and remove the last with its button.
    expect(rows).to_have_count(3)
    rows.nth(2).get_by_role("button", name="Remove").click()
    expect(rows).to_have_count(2)
    for index, (name, percentage) in enumerate([("Canary", "50"), ("Everyone", "100")]):
        row = rows.nth(index)
        row.locator('input[name$="-name"]').fill(name)
        row.locator('input[name$="-percentage"]').fill(percentage)
        row.locator('input[name$="-soak_minutes"]').fill("0")


def stage_total(page: Page, column: str) -> int:
    """The sum of a column of the rollout page's stage table, as a person reads it."""
    cells = page.locator(f'tr[data-stage] [data-field="{column}"]').all_inner_texts()
    return sum(int(text) for text in cells if text.strip().isdigit())


def test_operator_runs_a_rollout_and_watches_it_live(tmp_path: Path) -> None:
    with servers(tmp_path) as console, chromium() as browser:
        context = browser.new_context(viewport=LAPTOP)
        context.set_default_timeout(WAIT_MS)
        dash = watch(context.new_page())
        sign_in(dash.page, console.base)
        expect(dash.page.locator("[data-stream-status]")).to_have_text("Live")
        dash.mark()

        # Devices enroll: the dashboard shows them arrive, without reloading.
        with simulated_fleet(console, tmp_path):
            events = dash.page.locator('[data-live="events"]')
            for n in range(SIM_DEVICES):
                expect(events).to_contain_text(f"{GROUP}-{n}")
            expect(events).to_contain_text("device.registered")
            dash.assert_not_reloaded()

            # The create form: its preview counts the group's devices before anything is saved.
            work = watch(context.new_page())
            work.page.goto(f"{console.base}/rollouts/")
            work.page.get_by_role("link", name="New rollout").click()
            expect(work.page.get_by_role("heading", name="New rollout")).to_be_visible()
            fill_rollout_form(work.page)
            summary = work.page.locator("[data-preview-summary]")
            expect(summary).to_contain_text(f"{SIM_DEVICES} {DEVICE_TYPE} devices match")
            expect(summary).to_contain_text(f"{SIM_DEVICES} run an older version")
            last_stage = work.page.locator("#stage-rows [data-preview-stage]").nth(1)
            expect(last_stage).to_have_text(f"{SIM_DEVICES} ({SIM_DEVICES} to update)")
            expect(work.page.locator("[data-preview-error]")).to_be_hidden()
            work.page.evaluate("document.activeElement.blur()")
            work.page.locator("#preview").scroll_into_view_if_needed()
            shoot(work.page, "rollout-create")
            work.page.get_by_role("button", name="Create rollout").click()

            # The rollout page: scheduled, then started behind its confirmation.
            page = work.page
            status = page.locator("[data-rollout-status]")
            expect(status).to_have_text("scheduled")
            page.locator('details[data-action="start"] summary').click()
            page.get_by_role("button", name="Yes, start").click()
            expect(status).to_have_text("active")
            work.mark()
            # As loaded after the start: no device can have finished yet (each needs a poll, a
            # download, an install and a report), so what follows arrives while we watch.
            assert stage_total(page, "success") < SIM_DEVICES
            expect(page.locator("[data-live-status]")).to_have_attribute("data-state", "live")

            # The devices update; their progress arrives on the open page.
            page.wait_for_function(
                "() => [...document.querySelectorAll('tr[data-stage] [data-field=success]')]"
                ".some(cell => Number(cell.textContent) >= 1)",
                timeout=WAIT_MS,
            )
            bars = page.locator('tr[data-stage] [data-bar="success"]')
            widths = [bars.nth(i).evaluate("el => el.style.width") for i in range(bars.count())]
            assert any(width not in ("", "0%", "0.0%") for width in widths), widths
            expect(page.locator("[data-events]")).to_contain_text("session.")
            # The live stage table comes first: at 1280x800 it shows without scrolling.
            page.evaluate("window.scrollTo(0, 0)")
            expect(page.locator("table.stages")).to_be_in_viewport()
            # Live events name devices as the server does: short, linked, times 24-hour.
            ref = page.locator("[data-events] li.fresh a.device-ref").first
            expect(ref).to_have_text(re.compile(r"^[0-9a-f]{8}$"))
            expect(ref).to_have_attribute("href", re.compile(r"^/devices/[0-9a-f-]{36}/$"))
            expect(page.locator("[data-events] li.fresh time").first).to_have_text(
                re.compile(r"^\d\d:\d\d:\d\d$")
            )
            if SCREENSHOTS:
                # The stage table with its bars (first under the heading: seen at 1280x800).
                page.locator("table.stages").scroll_into_view_if_needed()
                shoot(page, "rollout")
                shoot_dashboard(dash.page)
            # ...to the end: every device updated, the engine completes the rollout.
            expect(status).to_have_text("completed", timeout=WAIT_MS * 2)
            page.wait_for_function(
                "n => [...document.querySelectorAll('tr[data-stage] [data-field=success]')]"
                ".reduce((sum, cell) => sum + Number(cell.textContent), 0) === n",
                arg=SIM_DEVICES,
            )
            assert stage_total(page, "failed") == 0
            work.assert_not_reloaded()

            # The dashboard heard it all too, still without a reload.
            expect(events).to_contain_text("rollout.completed")
            dash.assert_not_reloaded()

            if SCREENSHOTS:
                shoot_pages(work.page, console.base)

        context.close()
        assert dash.errors + work.errors == []


def shoot_dashboard(page: Page) -> None:
    """The dashboard at laptop and tablet widths, once its live parts caught up."""
    rollouts = page.locator('[data-live="rollouts"] .rollout-row')
    # The rollout may have finished already: the picture shows what is there.
    with suppress(AssertionError):
        expect(rollouts.first).to_be_visible(timeout=10_000)
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, "dashboard")
    page.set_viewport_size(TABLET)
    page.wait_for_timeout(500)  # the charts resize on a timer
    shoot(page, "dashboard-tablet")
    page.set_viewport_size(LAPTOP)


def shoot_pages(page: Page, base: str) -> None:
    """The lists and a device's page, after the rollout."""
    page.goto(f"{base}/devices/")
    shoot(page, "devices")
    page.goto(f"{base}/devices/?q={GROUP}-0")
    page.get_by_role("link", name=f"{GROUP}-0", exact=True).click()
    expect(page.get_by_role("heading", name=f"{GROUP}-0")).to_be_visible()
    shoot(page, "device")
    page.goto(f"{base}/firmware/")
    shoot(page, "firmware")
