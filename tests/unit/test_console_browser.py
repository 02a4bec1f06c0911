"""The console in a real browser: Debian's Chromium, headless, driven by Selenium through
Debian's chromedriver (no browser download). The gateway runs with uvicorn on a free port in a
thread (SQLite registry seeded from configs/prompts, the FakeBackend as the model, a decision
log). One walk through the prompt change loop: sign in (from the keyboard) → Prompts →
Playground (a draft beside production) → publish → the version's diff → Evaluation (scorecards
stored as `modgate eval run` stores them) → start a canary with a shadow → traffic → watch the
gates and the shadow's agreement → step → promote → the audit timeline → Decisions → Review;
then every page again in Simplified Chinese with times in Asia/Shanghai. Every page is
screenshotted in both languages and checked for real content (its expected text, a non-blank
picture), every form field has a label, and the browser reports no error (a CSP violation, a
failed load or a text missing from a catalogue would show up there).

`MODGATE_CONSOLE_SHOTS=/some/dir` also copies the screenshots there (for a closing note)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.samples import SampleRecorder, SampleSettings, SqliteSampleStore
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from tests.scorecards import store_scorecard

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from testsupport.ports import free_port  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
           "scripts/bootstrap installs them)")


@pytest.fixture
def gateway_url(store: SqlitePromptStore, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The gateway on a free port: (its URL, a prompt-ops lead's key, a caller's key)."""
    key, record = generate_key("prompt-ops", ["prompts:read", "prompts:publish", "labels:write",
                                              "labels:protected", "feedback", "samples:read"],
                               created_by="test")
    store.put_key(record)
    caller, record = generate_key("svc-listing", ["moderate"], created_by="test")
    store.put_key(record)
    log = DecisionLog(tmp_path / "decisions", replica="r1", fsync=False, idle_s=0.2)
    samples = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"), SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(readiness_cache_s=0), store, FakeBackend(), models=["tiny-llama"],
                     decision_log=log, samples=samples)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", key, caller
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
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


NAME = "listing-moderation"
TRAFFIC = [("Rolex Submariner replica 1:1, AAA grade", "Mirror quality. Pay by WeChat.", "en-US"),
           ("Wireless earbuds", "Sealed box, one year warranty.", "en-US"),
           ("名牌包 1:1 复刻", "与专柜同款，微信联系。", "zh-CN"),
           ("Kids' bicycle, 16 inch", "Barely used, pick-up only.", "en-US"),
           ("二手 iPhone 13", "电池健康 90%，无拆修。", "zh-CN")]
# What each page must show (its heading) in each language, and a picture that is not blank.
HEADINGS = {"en": {"prompts": "Prompts", "playground": "Playground", "rollouts": "Rollouts",
                   "evaluation": "Evaluation", "decisions": "Decisions", "review": "Review"},
            "zh-CN": {"prompts": "提示词", "playground": "试验场", "rollouts": "发布",
                      "evaluation": "评估", "decisions": "决策", "review": "审核"}}


