"""Admin API: the prompt-ops flow (publish v2, diff, promote, roll back, audit), its scopes, and
the promotion gate on production moves (refusal, admin override, scorecards, gate verdicts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from tests.scorecards import SAMPLE_SHA, store_scorecard

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], SqlitePromptStore]]:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    keys = {}
    for name, scopes in {"caller": ["moderate"], "author": ["prompts:read", "prompts:publish", "labels:write"],
                         "lead": ["prompts:read", "labels:write", "labels:protected"], "admin": ["admin"]}.items():
        key, record = generate_key(name, scopes, created_by="test")
        store.put_key(record)
        keys[name] = {"authorization": f"Bearer {key}"}
    with TestClient(create_app(GatewaySettings(), store, FakeBackend())) as client:
        yield client, keys, store
    store.close()


def _v2_yaml() -> str:
    data = yaml.safe_load(PROMPT.read_text())
    data["messages"][0]["content"] += "\nTreat '加微信' as off_platform_payment even when spaced out.\n"
    data["policy"]["change_note"] = "catch obfuscated WeChat ids"
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_prompt_ops_flow(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, store = env
    r = client.post("/v1/prompts", content=_v2_yaml(), headers={**keys["author"], "content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 2 and r.json()["created_by"] == "author"
    again = client.post("/v1/prompts", content=_v2_yaml(), headers={**keys["author"], "content-type": "application/yaml"})
    assert again.status_code == 200 and again.json()["created"] is False

    diff = client.get("/v1/prompts/listing-moderation/diff?from=1&to=2", headers=keys["author"]).json()["diff"]
    assert "+    Treat '加微信' as off_platform_payment" in diff and diff.startswith("--- listing-moderation@v1")

    # production is protected: the author may not move it, the lead may, once v2 passes its gate
    r = client.put("/v1/prompts/listing-moderation/labels/production", json={"version": 2}, headers=keys["author"])
    assert r.status_code == 403 and "labels:protected" in r.json()["error"]["message"]
    r = client.put("/v1/prompts/listing-moderation/labels/production",
                   json={"version": 2, "expected_version": 1, "note": "ship v2"}, headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    assert "no stored scorecard of v2" in r.json()["error"]["message"]
    store_scorecard(store, "listing-moderation", 1)
    store_scorecard(store, "listing-moderation", 2)
    r = client.put("/v1/prompts/listing-moderation/labels/production",
                   json={"version": 2, "expected_version": 1, "note": "ship v2"}, headers=keys["lead"])
    body = r.json()
    assert body.pop("gate")["verdict"] == "pass"
    assert body == {"name": "listing-moderation", "label": "production", "from_version": 1, "to_version": 2}
    assert client.post("/v1/moderate", json=LISTING, headers=keys["caller"]).json()["prompt"]["version"] == 2

    r = client.put("/v1/prompts/listing-moderation/labels/production",
                   json={"version": 1, "expected_version": 1}, headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "label_conflict"

    r = client.post("/v1/prompts/listing-moderation/labels/production/rollback", headers=keys["lead"])
    assert r.json()["to_version"] == 1
    assert client.post("/v1/moderate", json=LISTING, headers=keys["caller"]).json()["prompt"]["version"] == 1

    audit = client.get("/v1/prompts/listing-moderation/audit", headers=keys["author"]).json()["entries"]
    assert [(e["action"], e["label"], e["from_version"], e["to_version"], e["actor"]) for e in audit] == [
        ("publish", None, None, 1, "seed"), ("label", "production", None, 1, "seed"),
        ("publish", None, None, 2, "author"),
        ("gate_refused", "production", 1, 2, "lead"),  # the refusal is audited (issue 16, item 10)
        ("scorecard", None, None, 1, "test"),
        ("scorecard", None, None, 2, "test"), ("label", "production", 1, 2, "lead"),
        ("label", "production", 2, 1, "lead")]
    assert audit[3]["note"].startswith("gate failed on dataset e08b6d315ed6: no stored scorecard of v2")
    assert audit[6]["note"].startswith("ship v2 | gate passed on dataset e08b6d315ed6 (8 checks) "
                                       "[policy: production v1's evaluation block (policy ")
    summary = client.get("/v1/prompts/listing-moderation", headers=keys["author"]).json()
    assert summary == {"name": "listing-moderation", "versions": [1, 2], "latest": 2, "labels": {"production": 1},
                       "states": {}, "warnings": []}


def test_unprotected_labels_need_only_labels_write(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, _ = env
    r = client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1}, headers=keys["author"])
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "ctype", "status", "needle"),
    [
        ("name: x\nmessages: [", "application/yaml", 422, "malformed YAML"),
        (PROMPT.read_text().replace("{{ title|json }}", "{{ title.__class__ }}"), "application/yaml", 422,
         "attribute access"),
        (PROMPT.read_text().replace("{{ title|json }}", "{{ price }}"), "application/yaml", 422, "undeclared variable"),
        ('{"name": "x"}', "application/json", 422, "messages"),
        ("<xml/>", "application/xml", 415, "application/json"),
    ],
)
def test_bad_prompts_are_rejected_and_nothing_is_written(env: tuple[TestClient, dict, SqlitePromptStore],
                                                         body: str, ctype: str, status: int, needle: str) -> None:
    client, keys, store = env
    r = client.post("/v1/prompts", content=body, headers={**keys["admin"], "content-type": ctype})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert store.versions("listing-moderation") == [1]


def test_not_found_and_scopes(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, _ = env
    assert client.get("/v1/prompts/nope", headers=keys["admin"]).status_code == 404
    assert client.get("/v1/prompts/listing-moderation/versions/7", headers=keys["admin"]).status_code == 404
    assert client.get("/v1/prompts", headers=keys["caller"]).status_code == 403
    assert client.get("/v1/prompts").status_code == 401
    r = client.post("/v1/prompts/listing-moderation/labels/canary/rollback", headers=keys["admin"])
    assert r.status_code == 404
    client.put("/v1/prompts/listing-moderation/labels/canary", json={"version": 1}, headers=keys["admin"])
    r = client.post("/v1/prompts/listing-moderation/labels/canary/rollback", headers=keys["admin"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "nothing_to_roll_back"


def test_cache_snapshot_shows_what_this_replica_serves(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, _ = env
    client.post("/v1/moderate", json=LISTING, headers=keys["caller"])
    assert client.get("/v1/cache/prompts", headers=keys["caller"]).status_code == 403
    body = client.get("/v1/cache/prompts", headers=keys["author"]).json()
    assert body["entries"][0]["prompt"] == "listing-moderation" and body["entries"][0]["version"] == 1
    assert body["stats"]["hits"] >= 1


def test_rollout_api(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, store = env
    spec = store.get_version("listing-moderation", 1).spec
    store.publish(spec.model_copy(update={"description": "v2"}), actor="t")
    body = {"canary_version": 2, "steps": [10, 100], "shadows": [{"version": 2, "sample_rate": 0.5}],
            "auto": False}
    r = client.post("/v1/prompts/listing-moderation/rollout", json=body, headers=keys["author"])
    assert r.status_code == 403 and "labels:protected" in r.json()["error"]["message"]
    # v2 has no scorecard: its gate fails, so it starts only with an admin override (#16)
    r = client.post("/v1/prompts/listing-moderation/rollout", json=body, headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    body["override"] = {"reason": "try it on 10 %"}
    r = client.post("/v1/prompts/listing-moderation/rollout", json=body, headers=keys["lead"])
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
    r = client.post("/v1/prompts/listing-moderation/rollout", json=body, headers=keys["admin"])
    assert r.status_code == 201, r.text
    assert r.json()["weight"] == 10 and r.json()["rollout"]["state"] == "running"
    r = client.post("/v1/prompts/listing-moderation/rollout", json=body, headers=keys["admin"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "rollout_conflict"
    r = client.post("/v1/prompts/listing-moderation/rollout", json={**body, "steps": [50, 10]},
                    headers=keys["admin"])
    assert r.status_code in (409, 422)
    r = client.post("/v1/prompts/listing-moderation/rollout/step", headers=keys["lead"])
    assert r.status_code == 409 and "the promotion itself" in r.json()["error"]["message"]
    status = client.get("/v1/prompts/listing-moderation/rollout", headers=keys["author"]).json()
    assert {g["gate"] for g in status["gates"]} >= {"error_rate", "parse_failure_rate"}
    assert status["promotion_gate"]["verdict"] == "fail"  # v2 has no scorecard yet
    r = client.post("/v1/prompts/listing-moderation/rollout/promote", json={"note": "looks good"},
                    headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    assert "no stored scorecard of v2" in r.json()["error"]["message"]
    assert store.labels("listing-moderation")["production"] == 1
    r = client.post("/v1/prompts/listing-moderation/rollout/promote",
                    json={"note": "looks good", "override": {"reason": "offline set is stale"}},
                    headers=keys["lead"])
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
    store_scorecard(store, "listing-moderation", 1)
    store_scorecard(store, "listing-moderation", 2)
    assert client.post("/v1/prompts/listing-moderation/rollout/step", headers=keys["lead"]).json()["weight"] == 100
    r = client.post("/v1/prompts/listing-moderation/rollout/step", headers=keys["lead"])
    assert r.status_code == 409 and "last step" in r.json()["error"]["message"]
    r = client.post("/v1/prompts/listing-moderation/rollout/promote", json={"note": "looks good"},
                    headers=keys["lead"])
    assert r.json()["rollout"]["state"] == "promoted"
    assert store.labels("listing-moderation")["production"] == 2
    r = client.post("/v1/prompts/listing-moderation/rollout/bogus", headers=keys["lead"])
    assert r.status_code == 422


def test_promotion_gate_refuses_and_an_admin_overrides(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, store = env
    spec = store.get_version("listing-moderation", 1).spec
    store.publish(spec.model_copy(update={"description": "v2"}), actor="t")
    store_scorecard(store, "listing-moderation", 1)
    # v2 flags 26 listings as counterfeit, 20 rightly: Wilson lower bound 0.579 < 0.75
    store_scorecard(store, "listing-moderation", 2, counts={"counterfeit": (20, 6, 7)})
    url = "/v1/prompts/listing-moderation/labels/production"

    gate = client.get("/v1/prompts/listing-moderation/versions/2/gate", headers=keys["author"]).json()
    assert gate["verdict"] == "fail" and gate["production_version"] == 1 and gate["declared_by"] == 1
    assert gate["policy"]["source"] == "production" and gate["candidate_block"] == "same"
    assert gate["dataset"] == {"sha256": SAMPLE_SHA,
                               "path": "datasets/listings-sample.jsonl", "items": 194}
    failed = [c for c in gate["criteria"] if c["verdict"] == "fail"]
    assert [(c["category"], c["detail"]) for c in failed] == [
        ("counterfeit", "counterfeit precision lower bound 0.579 < 0.750 (n=26)"),
        ("counterfeit", "counterfeit recall 0.741 is 0.259 below production v1's 1.000 (allowed drop 0.050)")]

    r = client.put(url, json={"version": 2}, headers=keys["lead"])
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["type"] == "promotion_gate_failed" and err["retryable"] is False
    assert "counterfeit precision lower bound 0.579 < 0.750" in err["message"]
    assert "dataset e08b6d315ed6 (datasets/listings-sample.jsonl, 194 items)" in err["message"]

    r = client.put(url, json={"version": 2, "override": {"reason": "court order"}}, headers=keys["lead"])
    assert r.status_code == 403 and "lacks the 'admin' scope" in r.json()["error"]["message"]
    for bad in ({"reason": ""}, {"reason": "   "}, {}):
        r = client.put(url, json={"version": 2, "override": bad}, headers=keys["admin"])
        assert r.status_code == 422, bad
    assert store.labels("listing-moderation")["production"] == 1

    r = client.put(url, json={"version": 2, "note": "ship", "override": {"reason": "court order"}},
                   headers=keys["admin"])
    assert r.status_code == 200 and r.json()["gate"]["verdict"] == "fail"
    assert store.labels("listing-moderation")["production"] == 2
    entry = client.get("/v1/prompts/listing-moderation/audit", headers=keys["author"]).json()["entries"][-1]
    assert entry["actor"] == "admin" and entry["to_version"] == 2
    assert entry["note"].startswith("ship | GATE OVERRIDDEN by admin: court order (gate failed on dataset "
                                    "e08b6d315ed6: counterfeit precision lower bound 0.579 < 0.750")

    cards = client.get("/v1/prompts/listing-moderation/scorecards", headers=keys["author"]).json()["scorecards"]
    assert [(c["version"], c["items"]) for c in cards] == [(1, 194), (2, 194)]
    v2 = client.get("/v1/prompts/listing-moderation/scorecards?version=2", headers=keys["author"]).json()
    c = v2["scorecards"][0]["categories"]["counterfeit"]
    assert (c["tp"], c["fp"], c["fn"], round(c["precision_ci"][0], 3)) == (20, 6, 7, 0.579)
    assert client.get("/v1/prompts/listing-moderation/scorecards", headers=keys["caller"]).status_code == 403
    assert client.get("/v1/prompts/nope/scorecards", headers=keys["author"]).status_code == 404
    assert client.get("/v1/prompts/listing-moderation/scorecards?version=9",
                      headers=keys["author"]).status_code == 404
    assert client.get("/v1/prompts/listing-moderation/versions/9/gate", headers=keys["author"]).status_code == 404


# -- issue 16: the gate policy in force, and models the serving layer serves ----------------------

LAX = {"dataset": {"sha256": "1" * 64, "path": "datasets/tiny.jsonl"},
       "criteria": [{"metric": "parse_failure_rate", "max": 0.02}]}


def _lax_v2_yaml() -> str:
    data = yaml.safe_load(PROMPT.read_text())
    data["description"] = "a version that brings its own gate"
    data["evaluation"] = LAX
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def test_a_version_cannot_define_its_own_gate(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, store = env
    key, record = generate_key("gatekeeper", ["prompts:read", "gates:write"], created_by="test")
    store.put_key(record)
    keys["gates"] = {"authorization": f"Bearer {key}"}
    r = client.post("/v1/prompts", content=_lax_v2_yaml(), headers={**keys["author"], "content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    store_scorecard(store, "listing-moderation", 2, items=20, sha="1" * 64)  # meets its own lax block
    url = "/v1/prompts/listing-moderation/labels/production"

    r = client.put(url, json={"version": 2}, headers=keys["lead"])
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    message = r.json()["error"]["message"]
    assert "policy in force: production v1's evaluation block (policy " in message
    assert "no stored scorecard of v2 on dataset e08b6d315ed6" in message
    assert "is not at least as strict as the policy in force and does not apply" in message

    policy_url = "/v1/prompts/listing-moderation/gate-policy"
    view = client.get(policy_url, headers=keys["author"]).json()
    assert view["in_force"]["source"] == "production" and view["record"] is None
    assert view["versions"] == {"1": {"declares_block": True, "relation": "same"},
                                "2": {"declares_block": True, "relation": "not_stricter"}}
    assert client.get(policy_url, headers=keys["caller"]).status_code == 403

    # changing the policy is its own protected step: labels:protected is not enough
    change = {"from_version": 2, "reason": "the 20-item set is what we have for the new market"}
    r = client.put(policy_url, json=change, headers=keys["lead"])
    assert r.status_code == 403 and "gates:write" in r.json()["error"]["message"]
    for bad in ({"from_version": 2}, {"from_version": 2, "reason": " "},
                {"from_version": 2, "evaluation": LAX, "reason": "x"}, {"evaluation": {"criteria": []}, "reason": "x"}):
        assert client.put(policy_url, json=bad, headers=keys["gates"]).status_code == 422, bad
    dry = client.put(policy_url, json={**change, "dry_run": True}, headers=keys["gates"]).json()
    assert dry["written"] is False and store.get_gate_policy("listing-moderation") is None
    assert "-  sha256: e08b6d315ed6" in dry["diff"] and "+  path: datasets/tiny.jsonl" in dry["diff"]

    r = client.put(policy_url, json={**change, "expected_revision": 0}, headers=keys["gates"])
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["written"] is True and done["after"]["revision"] == 1 and done["after"]["set_by"] == "gatekeeper"
    assert done["before"]["source"] == "production" and done["diff"] == dry["diff"].replace(
        dry["after"]["sha256"][:12], done["after"]["sha256"][:12])
    r = client.put(policy_url, json={**change, "expected_revision": 0}, headers=keys["admin"])
    assert r.status_code == 409  # compare-and-set lost: revision 1 now
    audit = client.get("/v1/prompts/listing-moderation/audit", headers=keys["author"]).json()["entries"]
    entry = [e for e in audit if e["action"] == "gate_policy"][-1]
    assert entry["actor"] == "gatekeeper" and "r1 (policy " in entry["note"]
    assert entry["note"].endswith("| the 20-item set is what we have for the new market")

    # now the registry's policy (adopted on purpose) judges, and the move names it
    r = client.put(url, json={"version": 2, "note": "new market"}, headers=keys["lead"])
    assert r.status_code == 200, r.text
    assert r.json()["gate"]["policy"]["source"] == "registry"
    note = client.get("/v1/prompts/listing-moderation/audit", headers=keys["author"]).json()["entries"][-1]["note"]
    assert note == (f"new market | gate passed on dataset 111111111111 (1 checks) [policy: registry gate "
                    f"policy r1 (policy {done['after']['sha256'][:12]})]")


def test_publishing_a_model_the_serving_layer_does_not_serve(tmp_path: Path) -> None:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("author", ["prompts:publish"], created_by="test")
    store.put_key(record)
    data = yaml.safe_load(PROMPT.read_text())
    data["model"] = "qwen-does-not-exist"
    with TestClient(create_app(GatewaySettings(), store, FakeBackend(), models=["tiny-llama"])) as client:
        r = client.post("/v1/prompts", content=yaml.safe_dump(data, allow_unicode=True),
                        headers={"authorization": f"Bearer {key}", "content-type": "application/yaml"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "unknown_model"
    assert r.json()["error"]["message"] == (
        "listing-moderation names model 'qwen-does-not-exist', which the serving layer does not "
        "serve (served: tiny-llama)")
    assert store.versions("listing-moderation") == [1]
    store.close()


def test_no_label_move_points_at_a_version_whose_model_is_not_served(tmp_path: Path) -> None:
    """Any label is reachable by callers (a `moderate:pin` key pins it), so every move that
    points one at a version, not only production's, checks that its model is served: a move
    and a rollback to a version stored before its model left the configuration are refused
    (422 `unknown_model`, naming the model) and change nothing; so is a rollout with it as
    canary (its callers) or shadow."""
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("author", ["prompts:read", "labels:write", "labels:protected"],
                               created_by="test")
    store.put_key(record)
    headers = {"authorization": f"Bearer {key}"}
    spec = store.resolve("listing-moderation", "production").spec
    store.publish(spec.model_copy(update={"model": "qwen-gone"}), actor="test")  # when it was served
    store.set_label("listing-moderation", "staging", 2, actor="test")
    store.set_label("listing-moderation", "staging", 1, expected=2, actor="test")
    unserved = ("listing-moderation v2 names model 'qwen-gone', which the serving layer does not "
                "serve (served: tiny-llama)")
    with TestClient(create_app(GatewaySettings(), store, FakeBackend(), models=["tiny-llama"])) as client:
        url = "/v1/prompts/listing-moderation/labels"
        rollout = "/v1/prompts/listing-moderation/rollout"
        for r in (client.put(f"{url}/canary", json={"version": 2}, headers=headers),
                  client.post(f"{url}/staging/rollback", json={"note": "incident"}, headers=headers),
                  client.post(rollout, json={"canary_version": 2, "auto": False}, headers=headers),
                  client.post(rollout, json={"shadows": [{"version": 2, "sample_rate": 1.0}]}, headers=headers)):
            assert r.status_code == 422, r.text
            assert r.json()["error"]["type"] == "unknown_model"
            assert r.json()["error"]["message"] == unserved
        assert store.labels("listing-moderation") == {"production": 1, "staging": 1}
        assert store.get_rollout("listing-moderation") is None
        r = client.put(f"{url}/canary", json={"version": 1}, headers=headers)  # a served one moves
        assert r.status_code == 200, r.text
    store.close()


def test_scorecard_upload_is_checked_stored_and_audited_under_the_key(
        env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    """What `modgate eval run --url` posts: stored (the gate reads it), `created_by` the key,
    refused without prompts:publish, for another prompt than the path's, or for other content."""
    from tests.scorecards import make_record

    client, keys, store = env
    v1 = store.get_version("listing-moderation", 1)
    record = make_record("listing-moderation", 1, v1.content_hash).model_dump(mode="json")
    url = "/v1/prompts/listing-moderation/scorecards"
    r = client.post(url, json=record, headers=keys["lead"])
    assert r.status_code == 403
    assert r.json()["error"]["message"] == "API key 'lead' lacks the 'prompts:publish' (or 'admin') scope"
    r = client.post(url, json=record, headers=keys["author"])
    assert r.status_code == 200 and r.json() == {"name": "listing-moderation", "version": 1,
                                                 "dataset_sha256": SAMPLE_SHA, "replaced": False}
    assert client.post(url, json=record, headers=keys["author"]).json()["replaced"] is True
    (stored,) = store.list_scorecards("listing-moderation", 1)
    assert stored.created_by == "author" and store.audit("listing-moderation")[-1].actor == "author"
    other = client.post("/v1/prompts/other/scorecards", json=record, headers=keys["author"])
    assert other.status_code == 422 and other.json()["error"]["type"] == "invalid_request"
    forged = client.post(url, json={**record, "version_hash": "0" * 64}, headers=keys["author"])
    assert forged.status_code == 422 and forged.json()["error"]["type"] == "scorecard_mismatch"
    assert "was computed for content 000000000000" in forged.json()["error"]["message"]


