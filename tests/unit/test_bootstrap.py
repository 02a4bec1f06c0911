"""The composition root builds the same gateway `modgate gateway` serves."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from gateway.bootstrap import build_backend, build_gateway
from gateway.config import load_config
from gateway.telemetry import Metrics
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from serving.resilience import ResilientBackend


def test_build_gateway_serves_moderations_with_the_configured_parts(
        store: SqlitePromptStore, caller_key: str, tmp_path: Path) -> None:
    cfg = load_config(None, {"data_dir": str(tmp_path)})
    app = build_gateway(cfg, store, backend=FakeBackend())
    with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as client:
        r = client.post("/v1/moderate", json={"item_id": "i-1", "seller_id": "s-1", "title": "bike"})
        assert r.status_code == 200, r.text
        gateway = app.state.gateway
        assert gateway.service.decision_log is not None  # the config's decision log is wired in
    assert list((tmp_path / "decisions").rglob("decisions-*.jsonl"))


def test_the_configured_backend_is_resilient() -> None:
    cfg = load_config(None, {})
    backend = build_backend(cfg, Metrics())
    assert isinstance(backend, ResilientBackend)



def test_the_http_backend_keeps_idle_connections_as_configured() -> None:
    """`serving.keepalive_s` reaches the HTTP backend's pool (default 4 s: under the 5 s of
    uvicorn-based model servers)."""
    from serving.http_backend import OpenAIHttpBackend

    http = {"serving.mode": "http", "serving.base_url": "http://127.0.0.1:9/v1"}
    for overrides, expected in (({}, 4.0), ({"serving.keepalive_s": 1.5}, 1.5)):
        backend = build_backend(load_config(None, {**http, **overrides}), Metrics())
        assert isinstance(backend, ResilientBackend) and isinstance(backend.inner, OpenAIHttpBackend)
        assert backend.inner.keepalive_s == expected
