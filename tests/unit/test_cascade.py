"""Cascades (issue 19, item 3): a version's unsure verdicts go to a second, larger model.

Two model names on the fake backend: `tiny-llama` (the version's model) and `big-llama` (the
cascade's). What is checked: the spec's validation and content hash, the served-model check at
publish/seed time, escalation on needs_review and on a low self-reported confidence through
the real gateway (`/v1/moderate`), both answers in the decision log, and fail-closed when the
second call fails or answers garbage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api.app import create_app
from gateway.cascade import trigger_for
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog, DecisionRecord
from gateway.quality.decisions import arrow_schema, read_segments
from gateway.telemetry import Metrics
from gateway.verdict import parse_verdict
from prompt_registry import PromptSpec, UnservedModel
from prompt_registry.keys import generate_key
from prompt_registry.loader import load_prompt_file, seed_store
from prompt_registry.ops import publish_file
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import ChatRequest, ChatResult
from serving.errors import BackendUnavailable
from serving.fake_backend import FakeBackend
from serving.protocol import TokenLogprob

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
SMALL, BIG = "tiny-llama", "big-llama"


def _spec_data(**cascade: Any) -> dict[str, Any]:
    data = load_prompt_file(BASE).model_dump(mode="json", exclude_none=True)
    data["name"] = "listing-cascade"
    data.pop("evaluation", None)
    if cascade:
        data["cascade"] = cascade
    return data


def _write(tmp: Path, data: dict[str, Any]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


# -- the spec -------------------------------------------------------------------------------


def test_a_cascade_is_validated() -> None:
    ok = PromptSpec.model_validate(_spec_data(model=BIG))
    assert ok.cascade is not None and ok.cascade.escalate_on == ["needs_review"]
    assert ok.models() == (SMALL, BIG)
    cases = {
        "the second model must differ": dict(model=SMALL),
        "low_confidence and min_confidence go together": dict(model=BIG, escalate_on=["low_confidence"]),
        "go together": dict(model=BIG, min_confidence=0.5),
        "unique": dict(model=BIG, escalate_on=["needs_review", "needs_review"]),
    }
    for message, cascade in cases.items():
        with pytest.raises(ValidationError, match=message):
            PromptSpec.model_validate(_spec_data(**cascade))
    with pytest.raises(ValidationError, match="low_margin and min_margin go together"):
        PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["low_margin"]))
    with pytest.raises(ValidationError, match="low_margin and min_margin go together"):
        PromptSpec.model_validate(_spec_data(model=BIG, min_margin=0.3))
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValidationError, match="min_margin"):
            PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["low_margin"], min_margin=bad))
    with pytest.raises(ValidationError, match="escalate_on"):
        PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["low_prob"]))
    margin = PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["needs_review", "low_margin"],
                                                  min_margin=0.4))
    assert margin.cascade is not None and margin.cascade.min_margin == 0.4
    # low_margin needs no self-reported confidence: it reads the token probabilities
    no_confidence_margin = _spec_data(model=BIG, escalate_on=["low_margin"], min_margin=0.4)
    no_confidence_margin["verdict"]["confidence"] = False
    PromptSpec.model_validate(no_confidence_margin)
    no_confidence = _spec_data(model=BIG, escalate_on=["low_confidence"], min_confidence=0.5)
    no_confidence["verdict"]["confidence"] = False
    with pytest.raises(ValidationError, match="needs verdict.confidence"):
        PromptSpec.model_validate(no_confidence)


def test_the_cascade_is_part_of_the_content_hash_and_absent_blocks_hash_as_before() -> None:
    plain = PromptSpec.model_validate(_spec_data())
    # the hash a spec without the new blocks had before they existed
    data = plain.model_dump(mode="json")
    for key in ("evaluation", "reasoning", "cascade", "thresholds"):
        assert data.pop(key) is None
    data["policy"].pop("change_note")
    data["policy"].pop("author")
    assert plain.content_hash() == hashlib.sha256(
        orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    one = PromptSpec.model_validate(_spec_data(model=BIG))
    other = PromptSpec.model_validate(_spec_data(model="bigger-llama"))
    low = PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["needs_review", "low_confidence"],
                                               min_confidence=0.7))
    margin = PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["needs_review", "low_margin"],
                                                  min_margin=0.7))
    assert len({plain.content_hash(), one.content_hash(), other.content_hash(), low.content_hash(),
                margin.content_hash()}) == 5
    # versions stored before min_margin existed keep their hash: the rule as it was then
    for spec in (one, low):
        data = spec.model_dump(mode="json")
        data["cascade"].pop("min_margin")
        for key in ("sampling", "reasoning", "min_confidence"):
            if data["cascade"][key] is None:
                data["cascade"].pop(key)
        for key in ("evaluation", "reasoning", "thresholds"):
            assert data.pop(key) is None
        data["policy"].pop("change_note")
        data["policy"].pop("author")
        assert spec.content_hash() == hashlib.sha256(
            orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert one.answer_hash() != plain.answer_hash()  # evaluation answers are cached per cascade


def test_the_second_spec_is_the_same_prompt_with_the_cascades_model() -> None:
    spec = PromptSpec.model_validate(_spec_data(model=BIG, sampling={"max_tokens": 128}))
    second = spec.second_spec()
    assert second is not None and second.model == BIG and second.cascade is None
    assert second.sampling.max_tokens == 128 and second.messages == spec.messages
    assert second.verdict == spec.verdict and second.locales == spec.locales
    assert PromptSpec.model_validate(_spec_data(model=BIG)).second_spec().sampling == spec.sampling  # type: ignore[union-attr]


def test_publishing_and_seeding_check_the_cascade_model_is_served(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts", _spec_data(model=BIG))
    store = SqlitePromptStore(tmp_path / "r.db")
    try:
        with pytest.raises(UnservedModel, match="'big-llama'.*served: tiny-llama"):
            publish_file(store, path, actor="t", served_models=[SMALL])
        with pytest.raises(UnservedModel, match="'big-llama'"):
            seed_store(store, path.parent, served_models=[SMALL])
        assert store.list_prompts() == []  # nothing was written
        result, _ = publish_file(store, path, actor="t", served_models=[SMALL, BIG])
        assert result.version.spec.cascade is not None
    finally:
        store.close()


# -- serving ---------------------------------------------------------------------------------


def _verdict(decision: str, category: str, confidence: float) -> str:
    return orjson.dumps({"decision": decision, "category": category, "confidence": confidence}).decode()


class Models:
    """What each model answers (a function of the request), on one fake backend; and, per
    model, the engine's distribution over the decisions at the decision token (`scored`), or
    None for an engine that sends no log-probabilities (absent: every token certain)."""

    def __init__(self) -> None:
        self.answers: dict[str, Callable[[ChatRequest], str]] = {
            SMALL: lambda r: _verdict("needs_review", "none", 0.5),
            BIG: lambda r: _verdict("block", "counterfeit", 0.93),
        }
        self.scored: dict[str, dict[str, float] | None] = {}

    def __call__(self, request: ChatRequest) -> str:
        return self.answers[request.model](request)


def _scored_tokens(text: str, distribution: dict[str, float]) -> tuple[TokenLogprob, ...]:
    """*text* (a verdict) as an engine reports it: every token certain but the decision's, whose
    top alternatives are *distribution* (decision -> probability; what it leaves out of 1 is
    mass the top-k did not list)."""
    head = '{"decision":"'
    decision = text[len(head):text.index('"', len(head))]
    top = tuple(sorted(((d, math.log(p)) for d, p in distribution.items()), key=lambda a: -a[1]))
    return (TokenLogprob(head, 0.0, ((head, 0.0),)), TokenLogprob(decision, math.log(distribution[decision]), top),
            TokenLogprob(text[len(head) + len(decision):], 0.0, ((text[len(head) + len(decision):], 0.0),)))


class ScoredBackend(FakeBackend):
    """The fake backend with the log-probabilities `Models.scored` says."""

    def __init__(self, models: Models) -> None:
        super().__init__(responder=models)
        self.models = models

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        result = await super().chat(request, timeout_s=timeout_s)
        if request.model not in self.models.scored or request.top_logprobs is None:
            return result
        distribution = self.models.scored[request.model]
        return replace(result, logprobs=None if distribution is None
                       else _scored_tokens(result.text, distribution))


class Stack:
    def __init__(self, client: TestClient, backend: FakeBackend, models: Models, metrics: Metrics,
                 log_dir: Path) -> None:
        self.client, self.backend, self.models = client, backend, models
        self.metrics, self.log_dir = metrics, log_dir

    def moderate(self, rid: str) -> dict[str, Any]:
        r = self.client.post("/v1/moderate", headers={"x-request-id": rid},
                             json={"item_id": rid, "title": "Rolex 1:1 replica", "prompt": "listing-cascade"})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def records(self) -> list[DecisionRecord]:
        self.client.portal.call(self.client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
        return list(read_segments(self.log_dir))

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def _stack(tmp_path: Path, **cascade: Any) -> Iterator[Stack]:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, _write(tmp_path / "prompts", _spec_data(**cascade)).parent,
               served_models=[SMALL, BIG])
    key, record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(record)
    models = Models()
    backend = ScoredBackend(models)
    metrics = Metrics()
    log = DecisionLog(tmp_path / "decisions", replica="gw-0")
    app = create_app(GatewaySettings(default_prompt="listing-cascade"), store, backend,
                     metrics=metrics, models=[SMALL, BIG],
                     decision_log=log)
    try:
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            yield Stack(client, backend, models, metrics, tmp_path / "decisions")
    finally:
        store.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from _stack(tmp_path, model=BIG)


@pytest.fixture
def low_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from _stack(tmp_path, model=BIG, escalate_on=["needs_review", "low_confidence"],
                      min_confidence=0.7)


def test_needs_review_escalates_and_the_log_keeps_both_answers(stack: Stack) -> None:
    body = stack.moderate("r-1")
    assert (body["decision"], body["category"], body["model"]) == ("block", "counterfeit", BIG)
    assert [r.model for r in stack.backend.requests] == [SMALL, BIG]
    # the second call sees the same rendered prompt and the same verdict constraint
    first, second = stack.backend.requests
    assert first.messages == second.messages and first.regex == second.regex
    assert second.request_id == "r-1-cascade"
    (rec,) = stack.records()
    assert (rec.decision, rec.category, rec.model, rec.confidence) == ("block", "counterfeit", BIG, 0.93)
    assert (rec.escalation, rec.escalation_error) == ("needs_review", None)
    assert (rec.first_model, rec.first_decision, rec.first_category, rec.first_confidence) == (
        SMALL, "needs_review", "none", 0.5)
    assert rec.first_prompt_tokens is not None and rec.first_completion_tokens is not None
    assert stack.sample("modgate_escalations_total", prompt="listing-cascade", version="1",
                        arm="stable", trigger="needs_review", outcome="answered") == 1.0


def test_a_verdict_that_stands_is_not_escalated(stack: Stack) -> None:
    stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.2)  # low, but not a trigger here
    body = stack.moderate("r-2")
    assert (body["decision"], body["model"]) == ("allow", SMALL)
    assert [r.model for r in stack.backend.requests] == [SMALL]
    (rec,) = stack.records()
    assert rec.escalation is None and rec.first_model is None


def test_low_confidence_escalates_below_the_threshold_only(low_stack: Stack) -> None:
    low_stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.69)
    assert low_stack.moderate("r-low")["decision"] == "block"
    low_stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.70)
    assert low_stack.moderate("r-sure")["decision"] == "allow"
    assert [r.model for r in low_stack.backend.requests] == [SMALL, BIG, SMALL]
    by_id = {r.request_id: r for r in low_stack.records()}
    assert by_id["r-low"].escalation == "low_confidence" and by_id["r-low"].first_decision == "allow"
    assert by_id["r-sure"].escalation is None


@pytest.fixture
def margin_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from _stack(tmp_path, model=BIG, escalate_on=["needs_review", "low_margin"], min_margin=0.5)


def _margin(distribution: dict[str, float] | None, decision: str = "allow") -> float | None:
    text = _verdict(decision, "none", 0.9)
    tokens = None if distribution is None else _scored_tokens(text, distribution)
    return parse_verdict(text, "stop", load_prompt_file(BASE).verdict, logprobs=tokens).decision_margin


def test_the_decision_margin_is_top_one_minus_top_two_and_its_worst_case_when_inexact() -> None:
    assert _margin({"allow": 0.6, "block": 0.35, "needs_review": 0.05}) == pytest.approx(0.25)
    # renormalised over the allowed decisions: a forbidden alternative carries no mass
    assert _margin({"allow": 0.48, "block": 0.28, "needs_review": 0.04, "maybe": 0.2}) == pytest.approx(0.25)
    # a sampled answer that was not the most likely one is behind: negative
    assert _margin({"allow": 0.6, "block": 0.35, "needs_review": 0.05}, "block") == pytest.approx(-0.25)
    # 0.1 of the mass unlisted by the top-k: it could all be block's, so allow is surely ahead by
    # 0.6 - (0.3 + 0.1) only (the point estimate, (0.6 - 0.3) / 0.9, would say 0.333)
    assert _margin({"allow": 0.6, "block": 0.3}) == pytest.approx(0.2)
    assert _margin({"allow": 1.0}) == 1.0
    assert _margin(None) is None


def test_a_low_margin_escalates_and_the_log_records_it(margin_stack: Stack) -> None:
    margin_stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.99)  # sure, it says
    margin_stack.models.scored[SMALL] = {"allow": 0.6, "block": 0.35, "needs_review": 0.05}
    assert margin_stack.moderate("r-close")["decision"] == "block"
    margin_stack.models.scored[SMALL] = {"allow": 0.8, "block": 0.15, "needs_review": 0.05}
    body = margin_stack.moderate("r-clear")
    assert (body["decision"], body["model"]) == ("allow", SMALL)
    assert [r.model for r in margin_stack.backend.requests] == [SMALL, BIG, SMALL]
    by_id = {r.request_id: r for r in margin_stack.records()}
    close = by_id["r-close"]
    assert (close.escalation, close.first_decision, close.first_model) == ("low_margin", "allow", SMALL)
    assert close.first_decision_margin == pytest.approx(0.25)
    assert by_id["r-clear"].escalation is None and by_id["r-clear"].first_decision_margin is None
    assert margin_stack.sample("modgate_escalations_total", prompt="listing-cascade", version="1",
                               arm="stable", trigger="low_margin", outcome="answered") == 1.0


def test_a_verdict_without_a_calibrated_probability_escalates_as_margin_unavailable(margin_stack: Stack) -> None:
    """Fail closed: low_margin asked for, the engine sent no log-probabilities, so nothing shows
    the answer is sure; the log says why it escalated."""
    margin_stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.99)
    margin_stack.models.scored[SMALL] = None
    assert margin_stack.moderate("r-blind")["decision"] == "block"
    (rec,) = margin_stack.records()
    assert (rec.escalation, rec.first_decision, rec.first_decision_margin) == (
        "margin_unavailable", "allow", None)
    assert margin_stack.sample("modgate_escalations_total", prompt="listing-cascade", version="1",
                               arm="stable", trigger="margin_unavailable", outcome="answered") == 1.0


def test_needs_review_is_tried_before_the_margin_and_the_margin_before_the_confidence() -> None:
    cascade = PromptSpec.model_validate(_spec_data(
        model=BIG, escalate_on=["needs_review", "low_margin", "low_confidence"], min_margin=0.5,
        min_confidence=0.7)).cascade
    assert trigger_for(cascade, "needs_review", confidence=None, margin=None) == "needs_review"
    assert trigger_for(cascade, "allow", confidence=0.1, margin=None) == "margin_unavailable"
    assert trigger_for(cascade, "allow", confidence=0.1, margin=0.2) == "low_margin"
    assert trigger_for(cascade, "allow", confidence=0.1, margin=0.5) == "low_confidence"
    assert trigger_for(cascade, "allow", confidence=0.7, margin=0.5) is None
    only_margin = PromptSpec.model_validate(_spec_data(model=BIG, escalate_on=["low_margin"],
                                                       min_margin=0.5)).cascade
    # without needs_review in escalate_on, a fail-closed verdict (no probability) still escalates
    assert trigger_for(only_margin, "needs_review", confidence=None, margin=None) == "margin_unavailable"
    assert trigger_for(only_margin, "needs_review", confidence=None, margin=0.9) is None
    assert trigger_for(None, "needs_review", confidence=None, margin=None) is None


def test_a_failed_second_call_answers_needs_review_never_the_first_verdict(low_stack: Stack) -> None:
    low_stack.models.answers[SMALL] = lambda r: _verdict("allow", "none", 0.3)

    def down(request: ChatRequest) -> str:
        raise BackendUnavailable("engine dead", kind="connection_failed")

    low_stack.models.answers[BIG] = down
    body = low_stack.moderate("r-down")
    assert (body["decision"], body["category"], body["fail_reason"]) == (
        "needs_review", None, "escalation_failed")
    (rec,) = low_stack.records()
    assert (rec.decision, rec.escalation, rec.escalation_error) == (
        "needs_review", "low_confidence", "model_unavailable")
    assert (rec.first_decision, rec.first_confidence, rec.model) == ("allow", 0.3, SMALL)
    assert low_stack.sample("modgate_escalations_total", prompt="listing-cascade", version="1",
                            arm="stable", trigger="low_confidence", outcome="failed") == 1.0


def test_garbage_from_the_second_model_fails_closed(stack: Stack) -> None:
    stack.models.answers[BIG] = lambda r: '{"decision":"allow"'  # cut short: not a verdict
    body = stack.moderate("r-garbage")
    assert (body["decision"], body["fail_reason"]) == ("needs_review", "unparseable_output")
    (rec,) = stack.records()
    assert (rec.model, rec.escalation, rec.first_decision) == (BIG, "needs_review", "needs_review")


def test_the_export_schema_types_the_cascade_columns() -> None:
    import pyarrow as pa

    schema = arrow_schema()
    assert schema.field("first_confidence").type == pa.float64()
    assert schema.field("first_completion_tokens").type == pa.int64()
    assert schema.field("reasoning_tokens").type == pa.int64()
    assert schema.field("escalation").type == pa.string()


def test_a_record_names_its_first_model_exactly_when_it_escalated() -> None:
    from datetime import UTC, datetime

    base: dict[str, Any] = dict(ts=datetime.now(UTC), request_id="r", item_id="i", subject="s",
                                prompt_name="p", prompt_version=1, arm="stable", decision="block",
                                model=BIG, latency_ms=1.0)
    DecisionRecord(**base, escalation="needs_review", first_model=SMALL)
    with pytest.raises(ValidationError, match="first_model is set exactly when escalation is"):
        DecisionRecord(**base, escalation="needs_review")
    with pytest.raises(ValidationError, match="escalation_error needs escalation"):
        DecisionRecord(**base, escalation_error="model_unavailable")


# -- readiness and the cascade's model --------------------------------------------------------


def _gateway(tmp_path: Path, served: list[str]) -> Iterator[TestClient]:
    """A gateway serving *served* over a store whose production version cascades to BIG,
    stored before the serving configuration dropped BIG (seeded without the served check, as
    a registry shared with an older deployment holds it). The client's key sees the checks."""
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, _write(tmp_path / "prompts", _spec_data(model=BIG)).parent)
    key, record = generate_key("ops", ["moderate"], created_by="test")
    store.put_key(record)
    app = create_app(GatewaySettings(default_prompt="listing-cascade"), store,
                     FakeBackend(responder=Models()), metrics=Metrics(), models=served)
    try:
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            yield client
    finally:
        store.close()


