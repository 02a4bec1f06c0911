"""The gateway's HTTP contract, against a fake backend and a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import BackendOverloaded, BackendTimeout, BackendUnavailable
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds",
           "description": "Sealed box, one year warranty.", "locale": "en-US"}


@pytest.fixture
def client(store: SqlitePromptStore, backend: FakeBackend, caller_key: str) -> Iterator[TestClient]:
    settings = GatewaySettings(max_body_bytes=4096, max_title_chars=100, max_description_chars=1000,
                               readiness_cache_s=0)
    with TestClient(create_app(settings, store, backend), raise_server_exceptions=False,
                    headers={"authorization": f"Bearer {caller_key}"}) as c:
        yield c


def test_valid_listing_gets_a_verdict_with_its_prompt_version(client: TestClient, backend: FakeBackend) -> None:
    r = client.post("/v1/moderate", json=LISTING, headers={"x-request-id": "req-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "req-1" == r.headers["x-request-id"]
    assert body["prompt"] == {"name": "listing-moderation", "version": 1, "label": "production",
                              "locale": "en-US", "stale": False}
    assert body["decision"] in {"allow", "block", "needs_review"}
    assert body["fail_reason"] is None
    assert body["arm"] == "stable"
    sent = backend.requests[-1]
    assert sent.model == "tiny-llama" and sent.regex and sent.max_tokens == 96
    assert sent.messages[0]["role"] == "system" and "{{" not in sent.messages[0]["content"]
    assert "Wireless earbuds" in sent.messages[1]["content"]


def _error(r: object) -> dict:
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error", "request_id"}
    return body["error"]


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "field"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
        ({"content": b"[1,2]", "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
        ({"json": {k: v for k, v in LISTING.items() if k != "title"}}, 422, "invalid_request", "title"),
        ({"json": {**LISTING, "title": 42}}, 422, "invalid_request", "title"),
        ({"json": {**LISTING, "descripton": "typo"}}, 422, "invalid_request", "descripton"),
        ({"json": {**LISTING, "item_id": ""}}, 422, "invalid_request", "item_id"),
        ({"json": {**LISTING, "locale": "english"}}, 422, "invalid_request", "locale"),
        ({"json": {**LISTING, "title": "x" * 101}}, 422, "content_too_long", "title"),
        ({"json": {**LISTING, "description": "x" * 1001}}, 422, "content_too_long", "description"),
        ({"json": {**LISTING, "description": "x" * 5000}}, 413, "body_too_large", None),
        ({"json": {**LISTING, "prompt": "no-such-prompt"}}, 404, "unknown_prompt", None),
        ({"content": b"title=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
         "unsupported_media_type", None),
    ],
)
def test_bad_input_gets_a_clear_4xx(client: TestClient, kwargs: dict, status: int, kind: str,
                                    field: str | None) -> None:
    r = client.post("/v1/moderate", **kwargs)
    assert r.status_code == status, r.text
    err = _error(r)
    assert err["type"] == kind
    assert err["message"]
    if field:
        assert field in [f["field"] for f in err["fields"]]


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (BackendUnavailable("engine dead"), 503, "model_unavailable"),
        (BackendTimeout("slow"), 504, "model_timeout"),
        (BackendOverloaded("full", retry_after_s=3), 429, "model_overloaded"),
    ],
)
def test_backend_faults_are_explicit_errors_never_allow(client: TestClient, backend: FakeBackend,
                                                        exc: Exception, status: int, kind: str) -> None:
    backend.error = exc
    r = client.post("/v1/moderate", json=LISTING)
    assert r.status_code == status
    err = _error(r)
    assert err["type"] == kind and err["retryable"] is True
    if status == 429:
        assert r.headers["retry-after"] == "3"


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ('{"decision":"allow","category":"none","confid', "length", "truncated_output"),
        ("allow", "stop", "unparseable_output"),
        ('{"decision":"allow","category":"spam","confidence":0.5}', "stop", "invalid_verdict"),
    ],
)
def test_unusable_model_output_becomes_needs_review(client: TestClient, backend: FakeBackend,
                                                    text: str, finish: str, reason: str) -> None:
    backend.responder = lambda _req: text
    backend.finish_reason = finish
    r = client.post("/v1/moderate", json=LISTING)
    assert r.status_code == 200
    body = r.json()
    assert (body["decision"], body["category"], body["fail_reason"]) == ("needs_review", None, reason)


def test_unexpected_exception_is_a_json_500_without_a_stack_trace(client: TestClient, backend: FakeBackend) -> None:
    backend.error = RuntimeError("secret internal detail")
    r = client.post("/v1/moderate", json=LISTING)
    assert r.status_code == 500
    assert _error(r)["type"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_health_and_readiness(client: TestClient, backend: FakeBackend) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["model"]["ok"] is True
    backend.healthy = False
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["backend"]["ok"] is False
    backend.healthy = True
    backend.error = BackendUnavailable("engine dead")
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["model"]["ok"] is False


def test_openapi_documents_the_request_schema(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/moderate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "title" in body["properties"] and "item_id" in body["required"]


def test_zh_cn_caller_gets_the_zh_cn_variant(client: TestClient, backend: FakeBackend) -> None:
    r = client.post("/v1/moderate", json={**LISTING, "locale": "zh-CN", "title": "高仿 运动鞋"})
    assert r.status_code == 200 and r.json()["prompt"]["locale"] == "zh-CN"
    assert "你是一个线上交易平台的内容审核员" in backend.requests[-1].messages[0]["content"]
    r = client.post("/v1/moderate", json={**LISTING, "locale": "zh-TW"})
    assert r.json()["prompt"]["locale"] == "zh-CN"
    r = client.post("/v1/moderate", json={**LISTING, "locale": "de-DE"})
    assert r.json()["prompt"]["locale"] == "en-US"


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "missing API key"),
        ({"authorization": "Bearer nope"}, 401, "malformed"),
        ({"authorization": "Bearer mgk_000000000000_secret"}, 401, "invalid API key"),
        ({"x-api-key": "mgk_000000000000_secret"}, 401, "invalid API key"),
    ],
)
def test_requests_without_a_valid_key_are_denied(store: SqlitePromptStore, backend: FakeBackend,
                                                 headers: dict, status: int, message: str) -> None:
    with TestClient(create_app(GatewaySettings(), store, backend)) as c:
        r = c.post("/v1/moderate", json=LISTING, headers=headers)
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert backend.requests == []


def test_wrong_scope_and_revoked_keys(store: SqlitePromptStore, backend: FakeBackend) -> None:
    key, record = generate_key("reader", ["prompts:read"], created_by="t")
    store.put_key(record)
    with TestClient(create_app(GatewaySettings(key_cache_s=0), store, backend)) as c:
        r = c.post("/v1/moderate", json=LISTING, headers={"x-api-key": key})
        assert r.status_code == 403 and "'moderate'" in r.json()["error"]["message"]
        store.put_key(record.model_copy(update={"revoked": True}))
        r = c.get("/v1/prompts", headers={"x-api-key": key})
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    # a wrong secret for a real key id is rejected too
    forged = key[:-4] + "AAAA"
    with TestClient(create_app(GatewaySettings(), store, backend)) as c:
        assert c.get("/v1/prompts", headers={"x-api-key": forged}).status_code == 401


def test_direct_route_refuses_endpoints_fastapi_would_have_to_fill_in() -> None:
    from fastapi import Request
    from starlette.responses import Response

    from gateway.api.routing import DirectRoute

    async def ok(request: Request) -> Response:
        return Response()

    async def needs_body(request: Request, item: dict) -> Response:
        return Response()

    def not_async(request: Request) -> Response:
        return Response()

    DirectRoute("/ok", ok, methods=["POST"])
    for endpoint in (needs_body, not_async):
        with pytest.raises(TypeError, match="async def f"):
            DirectRoute("/bad", endpoint, methods=["POST"])


def test_pinning_a_version_needs_the_pin_scope(client: TestClient, store: SqlitePromptStore,
                                               backend: FakeBackend) -> None:
    """A pin bypasses the rollout and its gates: a plain `moderate` key may not pin."""
    r = client.post("/v1/moderate", json={**LISTING, "prompt_version": 1})
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
    assert r.json()["error"]["fields"][0]["field"] == "prompt_version"
    assert backend.requests == []
    key, record = generate_key("svc-tester", ["moderate", "moderate:pin"], created_by="test")
    store.put_key(record)
    r = client.post("/v1/moderate", json={**LISTING, "prompt_version": 1},
                    headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["arm"] == "pinned"



def test_seller_id_may_be_null_as_in_the_shipped_dataset(client: TestClient) -> None:
    """The dataset has `seller_id: null` rows (lst-10003): the API takes them; the item id is
    then the stickiness key."""
    for body in ({**LISTING, "seller_id": None}, {k: v for k, v in LISTING.items() if k != "seller_id"}):
        r = client.post("/v1/moderate", json=body)
        assert r.status_code == 200, r.text


def test_a_moderation_looks_its_production_label_up_once(client: TestClient) -> None:
    """The service resolves the production label to prove the prompt's name, then hands that
    result to the pipeline's resolve stage instead of looking the label up a second time."""
    assert client.post("/v1/moderate", json=LISTING).status_code == 200  # warm the cache
    stats = client.app.state.gateway.service.cache.stats  # type: ignore[attr-defined]
    before = stats.hits + stats.misses
    for _ in range(3):
        r = client.post("/v1/moderate", json=LISTING)
        assert r.status_code == 200 and r.json()["prompt"]["label"] == "production"
    assert stats.hits + stats.misses - before == 3