class Walk:
    """The browser, the gateway's URL and where the screenshots go."""

    def __init__(self, browser: Any, base: str, shots: Path) -> None:
        self.b, self.base, self.shots = browser, base, shots
        # The pages redraw parts of themselves after they load (a fetch, then new rows): an
        # element found a moment ago can be gone. Waits retry on that; reads go through `read`.
        # 60 s: a guard only (every wait ends as soon as its condition holds), with room for a
        # loaded 2-core machine.
        self.wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
        self.taken: list[Path] = []
        browser.get("about:blank")  # what a blank page weighs as PNG, to tell a real page from one
        self.blank = len(browser.get_screenshot_as_png())

    def find(self, css: str) -> Any:
        try:
            return self.wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
        except TimeoutException:
            raise AssertionError(f"{css} did not appear on {self.b.current_url}; the page says:\n"
                                 f"{self.text()[:2000]}\nbrowser log: {self.b.get_log('browser')}") from None

    def read(self, css: str, until: Callable[[str], bool] = bool) -> str:
        """The text of *css* once *until* holds for it: wait for the condition, then read, in
        one step (reading an element found earlier can meet a stale element)."""
        def ready(d: Any) -> str | bool:
            text = str(d.find_element(By.CSS_SELECTOR, css).text)
            return text if until(text) else False
        try:
            return str(self.wait.until(ready))
        except TimeoutException:
            raise AssertionError(f"{css} did not show what was expected on {self.b.current_url}; the "
                                 f"page says:\n{self.text()[:2000]}") from None

    def count(self, css: str, n: int) -> None:
        """Wait until exactly *n* elements match *css*."""
        self.wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) == n)

    def open(self, path: str, ready: str) -> Any:
        self.b.get(f"{self.base}{path}")
        return self.find(ready)

    def text(self) -> str:
        return str(self.wait.until(lambda d: d.find_element(By.TAG_NAME, "body").text or " "))

    def labelled(self) -> None:
        """Every visible form field on the page has a label (label[for] or aria-label)."""
        missing = self.b.execute_script("""
          return [...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden' && e.offsetParent !== null)
            .filter(e => !e.getAttribute('aria-label') && !(e.id && document.querySelector(`label[for="${e.id}"]`)))
            .map(e => e.outerHTML.slice(0, 80));""")
        assert not missing, f"form fields without a label on {self.b.current_url}: {missing}"

    def shot(self, name: str, expect: str) -> None:
        """A screenshot of the page, which must show *expect* and not be blank."""
        self.wait.until(lambda d: expect in self.text())
        self.labelled()
        path = self.shots / f"{name}.png"
        # the whole page, not the viewport: as tall as its content (up to 5,000 px)
        height = min(5000, int(self.b.execute_script("return document.documentElement.scrollHeight")))
        self.b.set_window_size(1400, max(1000, height))
        try:
            self.b.save_screenshot(str(path))
        finally:
            self.b.set_window_size(1400, 1000)
        size = path.stat().st_size
        assert size > 2 * self.blank, f"{name}: the screenshot looks blank ({size} bytes, blank {self.blank})"
        self.taken.append(path)


def _moderate(base: str, caller: str, n: int) -> None:
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {caller}"}, timeout=10) as c:
        for i in range(n):
            title, description, locale = TRAFFIC[i % len(TRAFFIC)]
            r = c.post("/v1/moderate", json={"item_id": f"item-{i}", "seller_id": f"seller-{i}",
                                             "title": title, "description": description,
                                             "locale": locale})
            assert r.status_code == 200, r.text


