"""The console's governance pages (#17): publish, label moves, rollouts, evaluation and
decisions. Each write is tried without the CSRF token and with a key lacking the scope, and
each answer is compared with what the admin API (the same service code) answers."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.api.console.routes import CONSOLE_WRITES
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog, DecisionRecord
from gateway.verdict import Verdict
from prompt_registry.keys import generate_key
from prompt_registry.ops import spec_as_yaml
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from tests.scorecards import store_scorecard

NAME = "listing-moderation"


class Keys:
    """Console users and their scopes; `api[name]` is the same key as admin-API headers."""

    SCOPES = {"reader": ["prompts:read"],
              "author": ["prompts:read", "prompts:publish", "labels:write"],
              "lead": ["prompts:read", "labels:write", "labels:protected"],
              "admin": ["admin"]}

    def __init__(self, store: SqlitePromptStore) -> None:
        self.key: dict[str, str] = {}
        for name, scopes in self.SCOPES.items():
            key, record = generate_key(name, scopes, created_by="test")
            store.put_key(record)
            self.key[name] = key

    def api(self, name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key[name]}"}


@pytest.fixture
def keys(store: SqlitePromptStore) -> Keys:
    return Keys(store)


@pytest.fixture
def decision_log(tmp_path: Path) -> DecisionLog:
    return DecisionLog(tmp_path / "decisions", replica="r1", fsync=False)


@pytest.fixture
def app(store: SqlitePromptStore, backend: FakeBackend, decision_log: DecisionLog) -> FastAPI:
    settings = GatewaySettings(key_cache_s=0, readiness_cache_s=0, rollout_controller=False)
    return create_app(settings, store, backend, models=["tiny-llama"], decision_log=decision_log)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def sign_in(client: TestClient, key: str) -> dict[str, str]:
    """Sign in as *key*; the CSRF header for writes."""
    r = client.post("/console/api/session", json={"key": key})
    assert r.status_code == 200, r.text
    return {"x-csrf-token": r.json()["csrf"]}


def publish_v2(store: SqlitePromptStore, note: str = "v2") -> int:
    spec = store.get_version(NAME, 1).spec
    return store.publish(spec.model_copy(update={"description": note}), actor="t").version.version


def draft_yaml(store: SqlitePromptStore, extra: str = "Draft rule.") -> str:
    version = store.resolve(NAME, "production")
    spec = version.spec
    draft = spec.model_copy(update={"messages": [
        spec.messages[0].model_copy(update={"content": spec.messages[0].content + f"\n{extra}\n"}),
        *spec.messages[1:]]})
    return spec_as_yaml(version.model_copy(update={"spec": draft}))


def strip_times(data: Any) -> Any:
    """A status view without the fields that are computed from "now"."""
    if isinstance(data, dict):
        return {k: strip_times(v) for k, v in data.items() if k not in ("next_step_not_before", "httpStatus")}
    if isinstance(data, list):
        return [strip_times(v) for v in data]
    return data


# -- every write: CSRF and scopes ---------------------------------------------------------------

def test_every_operation_write_needs_csrf_and_the_admin_apis_scope(client: TestClient, keys: Keys,
                                                                    store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    writes = {
        "/console/api/publish": ({"prompt": draft_yaml(store)}, "reader", "prompts:publish"),
        "/console/api/label": ({"prompt": NAME, "label": "staging", "version": v2}, "reader", "labels:write"),
        "/console/api/rollout/start": ({"prompt": NAME, "canary_version": v2}, "author", "labels:protected"),
        "/console/api/rollout/action": ({"prompt": NAME, "action": "abort"}, "author", "labels:protected"),
    }
    assert set(writes) | {"/console/api/session", "/console/api/signout", "/console/api/playground",
                          "/console/api/feedback"} >= CONSOLE_WRITES  # every write is tried here
    csrf = sign_in(client, keys.key["admin"])
    for path, (body, _, _) in writes.items():
        assert client.post(path, json=body).status_code == 403, path
        r = client.post(path, json=body, headers={"x-csrf-token": "wrong"})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"], path
        r = client.post(path, json=body, headers={**csrf, "origin": "http://evil.example"})
        assert r.status_code == 403, path
    for path, (body, who, scope) in writes.items():
        csrf = sign_in(client, keys.key[who])
        r = client.post(path, json=body, headers=csrf)
        assert r.status_code == 403 and scope in r.json()["error"]["message"], (path, r.text)
    # the production label needs labels:protected besides labels:write, as on the admin API
    csrf = sign_in(client, keys.key["author"])
    r = client.post("/console/api/label", headers=csrf,
                    json={"prompt": NAME, "label": "production", "version": v2})
    assert r.status_code == 403 and "labels:protected" in r.json()["error"]["message"]
    # an override needs admin
    csrf = sign_in(client, keys.key["lead"])
    r = client.post("/console/api/label", headers=csrf, json={
        "prompt": NAME, "label": "production", "version": v2, "override": {"reason": "trust me"}})
    assert r.status_code == 403 and "'admin'" in r.json()["error"]["message"]
    assert store.versions(NAME) == [1, v2] and store.get_rollout(NAME) is None
    assert "staging" not in store.labels(NAME) and store.labels(NAME)["production"] == 1
    # bodies are checked like the API's: unknown fields, bad names
    r = client.post("/console/api/label", headers=csrf, json={"prompt": NAME, "label": "x", "version": 1, "nope": 1})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["problem"] == "unknown field"
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": "../etc", "action": "abort"})
    assert r.status_code == 422


def test_reads_need_prompts_read(client: TestClient, store: SqlitePromptStore) -> None:
    key, record = generate_key("reviewer", ["feedback"], created_by="test")
    store.put_key(record)
    sign_in(client, key)
    for path in (f"/console/api/rollouts/{NAME}", f"/console/api/evaluation/{NAME}",
                 "/console/api/decisions", "/console/api/decisions.csv"):
        r = client.get(path)
        assert r.status_code == 403 and "prompts:read" in r.json()["error"]["message"], path
    client.cookies.clear()
    assert client.get(f"/console/api/rollouts/{NAME}").status_code == 401


# -- publish and label moves ----------------------------------------------------------------------

def test_publish_is_the_admin_apis_publish(client: TestClient, keys: Keys, store: SqlitePromptStore) -> None:
    csrf = sign_in(client, keys.key["author"])
    text = draft_yaml(store)
    r = client.post("/console/api/publish", headers=csrf, json={"prompt": text, "note": "from the playground"})
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["created"] is True
    v2 = store.get_version(NAME, 2)
    assert v2.created_by == "author" and v2.content_hash == r.json()["content_hash"]
    assert store.audit(NAME)[-1].note == "from the playground"
    again = client.post("/console/api/publish", headers=csrf, json={"prompt": text})
    assert again.status_code == 200 and again.json() == {**r.json(), "created": False}
    # the same text through the admin API: the same version
    api = client.post("/v1/prompts", content=text, headers={**keys.api("author"), "content-type": "application/yaml"})
    assert api.status_code == 200 and api.json()["version"] == 2
    r = client.post("/console/api/publish", headers=csrf,
                    json={"prompt": text.replace("model: tiny-llama", "model: gpt-x")})
    assert r.status_code == 422 and r.json()["error"]["type"] == "unknown_model"
    r = client.post("/console/api/publish", headers=csrf, json={"prompt": "name: [x"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_prompt"
    assert store.versions(NAME) == [1, 2]


def test_label_moves_go_through_the_gate_with_reasons_and_audited_refusals(
        client: TestClient, keys: Keys, store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2, counts={"counterfeit": (20, 6, 7)})
    csrf = sign_in(client, keys.key["lead"])
    r = client.post("/console/api/label", headers=csrf, json={"prompt": NAME, "label": "production", "version": v2})
    assert r.status_code == 409 and r.json()["error"]["type"] == "promotion_gate_failed"
    message = r.json()["error"]["message"]
    assert "counterfeit precision lower bound 0.579 < 0.750" in message
    assert "policy in force: production v1's evaluation block" in message
    # the admin API refuses the same move with the same words
    api = client.put(f"/v1/prompts/{NAME}/labels/production", json={"version": v2}, headers=keys.api("lead"))
    assert api.status_code == 409 and api.json()["error"]["message"] == message
    refusals = [e for e in store.audit(NAME) if e.action == "gate_refused"]
    assert [e.actor for e in refusals] == ["lead", "lead"]
    assert store.labels(NAME)["production"] == 1
    # other labels: no gate
    r = client.post("/console/api/label", headers=csrf, json={"prompt": NAME, "label": "staging", "version": v2,
                                                              "note": "try it"})
    assert r.status_code == 200 and r.json()["status"] == "moved" and r.json()["gate"] is None
    assert store.labels(NAME)["staging"] == v2
    # compare-and-set, as the API
    r = client.post("/console/api/label", headers=csrf, json={"prompt": NAME, "label": "staging", "version": 1,
                                                              "expected_version": 1})
    assert r.status_code == 409
    # an admin override moves it, recorded with its reason
    csrf = sign_in(client, keys.key["admin"])
    r = client.post("/console/api/label", headers=csrf, json={
        "prompt": NAME, "label": "production", "version": v2, "override": {"reason": "court order"}})
    assert r.status_code == 200 and r.json()["gate"]["verdict"] == "fail"
    assert store.labels(NAME)["production"] == v2
    assert "court order" in store.audit(NAME)[-1].note


def test_four_eyes_holds_a_console_move_for_a_second_key(client: TestClient, keys: Keys,
                                                         store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    r = client.put(f"/v1/prompts/{NAME}/four-eyes", json={"enabled": True, "reason": "SOX"},
                   headers=keys.api("admin"))
    assert r.status_code == 200
    csrf = sign_in(client, keys.key["lead"])
    r = client.post("/console/api/label", headers=csrf, json={"prompt": NAME, "label": "production", "version": v2})
    assert r.status_code == 202 and r.json()["status"] == "approval_required"
    assert r.json()["approval"]["requested_by"] == "lead" and store.labels(NAME)["production"] == 1


# -- rollouts -------------------------------------------------------------------------------------

def test_rollouts_start_act_and_show_what_the_admin_api_shows(app: FastAPI, client: TestClient, keys: Keys,
                                                               store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    csrf = sign_in(client, keys.key["lead"])
    page = client.get(f"/console/api/rollouts/{NAME}").json()
    assert page["status"] is None and page["history"] == [] and page["versions"] == [1, v2]
    body = {"prompt": NAME, "canary_version": v2, "steps": [10, 50], "auto": False,
            "shadows": [{"version": v2, "sample_rate": 1.0}]}
    # v2 has no scorecard: refused as the API refuses it, with the gate's reasons
    r = client.post("/console/api/rollout/start", headers=csrf, json=body)
    assert r.status_code == 409 and "no stored scorecard of v2" in r.json()["error"]["message"]
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2)
    r = client.post("/console/api/rollout/start", headers=csrf, json=body)
    assert r.status_code == 201, r.text
    rollout = store.get_rollout(NAME)
    assert rollout is not None and rollout.weight == 10 and rollout.started_by == "lead"
    assert [s.version for s in rollout.shadows] == [v2]

    # evidence: shadow comparisons through the recorder the gateway uses
    recorder = app.state.gateway.recorder
    allow, block = Verdict("allow", "none", 0.9), Verdict("block", "counterfeit", 0.8)
    for i in range(4):
        recorder.pair(rollout.id, v2, allow, block if i == 0 else allow, request_id=f"req-{i}",
                      item_id=f"item-{i}", stable_version=1)
    client.portal.call(recorder.flush)  # type: ignore[union-attr]

    page = client.get(f"/console/api/rollouts/{NAME}").json()
    api = client.get(f"/v1/prompts/{NAME}/rollout", headers=keys.api("reader")).json()
    assert page["status"].pop("flips_content") == "off"  # no sample store on this gateway
    assert strip_times(page["status"]) == strip_times(api)  # the same view: the same code
    pair = page["status"]["stats"]["pairs"][str(v2)]
    assert (pair["n"], pair["agree"], pair["agreement"]) == (4, 3, 0.75)
    assert [f["item_id"] for f in page["status"]["flips"]] == ["item-0"]
    gates = {g["gate"]: g for g in page["status"]["gates"]}
    assert {"error_rate", "disagreement_rate"} <= set(gates)
    assert gates["disagreement_rate"]["samples"] == 4 and gates["disagreement_rate"]["more"] > 0
    assert all("more" in g and "interval" in g for g in gates.values())

    for action, state, weight in (("step", "running", 50), ("pause", "paused", 50), ("resume", "running", 50)):
        r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": action,
                                                                           "note": f"{action} from the console"})
        assert r.status_code == 200, r.text
        assert (r.json()["rollout"]["state"], r.json()["weight"]) == (state, weight)
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": "resume"})
    assert r.status_code == 409 and "not paused" in r.json()["error"]["message"]
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": "promote"})
    assert r.status_code == 200 and r.json()["rollout"]["state"] == "promoted"
    assert store.labels(NAME)["production"] == v2
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": "abort"})
    assert r.status_code == 409 and "already promoted" in r.json()["error"]["message"]

    page = client.get(f"/console/api/rollouts/{NAME}").json()
    api_history = client.get(f"/v1/prompts/{NAME}/rollouts", headers=keys.api("reader")).json()["rollouts"]
    assert page["history"] == api_history and page["history"][0]["state"] == "promoted"
    detail = client.get(f"/console/api/rollouts/{NAME}/{rollout.id}").json()
    assert [t["action"] for t in detail["transitions"]] == ["start", "step", "pause", "resume", "promote"]
    notes = [e["note"] for e in client.get(f"/console/api/prompts/{NAME}/audit").json()["entries"]
             if e["action"] == "rollout"]  # each transition's why, as `prompts audit` words it
    assert notes[0].startswith("start: canary v2 at 10%, shadows v2@100%")
    assert notes[-1] == "promotion gate: pass"  # the promotion's why is the gate's verdict
    assert notes[1] == "step from the console"
    assert client.get(f"/console/api/rollouts/{NAME}/no such id").status_code == 404
    assert client.get("/console/api/rollouts/nope").status_code == 404


def test_a_shadow_only_rollout_and_abort(client: TestClient, keys: Keys, store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    csrf = sign_in(client, keys.key["lead"])
    r = client.post("/console/api/rollout/start", headers=csrf,
                    json={"prompt": NAME, "shadows": [{"version": v2, "sample_rate": 0.5}]})
    assert r.status_code == 201 and r.json()["rollout"]["canary_version"] is None
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": "step"})
    assert r.status_code == 409 and "shadow-only" in r.json()["error"]["message"]
    r = client.post("/console/api/rollout/action", headers=csrf, json={"prompt": NAME, "action": "abort"})
    assert r.status_code == 200 and r.json()["rollout"]["state"] == "aborted"
    assert store.labels(NAME)["production"] == 1


# -- evaluation -----------------------------------------------------------------------------------

def test_evaluation_shows_scorecards_and_each_versions_gate_with_its_policy(
        client: TestClient, keys: Keys, store: SqlitePromptStore) -> None:
    v2 = publish_v2(store)
    sign_in(client, keys.key["reader"])
    empty = client.get(f"/console/api/evaluation/{NAME}").json()
    assert empty["scorecards"] == [] and empty["gates"][str(v2)]["verdict"] == "fail"
    store_scorecard(store, NAME, 1)
    store_scorecard(store, NAME, v2, counts={"counterfeit": (20, 6, 7)})
    data = client.get(f"/console/api/evaluation/{NAME}").json()
    api = client.get(f"/v1/prompts/{NAME}/scorecards", headers=keys.api("reader")).json()["scorecards"]
    assert data["scorecards"] == api
    card = next(c for c in data["scorecards"] if c["version"] == v2)
    cf = card["categories"]["counterfeit"]
    assert (cf["tp"], cf["fp"], cf["fn"]) == (20, 6, 7)
    assert cf["precision_ci"][0] < cf["precision"] < cf["precision_ci"][1]
    gate = data["gates"][str(v2)]
    api_gate = client.get(f"/v1/prompts/{NAME}/versions/{v2}/gate", headers=keys.api("reader")).json()
    assert gate == api_gate and gate["verdict"] == "fail"
    assert gate["policy"]["source"] == "production" and "evaluation block" in gate["policy"]["description"]
    assert data["gates"]["1"]["verdict"] == "pass"
    assert data["policy"]["in_force"]["source"] == "production"
    prompts = client.get("/console/api/prompts").json()["prompts"]
    headline = next(p for p in prompts if p["name"] == NAME)["scorecard"]
    assert headline["version"] == v2 and headline["items"] == 194
    assert client.get("/console/api/evaluation/nope").status_code == 404


# -- decisions ------------------------------------------------------------------------------------

def _record(i: int, ts: datetime, **kw: Any) -> DecisionRecord:
    fields: dict[str, Any] = {
        "ts": ts, "request_id": f"req-{i}", "item_id": f"item-{i}", "subject": f"seller-{i % 3}",
        "prompt_name": NAME, "prompt_version": 1, "label": "production", "arm": "stable",
        "decision": "allow", "category": "none", "confidence": 0.9, "model": "tiny-llama",
        "latency_ms": 12.5, "prompt_tokens": 100, "completion_tokens": 9, "locale": "en-US",
        "front_door": "moderate", "caller": "svc"}
    fields.update(kw)
    return DecisionRecord(**fields)


def _write_log(client: TestClient, log: DecisionLog) -> list[DecisionRecord]:
    now = datetime.now(UTC)
    records = [
        _record(0, now - timedelta(hours=30)),  # outside the default 24 h
        _record(1, now - timedelta(hours=2)),
        _record(2, now - timedelta(hours=2), decision="block", category="counterfeit", locale="zh-CN"),
        _record(3, now - timedelta(hours=1), decision="block", category="counterfeit", locale="zh-CN",
                arm="canary", prompt_version=2, caller="卖家审核"),
        _record(4, now - timedelta(minutes=30), decision=None, category=None, confidence=None,
                error_type="model_timeout"),
        _record(5, now - timedelta(minutes=10), decision="needs_review", category="adult"),
        _record(6, now - timedelta(minutes=10), arm="shadow", shadow_of="req-5", prompt_version=2,
                decision="block", category="adult", label=None, front_door=None),
    ]

    async def write() -> None:
        for r in records:
            log.append(r)
        await log.flush()
    client.portal.call(write)  # type: ignore[union-attr]
    return records


def test_decisions_are_filtered_counted_and_downloaded_with_a_bom(client: TestClient, keys: Keys,
                                                                  decision_log: DecisionLog) -> None:
    records = _write_log(client, decision_log)
    sign_in(client, keys.key["reader"])
    d = client.get("/console/api/decisions").json()
    assert d["total"] == {"n": 5, "verdicts": 4, "flagged": 3, "errors": 1, "flag_rate": 0.75}
    assert d["shadows"] == 1  # a shadow's verdict reached no caller: its own row, not the totals
    shadow = client.get("/console/api/decisions?arm=shadow").json()
    assert shadow["total"]["n"] == 1 and shadow["latest"][0]["request_id"] == "req-6"
    assert d["decisions"] == {"allow": 1, "block": 2, "needs_review": 1}
    assert d["categories"] == {"counterfeit": 2, "adult": 1}
    assert [r["request_id"] for r in d["latest"]] == ["req-5", "req-4", "req-3", "req-2", "req-1"]
    canary = [g for g in d["groups"] if g["arm"] == "canary"]
    assert canary == [{"prompt": NAME, "version": 2, "arm": "canary", "locale": "zh-CN", "n": 1,
                       "verdicts": 1, "flagged": 1, "errors": 0, "flag_rate": 1.0}]
    assert client.get("/console/api/decisions?locale=zh-CN").json()["total"]["n"] == 2
    assert client.get("/console/api/decisions?arm=canary&version=2").json()["total"]["n"] == 1
    assert client.get("/console/api/decisions?category=counterfeit").json()["total"]["flagged"] == 2
    since = (datetime.now(UTC) - timedelta(hours=48)).isoformat()
    assert client.get("/console/api/decisions", params={"since": since}).json()["total"]["n"] == 6
    for bad in ({"since": "yesterday"}, {"version": "x"}, {"arm": "a b"}, {"since": "2020-01-01T00:00:00Z"},
                {"since": datetime.now(UTC).isoformat(), "until": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}):
        r = client.get("/console/api/decisions", params=bad)
        assert r.status_code == 422, bad

    r = client.get("/console/api/decisions.csv", params={"since": since})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    assert r.content.startswith("\ufeff".encode())
    rows = list(csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert [row["request_id"] for row in rows] == [rec.request_id for rec in records]
    assert rows[3]["caller"] == "卖家审核" and rows[4]["decision"] == "" and rows[4]["error_type"] == "model_timeout"
    assert list(rows[0]) == list(DecisionRecord.model_fields)
    # the offline export (modgate decisions export --format csv) writes the same cells
    pytest.importorskip("pyarrow")
    from gateway.quality.decisions import export

    out = decision_log.root.parent / "export.csv"
    export(decision_log.root, out, "csv")
    offline = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))

    def norm(row: dict[str, str]) -> dict[str, str]:
        return {k: (repr(float(v)) if k in ("confidence", "latency_ms") and v else v) for k, v in row.items()}
    assert [norm(row) for row in rows] == [norm(row) for row in offline]


def test_decisions_without_a_log(store: SqlitePromptStore, backend: FakeBackend, keys: Keys) -> None:
    app = create_app(GatewaySettings(key_cache_s=0), store, backend)
    with TestClient(app, raise_server_exceptions=False) as c:
        sign_in(c, keys.key["reader"])
        r = c.get("/console/api/decisions")
        assert r.status_code == 404 and "decision log is switched off" in r.json()["error"]["message"]


def test_the_decision_reader_moved_to_the_core_and_stays_shared() -> None:
    import gateway.decision_reader as core
    import gateway.quality.decisions as offline

    assert offline.read_segments is core.read_segments and offline.ReadStats is core.ReadStats
    assert offline.tail is core.tail
    assert asyncio.iscoroutinefunction(DecisionLog.flush)


# -- listing content of flipped items ----------------------------------------------------------

def test_flipped_items_show_listing_content_only_to_a_key_with_samples_read(
        store: SqlitePromptStore, backend: FakeBackend, tmp_path: Path) -> None:
    from gateway.samples import SampleRecorder, SampleSettings, SqliteSampleStore

    samples = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"), SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(key_cache_s=0, rollout_controller=False), store, backend,
                     models=["tiny-llama"], samples=samples)
    made = {}
    for name, scopes in {"svc": ["moderate"], "lead": ["prompts:read", "labels:write", "labels:protected"],
                         "content": ["prompts:read", "samples:read"]}.items():
        key, record = generate_key(name, scopes, created_by="test")  # type: ignore[arg-type]
        store.put_key(record)
        made[name] = key
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/moderate", headers={"authorization": f"Bearer {made['svc']}"},
                        json={"item_id": "item-7", "title": "名牌包 1:1 复刻", "description": "微信联系",
                              "locale": "zh-CN"})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        client.portal.call(samples.flush)  # type: ignore[union-attr]
        v2 = publish_v2(store)
        csrf = sign_in(client, made["lead"])
        r = client.post("/console/api/rollout/start", headers=csrf,
                        json={"prompt": NAME, "shadows": [{"version": v2, "sample_rate": 1.0}]})
        assert r.status_code == 201, r.text
        rollout = store.get_rollout(NAME)
        assert rollout is not None
        recorder = app.state.gateway.recorder
        recorder.pair(rollout.id, v2, Verdict("allow", "none", 0.9), Verdict("block", "counterfeit", 0.8),
                      request_id=rid, item_id="item-7", stable_version=1)
        client.portal.call(recorder.flush)  # type: ignore[union-attr]

        status = client.get(f"/console/api/rollouts/{NAME}").json()["status"]  # lead: no samples:read
        assert status["flips_content"] == "no_scope" and "content" not in status["flips"][0]
        sign_in(client, made["content"])
        status = client.get(f"/console/api/rollouts/{NAME}").json()["status"]
        assert status["flips_content"] == "shown"
        assert status["flips"][0]["content"] == {"title": "名牌包 1:1 复刻", "description": "微信联系"}
        # the same join as GET /v1/review/flips
        api = client.get("/v1/review/flips", params={"prompt": NAME},
                         headers={"authorization": f"Bearer {made['content']}"}).json()
        assert status["flips"] == api["flips"]
