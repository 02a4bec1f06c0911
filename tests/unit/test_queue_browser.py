"""The review queue page in a real browser (Debian's Chromium, headless, through Selenium and
Debian's chromedriver; no browser download): sign in, open `/console/queue`, label two items
from the keyboard only, and find both labels in the feedback log under the reviewer's key and
the agreement table updated. The gateway runs with uvicorn on a free port in a thread, with
the sample store on and the FakeBackend as the model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.api.review import read_labels
from gateway.config import GatewaySettings
from gateway.feedback import FeedbackLog
from gateway.samples import SampleRecorder, SampleSettings, SqliteSampleStore
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from tests.unit.test_console_browser import browser  # noqa: F401 - the fixture (same skips)
from tests.unit.test_review_queue import responder

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.unit.test_console_browser import pytestmark  # noqa: E402,F401 - skip without chromium
from testsupport.ports import free_port  # noqa: E402


class Served:
    def __init__(self, base: str, key: str, feedback: Path) -> None:
        self.base, self.key, self.feedback = base, key, feedback


@pytest.fixture
def served(store: SqlitePromptStore, tmp_path: Path) -> Iterator[Served]:
    key, record = generate_key("reviewer-ann", ["feedback", "samples:read"], created_by="test")
    store.put_key(record)
    svc, svc_record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(svc_record)
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"), SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(readiness_cache_s=0, rollout_controller=False), store,
                     FakeBackend(responder=responder), models=["tiny-llama"],
                     feedback_log=FeedbackLog(tmp_path / "feedback"), samples=recorder)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    import httpx

    base = f"http://127.0.0.1:{port}"
    for i, title in enumerate(["oak table", "replica watch AAA", "walnut chair"]):
        r = httpx.post(f"{base}/v1/moderate", headers={"authorization": f"Bearer {svc}"},
                       json={"item_id": f"item-{i}", "title": title, "description": f"about the {title}"})
        assert r.status_code == 200, r.text
    while recorder.store.count() < 3:  # the writer task has written all three
        assert time.monotonic() < deadline + 10, "the sample writer did not run"
        time.sleep(0.05)
    yield Served(base, key, tmp_path / "feedback")
    server.should_exit = True
    thread.join(timeout=10)


def test_label_two_items_from_the_keyboard(served: Served, browser: Any, tmp_path: Path) -> None:  # noqa: F811
    # the page redraws the list after every change: an element found a moment ago may be gone
    # (60 s: a guard only; every wait ends as soon as its condition holds)
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(f"{served.base}/console/queue")
    wait.until(ec.url_contains("/console/signin"))
    # the sign-in form is drawn once the page's strings have loaded (a fetch): waited for
    wait.until(ec.presence_of_element_located((By.ID, "api-key"))).send_keys(served.key)
    wait.until(ec.element_to_be_clickable((By.ID, "signin-submit"))).click()
    wait.until(ec.url_contains("/console/prompts"))
    # sign-in lands on Prompts, which a reviewer without prompts:read may not read (a 403 the
    # console page shows); only errors on the queue page count here, so the log is emptied
    # once that page has shown its error (waited for, not slept on)
    wait.until(lambda d: "forbidden" in d.find_element(By.CSS_SELECTOR, "#main .error").text)
    browser.get_log("browser")
    browser.get(f"{served.base}/console/queue")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "section.queue-item.current")))

    def listed(d: Any) -> list[tuple[str, str, str]] | bool:
        """(title, request id, text) of each item, read in one go: retried if redrawn meanwhile."""
        items = d.find_elements(By.CSS_SELECTOR, "section.queue-item")
        return [(i.find_element(By.TAG_NAME, "h3").text, i.get_attribute("data-request-id"), i.text)
                for i in items] if len(items) == 3 else False
    shown = wait.until(listed)
    titles = [title for title, _, _ in shown]
    ids = [rid for _, rid, _ in shown]

    def item(n: int) -> Any:
        return browser.find_element(By.CSS_SELECTOR, f'section[data-request-id="{ids[n]}"]')

    def current() -> str:
        """The focused item's request id, once the focus has settled on an item."""
        return str(wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "section.queue-item.current")
                              .get_attribute("data-request-id")))

    def focus_on(n: int) -> None:
        """Wait until item *n* has the focus (a key press redraws the list; not slept on)."""
        try:
            wait.until(lambda d: current() == ids[n])
        except TimeoutException:
            raise AssertionError(f"item {n} never got the focus (the focus is on {current()})") from None
    assert all("about the" in text for _, _, text in shown)  # the listing content is shown
    body = browser.find_element(By.TAG_NAME, "body")

    # item 1: allow, with the keyboard only
    body.send_keys("a")
    body.send_keys(Keys.ENTER)
    wait.until(lambda d: "recorded" in item(0).text)
    # the focus moved to the next unlabelled item; k (or the up arrow) goes back, j forward
    focus_on(1)
    body.send_keys("k")
    focus_on(0)
    body.send_keys(Keys.ARROW_DOWN)
    focus_on(1)
    # item 2: block + category 1 (the schema's first category), then Enter
    browser.find_element(By.TAG_NAME, "body").send_keys("b")
    browser.switch_to.active_element.send_keys("1")  # the category select has the focus now
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait.until(lambda d: "recorded" in item(1).text)
    wait.until(lambda d: "reviewer-ann" in d.find_element(By.ID, "agreement").text)
    browser.save_screenshot(str(tmp_path / "queue.png"))
    assert (tmp_path / "queue.png").stat().st_size > 10_000

    labels = read_labels(served.feedback, datetime(2000, 1, 1, tzinfo=UTC))
    mine = {rid: by["reviewer-ann"] for rid, by in labels.items()}
    assert sorted(mine.values()) == ["allow", "block:counterfeit"], (titles, mine)
    row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#agreement-table tbody tr").text)
    assert row.startswith("reviewer-ann 2 "), row  # both labels counted
    # the same page in Simplified Chinese (the console's language switch)
    browser.execute_script("window.localStorage.setItem('modgate.lang', 'zh-CN')")
    browser.refresh()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "审核队列")
    wait.until(lambda d: "与模型的一致率" in d.find_element(By.ID, "agreement").text)
    wait.until(lambda d: "本批还剩 1 / 1 条" in d.find_element(By.ID, "queue-count").text)  # two labelled, gone
    browser.save_screenshot(str(tmp_path / "queue-zh.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the browser reported errors: {errors}"
