"""The console in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver (no browser download). The gateway runs with uvicorn on a free port in a
thread (SQLite registry seeded from configs/prompts, the FakeBackend as the model). Walks:
sign in → Prompts → a version → Playground with one listing → a verdict, and checks that the
browser reported no error (a CSP violation or a failed load would show up there)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
           "scripts/bootstrap installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway_url(store: SqlitePromptStore) -> Iterator[tuple[str, str]]:
    key, record = generate_key("prompt-ops", ["prompts:read", "prompts:publish", "feedback"],
                               created_by="test")
    store.put_key(record)
    app = create_app(GatewaySettings(readiness_cache_s=0), store, FakeBackend(), models=["tiny-llama"])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_sign_in_browse_and_run_the_playground(gateway_url: tuple[str, str], browser: Any,
                                               tmp_path: Path) -> None:
    base, key = gateway_url
    wait = WebDriverWait(browser, 20)
    browser.get(f"{base}/console/prompts")
    wait.until(ec.url_contains("/console/signin"))  # not signed in: sent to sign-in
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "signin-submit").click()

    table = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#prompts tbody tr")))
    assert "listing-moderation" in table.text and "production → v1" in table.text
    assert "tiny-llama" in table.text
    cookie = browser.get_cookie("modgate_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # not readable by scripts

    browser.find_element(By.LINK_TEXT, "listing-moderation").click()
    wait.until(ec.presence_of_element_located((By.ID, "version-meta")))
    assert "listing-moderation v1" in browser.find_element(By.TAG_NAME, "h1").text
    locales = {s.get_attribute("data-locale") for s in browser.find_elements(By.CSS_SELECTOR, "section.locale")}
    assert {"en-US", "zh-CN"} <= locales
    audit = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#audit li")))
    assert "published v1" in audit.text
    browser.save_screenshot(str(tmp_path / "version.png"))

    browser.find_element(By.LINK_TEXT, "Playground").click()
    wait.until(ec.presence_of_element_located((By.ID, "load-production"))).click()
    wait.until(lambda d: "listing-moderation" in d.find_element(By.ID, "draft").get_property("value"))
    browser.find_element(By.ID, "title-1").send_keys("Rolex Submariner replica 1:1, AAA grade")
    browser.find_element(By.ID, "desc-1").send_keys("Mirror quality. Pay by WeChat.")
    browser.find_element(By.ID, "run").click()
    result = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results td.verdict-draft")))
    draft_decision = result.find_element(By.CSS_SELECTOR, "[class^=decision-]").text
    assert draft_decision in {"allow", "block", "needs_review"}
    production = browser.find_element(By.CSS_SELECTOR, "#results td.verdict-production")
    assert production.find_element(By.CSS_SELECTOR, "[class^=decision-]").text in {"allow", "block", "needs_review"}
    assert "tokens" in result.text
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the browser reported errors: {errors}"
