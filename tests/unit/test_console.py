"""The prompt-ops console (`/console`) and the offline `/docs`: sessions, CSRF, scopes, the
playground and review form calling the same code as the API, and nothing loaded from
another origin."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend


class _Refs(HTMLParser):
    """Every URL an HTML page makes the browser load (script/link/img/iframe/... src/href)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for attr in ("src", "href", "action", "data", "poster"):
            if a.get(attr) and not (tag == "a" and attr == "href"):
                self.refs.append(str(a[attr]))
        if tag == "script" and not a.get("src"):
            self.inline_scripts += 1


def refs_of(html: str) -> _Refs:
    parser = _Refs()
    parser.feed(html)
    return parser


def assert_same_origin(refs: list[str]) -> None:
    assert refs, "the page loads nothing at all?"
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc, f"{ref} is loaded from another origin"
        assert ref.startswith("/"), f"{ref}: expected an absolute path on this origin"


@pytest.fixture
def app_client(store: SqlitePromptStore, backend: FakeBackend) -> Iterator[TestClient]:
    settings = GatewaySettings(key_cache_s=0, readiness_cache_s=0)
    with TestClient(create_app(settings, store, backend, models=["tiny-llama"]),
                    raise_server_exceptions=False) as c:
        yield c


def test_docs_are_served_from_the_gateway(app_client: TestClient) -> None:
    r = app_client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    refs = refs_of(r.text)
    assert_same_origin(refs.refs)
    for ref in refs.refs:
        asset = app_client.get(ref)
        assert asset.status_code == 200 and asset.content, ref
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    assert app_client.get("/openapi.json").status_code == 200
    assert app_client.get("/redoc").status_code == 404  # ReDoc loads from a CDN: switched off


# -- the console --------------------------------------------------------------------------------

import time  # noqa: E402

from fastapi import FastAPI  # noqa: E402

from gateway.api.console import SessionStore  # noqa: E402
from prompt_registry.keys import ApiKeyRecord, generate_key  # noqa: E402
from prompt_registry.loader import parse_prompt_text  # noqa: E402
from prompt_registry.ops import spec_as_yaml  # noqa: E402

CONSOLE_CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
PAGES = ["/console/signin", "/console/prompts", "/console/version?name=listing-moderation&v=1",
         "/console/playground", "/console/rollouts", "/console/evaluation", "/console/decisions",
         "/console/review"]
LISTINGS = [{"title": "Wireless earbuds", "description": "Sealed box.", "locale": "en-US"},
            {"title": "名牌包 1:1 复刻", "description": "与专柜同款，微信联系。", "locale": "zh-CN"}]


class Keys:
    def __init__(self, store: SqlitePromptStore) -> None:
        self.store = store
        self.ops, self.ops_record = self._make("prompt-ops", ["prompts:read", "prompts:publish"])
        self.reviewer, self.reviewer_record = self._make("reviewer-1", ["feedback"])
        self.reader, _ = self._make("reader", ["prompts:read"])
        self.caller, _ = self._make("svc", ["moderate"])

    def _make(self, name: str, scopes: list[str]) -> tuple[str, ApiKeyRecord]:
        key, record = generate_key(name, scopes, created_by="test")
        self.store.put_key(record)
        return key, record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(store: SqlitePromptStore) -> Keys:
    return Keys(store)


