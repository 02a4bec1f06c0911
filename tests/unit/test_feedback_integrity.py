"""Reviewer feedback with integrity (issue #16 item 5): labels are checked against the answering
version's verdict schema, the reviewer is the key, one label per (request, reviewer), a request
counts once in the rollout evidence with its latest label, and retries are no-ops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.feedback import FeedbackLog
from prompt_registry import build_rollout_stats
from prompt_registry.keys import generate_key
from prompt_registry.models import PromptSpec
from prompt_registry.rollouts import GateConfig, new_rollout
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

LISTING = {"item_id": "i-1", "seller_id": "s-1", "title": "Rolex replica", "description": ""}


class Gw:
    def __init__(self, client: TestClient, reviewer: str, store: SqlitePromptStore, log_dir: Path) -> None:
        self.client, self.reviewer, self.store, self.log_dir = client, reviewer, store, log_dir

    def label(self, request_id: str, decision: str, category: str | None = None, *,
              key: str | None = None, **headers: str) -> tuple[int, dict]:
        r = self.client.post("/v1/feedback", json={"request_id": request_id, "decision": decision,
                                                   "category": category, "reviewer": "Ana"},
                             headers={"authorization": f"Bearer {key or self.reviewer}", **headers})
        return r.status_code, r.json()

    def flush(self) -> None:
        self.client.portal.call(self.client.app.state.gateway.recorder.flush)  # type: ignore[attr-defined]

    def log_lines(self) -> list[dict]:
        return [orjson.loads(x) for f in self.log_dir.glob("*.jsonl") for x in f.read_bytes().splitlines()]


@pytest.fixture
def gw(store: SqlitePromptStore, caller_key: str, tmp_path: Path, example_spec: PromptSpec) -> Iterator[Gw]:
    key, record = generate_key("reviewer-1", ["feedback"], created_by="test")
    store.put_key(record)
    v2 = store.publish(example_spec.model_copy(update={"description": "v2"}), actor="test").version.version
    store.put_rollout(new_rollout("listing-moderation", stable_version=1, canary_version=v2, steps=[50],
                                  shadows=[], step_hold_s=60, gates=GateConfig(), auto=False,
                                  subject_key="seller_id", started_by="test"),
                      expected_revision=None, actor="test")
    app = create_app(GatewaySettings(rollout_controller=False), store, FakeBackend(),
                     feedback_log=FeedbackLog(tmp_path / "fb"))
    with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as client:
        yield Gw(client, key, store, tmp_path / "fb")


def _moderated(gw: Gw) -> dict:
    r = gw.client.post("/v1/moderate", json=LISTING)
    assert r.status_code == 200, r.text
    gw.flush()  # the verdict memo reaches the store
    return r.json()


@pytest.mark.parametrize(("decision", "category", "field"), [
    ("maybe", None, "decision"),
    ("block", "weapons", "category"),
    ("allow", "counterfeit", "category"),
    ("block", "none", "category"),
    ("block", None, "category"),
    ("needs_review", "counterfeit", "decision"),
])
def test_invalid_or_contradictory_labels_are_refused(gw: Gw, decision: str, category: str | None,
                                                    field: str) -> None:
    answered = _moderated(gw)
    status, body = gw.label(answered["request_id"], decision, category)
    assert status == 422, body
    assert body["error"]["type"] == "invalid_label" and body["error"]["fields"][0]["field"] == field
    assert gw.log_lines() == []


def test_thirty_posts_by_one_key_count_once(gw: Gw) -> None:
    answered = _moderated(gw)
    rollout = gw.store.get_rollout("listing-moderation")
    assert rollout is not None
    for _ in range(30):
        status, _ = gw.label(answered["request_id"], "block", "counterfeit")
        assert status == 202
    gw.flush()
    stats = build_rollout_stats(gw.store.rollout_stats(rollout.id))
    assert getattr(stats, answered["arm"]).feedback.n == 1
    lines = gw.log_lines()
    assert len(lines) == 1 and lines[0]["reviewer"] == "reviewer-1" and lines[0]["display_name"] == "Ana"


def test_a_changed_label_replaces_the_earlier_one_in_the_evidence(gw: Gw) -> None:
    answered = _moderated(gw)
    rollout = gw.store.get_rollout("listing-moderation")
    assert rollout is not None
    assert gw.label(answered["request_id"], "block", "counterfeit")[1]["replaced"] is False
    status, body = gw.label(answered["request_id"], "allow")
    assert status == 202 and body["replaced"] is True
    gw.flush()
    arm = getattr(build_rollout_stats(gw.store.rollout_stats(rollout.id)), answered["arm"])
    assert arm.feedback.n == 1  # one request, counted once, with its latest label
    counted = arm.feedback.category("counterfeit")
    assert (counted.tp, counted.fn) == (0, 0)  # the retracted block/counterfeit no longer counts
    assert len(gw.log_lines()) == 2  # both labels kept in the log; quality takes the latest


def test_a_retry_with_the_same_idempotency_key_is_a_no_op(gw: Gw) -> None:
    answered = _moderated(gw)
    first = gw.label(answered["request_id"], "block", "counterfeit", **{"idempotency-key": "k-1"})
    # a retry of the same call, even if the body were different, answers what the first did
    again = gw.label(answered["request_id"], "allow", **{"idempotency-key": "k-1"})
    assert first == again
    assert len(gw.log_lines()) == 1


def test_unknown_request_ids_are_kept_and_flagged(gw: Gw) -> None:
    status, body = gw.label("never-answered", "allow")
    assert status == 202 and body["matched_rollout"] is False
    assert gw.log_lines()[0]["matched_rollout"] is False
