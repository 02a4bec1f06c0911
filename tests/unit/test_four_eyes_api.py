"""Issue 16, item 9 on the admin API: four eyes with two keys (request, approve, deny, a key
approving its own request), and a rollout promotion held awaiting approval, then completed by
the approval."""

from __future__ import annotations

from fastapi.testclient import TestClient

from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from tests.scorecards import store_scorecard
from tests.unit.test_admin_api import env  # noqa: F401  (the fixture)

NAME = "listing-moderation"
BASE = f"/v1/prompts/{NAME}"


def _second_lead(client: TestClient, store: SqlitePromptStore) -> dict[str, str]:
    key, record = generate_key("lead2", ["prompts:read", "labels:write", "labels:protected"],
                               created_by="test")
    store.put_key(record)
    return {"authorization": f"Bearer {key}"}


def _v2(store: SqlitePromptStore) -> int:
    spec = store.get_version(NAME, 1).spec
    v2 = store.publish(spec.model_copy(update={"description": "v2"}), actor="t").version.version
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    return v2


def test_four_eyes_with_two_keys(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:  # noqa: F811
    client, keys, store = env
    lead2 = _second_lead(client, store)
    v2 = _v2(store)
    r = client.put(f"{BASE}/four-eyes", json={"enabled": True, "reason": "SOX"}, headers=keys["lead"])
    assert r.status_code == 403
    r = client.put(f"{BASE}/four-eyes", json={"enabled": True, "reason": "SOX", "expiry_hours": 8},
                   headers=keys["admin"])
    assert r.status_code == 200 and r.json()["four_eyes"] is True and r.json()["expiry_s"] == 8 * 3600

    r = client.put(f"{BASE}/labels/production", json={"version": v2, "note": "ship"}, headers=keys["lead"])
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "approval_required" and body["type"] == "approval_required"
    assert r.headers["location"] == f"{BASE}/approvals"
    approval = body["approval"]
    assert (approval["requested_by"], approval["version"], approval["expected"], approval["state"]) == (
        "lead", v2, 1, "pending")
    assert store.labels(NAME)["production"] == 1

    listed = client.get(f"{BASE}/approvals", headers=keys["author"]).json()
    assert listed["four_eyes"] is True and [a["id"] for a in listed["requests"]] == [approval["id"]]
    url = f"{BASE}/approvals/{approval['id']}"
    r = client.post(f"{url}/approve", headers=keys["lead"])
    assert r.status_code == 403 and "second key holder" in r.json()["error"]["message"]
    r = client.post(f"{url}/approve", headers=keys["author"])  # no labels:protected
    assert r.status_code == 403
    r = client.post(f"{url}/approve", json={"note": "checked"}, headers=lead2)
    assert r.status_code == 200, r.text
    assert r.json()["approval"]["state"] == "approved" and r.json()["approval"]["decided_by"] == "lead2"
    assert r.json()["gate"]["verdict"] == "pass" and r.json()["from_version"] == 1
    assert store.labels(NAME)["production"] == v2
    r = client.post(f"{url}/deny", headers=lead2)
    assert r.status_code == 409
    r = client.post(f"{BASE}/approvals/0123456789ab/approve", headers=lead2)
    assert r.status_code == 404
    r = client.post(f"{url}/bogus", headers=lead2)
    assert r.status_code == 422

    # deny: nothing moves
    r = client.put(f"{BASE}/labels/production", json={"version": 1}, headers=lead2)
    assert r.status_code == 202
    r = client.post(f"{BASE}/approvals/{r.json()['approval']['id']}/deny",
                    json={"note": "not now"}, headers=keys["lead"])
    assert r.status_code == 200 and r.json()["approval"]["state"] == "denied"
    assert store.labels(NAME)["production"] == v2
    audit = [e["action"] for e in client.get(f"{BASE}/audit", headers=keys["author"]).json()["entries"]]
    assert audit[-6:] == ["four_eyes", "approval_requested", "approval_approved", "label",
                          "approval_requested", "approval_denied"]


def test_a_rollout_promotion_waits_for_approval(env: tuple[TestClient, dict, SqlitePromptStore]) -> None:  # noqa: F811
    client, keys, store = env
    lead2 = _second_lead(client, store)
    v2 = _v2(store)
    client.put(f"{BASE}/four-eyes", json={"enabled": True, "reason": "SOX"}, headers=keys["admin"])
    r = client.post(f"{BASE}/rollout", json={"canary_version": v2, "steps": [10, 100], "auto": False},
                    headers=keys["lead"])
    assert r.status_code == 201, r.text
    r = client.post(f"{BASE}/rollout/promote", json={"note": "go"}, headers=keys["lead"])
    assert r.status_code == 200, r.text
    rollout = r.json()["rollout"]
    assert rollout["state"] == "paused" and rollout["last_decision"].startswith("awaiting approval ")
    request_id = rollout["last_decision"].split()[2].rstrip(":")
    assert r.json()["weight"] == 10, "held at its step"
    assert store.labels(NAME)["production"] == 1
    r = client.post(f"{BASE}/approvals/{request_id}/approve", headers=lead2)
    assert r.status_code == 200, r.text
    assert r.json()["rollout"]["state"] == "promoted"
    assert store.labels(NAME)["production"] == v2
    status = client.get(f"{BASE}/rollout", headers=keys["author"]).json()
    assert status["rollout"]["state"] == "promoted"
