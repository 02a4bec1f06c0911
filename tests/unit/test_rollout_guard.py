"""#16: the promotion gate guards traffic, not only the label. On the old code a key holding
only `labels:protected` started a rollout of a gate-failing version at 100 % (steps [100]) and
served it every request; a refused automatic promotion left the canary at 100 % with nothing
to end it. Here: the start needs what a production move needs and, for a failing version, an
admin override; an unproven canary never gets more than `max_unproven_weight`; no sequence of
API calls without an override puts all traffic on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.rollouts.controller import RolloutController
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from tests.scorecards import store_scorecard

ROOT = Path(__file__).resolve().parents[2]
URL = "/v1/prompts/listing-moderation/rollout"
Env = tuple[TestClient, dict[str, dict[str, str]], SqlitePromptStore]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    spec = store.get_version("listing-moderation", 1).spec
    allow_all = spec.model_copy(update={"description": "always answer allow"})
    store.publish(allow_all, actor="mallory")  # v2: no scorecard, so its gate fails
    keys = {}
    for name, scopes in {"caller": ["moderate"], "protected_only": ["labels:protected"],
                         "lead": ["prompts:read", "labels:write", "labels:protected"], "admin": ["admin"]}.items():
        key, record = generate_key(name, scopes, created_by="test")
        store.put_key(record)
        keys[name] = {"authorization": f"Bearer {key}"}
    settings = GatewaySettings(rollout_controller=False)
    with TestClient(create_app(settings, store, FakeBackend())) as client:
        yield client, keys, store
    store.close()


def _served_by_canary(client: TestClient, keys: dict[str, dict[str, str]], n: int = 40) -> int:
    arms = [client.post("/v1/moderate", json={"item_id": f"i{i}", "seller_id": f"s{i}", "title": "earbuds"},
                        headers=keys["caller"]).json()["arm"] for i in range(n)]
    return arms.count("canary")


def test_a_failing_version_does_not_take_all_traffic(env: Env) -> None:
    client, keys, store = env
    body = {"canary_version": 2, "steps": [100], "auto": False}
    r = client.post(URL, json=body, headers=keys["protected_only"])
    assert r.status_code == 403 and "labels:write" in r.json()["error"]["message"]
    r = client.post(URL, json=body, headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    r = client.post(URL, json={**body, "override": {"reason": "just try it"}}, headers=keys["lead"])
    assert r.status_code == 403
    r = client.post(URL, json={**body, "override": {"reason": "just try it"}}, headers=keys["admin"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "rollout_state"
    assert "at most 50%" in r.json()["error"]["message"]
    assert client.get(URL, headers=keys["lead"]).status_code == 404  # nothing started

    r = client.post(URL, json={**body, "steps": [10, 50, 100], "override": {"reason": "just try it"}},
                    headers=keys["admin"])
    assert r.status_code == 201, r.text
    audit = store.audit("listing-moderation")[-1]
    assert "GATE OVERRIDDEN by admin: just try it" in audit.note
    # no sequence of calls without an override gets it past 50 %
    assert client.post(f"{URL}/step", headers=keys["lead"]).json()["weight"] == 50
    for action in ("step", "promote", "step"):
        r = client.post(f"{URL}/{action}", headers=keys["lead"])
        assert r.status_code == 409, (action, r.text)
    for action in ("pause", "resume"):
        assert client.post(f"{URL}/{action}", headers=keys["lead"]).status_code == 200
    assert client.post(f"{URL}/step", headers=keys["lead"]).status_code == 409
    assert client.get(URL, headers=keys["lead"]).json()["weight"] == 50
    assert store.labels("listing-moderation")["production"] == 1
    assert _served_by_canary(client, keys) < 40


def test_a_refused_automatic_promotion_falls_back(env: Env) -> None:
    client, keys, store = env
    for fallback, weight in (("last_safe", 25), ("zero", 0)):
        r = client.post(URL, json={"canary_version": 2, "steps": [5, 25, 100], "step_hold_s": 0,
                                   "on_promotion_refused": fallback, "override": {"reason": "r"},
                                   "gates": {"min_samples": 1, "max_error_rate": None,
                                             "max_parse_failure_rate": None, "max_flag_rate_drift": None}},
                        headers=keys["admin"])
        assert r.status_code == 201, r.text
        controller = RolloutController(store)
        assert asyncio.run(controller.tick()) == [("listing-moderation", "step")]
        assert asyncio.run(controller.tick()) == [("listing-moderation", "hold")]  # promotion, refused
        st = client.get(URL, headers=keys["lead"]).json()
        assert st["rollout"]["state"] == "paused" and st["weight"] == weight
        assert st["rollout"]["last_decision"].startswith("hold: promotion refused by the gate")
        assert st["rollout"]["last_decision"].endswith(f"canary back to {weight}%")
        assert store.labels("listing-moderation")["production"] == 1
        assert client.post(f"{URL}/abort", headers=keys["lead"]).status_code == 200


def test_a_canary_above_the_cap_whose_gate_stops_passing_is_put_back(env: Env) -> None:
    client, keys, store = env
    store_scorecard(store, "listing-moderation", 1)
    store_scorecard(store, "listing-moderation", 2)
    r = client.post(URL, json={"canary_version": 2, "steps": [20, 100], "auto": False}, headers=keys["lead"])
    assert r.status_code == 201, r.text
    assert client.post(f"{URL}/step", headers=keys["lead"]).json()["weight"] == 100  # proven: allowed
    store_scorecard(store, "listing-moderation", 2, counts={"counterfeit": (20, 6, 7)})  # now it fails
    assert asyncio.run(RolloutController(store).tick()) == [("listing-moderation", "fallback")]
    st = client.get(URL, headers=keys["lead"]).json()
    assert st["weight"] == 20 and st["rollout"]["state"] == "paused"
    assert "does not pass its promotion gate" in st["rollout"]["last_decision"]


def test_every_rollout_is_kept_and_shown_by_id(env: Env) -> None:
    """#16: earlier rollouts survived only as JSON notes in the audit log, and status after a
    finished rollout still showed WAIT gates."""
    client, keys, store = env
    ids = []
    for _ in range(2):
        r = client.post(URL, json={"canary_version": 2, "steps": [10, 50], "override": {"reason": "r"}},
                        headers=keys["admin"])
        ids.append(r.json()["rollout"]["id"])
        assert client.post(f"{URL}/abort", json={"note": "enough"}, headers=keys["lead"]).status_code == 200
    listed = client.get("/v1/prompts/listing-moderation/rollouts", headers=keys["lead"]).json()["rollouts"]
    assert [(x["id"], x["state"], x["transitions"]) for x in listed] == [(ids[1], "aborted", 2), (ids[0], "aborted", 2)]
    shown = client.get(f"/v1/prompts/listing-moderation/rollouts/{ids[0]}", headers=keys["lead"]).json()
    assert shown["rollout"]["id"] == ids[0] and shown["gates"] == [] and shown["would_decide"] is None
    assert [(t["action"], t["state"], t["actor"]) for t in shown["transitions"]] == [
        ("start", "running", "admin"), ("abort", "aborted", "lead")]
    assert shown["transitions"][1]["note"] == "enough"
    assert "GATE OVERRIDDEN by admin" in shown["transitions"][0]["gate_note"]
    assert shown["serving"] == [{"version": 1, "arm": "stable", "share": 100}]
    assert client.get("/v1/prompts/listing-moderation/rollouts/nope", headers=keys["lead"]).status_code == 404
    assert client.get("/v1/prompts/listing-moderation/rollouts", headers=keys["caller"]).status_code == 403