@pytest.fixture
def small_only(tmp_path: Path) -> Iterator[TestClient]:
    yield from _gateway(tmp_path, [SMALL])


@pytest.fixture
def both_served(tmp_path: Path) -> Iterator[TestClient]:
    yield from _gateway(tmp_path, [SMALL, BIG])


def test_readyz_reports_a_cascade_model_the_serving_layer_does_not_serve(small_only: TestClient) -> None:
    r = small_only.get("/readyz")
    assert r.status_code == 503, r.text
    models = r.json()["checks"]["models"]
    assert models[BIG]["ok"] is False and models[BIG]["used_by"] == ["listing-cascade:production (cascade)"]
    assert "not served" in models[BIG]["error"] and SMALL in models[BIG]["error"]
    assert models[SMALL] == {"ok": True, "used_by": ["listing-cascade:production"]}


def test_readyz_is_ready_when_both_models_are_served(both_served: TestClient) -> None:
    r = both_served.get("/readyz")
    assert r.status_code == 200, r.text
    assert {m: c["ok"] for m, c in r.json()["checks"]["models"].items()} == {SMALL: True, BIG: True}


def test_a_production_move_to_a_version_whose_cascade_model_is_not_served_is_refused(tmp_path: Path) -> None:
    """Through the admin API (the console and the remote CLI call the same `set_label`), before
    the promotion gate is asked."""
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, _write(tmp_path / "plain", _spec_data()).parent)
    v2 = store.publish(PromptSpec.model_validate(_spec_data(model=BIG)), actor="t").version.version
    key, record = generate_key("ops", ["admin"], created_by="test")
    store.put_key(record)
    app = create_app(GatewaySettings(default_prompt="listing-cascade"), store,
                     FakeBackend(responder=Models()), metrics=Metrics(), models=[SMALL])
    try:
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            r = client.put("/v1/prompts/listing-cascade/labels/production", json={"version": v2})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["type"] == "unknown_model" and "'big-llama'" in error["message"]
            assert store.labels("listing-cascade")["production"] == 1
    finally:
        store.close()
