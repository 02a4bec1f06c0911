"""The decision log's hot-path record (`gateway.recording.decision_row`): a plain dict the log
writes without validating it, so it must be, for every shape of evaluation, exactly the record
`DecisionRecord` validation would make: the same keys in the same order, the same values, the
same bytes on disk, and lines every reader takes."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.decision_log import FIELDS, DecisionLog, DecisionRecord, encode_record
from gateway.pipeline import Evaluation
from gateway.quality.decisions import read_segments
from gateway.recording import decision_record, decision_row
from gateway.verdict import Verdict, parse_verdict
from prompt_registry import VerdictSchema
from prompt_registry.models import OperatingPoint
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.protocol import ChatResult, Timings, TokenLogprob

SCHEMA = VerdictSchema(decisions=["allow", "block", "needs_review"],
                       categories=["none", "counterfeit", "adult"])


def _answer(decision: str, category: str, confidence: float = 0.9) -> str:
    return orjson.dumps({"decision": decision, "category": category, "confidence": confidence}).decode()


def _tokens(text: str, distribution: dict[str, float]) -> tuple[TokenLogprob, ...]:
    """*text* as an engine reports it: every token certain but the decision's, whose top
    alternatives are *distribution* (what it leaves out of 1 is unlisted mass)."""
    head = '{"decision":"'
    decision = text[len(head):text.index('"', len(head))]
    top = tuple((d, math.log(p)) for d, p in distribution.items())
    rest = text[len(head) + len(decision):]
    return (TokenLogprob(head, 0.0, ((head, 0.0),)), TokenLogprob(decision, math.log(distribution[decision]), top),
            TokenLogprob(rest, 0.0, ((rest, 0.0),)))


def _result(model: str = "m-small", **kw: Any) -> ChatResult:
    fields: dict[str, Any] = {"text": "{}", "finish_reason": "stop", "prompt_tokens": 1750,
                              "completion_tokens": 38, "model": model, "timings": Timings(12.0)}
    return ChatResult(**{**fields, **kw})


def _evaluations(store: SqlitePromptStore) -> dict[str, tuple[Evaluation, dict[str, Any]]]:
    """Every shape of evaluation the gateway logs, each with the call's other arguments."""
    version = store.resolve("listing-moderation", "production")

    def ev(verdict: Verdict, **kw: Any) -> Evaluation:
        fields: dict[str, Any] = {"version": version, "label": "production", "arm": "stable",
                                  "locale": "en-US", "stale": False, "verdict": verdict,
                                  "result": _result()}
        return Evaluation(**{**fields, **kw})

    blocked = _answer("block", "counterfeit", 0.97)
    scored = parse_verdict(blocked, "stop", SCHEMA, logprobs=_tokens(blocked, {"block": 0.8, "needs_review": 0.15}))
    allowed = _answer("allow", "counterfeit", 0.6)
    overruled = parse_verdict(allowed, "stop", SCHEMA, logprobs=_tokens(allowed, {"allow": 0.55, "block": 0.4,
                                                                                 "needs_review": 0.05}),
                              thresholds={"counterfeit": OperatingPoint(block_at=0.9, review_at=0.3)})
    no_probability = parse_verdict(allowed, "stop", SCHEMA,
                                   thresholds={"counterfeit": OperatingPoint(block_at=0.9, review_at=0.3)})
    low = parse_verdict(_answer("allow", "none", 0.4), "stop", SCHEMA)
    first = ev(low, result=_result("m-small", prompt_tokens=900, completion_tokens=20))
    call = {"request_id": "req-1", "item_id": "item-1", "subject": "seller-1", "arm": "stable",
            "latency_ms": 12.3456789, "trace_id": "ab" * 16, "front_door": "moderate", "caller": "svc"}
    bare = {"request_id": "req-2", "item_id": "item-2", "subject": "s", "arm": "pinned",
            "latency_ms": 0.0, "trace_id": None}
    return {
        "allow": (ev(parse_verdict(_answer("allow", "none"), "stop", SCHEMA)), call),
        "block": (ev(parse_verdict(blocked, "stop", SCHEMA), result=_result(cached_prompt_tokens=1536,
                                                                           reasoning_tokens=17)), call),
        "needs_review": (ev(parse_verdict(_answer("needs_review", "adult", 0.5), "stop", SCHEMA),
                            label=None, arm="canary"), {**call, "arm": "canary"}),
        "fail_closed_unparseable": (ev(parse_verdict("not json", "stop", SCHEMA)), bare),
        "fail_closed_truncated": (ev(parse_verdict(blocked[:20], "length", SCHEMA)), bare),
        "scored": (ev(scored), {**call, "front_door": "moderations"}),
        "thresholds_overruled": (ev(overruled), {**call, "front_door": "decisions"}),
        "thresholds_without_probability": (ev(no_probability), {**call, "front_door": "chat"}),
        "cascade": (ev(scored, escalated_from=first, escalation="low_confidence",
                       result=_result("m-large")), call),
        "cascade_scored_first": (ev(low, escalated_from=ev(scored), escalation="low_margin"), call),
        "cascade_failed": (ev(Verdict("needs_review", None, None, fail_reason="escalation_failed"),
                              escalated_from=first, escalation="needs_review",
                              escalation_error="model_timeout"), call),
        "shadow": (ev(scored, label=None, arm="shadow"),
                   {**bare, "arm": "shadow", "shadow_of": "req-1", "latency_ms": 3.5}),
    }


