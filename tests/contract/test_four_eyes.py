"""Issue 16, item 9: four eyes on production moves, on both stores (SQLite and a real Redis).

With four eyes on, a production move by key A is recorded as a pending request and raises
ApprovalRequired; key B approves (the move is made then, judged by the gate again,
compare-and-set on the production version the request expected) or denies; a request expires
(default 24 h); A cannot approve its own request; every step is audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from prompt_registry import (
    ApprovalClosed,
    ApprovalConflict,
    ApprovalRequired,
    FourEyesRecord,
    GateRefused,
    LabelConflict,
    PromptSpec,
    PromptStore,
    SelfApproval,
)
from prompt_registry.gates import move_label
from prompt_registry.loader import seed_store
from prompt_registry.ops import (
    approvals_view,
    approve_request,
    deny_request,
    rollback,
    set_four_eyes,
    set_label,
)
from prompt_registry.redis_store import RedisPromptStore
from prompt_registry.sqlite_store import SqlitePromptStore
from tests.scorecards import store_scorecard
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
NAME = "listing-moderation"


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PromptStore]:
    s: PromptStore
    if request.param == "sqlite":
        s = SqlitePromptStore(tmp_path / "registry.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisPromptStore(server.url, prefix=request.getfixturevalue("redis_prefix"))
    seed_store(s, ROOT / "configs" / "prompts")
    yield s
    s.close()


def publish(store: PromptStore, spec: PromptSpec, tag: str, *, scored: bool = True) -> int:
    v = store.publish(spec.model_copy(update={"description": tag}), actor="author").version.version
    if scored:
        store_scorecard(store, NAME, v)
    return v


def actions(store: PromptStore, since: int) -> list[str]:
    return [e.action for e in store.audit(NAME)[since:]]


def test_setting_is_audited_and_off_means_moves_are_direct(store: PromptStore,
                                                           example_spec: PromptSpec) -> None:
    store_scorecard(store, NAME, 1)
    v2 = publish(store, example_spec, "v2")
    assert approvals_view(store, NAME)["four_eyes"] is False
    with pytest.raises(Exception, match="needs a reason"):
        set_four_eyes(store, NAME, True, actor="root", reason=" ")
    set_four_eyes(store, NAME, True, actor="root", reason="SOX")
    record = store.get_four_eyes(NAME)
    assert record is not None and record.enabled and record.expiry_s == 24 * 3600
    last = store.audit(NAME)[-1]
    assert (last.action, last.actor, last.label) == ("four_eyes", "root", "four-eyes")
    assert "four eyes on (requests expire after 1 day, 0:00:00) | SOX" == last.note
    # other labels are never held
    set_label(store, NAME, "canary", v2, actor="alice")
    set_four_eyes(store, NAME, False, actor="root", reason="done")
    assert approvals_view(store, NAME)["four_eyes"] is False
    set_label(store, NAME, "production", v2, actor="alice")
    assert store.labels(NAME)["production"] == v2
    with pytest.raises(ApprovalConflict):  # compare-and-set on the record's revision
        store.put_four_eyes(record, expected_revision=0, actor="x", action="four_eyes")
    with pytest.raises(ValueError, match="not a four-eyes action"):
        store.put_four_eyes(record.model_copy(update={"revision": 4}), expected_revision=3,
                            actor="x", action="label")
    with pytest.raises(ValueError, match="cannot be recorded"):
        store.record_audit(NAME, "approval_approved", actor="mallory")


def test_request_then_a_second_key_holder_approves(store: PromptStore, example_spec: PromptSpec) -> None:
    store_scorecard(store, NAME, 1)
    v2 = publish(store, example_spec, "v2")
    set_four_eyes(store, NAME, True, actor="root", reason="SOX")
    since = len(store.audit(NAME))
    with pytest.raises(ApprovalRequired) as held:
        set_label(store, NAME, "production", v2, actor="alice", holder="alice", note="ship v2")
    req = held.value.request
    assert held.value.created and (req.label, req.version, req.expected, req.requested_by) == (
        "production", v2, 1, "alice")
    assert req.expires_at - req.requested_at == timedelta(hours=24)
    assert store.labels(NAME)["production"] == 1, "nothing moved"
    # asking again finds the same pending request (a controller retrying every tick)
    with pytest.raises(ApprovalRequired) as again:
        move_label(store, NAME, "production", v2, actor="rollout-controller")
    assert again.value.request.id == req.id and not again.value.created
    assert actions(store, since) == ["approval_requested"]
    view = approvals_view(store, NAME)
    assert [(r["id"], r["state"]) for r in view["requests"]] == [(req.id, "pending")]

    with pytest.raises(SelfApproval):
        approve_request(store, NAME, req.id, actor="alice", holder="alice")
    approved, previous, report = approve_request(store, NAME, req.id, actor="bob", holder="bob",
                                                 note="looked at the scorecard")
    assert previous == 1 and report is not None and report.verdict == "pass"
    assert store.labels(NAME)["production"] == v2
    assert approved.state == "approved" and approved.decided_by == "bob"
    entries = store.audit(NAME)[since:]
    assert [e.action for e in entries] == ["approval_requested", "approval_approved", "label"]
    move = entries[-1]
    assert (move.actor, move.from_version, move.to_version) == ("bob", 1, v2)
    assert move.note.startswith("ship v2 | gate passed") and f"approval {req.id}" in move.note
    with pytest.raises(ApprovalClosed, match="approved by bob"):
        approve_request(store, NAME, req.id, actor="carol")
    # rolling back is never held (an incident must not wait for a second person)
    assert rollback(store, NAME, "production", actor="alice") == (v2, 1)


def test_deny_expiry_and_failed_approvals_move_nothing(store: PromptStore,
                                                       example_spec: PromptSpec) -> None:
    store_scorecard(store, NAME, 1)
    v2 = publish(store, example_spec, "v2")
    v3 = publish(store, example_spec, "v3")
    set_four_eyes(store, NAME, True, actor="root", reason="SOX", expiry_s=3600)
    with pytest.raises(ApprovalRequired) as a:
        set_label(store, NAME, "production", v2, actor="alice")
    deny_request(store, NAME, a.value.request.id, actor="bob", reason="not this week")
    assert store.labels(NAME)["production"] == 1
    assert store.audit(NAME)[-1].action == "approval_denied"
    with pytest.raises(ApprovalClosed, match="denied"):
        approve_request(store, NAME, a.value.request.id, actor="carol")

    # expiry: a request past its time is expired, audited when touched, and moves nothing
    with pytest.raises(ApprovalRequired) as b:
        set_label(store, NAME, "production", v2, actor="alice")
    record = store.get_four_eyes(NAME)
    assert record is not None
    old = record.find(b.value.request.id)
    assert old is not None
    past = old.model_copy(update={"expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    store.put_four_eyes(record.with_request(past), expected_revision=record.revision, actor="clock",
                        action="approval_requested")
    assert approvals_view(store, NAME)["requests"][0]["state"] == "expired"
    with pytest.raises(ApprovalClosed, match="expired"):
        approve_request(store, NAME, old.id, actor="bob")
    assert store.audit(NAME)[-1].action == "approval_expired"
    assert store.labels(NAME)["production"] == 1

    # approved, but production moved meanwhile: compare-and-set fails, the request is failed
    with pytest.raises(ApprovalRequired) as c:
        set_label(store, NAME, "production", v2, actor="alice")
    with pytest.raises(ApprovalRequired) as d:
        set_label(store, NAME, "production", v3, actor="carol")
    approve_request(store, NAME, d.value.request.id, actor="bob")
    assert store.labels(NAME)["production"] == v3
    with pytest.raises(LabelConflict):
        approve_request(store, NAME, c.value.request.id, actor="bob")
    assert store.labels(NAME)["production"] == v3
    assert store.audit(NAME)[-1].action == "approval_failed"
    states = {r["id"]: r["state"] for r in approvals_view(store, NAME)["requests"]}
    assert states[c.value.request.id] == "failed" and states[d.value.request.id] == "approved"


def test_the_gate_judges_at_request_and_at_approval(store: PromptStore, example_spec: PromptSpec) -> None:
    store_scorecard(store, NAME, 1)
    v2 = publish(store, example_spec, "v2", scored=False)
    set_four_eyes(store, NAME, True, actor="root", reason="SOX")
    with pytest.raises(GateRefused):  # a failing gate is refused at once, not queued
        set_label(store, NAME, "production", v2, actor="alice")
    assert store.audit(NAME)[-1].action == "gate_refused"
    store_scorecard(store, NAME, v2)
    with pytest.raises(ApprovalRequired) as held:
        set_label(store, NAME, "production", v2, actor="alice")
    # the scorecard is replaced by a failing one before the approval: the gate refuses then
    store_scorecard(store, NAME, v2, counts={"counterfeit": (2, 30, 25)})
    with pytest.raises(GateRefused):
        approve_request(store, NAME, held.value.request.id, actor="bob")
    assert store.labels(NAME)["production"] == 1
    assert [e.action for e in store.audit(NAME)[-3:]] == ["approval_approved", "gate_refused",
                                                          "approval_failed"]


def test_a_forged_approval_does_not_move(store: PromptStore, example_spec: PromptSpec) -> None:
    store_scorecard(store, NAME, 1)
    v2 = publish(store, example_spec, "v2")
    set_four_eyes(store, NAME, True, actor="root", reason="SOX")
    with pytest.raises(ApprovalRequired) as held:
        set_label(store, NAME, "production", v2, actor="alice")
    forged = held.value.request.model_copy(update={"state": "approved", "decided_by": "alice"})
    with pytest.raises(ApprovalConflict):
        move_label(store, NAME, "production", v2, actor="alice", approved=forged)
    assert store.labels(NAME)["production"] == 1
    assert isinstance(store.get_four_eyes(NAME), FourEyesRecord)
