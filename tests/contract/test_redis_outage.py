"""Redis stops while the gateway serves: moderation keeps working from the cache (flagged
stale), registry writes fail with a clear error, and everything recovers when Redis returns."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.redis_store import RedisPromptStore
from serving.fake_backend import FakeBackend
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


def _wait(predicate, within_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_gateway_rides_out_a_redis_outage(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()  # AOF on: data survives the restart
    store = RedisPromptStore(server.url, prefix="outage", timeout_s=0.3)
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("caller", ["moderate"], created_by="t")
    admin, admin_record = generate_key("admin", ["admin"], created_by="t")
    store.put_key(record)
    store.put_key(admin_record)
    settings = GatewaySettings(prompt_refresh_s=0.2, prompt_max_staleness_s=3600, readiness_cache_s=0)
    try:
        with TestClient(create_app(settings, store, FakeBackend()),
                        headers={"authorization": f"Bearer {key}"}) as client:
            ok = client.post("/v1/moderate", json=LISTING)
            assert ok.status_code == 200 and ok.json()["prompt"]["stale"] is False
            client.get("/v1/prompts", headers={"authorization": f"Bearer {admin}"})  # admin key cached

            server.stop()
            time.sleep(0.3)  # past the refresh interval: the next request triggers a failing refresh
            stale_seen = []
            for i in range(20):
                r = client.post("/v1/moderate", json={**LISTING, "item_id": f"during-{i}"})
                assert r.status_code == 200, r.text
                assert r.json()["prompt"]["version"] == 1
                stale_seen.append(r.json()["prompt"]["stale"])
                time.sleep(0.05)
            assert any(stale_seen), "responses during the outage should say the prompt is stale"

            r = client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1},
                           headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "registry_unavailable"
            assert "unreachable" in r.json()["error"]["message"]
            ready = client.get("/readyz").json()
            assert ready["checks"]["prompts"]["listing-moderation:production"]["stale"] is True

            server.start()
            _wait(lambda: client.post("/v1/moderate", json=LISTING).json()["prompt"]["stale"] is False)
            r = client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1},
                           headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 200
    finally:
        store.close()
        server.stop()