@pytest.fixture
def app(store: SqlitePromptStore, backend: FakeBackend) -> FastAPI:
    settings = GatewaySettings(key_cache_s=0, readiness_cache_s=0)
    return create_app(settings, store, backend, models=["tiny-llama"])


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sign_in(client: TestClient, key: str) -> str:
    r = client.post("/console/api/session", json={"key": key})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def test_without_a_session_pages_redirect_and_the_api_answers_401(client: TestClient) -> None:
    for page in PAGES[1:] + ["/console"]:
        r = client.get(page, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, "/console/signin"), page
    for path in ("/console/api/session", "/console/api/prompts", "/console/api/review/schema",
                 "/console/api/prompts/listing-moderation/audit"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated", path
    r = client.post("/console/api/playground", json={"prompt": "x", "listings": []})
    assert r.status_code == 401


def test_sign_in_gives_an_http_only_strict_cookie_and_a_csrf_token(client: TestClient, keys: Keys) -> None:
    r = client.post("/console/api/session", json={"key": keys.ops})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert "secure" not in cookie  # plain http here; Secure on https (test below)
    body = r.json()
    assert body["name"] == "prompt-ops" and body["csrf"] and keys.ops not in r.text
    assert client.get("/console/api/session").json()["csrf"] == body["csrf"]
    assert client.get("/console/prompts").status_code == 200


def test_the_cookie_is_secure_over_https(app: FastAPI, keys: Keys) -> None:
    with TestClient(app, base_url="https://testserver") as c:
        r = c.post("/console/api/session", json={"key": keys.ops})
        assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()


def test_sign_in_refuses_bad_keys_and_keys_without_a_console_scope(client: TestClient, keys: Keys) -> None:
    assert client.post("/console/api/session", json={"key": "mgk_nope"}).status_code == 401
    assert client.post("/console/api/session", json={"key": ""}).status_code == 401
    r = client.post("/console/api/session", json={"key": keys.caller})
    assert r.status_code == 403 and "console" in r.json()["error"]["message"]
    assert client.post("/console/api/session", content=b"key=x",
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 415
    r = client.post("/console/api/session", json={"key": keys.ops},
                    headers={"origin": "https://evil.example"})
    assert r.status_code == 403


def test_every_write_needs_the_csrf_token(client: TestClient, keys: Keys) -> None:
    csrf = sign_in(client, keys.ops)
    run = {"prompt": "name: x", "listings": [LISTINGS[0]]}
    for path, body in (("/console/api/playground", run), ("/console/api/feedback", {"rows": []}),
                       ("/console/api/signout", {})):
        assert client.post(path, json=body).status_code == 403, path
        r = client.post(path, json=body, headers={"x-csrf-token": "wrong"})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"], path
    r = client.post("/console/api/playground", json=run,
                    headers={"x-csrf-token": csrf, "origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/console/api/session").status_code == 200  # still signed in
    assert client.post("/console/api/signout", json={}, headers={"x-csrf-token": csrf}).status_code == 200
    assert client.get("/console/api/session").status_code == 401
    assert client.get("/console/prompts", follow_redirects=False).status_code == 303


def test_scopes_are_the_admin_apis(client: TestClient, keys: Keys) -> None:
    csrf = sign_in(client, keys.reader)
    assert client.get("/console/api/prompts").status_code == 200
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": "name: x", "listings": [LISTINGS[0]]})
    assert r.status_code == 403 and "prompts:publish" in r.json()["error"]["message"]
    assert client.get("/console/api/review/schema").status_code == 403
    r = client.post("/console/api/feedback", headers={"x-csrf-token": csrf},
                    json={"rows": [{"request_id": "r1", "decision": "allow"}]})
    assert r.status_code == 403 and "feedback" in r.json()["error"]["message"]
    csrf = sign_in(client, keys.reviewer)
    assert client.get("/console/api/prompts").status_code == 403  # feedback only


def test_revoking_the_key_ends_the_session(client: TestClient, keys: Keys, store: SqlitePromptStore) -> None:
    sign_in(client, keys.ops)
    assert client.get("/console/api/prompts").status_code == 200
    store.put_key(keys.ops_record.model_copy(update={"revoked": True}))
    r = client.get("/console/api/prompts")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert client.get("/console/playground", follow_redirects=False).status_code == 303
    store.put_key(keys.ops_record)  # un-revoking does not bring the session back
    assert client.get("/console/api/session").status_code == 401


def test_sessions_expire_when_idle(app: FastAPI, client: TestClient, keys: Keys) -> None:
    sessions: SessionStore = app.state.console_sessions
    clock = Clock()
    sessions.clock = clock
    assert sessions.idle_s == 1800.0  # the default: 30 minutes
    sign_in(client, keys.ops)
    clock.now += 1700
    assert client.get("/console/api/session").status_code == 200  # activity restarts the clock
    clock.now += 1700
    assert client.get("/console/api/session").status_code == 200
    clock.now += 1801
    assert client.get("/console/api/session").status_code == 401
    assert len(sessions) == 0


def test_the_session_store_is_bounded() -> None:
    clock = Clock()
    store = SessionStore(idle_s=60, max_sessions=3, max_per_key=2, clock=clock)
    ids = []
    for i in range(3):
        clock.now += 1
        ids.append(store.create(f"key{i}", f"k{i}")[0])
    assert store.get(ids[0]) is not None  # key0 is now the most recently used
    new, _ = store.create("key3", "k3")
    assert len(store) == 3 and store.get(ids[1]) is None and store.get(ids[0]) is not None
    a, _ = store.create("key9", "k9")
    b, _ = store.create("key9", "k9")
    c, _ = store.create("key9", "k9")
    assert store.get(a) is None and store.get(b) and store.get(c)  # at most 2 per key
    clock.now += 61
    assert store.get(c) is None
    assert store.get("x" * 500) is None and store.get(None) is None


def test_prompts_version_diff_and_audit(client: TestClient, keys: Keys,
                                        store: SqlitePromptStore) -> None:
    spec = store.resolve("listing-moderation", "production").spec
    changed = spec.model_copy(update={"messages": [
        spec.messages[0].model_copy(update={"content": spec.messages[0].content + "\nNEW RULE: be careful.\n"}),
        *spec.messages[1:]]})
    store.publish(changed, actor="alice", note="add a rule")
    sign_in(client, keys.ops)
    prompts = client.get("/console/api/prompts").json()["prompts"]
    lm = next(p for p in prompts if p["name"] == "listing-moderation")
    assert lm["latest"] == 2 and lm["labels"]["production"] == 1 and lm["model"] == "tiny-llama"
    assert lm["rollout"] is None
    v = client.get("/console/api/prompts/listing-moderation/versions/2").json()
    assert set(v["locales"]) >= {"en-US", "zh-CN"} and v["variables"] == spec.variables
    assert v["verdict"]["decisions"] == spec.verdict.decisions and v["sampling"]["max_tokens"] == 96
    assert parse_prompt_text(v["yaml"], source="t") == changed
    d = client.get("/console/api/prompts/listing-moderation/diff?from=1&to=2").json()
    inserted = [r for r in d["locales"]["en-US"] if r["op"] != "equal"]
    assert [r["right"] for r in inserted] == ["", "NEW RULE: be careful."]
    assert all(r["op"] == "insert" and r["left"] is None for r in inserted)
    assert all(r["op"] == "equal" for r in d["locales"]["zh-CN"])
    assert "+    NEW RULE: be careful." in d["spec_diff"]
    lines = [e["line"] for e in client.get("/console/api/prompts/listing-moderation/audit").json()["entries"]]
    assert any("alice  published v2 — add a rule" in ln for ln in lines)
    assert any("label production set to v1" in ln for ln in lines)  # the CLI's and the report's words
    assert client.get("/console/api/prompts/nope/audit").status_code == 404
    assert client.get("/console/api/prompts/listing-moderation/versions/99").status_code == 404
    assert client.get("/console/api/prompts/listing-moderation/diff?from=1&to=x").status_code == 422


def _draft_yaml(store: SqlitePromptStore) -> str:
    version = store.resolve("listing-moderation", "production")
    spec = version.spec
    draft = spec.model_copy(update={"messages": [
        spec.messages[0].model_copy(update={"content": spec.messages[0].content + "\nDraft rule.\n"}),
        *spec.messages[1:]]})
    return spec_as_yaml(version.model_copy(update={"spec": draft}))


def test_the_playground_answers_what_try_draft_answers(app: FastAPI, client: TestClient, keys: Keys,
                                                       store: SqlitePromptStore, backend: FakeBackend) -> None:
    csrf = sign_in(client, keys.ops)
    text = _draft_yaml(store)
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": text, "listings": LISTINGS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["production"] == {"name": "listing-moderation", "version": 1, "label": "production"}
    assert len(backend.requests) == 4  # draft and production, two listings each
    service = app.state.gateway.service
    draft = parse_prompt_text(text, source="t")
    production = store.resolve("listing-moderation", "production").spec

    async def direct(spec: object, listing: dict[str, str]) -> object:
        [ev] = await service.try_draft(spec, [{"title": listing["title"], "description": listing["description"]}],
                                       locale=listing["locale"], started=time.perf_counter(),
                                       request_id="direct", caller="test")
        return ev

    for listing, result in zip(LISTINGS, body["results"], strict=True):
        for spec, side in ((draft, "draft"), (production, "production")):
            ev = client.portal.call(direct, spec, listing)  # type: ignore[union-attr]
            got = result[side]
            assert (got["decision"], got["category"], got["confidence"], got["fail_reason"]) == (
                ev.verdict.decision, ev.verdict.category, ev.verdict.confidence, ev.verdict.fail_reason)
            assert got["locale"] == listing["locale"] == ev.locale
        assert listing["title"] in result["draft"]["messages"][-1]["content"]
        edited = listing["locale"] == "en-US"  # the draft changes the default locale's text only
        assert ("Draft rule." in result["draft"]["messages"][0]["content"]) is edited
        assert "Draft rule." not in result["production"]["messages"][0]["content"]
    # nothing published, no label moved
    assert store.versions("listing-moderation") == [1]


def test_the_playground_shows_prompt_errors_with_line_and_field(client: TestClient, keys: Keys,
                                                                store: SqlitePromptStore) -> None:
    csrf = sign_in(client, keys.ops)
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": "name: x\nmessages: [\n  - {", "listings": [LISTINGS[0]]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_prompt"
    assert "line" in r.json()["error"]["message"]
    text = _draft_yaml(store).replace("needs_review", "maybe")
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": text, "listings": [LISTINGS[0]]})
    assert r.status_code == 422
    assert any(f["field"].startswith("verdict.decisions") for f in r.json()["error"]["fields"])
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": _draft_yaml(store).replace("model: tiny-llama", "model: gpt-x"),
                          "listings": [LISTINGS[0]]})
    assert r.status_code == 422 and r.json()["error"]["type"] == "unknown_model"
    r = client.post("/console/api/playground", headers={"x-csrf-token": csrf},
                    json={"prompt": _draft_yaml(store), "listings": [LISTINGS[0]] * 9})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "listings"


def test_review_rows_are_checked_and_counted_like_v1_feedback(client: TestClient, keys: Keys,
                                                              store: SqlitePromptStore) -> None:
    csrf = sign_in(client, keys.reviewer)
    schema = client.get("/console/api/review/schema").json()
    assert "needs_review" not in schema["decisions"] and "counterfeit" in schema["categories"]
    rows = [{"request_id": "req-a", "decision": "allow"},
            {"request_id": "req-b", "decision": "block", "category": "counterfeit"},
            {"request_id": "req-c", "decision": "block"},
            {"request_id": "req-d", "decision": "maybe"},
            {"request_id": "bad id!", "decision": "allow"},
            {"request_id": "req-a", "decision": "allow"}]
    check = client.post("/console/api/feedback", headers={"x-csrf-token": csrf},
                        json={"rows": rows, "dry_run": True}).json()
    assert [r["ok"] for r in check["results"]] == [True, True, False, False, False, False]
    assert check["results"][2]["errors"][0]["field"] == "category"
    assert check["results"][3]["errors"][0]["field"] == "decision"
    assert check["results"][4]["errors"][0]["field"] == "request_id"
    assert "twice" in check["results"][5]["errors"][0]["problem"]
    assert store.recall_verdict("feedback:req-a") is None  # a check records nothing
    done = client.post("/console/api/feedback", headers={"x-csrf-token": csrf}, json={"rows": rows[:2]}).json()
    assert done["ok"] == 2 and done["results"][0]["answer"]["reviewer"] == "reviewer-1"
    # the same label through the API, with the same key: the same record, so a duplicate
    r = client.post("/v1/feedback", json={"request_id": "req-b", "decision": "block", "category": "counterfeit"},
                    headers={"authorization": f"Bearer {keys.reviewer}"})
    assert r.status_code == 202 and r.json()["duplicate"] is True
    again = client.post("/console/api/feedback", headers={"x-csrf-token": csrf},
                        json={"rows": [{"request_id": "req-a", "decision": "block", "category": "adult"}]}).json()
    assert again["results"][0]["answer"]["replaced"] is True


def test_no_console_page_loads_anything_from_another_origin(client: TestClient, keys: Keys) -> None:
    sign_in(client, keys.ops)
    for page in PAGES:
        r = client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], page
        assert r.headers["content-security-policy"] == CONSOLE_CSP
        refs = refs_of(r.text)
        assert refs.inline_scripts == 0, f"{page} has an inline script (the CSP forbids it)"
        assert_same_origin(refs.refs)
        for ref in refs.refs:
            asset = client.get(ref)
            assert asset.status_code == 200 and asset.content, ref
            assert asset.headers["content-security-policy"] == CONSOLE_CSP
            if ref.endswith((".js", ".css")):
                assert "http://" not in asset.text and "https://" not in asset.text, ref
    assert client.get("/console/api/session").headers["content-security-policy"] == CONSOLE_CSP
    assert client.get("/healthz").headers["content-security-policy"].startswith("default-src 'none'")


def test_console_routes_are_not_in_the_public_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/console", "/docs"))]


def test_the_console_can_be_switched_off(store: SqlitePromptStore, backend: FakeBackend) -> None:
    settings = GatewaySettings(console={"enabled": False})  # type: ignore[arg-type]
    with TestClient(create_app(settings, store, backend)) as c:
        assert c.get("/console/signin").status_code == 404
        assert c.get("/docs").status_code == 200