def test_api_keys_are_managed_with_the_admin_scope_only(
        env: tuple[TestClient, dict, SqlitePromptStore]) -> None:
    client, keys, store = env
    r = client.post("/v1/keys", json={"name": "pipeline", "scopes": ["moderate"]}, headers=keys["lead"])
    assert r.status_code == 403
    assert r.json()["error"]["message"] == ("API key 'lead' lacks the 'admin' scope needed for "
                                            "creating API keys")
    made = client.post("/v1/keys", json={"name": "pipeline", "scopes": ["moderate"]}, headers=keys["admin"])
    assert made.status_code == 201
    new = made.json()
    assert store.get_key(new["key_id"]).created_by == "admin"  # type: ignore[union-attr]
    listed = client.get("/v1/keys", headers=keys["admin"]).json()["keys"]
    assert {k["name"] for k in listed} == {"caller", "author", "lead", "admin", "pipeline"}
    assert all("secret_sha256" not in k for k in listed)
    bad = client.post("/v1/keys", json={"name": "x", "scopes": ["root"]}, headers=keys["admin"])
    assert bad.status_code == 422
    assert client.post("/v1/keys/000000000000/revoke", headers=keys["admin"]).status_code == 404
    r = client.post(f"/v1/keys/{new['key_id']}/revoke", headers=keys["admin"])
    assert r.json() == {"key_id": new["key_id"], "name": "pipeline", "revoked": True}
    assert store.get_key(new["key_id"]).revoked  # type: ignore[union-attr]
