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
    # A stopped Redis refuses connections at once: the timeout only guards against a hang (at
    # 0.3 s a loaded machine could fail the seeding writes before the outage even began).
    store = RedisPromptStore(server.url, prefix="outage", timeout_s=10.0)
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
            # Every answer during the outage is a verdict from the cached v1; once the failed
            # refresh is noticed (as soon as the machine runs it) they say the prompt is stale.
            deadline = time.monotonic() + 30  # a guard against a hang only
            i = 0
            while True:
                r = client.post("/v1/moderate", json={**LISTING, "item_id": f"during-{i}"})
                assert r.status_code == 200, r.text
                assert r.json()["prompt"]["version"] == 1
                if r.json()["prompt"]["stale"]:
                    break
                assert time.monotonic() < deadline, "no answer during the outage said the prompt was stale"
                i += 1
                time.sleep(0.05)

            r = client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1},
                           headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "registry_unavailable"
            assert "unreachable" in r.json()["error"]["message"]
            ready = client.get("/readyz").json()
            assert ready["checks"]["prompts"]["listing-moderation:production"]["stale"] is True

            server.start()
            _wait(lambda: client.post("/v1/moderate", json=LISTING).json()["prompt"]["stale"] is False, 30.0)
            r = client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1},
                           headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 200
    finally:
        store.close()
        server.stop()
