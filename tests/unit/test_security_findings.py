"""Regression tests for the second security probe's findings (each failed on main at 89a8dc6).

Findings handled elsewhere have their own tests: upstream text (tests/unit/test_http_backend.py),
the durable decision log (tests/unit/test_decision_log.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from gateway.api.app import create_app
from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.limits import CallerLimitsSettings
from gateway.problems import Unauthenticated
from gateway.telemetry import Metrics
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

LISTING = {"item_id": "i-1", "seller_id": "s-1", "title": "bike", "description": ""}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(store: SqlitePromptStore, backend: FakeBackend, caller_key: str,
           metrics: Metrics) -> Iterator[TestClient]:
    settings = GatewaySettings(readiness_cache_s=60, body_timeout_s=2)
    with TestClient(create_app(settings, store, backend, metrics=metrics, models=["tiny-llama"]),
                    raise_server_exceptions=False) as c:
        c.headers["authorization"] = f"Bearer {caller_key}"
        yield c


# 1. metric labels chosen by callers ---------------------------------------------------------

def test_made_up_prompt_names_never_become_metric_labels(client: TestClient, metrics: Metrics) -> None:
    before = len(generate_latest(metrics.registry))
    for i in range(50):
        made_up = f"nope-{i}-" + "x" * 40
        r1 = client.post("/v1/moderate", json={**LISTING, "prompt": made_up})
        r2 = client.post("/v1/moderations", json={"input": "x", "model": made_up})
        r3 = client.post("/v1/moderations", json={"input": "x", "model": "Y" * 5000})
        r4 = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [], "prompt": {"name": made_up, "variables": {"title": "x"}}})
        assert {r1.status_code, r2.status_code, r3.status_code, r4.status_code} == {404}
    exposition = generate_latest(metrics.registry)
    assert b"nope-" not in exposition and b"YYYY" not in exposition
    assert len(exposition) < before + 4096  # request counters only: bounded by routes x codes
    cache = client.app.state.gateway.cache  # type: ignore[attr-defined]
    assert not any(name.startswith("nope-") for name in cache._rollouts)  # no per-name state either


# 2. bodies read before authentication -------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/feedback", "/v1/prompts/listing-moderation/labels/canary",
                                  "/v1/prompts/listing-moderation/rollout", "/v1/prompts"])
def test_anonymous_bodies_are_refused_before_they_are_read(client: TestClient, path: str) -> None:
    received = 0

    def body() -> Iterator[bytes]:
        nonlocal received
        for _ in range(64):  # would be 4 MiB
            received += 1
            yield b"x" * 65536

    r = client.request("POST" if path != "/v1/prompts/listing-moderation/labels/canary" else "PUT",
                       path, content=body(), headers={"authorization": "", "content-type": "application/json"})
    assert r.status_code == 401, r.text
    assert received <= 2  # refused before the body was read (the client may have sent a chunk)


def test_authenticated_bodies_are_cut_at_the_limit(client: TestClient, store: SqlitePromptStore) -> None:
    key, record = generate_key("reviewer", ["feedback"], created_by="test")
    store.put_key(record)
    r = client.post("/v1/feedback", content=b"{" + b" " * (200 * 1024) + b"}",
                    headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"


# 6. quotas count work; /readyz does not call the model per probe -----------------------------

def test_moderations_with_n_inputs_count_n_against_the_rate_limit(store: SqlitePromptStore,
                                                                  caller_key: str) -> None:
    limits = CallerLimitsSettings(enabled=True, rate_per_s=0.001, burst=5, max_concurrent=100)
    with TestClient(create_app(GatewaySettings(caller_limits=limits), store, FakeBackend()),
                    headers={"authorization": f"Bearer {caller_key}"}) as c:
        assert c.post("/v1/moderations", json={"input": ["a", "b", "c", "d"]}).status_code == 200
        r = c.post("/v1/moderations", json={"input": ["a", "b"]})  # 4 + 2 > burst of 5
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        # (the refused call spent the burst's last unit on admission: a rate unit is not refunded)


def test_readyz_probes_the_model_once_per_interval_and_tells_anonymous_callers_nothing(
        client: TestClient, backend: FakeBackend) -> None:
    for _ in range(20):
        r = client.get("/readyz", headers={"authorization": ""})
        assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert len(backend.requests) == 1
    assert "checks" in client.get("/readyz").json()  # a valid key sees the checks


# 7. slow clients ------------------------------------------------------------------------------

def test_a_trickled_body_is_cut_off_by_the_body_timeout(store: SqlitePromptStore, caller_key: str) -> None:
    """On a real socket: the headers arrive, then the body one byte every 0.5 s. The answer is a
    408 after `body_timeout_s`, not whenever the client chooses to finish."""
    import socket
    import threading

    import uvicorn

    app = create_app(GatewaySettings(body_timeout_s=1.0), store, FakeBackend())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        body = b'{"item_id": "i-1", "seller_id": "s-1", "title": "x"}'
        conn.sendall(b"POST /v1/moderate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {caller_key}\r\ncontent-length: {len(body)}\r\n\r\n".encode())
        answer = b""
        sent = 0  # body bytes sent before the answer came
        conn.settimeout(0.5)
        for byte in body:
            try:
                conn.sendall(bytes([byte]))
                sent += 1
                answer += conn.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        conn.settimeout(5)
        try:
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            pass
        conn.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        # Cut off long before the client would have finished (one byte per 0.5 s: ~26 s for the
        # whole body); counted in bytes, not timed, so a loaded machine does not fail it.
        assert sent < len(body) // 2, (sent, len(body))
    finally:
        server.should_exit = True
        thread.join(10)


# 9. the smaller items -------------------------------------------------------------------------

def test_request_ids_are_validated_before_they_are_reflected(client: TestClient) -> None:
    evil = "x<script>" + "a" * 300
    for r in (client.post("/v1/moderate", content=b"{", headers={"x-request-id": evil,
                                                                 "content-type": "application/json"}),
              client.get("/v1/nothing-here", headers={"x-request-id": evil}),
              client.post("/v1/prompts/listing-moderation/rollback", json={"bad": 1},
                          headers={"x-request-id": evil})):
        assert "script" not in r.headers.get("x-request-id", "") and "script" not in r.text


def test_no_redirect_is_built_from_the_host_header(client: TestClient) -> None:
    r = client.get("/v1/prompts/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code != 307 and "evil.example" not in r.headers.get("location", "")


def test_security_headers_on_every_response(client: TestClient) -> None:
    for r in (client.post("/v1/moderate", json=LISTING), client.get("/healthz"),
              client.get("/v1/nothing-here"), client.post("/v1/moderate", json={})):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert "default-src 'none'" in r.headers["content-security-policy"]


def test_an_empty_x_api_key_does_not_mask_a_valid_bearer_token(client: TestClient, caller_key: str) -> None:
    r = client.post("/v1/moderate", json=LISTING,
                    headers={"authorization": f"Bearer {caller_key}", "x-api-key": ""})
    assert r.status_code == 200, r.text
    r = client.post("/v1/moderate", json=LISTING,
                    headers={"authorization": f"Bearer {caller_key}", "x-api-key": caller_key + "x"})
    assert r.status_code == 401 and "two different API keys" in r.json()["error"]["message"]


def test_wrong_keys_are_slowed_down(store: SqlitePromptStore) -> None:
    auth = Authenticator(store, failure_delay_s=0.2)

    async def attempt() -> float:
        started = time.perf_counter()
        with pytest.raises(Unauthenticated):
            await auth.authenticate("Bearer mgk_000000000000_guessedsecret", None)
        return time.perf_counter() - started

    assert asyncio.run(attempt()) >= 0.2


def test_the_up_banner_prints_no_key(tmp_path: Path) -> None:
    from gateway.cli.main import _curl_example
    from gateway.config import load_config

    cfg = load_config(None, {"data_dir": str(tmp_path)})
    key = "mgk_abcdef123456_" + "s" * 30
    line = _curl_example(cfg, key)
    assert key not in line and "s" * 30 not in line and "local-keys.json" in line


def test_unknown_routes_answer_our_json_not_a_500(client: TestClient) -> None:
    r = client.get("/v1/moderate")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    assert httpx.codes.is_client_error(client.get("/nope").status_code)


def test_too_many_or_too_large_headers_are_refused(client: TestClient) -> None:
    many = {f"x-h{i}": "v" for i in range(150)}
    r = client.post("/v1/moderate", json=LISTING, headers=many)
    assert r.status_code == 431 and r.json()["error"]["type"] == "headers_too_large"
    r = client.get("/healthz", headers={"x-big": "a" * 64 * 1024})
    assert r.status_code == 431
    assert client.post("/v1/moderate", json=LISTING).status_code == 200


def test_metrics_can_live_on_their_own_listener(store: SqlitePromptStore, caller_key: str) -> None:
    """gateway.metrics_port: the API port no longer answers /metrics; the metrics app does."""
    from gateway.api.ops import build_metrics_app

    app = create_app(GatewaySettings(metrics_port=9090), store, FakeBackend())
    with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as c:
        assert c.post("/v1/moderate", json=LISTING).status_code == 200
        assert c.get("/metrics").status_code == 404
        with TestClient(build_metrics_app(app.state.gateway.service)) as m:
            r = m.get("/metrics")
            assert r.status_code == 200 and b"modgate_requests_total" in r.content


def test_every_error_body_carries_a_request_id(client: TestClient, store: SqlitePromptStore) -> None:
    """403s and 401s on the admin and feedback routes said `"request_id": null` (#21)."""
    for r in (client.post("/v1/feedback", json={"request_id": "x", "decision": "allow"}),  # 403
              client.post("/v1/feedback", json={}, headers={"authorization": ""}),  # 401 (guard)
              client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1}),
              client.get("/v1/prompts", headers={"x-request-id": "mine-1", "authorization": ""})):
        assert r.status_code in (401, 403), r.text
        assert r.json()["request_id"], r.text
        assert r.headers["x-request-id"] == r.json()["request_id"]
    assert r.json()["request_id"] == "mine-1"