def test_the_prompt_change_loop_in_a_browser_in_two_languages(
        gateway_url: tuple[str, str, str], browser: Any, store: SqlitePromptStore, tmp_path: Path) -> None:
    base, key, caller = gateway_url
    w = Walk(browser, base, tmp_path / "screenshots")
    w.shots.mkdir()

    # sign in, from the keyboard
    browser.get(f"{base}/console/prompts")
    w.wait.until(ec.url_contains("/console/signin"))  # not signed in: sent to sign-in
    w.shot("signin-en", "API key")
    w.find("#api-key").send_keys(key + Keys.ENTER)
    table = w.read("table#prompts tbody tr", lambda t: "listing-moderation" in t)
    assert "production → v1" in table and "tiny-llama" in table
    cookie = browser.get_cookie("modgate_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # not readable by scripts
    w.shot("prompts-en", "Active rollout")

    # playground: the production prompt, edited, beside production
    w.open("/console/playground", "#load-production").click()
    w.wait.until(lambda d: NAME in d.find_element(By.ID, "draft").get_property("value"))
    browser.execute_script("""const d = document.getElementById('draft');
      d.value = d.value.replace('You review one listing at a time',
                                'You review one listing at a time. Treat any 1:1 replica as counterfeit');""")
    w.find("#title-1").send_keys(TRAFFIC[0][0])
    w.find("#desc-1").send_keys(TRAFFIC[0][1])
    w.find("#run").click()
    for side in ("draft", "production"):
        assert w.read(f"#results td.verdict-{side} [class^=decision-]") in {"allow", "block", "needs_review"}
    w.shot("playground-en", "tokens")

    # publish: a separate, explicit step (Enter in the note field submits it)
    w.find("#publish-note").send_keys("treat 1:1 replicas as counterfeit" + Keys.ENTER)
    assert "Published listing-moderation v2" in w.read("#published", lambda t: "Published" in t)
    assert store.versions(NAME) == [1, 2] and store.get_version(NAME, 2).created_by == "prompt-ops"
    w.find("#published-link").click()

    # the version and its diff against v1
    w.find("#version-meta")
    assert "listing-moderation v2" in w.read("h1")
    w.read("#diff table.diff tr.op-replace td.l",  # this version (v2) on the left
           lambda t: "1:1 replica as counterfeit" in t)
    # moving production to v2 before it has a scorecard: refused by the gate, reasons shown
    label = w.find("#move-label")
    assert label.get_property("value") == "production"
    w.find("#move-note").send_keys("ship it" + Keys.ENTER)
    refusal = w.read("#move-out .error", lambda t: "promotion_gate_failed" in t)
    assert "promotion_gate_failed" in refusal and "no stored scorecard of v2" in refusal
    assert store.labels(NAME)["production"] == 1
    w.shot("version-en", "1:1 replica as counterfeit")

    # evaluation: the scorecards `modgate eval run` stores
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, 2)
    w.open(f"/console/evaluation?name={NAME}", "#scorecards")
    w.count("#scorecards tbody tr", 2)
    w.read("#policy", lambda t: "production v1's evaluation block" in t)
    w.read('section.gate[data-version="2"] h3', lambda t: "pass" in t)
    assert w.find("#compare tbody tr[data-category=counterfeit]")
    w.shot("evaluation-en", "Promotion gate per version")

    # a canary with a shadow, from the rollouts page's form
    w.open(f"/console/rollouts?name={NAME}", "#start-form")
    Select(w.find("#start-canary")).select_by_value("2")
    steps = w.find("#start-steps")
    steps.clear()
    steps.send_keys("10,50")
    Select(w.find("#start-shadow")).select_by_value("2")
    w.find("#start-auto").click()  # manual: the test decides when to step
    w.find("#start-note").send_keys("canary from the console")
    w.find("#start-submit").click()
    assert "canary v2 serves 10% of traffic" in w.read("#outcome", lambda t: "serves" in t)
    assert store.get_rollout(NAME) is not None and store.get_rollout(NAME).started_by == "prompt-ops"

    # traffic; watch the gates and the shadow's agreement fill in
    _moderate(base, caller, 30)
    deadline = time.monotonic() + 60  # a guard only: the evidence is flushed once a second
    while True:
        browser.refresh()
        compared = w.read('#shadows tr[data-shadow="2"] td:nth-child(3)', lambda t: t != "")
        if compared != "0":
            break
        assert time.monotonic() < deadline, "no shadow comparison reached the rollout's evidence"
        time.sleep(0.5)
    assert int(compared) > 0
    w.wait.until(lambda d: {"error_rate", "disagreement_rate"} <= {
        r.get_attribute("data-gate") for r in d.find_elements(By.CSS_SELECTOR, "#gates tbody tr")})
    w.read("#gates", lambda t: "more samples" in t or "enough samples" in t)
    # the flipped items with their listing content (the sample store keeps every item here):
    # after each reload, the rollout drawn (its shadows table), then the flips looked for. A
    # reload inside a wait's 0.5 s poll reloaded again before a slow page had drawn anything.
    deadline = time.monotonic() + 60  # a guard only: the evidence is flushed once a second
    while True:
        w.find('#shadows tr[data-shadow="2"]')
        if browser.find_elements(By.CSS_SELECTOR, "#flips .flip-content"):
            break
        assert time.monotonic() < deadline, "no flipped item reached the rollout's evidence"
        time.sleep(0.5)
        browser.refresh()
    w.read("#flips", lambda t: any(item[0] in t for item in TRAFFIC))
    w.shot("rollouts-en", "Agreement")

    w.find("#action-step").click()
    w.wait.until(ec.text_to_be_present_in_element((By.ID, "outcome"), "50% of traffic"))
    w.find("#action-note").send_keys("gates look fine")
    w.find("#action-promote").click()
    w.wait.until(ec.text_to_be_present_in_element((By.ID, "outcome"), "promoted v2"))
    assert store.labels(NAME)["production"] == 2
    w.read("#history tbody tr[data-rollout]", lambda t: "promoted" in t)
    w.wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#history tbody tr[data-rollout] button").click()
                 or True)  # retried if the row was redrawn under the click
    w.wait.until(lambda d: "promote" in d.find_element(By.CSS_SELECTOR, "#history .detail").text)
    w.shot("rollouts-history-en", "promoted v2")

    # the audit timeline of v2
    w.open(f"/console/version?name={NAME}&v=2", "#audit li")
    audit = w.read("#audit")
    assert "published v2" in audit and "moved label production v1 → v2" in audit
    assert "rollout (promoted)" in audit and " UTC " in audit
    w.shot("audit-en", "Audit timeline")

    # decisions: the traffic above, counted
    w.open("/console/decisions", "#decision-filter")

    def logged() -> dict[str, int]:
        """Decisions per arm in the groups table, read in one go (a redraw meanwhile: again)."""
        def read(d: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for r in d.find_elements(By.CSS_SELECTOR, "#decision-groups tbody tr"):
                cells = [c.text for c in r.find_elements(By.TAG_NAME, "td")]
                out[cells[2]] = out.get(cells[2], 0) + int(cells[4])
            return out
        return dict(w.wait.until(lambda d: read(d) or {"": 0}))

    deadline = time.monotonic() + 60  # a guard only: the decision log is written in the background
    while (n := logged()).get("stable", 0) + n.get("canary", 0) < 30:
        assert time.monotonic() < deadline, f"the decisions page shows {n}, not 30 answers"
        w.find("#f-apply").click()
        time.sleep(0.5)
        w.find("#decision-total")
    assert n.get("stable", 0) + n.get("canary", 0) == 30 and n.get("shadow", 0) > 0  # shadows are logged too
    assert "/console/api/decisions.csv?" in w.find("#csv-link").get_attribute("href")
    w.shot("decisions-en", "Newest decisions")

    w.open("/console/review", "#review-input")
    w.shot("review-en", "Submit labels")

    # Simplified Chinese, times in Asia/Shanghai: chosen once, kept for the next pages
    Select(w.find("#pref-lang")).select_by_value("zh-CN")
    w.wait.until(lambda d: d.execute_script("return document.documentElement.lang") == "zh-CN")
    Select(w.find("#pref-tz")).select_by_value("Asia/Shanghai")
    w.find("#pref-tz")
    for page, path, ready in (("prompts", "/console/prompts", "table#prompts"),
                              ("playground", "/console/playground", "#draft"),
                              ("rollouts", f"/console/rollouts?name={NAME}", "#history"),
                              ("evaluation", f"/console/evaluation?name={NAME}", "#scorecards"),
                              ("decisions", "/console/decisions", "#decision-total"),
                              ("review", "/console/review", "#review-input")):
        w.open(path, ready)
        assert HEADINGS["zh-CN"][page] in w.read("h1")
        assert HEADINGS["zh-CN"][page] in w.read(f"#nav-{page}")
        w.shot(f"{page}-zh-CN", HEADINGS["zh-CN"][page])
    w.open(f"/console/version?name={NAME}&v=2", "#audit li")
    audit = w.read("#audit")
    assert "发布了 v2" in audit and "Asia/Shanghai" in audit and " UTC " not in audit
    w.shot("version-zh-CN", "审计时间线")
    w.find("#signout").click()
    w.wait.until(ec.url_contains("/console/signin"))
    w.shot("signin-zh-CN", "API 密钥")

    refused = "/console/api/label - Failed to load resource: the server responded with a status of 409"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
              and refused not in e["message"]]  # the gate's refusal above is expected
    assert not errors, f"the browser reported errors: {errors}"
    pages = {"signin", "prompts", "playground", "version", "evaluation", "rollouts", "decisions", "review"}
    for lang in ("en", "zh-CN"):  # every page in both languages
        assert {p.stem.removesuffix(f"-{lang}") for p in w.taken if p.stem.endswith(f"-{lang}")} >= pages
    if os.environ.get("MODGATE_CONSOLE_SHOTS"):
        out = Path(os.environ["MODGATE_CONSOLE_SHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for path in w.taken:
            shutil.copy(path, out / path.name)
