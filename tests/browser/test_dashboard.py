"""The dashboard in a real headless Chromium during a real training run.

Opens the page, watches the reward chart gain points, clicks Stop and sees the run stop, saves a
screenshot (test-artifacts/dashboard.png), then takes the service away and back to check the
connection banner and the automatic reconnect.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tether.service.app import create_app
from tether.service.jobs import JobManager
from tether.service.server import start_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make setup installs it)"
    ),
]

JOB: dict[str, Any] = {
    "preset": "cartpole",
    "steps": 10_000_000,  # runs until the test clicks Stop
    "overrides": [
        "torch_threads=1",
        "environment.num_envs=4",
        "training.rollout_steps=16",
        "training.num_epochs=1",
        "training.batch_size=64",
        "schedule.checkpoint_every=1000",
        "schedule.eval_every=256",
        "schedule.eval_every_episodes=2",
    ],
}


def wait_for(predicate: Callable[[], Any], timeout: float = 120.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tether-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_follows_a_real_run_and_stops_it(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    torch.set_num_threads(1)
    manager = JobManager(tmp_path / "runs", default_preset="cartpole")
    handle = start_in_thread(create_app(manager), port=0)
    try:
        response = httpx.post(f"{handle.url}control/start", json=JOB, timeout=60)
        assert response.status_code == 201, response.text
        run_id = response.json()["run_id"]

        browser.get(handle.url)
        text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
        wait_for(lambda: text("conn-text") == "live", what="the WebSocket to connect")
        points = lambda: int(browser.find_element(By.ID, "chart-reward").get_attribute("data-points"))  # noqa: E731

        first = wait_for(points, what="the reward chart's first points")
        wait_for(lambda: points() > first, what="the reward chart to gain points")
        assert wait_for(lambda: text("status") == "started", what="status 'started'")
        assert text("run-id") == run_id
        assert browser.find_elements(By.CSS_SELECTOR, "#metrics-table tbody tr")
        # The greedy evaluations every 256 steps show their mean return (CartPole: at least 8).
        assert float(wait_for(lambda: text("stat-eval").replace("–", ""), what="an eval return")) >= 8
        # ... and join the reward chart as their own series, one point per evaluation.
        chart = browser.find_element(By.ID, "chart-reward")
        wait_for(lambda: int(chart.get_attribute("data-eval-points") or 0) >= 1, what="an eval point")
        evals = browser.execute_script(
            "return window.tetherDashboard.state.reward.evalReturn.filter((v) => v !== null)"
        )
        assert evals and all(v >= 8 for v in evals)
        # The JS state agrees with the attribute and keeps at most 500 points per series.
        state = browser.execute_script("return window.tetherDashboard.state.reward.x.length")
        assert 0 < state <= 500
        assert not browser.find_element(By.ID, "banner").is_displayed()
        assert not browser.find_element(By.ID, "auth").is_displayed()  # no token configured, none asked for
        assert browser.find_element(By.ID, "btn-start").get_attribute("disabled") is not None

        browser.find_element(By.ID, "btn-stop").click()
        wait_for(lambda: text("status") == "stopped", what="the dashboard to show 'stopped'")
        assert manager.wait(60)
        assert manager.status()["status"] == "stopped"
        runs = httpx.get(f"{handle.url}runs", timeout=30).json()["runs"]
        assert runs[0]["id"] == run_id and runs[0]["status"] == "stopped"
        wait_for(
            lambda: browser.find_element(By.ID, "btn-start").get_attribute("disabled") is None, what="Start"
        )

        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # The service goes away: a clear banner, then an automatic reconnect when it is back.
        port = handle.port
        handle.stop()
        wait_for(lambda: browser.find_element(By.ID, "banner").is_displayed(), what="the connection banner")
        assert "reconnecting" in text("banner")
        assert text("conn-text") == "offline"
        handle = start_in_thread(create_app(manager), port=port)
        wait_for(lambda: text("conn-text") == "live", timeout=60, what="the automatic reconnect")
        assert not browser.find_element(By.ID, "banner").is_displayed()
        assert wait_for(points, what="the replayed history after the reconnect") > 0
    finally:
        manager.shutdown(timeout=60)
        handle.stop()


def test_dashboard_with_a_token(browser: Any, tmp_path: Path) -> None:
    """Without the token the page asks for it; with `#token=` it connects and fills its charts."""
    from selenium.webdriver.common.by import By

    token = "dashboard-token_42"
    manager = JobManager(tmp_path / "runs", default_preset="cartpole")
    for i in range(1, 6):
        manager.bus.emit(
            "metrics_update", {"step": 64 * i, "episodes": 2 * i, "episode_rewards": [10.0 + i, 11.0]}
        )
    handle = start_in_thread(create_app(manager, token=token), port=0)
    try:
        browser.get(handle.url)
        browser.execute_script("sessionStorage.clear()")
        browser.get(handle.url)
        wait_for(lambda: browser.find_element(By.ID, "auth").is_displayed(), what="the token form")
        assert browser.find_element(By.ID, "conn-text").text == "offline"

        browser.get(f"{handle.url}#token={token}")
        browser.refresh()
        wait_for(
            lambda: browser.find_element(By.ID, "conn-text").text == "live", what="a token-authorised socket"
        )
        wait_for(
            lambda: browser.find_element(By.ID, "chart-reward").get_attribute("data-points") == "10",
            what="replay",
        )
        assert "token" not in browser.current_url  # the token is taken out of the address bar
        rows = browser.find_elements(By.CSS_SELECTOR, "#metrics-table tbody tr")
        assert len(rows) == 5 and rows[0].find_elements(By.TAG_NAME, "td")[1].text == "320"
    finally:
        handle.stop()
