"""The review queue (`GET /v1/review/queue`, `/console/queue`): a stratified sample of recent
decisions with their listing content, `allow` included; labels through the one feedback path;
each reviewer's agreement with the model and with the other reviewers; the console's session,
CSRF and scope rules on every write."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.api.review import read_labels
from gateway.config import GatewaySettings
from gateway.feedback import FeedbackLog
from gateway.samples import SampleRecorder, SampleSettings, SqliteSampleStore
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import ChatRequest
from serving.fake_backend import FakeBackend


def responder(req: ChatRequest) -> str:
    """Block listings that say "replica" (counterfeit) or "pills" (prohibited_item)."""
    text = " ".join(m["content"] for m in req.messages if m["role"] == "user")
    if "replica" in text:
        return '{"decision":"block","category":"counterfeit","confidence":0.9}'
    if "pills" in text:
        return '{"decision":"block","category":"prohibited_item","confidence":0.8}'
    return '{"decision":"allow","category":"none","confidence":0.95}'


EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
TITLES = ([f"oak table {i}" for i in range(8)] + [f"replica watch {i}" for i in range(4)]
          + [f"diet pills {i}" for i in range(2)])


class Stack:
    def __init__(self, client: TestClient, recorder: SampleRecorder, keys: dict[str, str],
                 feedback: Path) -> None:
        self.client, self.recorder, self.keys, self.feedback = client, recorder, keys, feedback
        self.request_ids: dict[str, str] = {}

    def h(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[who]}"}


@pytest.fixture
def stack(store: SqlitePromptStore, tmp_path: Path) -> Iterator[Stack]:
    keys = {}
    for name, scopes in {"svc": ["moderate"], "ann": ["feedback", "samples:read"],
                         "bob": ["feedback", "samples:read"], "fb-only": ["feedback"],
                         "reader": ["samples:read"]}.items():
        key, record = generate_key(name, scopes, created_by="test")  # type: ignore[arg-type]
        store.put_key(record)
        keys[name] = key
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"),
                              SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(key_cache_s=0, rollout_controller=False), store,
                     FakeBackend(responder=responder), models=["tiny-llama"],
                     feedback_log=FeedbackLog(tmp_path / "feedback"), samples=recorder)
    with TestClient(app, raise_server_exceptions=False) as client:
        s = Stack(client, recorder, keys, tmp_path / "feedback")
        for i, title in enumerate(TITLES):
            r = client.post("/v1/moderate", headers=s.h("svc"),
                            json={"item_id": f"item-{i}", "title": title, "description": f"about {title}",
                                  "locale": "zh-CN" if i % 2 else "en-US"})
            assert r.status_code == 200, r.text
            s.request_ids[title] = r.json()["request_id"]
        client.portal.call(recorder.flush)
        yield s


def test_the_queue_is_stratified_allow_included_with_content(stack: Stack) -> None:
    r = stack.client.get("/v1/review/queue?n=6", headers=stack.h("ann"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["population"] == {"allow": 8, "block:counterfeit": 4, "block:prohibited_item": 2}
    strata = [item["stratum"] for item in body["items"]]
    assert sorted(strata) == ["allow", "allow", "block:counterfeit", "block:counterfeit",
                              "block:prohibited_item", "block:prohibited_item"]
    for item in body["items"]:
        assert item["content"]["title"] in TITLES
        assert item["content"]["description"] == f"about {item['content']['title']}"
        assert item["stratum_size"] == body["population"][item["stratum"]]
    schema = body["schemas"]["listing-moderation@1"]
    assert "allow" in schema["decisions"] and "needs_review" not in schema["decisions"]
    assert "counterfeit" in schema["categories"]
    # the order is the same for every reviewer (so reviewers overlap)
    bob = stack.client.get("/v1/review/queue?n=6", headers=stack.h("bob")).json()
    assert [i["request_id"] for i in bob["items"]] == [i["request_id"] for i in body["items"]]


def test_the_queue_needs_feedback_and_samples_read(stack: Stack) -> None:
    assert stack.client.get("/v1/review/queue").status_code == 401
    for who, missing in (("fb-only", "samples:read"), ("reader", "feedback"), ("svc", "feedback")):
        r = stack.client.get("/v1/review/queue", headers=stack.h(who))
        assert r.status_code == 403 and missing in r.json()["error"]["message"], who
    assert stack.client.get("/v1/review/queue?n=0", headers=stack.h("ann")).status_code == 422
    assert stack.client.get("/v1/review/queue?n=9999", headers=stack.h("ann")).status_code == 422


def test_labels_go_through_feedback_and_agreement_is_measured(stack: Stack) -> None:
    queue = stack.client.get("/v1/review/queue?n=14", headers=stack.h("ann")).json()["items"]
    assert len(queue) == 14
    by_title = {i["content"]["title"]: i for i in queue}

    def label(who: str, title: str, decision: str, category: str | None) -> None:
        r = stack.client.post("/v1/feedback", headers=stack.h(who), json={
            "request_id": by_title[title]["request_id"], "decision": decision, "category": category})
        assert r.status_code == 202, r.text

    # ann agrees with the model on 3 of 4; bob agrees with ann on 2 of 3 shared items
    label("ann", "oak table 0", "allow", None)
    label("ann", "oak table 1", "block", "counterfeit")
    label("ann", "replica watch 0", "block", "counterfeit")
    label("ann", "diet pills 0", "block", "prohibited_item")
    label("bob", "oak table 0", "allow", None)
    label("bob", "oak table 1", "allow", None)
    label("bob", "replica watch 0", "block", "counterfeit")
    label("ann", "oak table 0", "allow", None)  # the same label again counts once
    # schema-checked like any label
    bad = stack.client.post("/v1/feedback", headers=stack.h("ann"), json={
        "request_id": by_title["oak table 2"]["request_id"], "decision": "block", "category": "nonsense"})
    assert bad.status_code == 422

    left = stack.client.get("/v1/review/queue?n=50", headers=stack.h("ann")).json()
    assert len(left["items"]) == 10 and left["remaining"] == 10
    assert not {"oak table 0", "oak table 1", "replica watch 0", "diet pills 0"} & {
        i["content"]["title"] for i in left["items"]}
    bob_left = stack.client.get("/v1/review/queue?n=50", headers=stack.h("bob")).json()["items"]
    assert {i["content"]["title"]: i["labelled_by"] for i in bob_left}["diet pills 0"] == ["ann"]

    r = stack.client.get("/v1/review/agreement", headers=stack.h("fb-only"))
    assert r.status_code == 200, r.text
    rows = {row["reviewer"]: row for row in r.json()["reviewers"]}
    assert rows["ann"]["labels"] == 4
    assert rows["ann"]["with_model"]["n"] == 4 and rows["ann"]["with_model"]["agree"] == 3
    assert rows["bob"]["with_model"]["agree"] == 3
    [pair] = rows["ann"]["with_reviewers"]
    assert (pair["reviewer"], pair["n"], pair["agree"]) == ("bob", 3, 2)
    assert pair["kappa"] is not None and -1 <= pair["kappa"] < 1
    assert stack.client.get("/v1/review/agreement", headers=stack.h("reader")).status_code == 403
    labels = read_labels(stack.feedback, EPOCH)
    assert labels[by_title["oak table 1"]["request_id"]] == {"ann": "block:counterfeit", "bob": "allow"}


# -- the console page ---------------------------------------------------------------------------

def sign_in(client: TestClient, key: str) -> str:
    r = client.post("/console/api/session", json={"key": key})
    assert r.status_code == 200, r.text
    return str(r.json()["csrf"])


def test_console_queue_page_and_reads_follow_the_session_and_scopes(stack: Stack) -> None:
    c = stack.client
    r = c.get("/console/queue", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/console/signin")
    assert c.get("/console/api/queue").status_code == 401
    sign_in(c, stack.keys["fb-only"])
    assert c.get("/console/queue").status_code == 200
    r = c.get("/console/api/queue")
    assert r.status_code == 403 and "samples:read" in r.json()["error"]["message"]
    assert c.get("/console/api/queue/agreement").status_code == 200
    sign_in(c, stack.keys["ann"])
    r = c.get("/console/api/queue?n=3")
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert c.get("/console/api/queue?n=abc").status_code == 422
    page = c.get("/console/queue")
    assert '<script src="/console/static/queue.js"></script>' in page.text and "<script>" not in page.text
    assert 'data-page="queue"' in page.text  # the console's one shell


def test_console_label_writes_need_csrf_and_the_feedback_scope(stack: Stack, store: SqlitePromptStore) -> None:
    c = stack.client
    csrf = sign_in(c, stack.keys["ann"])
    item = c.get("/console/api/queue?n=1").json()["items"][0]
    row = {"rows": [{"request_id": item["request_id"], "decision": "allow", "category": None}]}
    assert c.post("/console/api/feedback", json=row).status_code == 403
    r = c.post("/console/api/feedback", json=row, headers={"x-csrf-token": "wrong"})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    r = c.post("/console/api/feedback", json=row, headers={"x-csrf-token": csrf, "origin": "http://evil.example"})
    assert r.status_code == 403
    assert read_labels(stack.feedback, EPOCH) == {}
    # a key that may read content but not label
    key, record = generate_key("content-reader", ["samples:read", "prompts:read"], created_by="test")
    store.put_key(record)
    csrf_reader = sign_in(c, key)
    r = c.post("/console/api/feedback", json=row, headers={"x-csrf-token": csrf_reader})
    assert r.status_code == 403 and "feedback" in r.json()["error"]["message"]
    csrf = sign_in(c, stack.keys["ann"])
    r = c.post("/console/api/feedback", json=row, headers={"x-csrf-token": csrf})
    assert r.status_code == 200 and r.json()["ok"] == 1
    assert read_labels(stack.feedback, EPOCH) == {
        item["request_id"]: {"ann": "allow"}}


# -- shadow flips with their content ---------------------------------------------------------------

def test_shadow_flips_come_with_their_listing_content(store: SqlitePromptStore, tmp_path: Path) -> None:
    from prompt_registry.loader import load_prompt_file

    root = Path(__file__).resolve().parents[2]
    spec = load_prompt_file(root / "configs" / "prompts" / "listing-moderation.yaml")
    messages = [m.model_copy(update={"content": m.content + "\nSTRICT-SHADOW"}) if m.role == "system" else m
                for m in spec.messages]
    store.publish(spec.model_copy(update={"messages": messages}), actor="test")  # v2

    def strict(req: ChatRequest) -> str:
        if "STRICT-SHADOW" in req.messages[0]["content"] and "oak" in req.messages[-1]["content"]:
            return '{"decision":"block","category":"counterfeit","confidence":0.7}'
        return responder(req)

    keys = {}
    for name, scopes in {"svc": ["moderate"], "ops": ["admin"], "viewer": ["prompts:read"]}.items():
        key, record = generate_key(name, scopes, created_by="test")  # type: ignore[arg-type]
        store.put_key(record)
        keys[name] = {"authorization": f"Bearer {key}"}
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"), SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(key_cache_s=0, rollout_controller=False), store,
                     FakeBackend(responder=strict), models=["tiny-llama"], samples=recorder)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/prompts/listing-moderation/rollout", headers=keys["ops"],
                   json={"shadows": [{"version": 2, "sample_rate": 1.0}]})
        assert r.status_code == 201, r.text
        c.portal.call(app.state.gateway.cache.refresh_now, "listing-moderation")
        for i, title in enumerate(["oak desk", "replica watch", "oak bench"]):
            r = c.post("/v1/moderate", headers=keys["svc"], json={
                "item_id": f"f-{i}", "title": title, "description": f"the {title}"})
            assert r.status_code == 200, r.text

        async def settle() -> None:
            deadline = time.monotonic() + 60  # a guard only: the shadows end when the machine lets them
            while app.state.gateway.shadows.pending:
                assert time.monotonic() < deadline, "shadows still pending after 60 s"
                await asyncio.sleep(0.01)
            await app.state.gateway.recorder.flush()
            await recorder.flush()
        c.portal.call(settle)
        r = c.get("/v1/review/flips?prompt=listing-moderation", headers=keys["viewer"])
        assert r.status_code == 403 and "samples:read" in r.json()["error"]["message"]
        r = c.get("/v1/review/flips?prompt=listing-moderation", headers=keys["ops"])
        assert r.status_code == 200, r.text
        flips = {f["item_id"]: f for f in r.json()["flips"]}
        assert set(flips) == {"f-0", "f-2"}
        assert flips["f-0"]["content"] == {"title": "oak desk", "description": "the oak desk"}
        assert flips["f-2"]["candidate"]["decision"] == "block"
        assert c.get("/v1/review/flips?prompt=no-such-prompt", headers=keys["ops"]).status_code == 404
