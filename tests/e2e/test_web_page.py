"""The gateway's web page in headless Chromium: a generation followed live, and the cluster view.

Needs Debian's chromium and chromium-driver (`bash scripts/ensure-browser`; make test runs it). With
LEGO_SCREENSHOT set, the finished page is saved to docs/playground.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from lego.builtin_workflows import TINY_SD15_TXT2IMG
from lego_cli.cluster import EmbeddedCluster
from lego_gateway.auth import ApiKeys
from lego_gateway.service import GatewayOptions
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
STEPS = 4
WAIT_S = 60


@dataclass
class PageResult:
    progress: str
    events: list[tuple[str, str]]  # (kind, the log line)
    image_size: tuple[int, int]
    workers: str
    errors: list[str]


def start_browser() -> webdriver.Chrome:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium-manager never looks for (or downloads) one
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def page_state(browser: webdriver.Chrome) -> str:
    return " | ".join(
        f"#{i}: {browser.find_element(By.ID, i).text!r}" for i in ("progress", "status", "workers")
    )


def wait_for(browser: webdriver.Chrome, condition: Callable[[webdriver.Chrome], object], what: str) -> None:
    try:
        WebDriverWait(browser, WAIT_S).until(condition)
    except TimeoutException:
        raise AssertionError(f"no {what} after {WAIT_S} s: {page_state(browser)}") from None


def generate_in_page(url: str, screenshot: Path | None = None, api_key: str = "") -> PageResult:
    """Drive the playground like a user: pick the workflow, type, click Generate, wait for the image."""
    browser = start_browser()
    try:
        browser.get(url)
        if api_key:  # the page itself is public; its API calls are refused until the key is given
            refused = ec.text_to_be_present_in_element((By.ID, "workflow-description"), "UNAUTHENTICATED")
            wait_for(browser, refused, "refused workflow list")
            browser.find_element(By.ID, "api-key").send_keys(api_key, Keys.ENTER)
        option = (By.CSS_SELECTOR, f"#workflow option[value='{TINY_SD15_TXT2IMG}']")
        wait_for(browser, ec.presence_of_element_located(option), "workflow list")
        Select(browser.find_element(By.ID, "workflow")).select_by_value(TINY_SD15_TXT2IMG)
        for field, value in (("prompt", "a red circle on a blue background"), ("steps", STEPS), ("seed", 42)):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(str(value))
        browser.find_element(By.ID, "generate").click()

        wait_for(
            browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#events li[data-kind=done]")), "done"
        )
        loaded = "const image = document.getElementById('result-image');"
        loaded += "return image.complete && image.naturalWidth > 0 && image.checkVisibility();"
        wait_for(browser, lambda b: b.execute_script(loaded), "loaded image")
        wait_for(browser, ec.text_to_be_present_in_element((By.ID, "workers"), "worker-0"), "worker-0")
        if screenshot is not None:
            wait_for(browser, ec.text_to_be_present_in_element((By.ID, "slo"), "1/1"), "SLO count")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(screenshot))
        image = browser.find_element(By.ID, "result-image")
        size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
        events = browser.execute_script(
            "return [...document.querySelectorAll('#events li')].map(li => [li.dataset.kind, li.textContent])"
        )
        return PageResult(
            progress=browser.find_element(By.ID, "progress").text,
            events=[(kind, text) for kind, text in events],
            image_size=(size[0], size[1]),
            workers=browser.find_element(By.ID, "workers").text,
            errors=[entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"],
        )
    finally:
        browser.quit()


def require_browser() -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium or chromedriver is not installed: run `bash scripts/ensure-browser`")


async def test_the_playground_follows_a_generation_live_and_shows_the_cluster() -> None:
    require_browser()
    screenshot = SCREENSHOT if os.environ.get("LEGO_SCREENSHOT") else None
    async with EmbeddedCluster(workers=1, http_port=0) as cluster:
        # selenium blocks; the cluster serves the page from this test's event loop
        result = await asyncio.to_thread(generate_in_page, f"http://{cluster.http_address}/", screenshot)
    assert [kind for kind, _ in result.events[:2]] == ["queued", "admitted"]
    assert result.events[-1][0] == "done"
    steps = [text.split()[-1] for kind, text in result.events if kind == "step"]
    total = len(steps)
    assert total in (STEPS, STEPS + 1)  # PNDM, SD 1.5's scheduler, runs one more iteration than steps
    assert steps == [f"{i}/{total}" for i in range(1, total + 1)]  # every step reached the page, in order
    assert f"step {total}/{total}" in result.progress
    assert result.image_size == (128, 128)
    assert "worker-0" in result.workers
    assert result.errors == []


async def test_the_page_sends_the_api_key_it_is_given_on_every_call() -> None:
    require_browser()
    options = GatewayOptions(api_keys=ApiKeys(frozenset({"key-for-the-page"})))
    async with EmbeddedCluster(workers=1, http_port=0, gateway=options) as cluster:
        url = f"http://{cluster.http_address}/"
        result = await asyncio.to_thread(generate_in_page, url, api_key="key-for-the-page")
    # the workflow list, the submission, the event stream and the image all went through with the key
    assert result.events[-1][0] == "done"
    assert result.image_size == (128, 128)
    assert "worker-0" in result.workers
    assert result.errors  # the calls made before the key was typed were refused ...
    assert all("401" in error for error in result.errors)  # ... and nothing else failed
