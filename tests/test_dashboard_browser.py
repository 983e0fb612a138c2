"""The dashboard in a real browser: headless Chromium (Debian's) driven by Selenium logs in,
finds a run waiting at a gate, approves it, and sees the run complete on its page, which
follows the run's server-sent events without reloading."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from cairn.events import ApprovalGranted, Intent
from cairn.projections import wait_for_views
from cairn.projections.http import url_file
from cairn.runtime.client import TERMINAL_TYPES, CairnClient
from cairn.runtime.eventlog.store import EventStore
from cairn.runtime.settings import Settings
from cairn.runtime.supervisor import Supervisor

pytestmark = pytest.mark.timeout(120)

APPROVER = "approver-token-0123456789abcdef"
TOKENS = {APPROVER: {"subject": "maria", "role": "approver"}}
INSTALL = "apt-get install -y chromium chromium-driver (.ci/run does this)"


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if chromium is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
        )
        pytest.skip(f"{missing} not installed, so no browser to drive: {INSTALL}")
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    chromium, chromedriver = _browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]'")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    # Both paths are given, so Selenium runs them as they are and downloads nothing.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def approve_in_the_browser(driver: object, base: str, run_id: uuid.UUID, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(driver, WebDriver)
    wait = WebDriverWait(driver, 20)

    # Pages need a login: the runs list sends the browser to the login form and back.
    driver.get(f"{base}/runs")
    wait.until(ec.url_contains("/login"))
    driver.find_element(By.ID, "token").send_keys(APPROVER)
    driver.find_element(By.ID, "login").click()
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-run="{run_id}"]')))
    assert driver.current_url == f"{base}/runs"
    assert "waiting on approval: write" in row.find_element(By.CSS_SELECTOR, ".gate-marker").text
    driver.save_screenshot(str(shots / "runs.png"))

    row.find_element(By.CSS_SELECTOR, "a").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "live-state"), "live updates: on"))
    assert driver.find_element(By.ID, "run-status").text == "running"
    # A mark that only survives if the page is never reloaded.
    driver.execute_script("window.cairnTestMark = 'same page';")
    gate = driver.find_element(By.CSS_SELECTOR, 'form.gate[data-gate="write"]')
    gate.find_element(By.NAME, "reason").send_keys("looks right")
    driver.save_screenshot(str(shots / "gate.png"))
    gate.find_element(By.CSS_SELECTOR, 'button[data-action="approve"]').click()

    WebDriverWait(driver, 40).until(
        ec.text_to_be_present_in_element((By.ID, "run-status"), "completed")
    )
    driver.save_screenshot(str(shots / "completed.png"))
    assert driver.execute_script("return window.cairnTestMark;") == "same page"
    timeline = driver.find_element(By.ID, "timeline").text
    assert "human:maria ApprovalGranted write looks right" in timeline
    assert "RunCompleted" in timeline
    assert not driver.find_elements(By.CSS_SELECTOR, "form.gate")


async def test_approve_a_gated_run_in_the_dashboard_and_watch_it_complete(
    settings: Settings,
    supervisor: Supervisor,
    client: CairnClient,
    browser: object,
    tmp_path: Path,
) -> None:
    supervisor.start_all()
    supervisor.start(
        "http",
        "cairn.projections.http",
        {"CAIRN_API_TOKENS": json.dumps(TOKENS), "CAIRN_HTTP_PORT": "0"},
    )
    await client.wait_ready()
    await wait_until(url_file(settings).exists, 20, "the HTTP server to listen")
    base = url_file(settings).read_text().strip()

    run_id = uuid.uuid4()
    feed = await client.follow(run_id)
    reply = await client.start_run(
        "reviewed-report", {"topic": "lichens"}, intent=Intent(goal="lichens"), run_id=run_id
    )
    assert reply.ok, reply.error
    while (gate := await feed.next(timeout=30)).type != "ApprovalRequested":
        assert gate.type not in TERMINAL_TYPES, gate
    await asyncio.to_thread(wait_for_views, settings.views, gate.position, 15.0)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    await asyncio.to_thread(approve_in_the_browser, browser, base, run_id, shots)

    while (end := await feed.next(timeout=30)).type not in TERMINAL_TYPES:
        pass
    await feed.close()
    assert end.type == "RunCompleted"
    store = EventStore(settings.store)
    granted = [e for e in store.load(run_id) if isinstance(e, ApprovalGranted)]
    store.close()
    assert [(g.actor, g.by, g.reason) for g in granted] == [("human:maria", "maria", "looks right")]