def test_header_reads_the_scope_as_starlette_headers_do() -> None:
    """`edge.header` (the hot route's header reads, straight from the scope) answers what
    `request.headers.get` answers: the first of repeated headers, None when absent, latin-1."""
    from starlette.requests import Request

    from gateway.api.edge import header

    raw = [(b"content-type", b"application/json"), (b"x-request-id", b"a"), (b"x-request-id", b"b"),
           (b"authorization", "Bearer \xe9".encode("latin-1")), (b"content-length", b"")]
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": raw})
    for name in ("content-type", "x-request-id", "authorization", "content-length", "x-api-key", "traceparent"):
        assert header(request, name.encode()) == request.headers.get(name)
    assert header(request, b"x-request-id") == "a" and header(request, b"x-api-key") is None


def test_the_hot_route_is_served_from_the_guard_with_its_headers_and_error_edge(
        client: TestClient, backend: FakeBackend) -> None:
    """`POST /v1/moderate` (a DirectRoute) is dispatched by the request guard straight to its
    endpoint, past FastAPI's middleware and router: the answer keeps the security headers, an
    exception escaping the endpoint is still our JSON 500, and other methods still get the
    router's 405."""
    guard = client.app.middleware_stack  # type: ignore[attr-defined]
    while type(guard).__name__ != "RequestGuard":
        guard = guard.app
    assert set(guard.direct_routes()) == {("POST", "/v1/moderate")}
    r = client.post("/v1/moderate", json=LISTING)
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert r.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    route = guard.direct_routes()[("POST", "/v1/moderate")]
    endpoint = route.endpoint

    async def broken(request: object) -> None:
        raise RuntimeError("a bug past the route's own error edge")

    route.endpoint = broken
    try:
        r = client.post("/v1/moderate", json=LISTING, headers={"x-request-id": "req-bug"})
    finally:
        route.endpoint = endpoint
    assert r.status_code == 500 and r.headers["x-content-type-options"] == "nosniff"
    assert r.json() == {"error": {"type": "internal_error", "message": "internal error; see gateway logs",
                                  "retryable": False}, "request_id": "req-bug"}
    assert client.get("/v1/moderate").status_code == 405


@pytest.mark.parametrize("path", ["/v1/moderations", "/v1/chat/completions", "/v1/decisions", "/v1/prompts"])
def test_a_caller_leaving_mid_body_is_a_499_not_an_unhandled_500(client: TestClient, store: SqlitePromptStore,
                                                                  path: str) -> None:
    """The front doors that read their body through the edge (not the /v1/moderate guard's
    reader), and the publish route, met Starlette's own ClientDisconnect, which no row of the
    table names: a 500 logged as our bug. It is the same event as the guard's 499."""
    key, record = generate_key("svc-both", ["moderate", "prompts:publish"], created_by="test")
    store.put_key(record)
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": b'{"input": "half a bo', "more_body": True},
              {"type": "http.disconnect"}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", b"100"),
                         (b"authorization", f"Bearer {key}".encode())]}

    async def call() -> None:
        await client.app(scope, receive, send)

    client.portal.call(call)  # type: ignore[union-attr]
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499, sent