@pytest.fixture
def evaluations(store: SqlitePromptStore) -> dict[str, tuple[Evaluation, dict[str, Any]]]:
    return _evaluations(store)


def test_every_shape_is_its_validated_record_byte_for_byte(
        evaluations: dict[str, tuple[Evaluation, dict[str, Any]]]) -> None:
    for name, (ev, call) in evaluations.items():
        row = decision_row(ev, **call)
        assert tuple(row) == FIELDS, name
        validated = DecisionRecord(**row)  # strict: raises on any value of a wrong type
        assert validated.__dict__ == row, name
        assert encode_record(row) == encode_record(validated), name
        assert encode_record(row) == orjson.dumps(validated.model_dump(), option=orjson.OPT_APPEND_NEWLINE), name
        assert DecisionRecord.model_validate_json(encode_record(row)) == validated, name
        # decision_record is the same row through the model
        again = decision_record(ev, **call)
        assert again.model_dump(exclude={"ts"}) == validated.model_dump(exclude={"ts"}), name
        # floats stay floats (validation turns an int into a float: the line would show 1 for 1.0)
        for key, value in row.items():
            if DecisionRecord.model_fields[key].annotation in (float, float | None) and value is not None:
                assert type(value) is float, (name, key)


def test_the_fields_come_from_the_evaluation(evaluations: dict[str, tuple[Evaluation, dict[str, Any]]]) -> None:
    """What each field holds, for the shapes that set the rarer ones."""
    ev, call = evaluations["block"]
    row = decision_row(ev, **call)
    assert {k: row[k] for k in ("request_id", "item_id", "subject", "arm", "shadow_of", "trace_id",
                                "front_door", "caller", "latency_ms", "kind", "error_type")} == {
        "request_id": "req-1", "item_id": "item-1", "subject": "seller-1", "arm": "stable",
        "shadow_of": None, "trace_id": "ab" * 16, "front_door": "moderate", "caller": "svc",
        "latency_ms": 12.346, "kind": "moderation", "error_type": None}
    assert (row["prompt_name"], row["prompt_version"], row["label"], row["locale"]) == (
        ev.version.name, ev.version.version, "production", "en-US")
    assert (row["decision"], row["category"], row["confidence"], row["decided_by"]) == (
        "block", "counterfeit", 0.97, "model")
    assert (row["model"], row["prompt_tokens"], row["completion_tokens"], row["cached_prompt_tokens"],
            row["reasoning_tokens"]) == ("m-small", 1750, 38, 1536, 17)
    assert row["ts"].utcoffset().total_seconds() == 0

    ev, call = evaluations["thresholds_overruled"]
    row = decision_row(ev, **call)
    v = ev.verdict
    assert (row["decided_by"], row["model_decision"], row["decision"]) == ("threshold", "allow", "needs_review")
    assert (row["decision_probability"], row["category_probability"], row["block_probability"],
            row["probability_unresolved"], row["block_probability_low"], row["decision_unresolved"]) == (
        v.decision_probability, v.category_probability, v.block_probability, v.probability_unresolved,
        v.block_probability_low, v.decision_unresolved)
    assert row["block_probability"] is not None and row["decision_unresolved"] is not None

    ev, call = evaluations["thresholds_without_probability"]
    row = decision_row(ev, **call)
    assert (row["decided_by"], row["model_decision"], row["block_probability"]) == ("fail_closed", "allow", None)

    ev, call = evaluations["cascade_scored_first"]
    row = decision_row(ev, **call)
    first = ev.escalated_from
    assert first is not None
    assert {k: row[k] for k in FIELDS if k.startswith("first_") or k.startswith("escalation")} == {
        "escalation": "low_margin", "escalation_error": None, "first_model": "m-small",
        "first_decision": "block", "first_category": "counterfeit", "first_confidence": 0.97,
        "first_fail_reason": None, "first_prompt_tokens": 1750, "first_completion_tokens": 38,
        "first_decision_margin": first.verdict.decision_margin}
    assert row["first_decision_margin"] is not None

    ev, call = evaluations["cascade_failed"]
    row = decision_row(ev, **call)
    assert (row["decision"], row["fail_reason"], row["escalation_error"], row["first_decision"]) == (
        "needs_review", "escalation_failed", "model_timeout", "allow")

    ev, call = evaluations["shadow"]
    row = decision_row(ev, **call)
    assert (row["arm"], row["shadow_of"], row["label"], row["front_door"]) == ("shadow", "req-1", None, None)


