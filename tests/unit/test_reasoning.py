"""Policy-following reasoning models (issue 19, item 5), gpt-oss-safeguard first: everything that
does not need the weights. Request shapes sent to the engine, answers in the model's format
(hand-written in the shapes vLLM 0.32 returns, tests/unit/fixtures/gpt_oss_safeguard/) read
through the real HTTP backend on a real socket, the reasoning budget, the GPU example, and the
storage rule: the rationale never reaches the decision log, spans, logs, metrics or answers; it
is kept only in the opt-in sample store (gateway/samples.py), with the listing content.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from pydantic import ValidationError

from gateway.api.app import create_app
from gateway.config import GatewaySettings, load_config
from gateway.decision_log import DecisionLog
from gateway.moderation import ModerationCall
from gateway.pipeline import ModerationPipeline
from gateway.samples import SampleRecorder, SampleSettings, SqliteSampleStore
from gateway.telemetry import Metrics, TracingSettings, build_tracer_provider
from gateway.verdict import parse_verdict
from prompt_registry import PromptSpec, PromptVersion
from prompt_registry.keys import generate_key
from prompt_registry.loader import load_prompt_file, seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import ChatRequest, ChatResult
from serving.fake_backend import FakeBackend
from serving.http_backend import OpenAIHttpBackend, build_chat_body, parse_completion
from serving.protocol import TokenLogprob
from serving.reasoning import answer_tokens, split_harmony
from tests.handler_server import HandlerServer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "unit" / "fixtures" / "gpt_oss_safeguard"
GPU_CONFIG = ROOT / "configs" / "examples" / "gpu-safeguard.yaml"
SAFEGUARD_PROMPT = ROOT / "configs" / "examples" / "gpu-safeguard-prompts" / "listing-moderation.yaml"
SHIPPED_PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
MODEL = "gpt-oss-safeguard-20b"
LISTING = {"title": "Rolex Submariner 1:1 replica", "description": "WhatsApp me", "locale": "en-US"}


def _fixtures() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}


def _version(spec: PromptSpec) -> PromptVersion:
    return PromptVersion(spec=spec, version=1, content_hash=spec.content_hash(),
                         created_at=datetime.now(UTC))


# -- request shapes --------------------------------------------------------------------------


def test_the_request_asks_for_reasoning_effort_and_budgets_reasoning_plus_verdict() -> None:
    spec = load_prompt_file(SAFEGUARD_PROMPT)
    _, chat = ModerationPipeline.build_chat(_version(spec), LISTING, "en-US", request_id="r1")
    body = build_chat_body(chat)
    assert body["model"] == MODEL and body["reasoning_effort"] == "low"
    assert body["max_tokens"] == 1024 + 96 == spec.max_output_tokens()
    # the verdict regex is sent as usual; vLLM's harmony parser applies it to the final channel
    assert body["structured_outputs"] == {"regex": spec.verdict.regex()}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "POLICY" in body["messages"][0]["content"]  # the policy goes first (developer message)
    assert "1:1 replica" in body["messages"][1]["content"]


def test_a_model_that_does_not_reason_gets_the_request_it_got_before() -> None:
    spec = load_prompt_file(SHIPPED_PROMPT)
    assert spec.reasoning is None and spec.max_output_tokens() == spec.sampling.max_tokens
    _, chat = ModerationPipeline.build_chat(_version(spec), LISTING, "en-US", request_id="r1")
    body = build_chat_body(chat)
    assert "reasoning_effort" not in body and body["max_tokens"] == 96


def test_the_reasoning_block_is_validated_and_hashed() -> None:
    data = load_prompt_file(SAFEGUARD_PROMPT).model_dump(mode="json", exclude_none=True)
    for bad in ({"effort": "extreme"}, {"max_tokens": 8}, {"max_tokens": 100_000}, {"budget": 5}):
        with pytest.raises(ValidationError):
            PromptSpec.model_validate({**data, "reasoning": {**data["reasoning"], **bad}})
    hashes = {PromptSpec.model_validate({**data, "reasoning": r}).content_hash()
              for r in ({"effort": "low", "max_tokens": 1024}, {"effort": "high", "max_tokens": 1024},
                        {"effort": "low", "max_tokens": 2048})}
    assert len(hashes) == 3


def test_a_cascade_to_a_reasoning_model_reasons_on_the_second_call_only() -> None:
    data = load_prompt_file(SHIPPED_PROMPT).model_dump(mode="json", exclude_none=True)
    data.pop("evaluation")
    data["cascade"] = {"model": MODEL, "reasoning": {"effort": "medium", "max_tokens": 2048}}
    spec = PromptSpec.model_validate(data)
    second = spec.second_spec()
    assert second is not None
    _, first_chat = ModerationPipeline.build_chat(_version(spec), LISTING, "en-US", request_id="r")
    _, second_chat = ModerationPipeline.build_chat(_version(second), LISTING, "en-US", request_id="r")
    assert (first_chat.reasoning_effort, first_chat.max_tokens) == (None, 96)
    assert (second_chat.model, second_chat.reasoning_effort, second_chat.max_tokens) == (MODEL, "medium", 2048 + 96)


# -- answers in the model's format -----------------------------------------------------------


def _through_http(response: dict[str, Any]) -> ChatResult:
    async def go() -> ChatResult:
        async with HandlerServer(lambda req: httpx.Response(200, json=response)) as server:
            backend = OpenAIHttpBackend(server.base_url)
            try:
                return await backend.chat(ChatRequest(model=MODEL, messages=[], max_tokens=1120),
                                          timeout_s=5)
            finally:
                await backend.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("name", sorted(_fixtures()))
def test_recorded_answers_give_the_final_channels_verdict_or_fail_closed(name: str) -> None:
    fixture = _fixtures()[name]
    schema = load_prompt_file(SAFEGUARD_PROMPT).verdict
    result = _through_http(fixture["response"])
    verdict = parse_verdict(result.text, result.finish_reason, schema)
    assert {"decision": verdict.decision, "category": verdict.category,
            "fail_reason": verdict.fail_reason} == fixture["expected"]
    assert "<|" not in result.text  # never a harmony frame as the answer
    if name == "stripped-tokens":
        # a server without the reasoning parser that also dropped the channel markers leaves
        # nothing to split: the text is not a verdict, so the answer is needs_review
        return
    assert "Policy section 1" not in result.text  # the reasoning is never taken as the answer
    assert result.reasoning and "replica" in result.reasoning
    assert "reasoning=" not in repr(result) and "Policy section" not in repr(result)


def test_every_recorded_answer_without_a_final_message_is_needs_review() -> None:
    """Including those whose reasoning contains an `allow` verdict: it is never taken."""
    schema = load_prompt_file(SAFEGUARD_PROMPT).verdict
    cut = [f for n, f in _fixtures().items() if f["expected"]["fail_reason"] is not None]
    assert len(cut) >= 5
    for f in cut:
        result = parse_completion(copy.deepcopy(f["response"]), MODEL, 1.0, "recorded")
        assert parse_verdict(result.text, result.finish_reason, schema).decision == "needs_review"


def test_reasoning_tokens_are_read_from_usage() -> None:
    result = parse_completion(_fixtures()["separated"]["response"], MODEL, 1.0, "recorded")
    assert (result.reasoning_tokens, result.completion_tokens) == (163, 187)
    assert parse_completion(_fixtures()["raw-harmony"]["response"], MODEL, 1.0, "x").reasoning_tokens is None


def test_split_harmony_reads_channels_and_only_ended_finals() -> None:
    text = ("<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>commentary"
            "<|message|>tool talk<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>"
            '<|start|>assistant<|channel|>final<|message|>{"a":1}<|return|>')
    answer = split_harmony(text, stopped=True)
    assert (answer.final, answer.analysis) == ('{"a":1}', "one\ntwo")
    assert answer.channels == ("analysis", "commentary", "analysis", "final")
    assert split_harmony('<|channel|>final<|message|>{"a":1}', stopped=True).final == '{"a":1}'
    assert split_harmony('<|channel|>final<|message|>{"a":1}', stopped=False).final is None
    assert split_harmony("<|channel|>analysis<|message|>thinking", stopped=True).final is None


# -- calibrated probabilities of a reasoned answer -------------------------------------------

LOGPROB_FIXTURES = ("separated-logprobs", "raw-harmony-logprobs")


def _top(fixture: dict[str, Any], token: str) -> dict[str, float]:
    """The alternatives the engine reported at the one position where *token* was generated."""
    (entry,) = [e for e in fixture["response"]["choices"][0]["logprobs"]["content"] if e["token"] == token]
    return {a["token"]: a["logprob"] for a in entry["top_logprobs"]}


def _renormalised(top: dict[str, float], chosen: str, allowed: tuple[str, ...]) -> float:
    mass = {t: math.exp(lp) for t, lp in top.items() if t in allowed}
    return mass[chosen] / sum(mass.values())


@pytest.mark.parametrize("name", LOGPROB_FIXTURES)
def test_a_reasoned_answer_is_scored_at_its_final_channels_tokens(name: str) -> None:
    """The engine's tokens cover the reasoning too; the probability is read where the final
    message spells the verdict (not at the decoy verdict the model wrote in its reasoning)."""
    fixture = _fixtures()[name]
    schema = load_prompt_file(SAFEGUARD_PROMPT).verdict
    result = _through_http(fixture["response"])
    assert result.logprobs is not None and "".join(t.token for t in result.logprobs) == result.text
    verdict = parse_verdict(result.text, result.finish_reason, schema, logprobs=result.logprobs)
    assert (verdict.decision, verdict.category) == ("block", "counterfeit")
    decision = _top(fixture, "block")  # the decoy's position has "allow" generated, not "block"
    expected = _renormalised(decision, "block", ("block", "allow", "needs"))
    assert verdict.decision_probability == pytest.approx(expected, abs=1e-6)
    assert verdict.decision_margin == pytest.approx(
        expected - _renormalised(decision, "allow", ("block", "allow", "needs")), abs=1e-6)
    category = _top(fixture, "counter")
    assert verdict.category_probability == pytest.approx(
        _renormalised(category, "counter", ("counter", "off", "prohibited", "none")), abs=1e-6)
    assert verdict.probability_unresolved == pytest.approx(0.0, abs=1e-3)


def test_a_reasoned_answer_whose_markers_cannot_be_found_keeps_null_probabilities() -> None:
    """Special tokens reported as empty strings (a server that skips them when decoding
    log-probabilities): the final message cannot be located, so no probability rather than one
    read at guessed positions."""
    fixture = copy.deepcopy(_fixtures()["separated-logprobs"])
    for entry in fixture["response"]["choices"][0]["logprobs"]["content"]:
        if entry["token"].startswith("<|") and entry["token"].endswith("|>"):
            entry["token"] = ""
    result = _through_http(fixture["response"])
    assert result.logprobs is None
    verdict = parse_verdict(result.text, result.finish_reason, load_prompt_file(SAFEGUARD_PROMPT).verdict,
                            logprobs=result.logprobs)
    assert (verdict.decision, verdict.decision_probability, verdict.decision_margin) == ("block", None, None)


def _tokens(*pieces: str) -> list[TokenLogprob]:
    return [TokenLogprob(p, 0.0) for p in pieces]


def test_answer_tokens_takes_the_last_final_message_by_its_special_tokens_only() -> None:
    final = ['{"a":', "1}"]
    reasoned = _tokens("<|channel|>", "analysis", "<|message|>", "think", "<|end|>", "<|start|>",
                       "assistant", "<|channel|>", "final", "<|message|>", *final, "<|return|>")
    assert [t.token for t in answer_tokens(reasoned, '{"a":1}') or ()] == final
    # a model that does not reason: its tokens are the answer's (the stop token may follow)
    plain = _tokens('{"a":', "1}", "<|end|>")
    assert answer_tokens(plain, '{"a":1}') == tuple(plain)
    # the markers written as ordinary pieces inside the reasoning are not markers
    decoy = _tokens("<|channel|>", "analysis", "<|message|>", "<|", "channel", "|>", "final", "<|",
                    "message", "|>", *final, "<|end|>")
    assert answer_tokens(decoy, '{"a":1}') is None
    # only the final channel: commentary, a look-alike name, a message without a channel
    for header in (("commentary",), ("finals",), ("final", " to=x")):
        tokens = _tokens("<|channel|>", *header, "<|message|>", *final)
        assert (answer_tokens(tokens, '{"a":1}') is not None) == (header == ("final", " to=x"))
    assert answer_tokens(_tokens("<|message|>", *final), '{"a":1}') is None
    # the header may constrain the final message's format
    constrained = _tokens("<|channel|>", "final", " ", "<|constrain|>", "json", "<|message|>", *final)
    assert answer_tokens(constrained, '{"a":1}') == tuple(constrained[6:])
    # tokens that do not spell the server's final text, or no text: nothing
    assert answer_tokens(reasoned, '{"a":2}') is None and answer_tokens(reasoned, "") is None


# -- the GPU example ------------------------------------------------------------------------


def test_the_gpu_example_serves_the_safeguard_prompt_it_seeds(tmp_path: Path) -> None:
    cfg = load_config(GPU_CONFIG)
    served = [m.name for m in cfg.serving.models]
    assert served == [MODEL] and cfg.gateway.default_prompt == "listing-moderation"
    assert cfg.serving.models[0].engine_kwargs["reasoning_parser"] == "openai_gptoss"
    seed = cfg.seed_path()
    assert seed is not None
    store = SqlitePromptStore(tmp_path / "r.db")
    try:
        assert seed_store(store, seed, served_models=served) == ["listing-moderation"]
        version = store.get_version("listing-moderation", 1)
        assert version.spec.model == MODEL and version.spec.reasoning is not None
        # a request fits the engine's context: prompt budget plus the generation budget
        assert version.spec.max_output_tokens() < cfg.serving.models[0].engine_kwargs["max_model_len"]
    finally:
        store.close()


def test_the_safeguard_prompt_is_the_shipped_policy_with_only_the_model_settings_changed() -> None:
    shipped = yaml.safe_load(SHIPPED_PROMPT.read_text())
    safeguard = yaml.safe_load(SAFEGUARD_PROMPT.read_text())
    differing = {k for k in shipped.keys() | safeguard.keys() if shipped.get(k) != safeguard.get(k)}
    assert differing == {"model", "reasoning", "evaluation"}


# -- storage rules ---------------------------------------------------------------------------

MARKER = "RATIONALE-7f3a9c"


class ReplayBackend(FakeBackend):
    """Answers every call with a recorded chat completion, read by the real parser."""

    def __init__(self, response: dict[str, Any]) -> None:
        super().__init__()
        self.response = response

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        self.requests.append(request)
        return parse_completion(copy.deepcopy(self.response), request.model, 12.5, "recorded")


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[tuple[TestClient, InMemorySpanExporter, Metrics, Path]]:
    response = copy.deepcopy(_fixtures()["separated"]["response"])
    message = response["choices"][0]["message"]
    message["reasoning"] = f"{MARKER}: {message['reasoning']}"
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, SAFEGUARD_PROMPT.parent, served_models=[MODEL])
    key, record = generate_key("svc", ["moderate"], created_by="test")
    store.put_key(record)
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(TracingSettings(sample_ratio=1.0), exporter=exporter)  # type: ignore[arg-type]
    metrics = Metrics()
    log = DecisionLog(tmp_path / "decisions", replica="gw-0")
    samples = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"),
                             SampleSettings(enabled=True, share=1.0))
    app = create_app(GatewaySettings(), store, ReplayBackend(response), tracer_provider=provider,
                     metrics=metrics, models=[MODEL], decision_log=log, samples=samples)
    try:
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            yield client, exporter, metrics, tmp_path / "decisions"
    finally:
        store.close()


def test_the_rationale_never_reaches_the_decision_log_spans_logs_metrics_or_answers(
        replay: tuple[TestClient, InMemorySpanExporter, Metrics, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    client, exporter, metrics, log_dir = replay
    caplog.set_level(logging.DEBUG)
    answers = [
        client.post("/v1/moderate", headers={"x-request-id": "r-1"},
                    json={"item_id": "i-1", **{k: LISTING[k] for k in ("title", "description", "locale")}}),
        client.post("/v1/moderations", json={"input": LISTING["title"]}),
        client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [],
            "prompt": {"name": "listing-moderation", "variables": {**LISTING, "item_id": "i-2"}}}),
    ]
    for r in answers:
        assert r.status_code == 200, r.text
        assert MARKER not in r.text and "Policy section" not in r.text
    assert answers[0].json()["decision"] == "block"  # the final channel's verdict was served
    service = client.app.state.gateway.service  # type: ignore[attr-defined]

    # positive control: the rationale is there, in memory, for the sample store to take
    call = ModerationCall(front_door="moderate", request_id="r-mem", item_id="i-3", variables=LISTING)
    moderation = client.portal.call(lambda: service.moderate(call, started=service.clock()))
    assert moderation.evaluation.rationale is not None and MARKER in moderation.evaluation.rationale

    # the opt-in sample store, read with `samples:read`, is the one place it is kept
    client.portal.call(service.samples.flush)
    (sample,) = service.samples.store.by_request(["r-1"]).values()
    assert MARKER in sample.content["rationale"] and sample.content["title"] == LISTING["title"]

    client.portal.call(service.decision_log.flush)
    written = b"".join(p.read_bytes() for p in log_dir.rglob("*") if p.is_file())
    assert b'"reasoning_tokens":163' in written  # the count is kept...
    assert MARKER.encode() not in written and b"Policy section" not in written  # ...the text is not
    spans = exporter.get_finished_spans()
    assert spans
    assert not [s.name for s in spans if MARKER in s.to_json()]
    assert not [r.getMessage() for r in caplog.records if MARKER in r.getMessage()
                or MARKER in (r.exc_text or "")]
    exposition = generate_latest(metrics.registry).decode()
    assert MARKER not in exposition and "Policy section" not in exposition
    assert orjson.loads(answers[0].text)["usage"]  # usage is reported; no rationale field
