"""The console in two languages (#17 item 5) and one page shell: every text the pages ask for
exists in English and in Simplified Chinese with the same placeholders, and every page is the
one shared shell with its own script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import typing
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.api.console.routes import PAGES, STATIC
from gateway.config import GatewaySettings
from gateway.decision_log import Arm
from gateway.rollouts.ops import ACTIONS
from prompt_registry.keys import generate_key
from prompt_registry.rollouts import State, Verdict
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

LANGUAGES = ("en", "zh-CN")
CJK = re.compile(r"[\u4e00-\u9fff]")
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def catalogue(lang: str) -> dict[str, str]:
    return dict(json.loads((STATIC / "i18n" / f"{lang}.json").read_text(encoding="utf-8")))


def scripts() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(STATIC.glob("*.js"))}


def keys_used() -> set[str]:
    """Every key the scripts ask for: literal `t("...")` calls and literal key strings handed to
    helpers (table headings), plus the keys built from a prefix and a value the server sends."""
    used: set[str] = set()
    known_prefixes = ("page.", "nav.", "gate.", "state.", "arm.", "action.")
    for text in scripts().values():
        used |= set(re.findall(r'\bt\("([a-z0-9_.]+)"', text))
        used |= {k for k in re.findall(r'"((?:[a-z]+)\.[a-z0-9_.]+)"', text)
                 if k.split(".")[0] in {c.split(".")[0] for c in catalogue("en")}
                 and not k.startswith(("modgate.", "fieldset."))}
    # "queue": the review queue page (gateway/api/console/queue.py), in the shared header too
    built = {"page": [*PAGES, "signin", "queue"], "nav": [*(p for p in PAGES if p != "version"), "queue"],
             "gate": [*typing.get_args(Verdict), "none"], "state": list(typing.get_args(State)),
             "arm": [a for a in typing.get_args(Arm) if a != "raw"], "action": list(ACTIONS)}
    for prefix, values in built.items():
        assert f"{prefix}." in known_prefixes
        used |= {f"{prefix}.{v}" for v in values}
    return used


def test_every_key_exists_in_both_catalogues_with_the_same_placeholders() -> None:
    en, zh = (catalogue(lang) for lang in LANGUAGES)
    assert set(en) == set(zh), (set(en) ^ set(zh))
    for key in en:
        assert en[key].strip() and zh[key].strip(), key
        assert set(PLACEHOLDER.findall(en[key])) == set(PLACEHOLDER.findall(zh[key])), key
    missing = keys_used() - set(en)
    assert not missing, f"the pages ask for texts no catalogue has: {sorted(missing)}"
    unused = set(en) - keys_used()
    assert not unused, f"texts no page uses: {sorted(unused)}"
    same = [k for k in en if en[k] == zh[k]]
    assert same == ["rollouts.col.kappa"], same  # a statistic's name, the same in both
    assert all(CJK.search(v) for k, v in zh.items() if k not in same), "untranslated Chinese texts"


def test_the_scripts_hold_no_english_sentences_outside_the_catalogues() -> None:
    """A heuristic for texts written into a page instead of the catalogue: a string literal of
    three or more English words as a child of an element."""
    for name, text in scripts().items():
        if name.startswith("queue"):
            continue  # the review queue's page (owned with gateway/api/console/queue.py)
        for literal in re.findall(r'el\("[a-z0-9]+", \{[^}]*\}, "([^"]+)"\)', text):
            assert len(literal.split()) < 3, f"{name}: {literal!r} is not in the catalogues"


@pytest.fixture
def client(store: SqlitePromptStore, backend: FakeBackend) -> Iterator[TestClient]:
    key, record = generate_key("reader", ["prompts:read"], created_by="test")
    store.put_key(record)
    with TestClient(create_app(GatewaySettings(key_cache_s=0), store, backend)) as c:
        assert c.post("/console/api/session", json={"key": key}).status_code == 200
        yield c


def test_every_page_is_the_one_shell_with_its_own_script(client: TestClient) -> None:
    shell = (STATIC / "shell.html").read_text(encoding="utf-8")
    assert not [p for p in PAGES if (STATIC / f"{p}.html").exists()], "a page with its own HTML head"
    for page in [*PAGES, "signin"]:
        r = client.get(f"/console/{page}")
        assert r.status_code == 200, page
        assert r.text == shell.replace("{page}", page).replace(
            "{main_class}", "signin" if page == "signin" else ""), page
        assert f'<script src="/console/static/{page}.js"></script>' in r.text
        assert client.get(f"/console/static/{page}.js").status_code == 200
    for lang in LANGUAGES:
        r = client.get(f"/console/static/i18n/{lang}.json")
        assert r.status_code == 200 and r.json() == catalogue(lang)


def test_every_script_parses() -> None:
    """A syntax error in one page's script leaves that page blank; catch it before a browser.
    Needs node: skipped on a machine without it, except in CI (.ci/run installs Debian's nodejs
    and sets MODGATE_REQUIRE_NODE=1), where a missing node fails rather than passing unseen."""
    if shutil.which("node") is None:
        if os.environ.get("MODGATE_REQUIRE_NODE") == "1":
            pytest.fail("node is not installed, and MODGATE_REQUIRE_NODE=1 says it must be "
                        "(.ci/run installs it: apt-get install nodejs)")
        pytest.skip("needs node to parse the scripts (apt-get install nodejs; CI requires it)")
    for path in sorted(STATIC.glob("*.js")):
        out = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"
