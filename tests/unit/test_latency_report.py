"""`modgate latency`: per-stage percentiles from two /metrics scrapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.cli.latency import _quantile, stage_percentiles
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, float("inf"): 100.0}
    assert _quantile(0.5, buckets) == pytest.approx(0.1)
    assert _quantile(0.7, buckets) == pytest.approx(0.15)
    assert _quantile(0.95, buckets) == pytest.approx(0.3)


def test_window_subtracts_the_first_scrape(tmp_path: Path) -> None:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("c", ["moderate"], created_by="t")
    store.put_key(record)
    backend = FakeBackend(delay_s=0.03)
    listing = {"item_id": "i", "seller_id": "s", "title": "t"}
    with TestClient(create_app(GatewaySettings(), store, backend), headers={"x-api-key": key}) as client:
        for _ in range(3):
            client.post("/v1/moderate", json=listing)
        before = client.get("/metrics").text
        for _ in range(5):
            client.post("/v1/moderate", json=listing)
        after = client.get("/metrics").text
    rows = {r["stage"]: r for r in stage_percentiles(before, after)}
    assert rows["backend"]["count"] == 5 and rows["total"]["count"] == 5
    # The fake backend sleeps 30 ms: its p50 is at least the 25 ms bucket's bound, and below
    # 250 ms (the next bounds, 50 and 100 ms, are within reach of a loaded machine's scheduling).
    assert 25 <= rows["backend"]["p50_ms"] < 250
    assert rows["prompt.render"]["p99_ms"] < rows["backend"]["p50_ms"]
    assert list(rows)[-1] == "total"
    store.close()