def test_rows_and_records_written_together_read_back_as_the_records(
        tmp_path: Path, evaluations: dict[str, tuple[Evaluation, dict[str, Any]]]) -> None:
    """Through the real log: rows (the request path) and validated records (failures, raw
    chat) in one segment, in durable and buffered appends; the reader validates every line."""
    rows = [decision_row(ev, **{**call, "request_id": f"req-{name}"}) for name, (ev, call) in evaluations.items()]
    failure = DecisionRecord(ts=rows[0]["ts"], request_id="req-f", item_id="item-f", subject="s",
                             prompt_name="listing-moderation", prompt_version=1, arm="stable",
                             error_type="model_timeout", model="m-small", latency_ms=5.0)

    async def run() -> None:
        log = DecisionLog(tmp_path, replica="gw-0")
        await log.start()
        for row in rows[:-1]:
            assert log.append(row)
        log.append(failure)
        await log.append_durable(rows[-1])
        await log.aclose()

    asyncio.run(run())
    read = list(read_segments(tmp_path))
    assert len(read) == len(rows) + 1
    assert sorted(read, key=lambda r: r.request_id) == sorted([DecisionRecord(**r) for r in rows] + [failure],
                                                              key=lambda r: r.request_id)
    lines = b"".join(p.read_bytes() for p in sorted((tmp_path / "gw-0").glob("decisions-*.jsonl")))
    assert sorted(lines.splitlines(keepends=True)) == sorted(
        [encode_record(DecisionRecord(**r)) for r in rows] + [encode_record(failure)])


def test_a_replaced_verdict_keeps_its_row_shape(evaluations: dict[str, tuple[Evaluation, dict[str, Any]]]) -> None:
    """A verdict with category scores only (no decision scores) still reports what it has."""
    ev, call = evaluations["scored"]
    only_category = replace(ev.verdict, decision_scores=None)
    row = decision_row(replace(ev, verdict=only_category), **call)
    assert row["category_probability"] == only_category.category_probability is not None
    assert row["decision_probability"] is None and row["block_probability"] is None
    assert encode_record(row) == encode_record(DecisionRecord(**row))
