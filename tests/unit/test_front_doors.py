"""One moderation path (issue: every front door through one service).

The same listing is sent through `/v1/moderate`, `/v1/moderations`, `/v1/chat/completions`
with a registry prompt (plain and streamed) and `/v1/decisions`. Each must give the same
verdict with the same calibrated probabilities (each read from the field that door's callers
read: `/v1/moderations`' `category_scores`, the Decisions API's answers), write one
decision-log record naming its front door, move the same metric series and make one trace.
With a model answer that is a truncated `allow`, every surface must say `needs_review`, no
response body or stream may carry an `allow` text, and no door may show a probability.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog, DecisionRecord
from gateway.quality.decisions import read_segments
from gateway.telemetry import Metrics, TracingSettings, build_tracer_provider
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

TITLE = "Rolex Submariner 1:1 replica, WhatsApp me"
SELLER = "seller-7"


def _moderate(client: TestClient, rid: str) -> tuple[str, dict[str, Any]]:
    r = client.post("/v1/moderate", headers={"x-request-id": rid},
                    json={"item_id": rid, "seller_id": SELLER, "title": TITLE, "description": "",
                          "locale": "en-US"})
    assert r.status_code == 200, r.text
    body = r.json()
    return r.text, {"decision": body["decision"], "category": body["category"],
                    "fail_reason": body["fail_reason"], "version": body["prompt"]["version"],
                    "decision_probability": body["decision_probability"],
                    "category_probability": body["category_probability"]}


def _moderations(client: TestClient, rid: str) -> tuple[str, dict[str, Any]]:
    r = client.post("/v1/moderations", headers={"x-request-id": rid},
                    json={"input": TITLE, "locale": "en-US"})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    ext = result["modgate"]
    scores = result["category_scores"]
    # the calibrated category probability is the verdict category's score (null when withheld)
    category_p = scores.get(ext["category"], ext["category_probability"]) \
        if ext["category_scores_withheld"] is None else None
    return r.text, {"decision": ext["decision"], "category": ext["category"],
                    "fail_reason": ext["fail_reason"], "version": ext["prompt"]["version"],
                    "decision_probability": ext["decision_probability"],
                    "category_probability": category_p}


def _chat_body(rid: str) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": [],
            "prompt": {"name": "listing-moderation", "locale": "en-US",
                       "variables": {"item_id": rid, "seller_id": SELLER, "title": TITLE,
                                     "description": ""}}}


def _chat(client: TestClient, rid: str) -> tuple[str, dict[str, Any]]:
    r = client.post("/v1/chat/completions", headers={"x-request-id": rid}, json=_chat_body(rid))
    assert r.status_code == 200, r.text
    body = r.json()
    content = orjson.loads(body["choices"][0]["message"]["content"])
    verdict = body["modgate"]["verdict"]
    # the standard field carries the validated verdict, never something else
    assert content["decision"] == verdict["decision"] and content["category"] == verdict["category"]
    return r.text, {"decision": verdict["decision"], "category": verdict["category"],
                    "fail_reason": verdict["fail_reason"], "version": body["modgate"]["prompt"]["version"],
                    "decision_probability": verdict["decision_probability"],
                    "category_probability": verdict["category_probability"]}


def _chat_stream(client: TestClient, rid: str) -> tuple[str, dict[str, Any]]:
    r = client.post("/v1/chat/completions", headers={"x-request-id": rid},
                    json={**_chat_body(rid), "stream": True})
    assert r.status_code == 200, r.text
    events = [orjson.loads(line[len("data: "):]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    final = next(e for e in events if e.get("choices") and e["choices"][0]["finish_reason"])
    verdict = final["modgate"]["verdict"]
    assert orjson.loads(content)["decision"] == verdict["decision"]
    return r.text, {"decision": verdict["decision"], "category": verdict["category"],
                    "fail_reason": verdict["fail_reason"], "version": final["modgate"]["prompt"]["version"],
                    "decision_probability": verdict["decision_probability"],
                    "category_probability": verdict["category_probability"]}


DECISIONS = ["allow", "block", "needs_review"]
CATEGORIES = ["none", "counterfeit", "prohibited_item", "misleading_claim", "off_platform_payment",
              "adult", "hate_harassment"]


def _decisions(client: TestClient, rid: str) -> tuple[str, dict[str, Any]]:
    r = client.post("/v1/decisions", headers={"x-request-id": rid}, json={
        "model": "listing-moderation", "input": TITLE, "locale": "en-US", "safety_identifier": SELLER,
        "questions": [
            {"type": "choice", "name": "decision", "instructions": "the policy decision",
             "choices": [{"value": v} for v in DECISIONS]},
            {"type": "choice", "name": "category", "instructions": "the policy category",
             "choices": [{"value": v} for v in CATEGORIES]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    decision, category = body["answers"]
    verdict = body["modgate"]["verdict"]
    if decision["type"] == "choice":  # the answer is the verdict's, its confidence the probability
        assert decision["choice"] == verdict["decision"] and category["choice"] == verdict["category"]
    return r.text, {"decision": verdict["decision"], "category": verdict["category"],
                    "fail_reason": verdict["fail_reason"], "version": body["modgate"]["prompt"]["version"],
                    "decision_probability": decision.get("confidence"),
                    "category_probability": category.get("confidence")}


FRONT_DOORS: dict[str, tuple[str, str, Callable[[TestClient, str], tuple[str, dict[str, Any]]]]] = {
    # name: (front_door in the decision log, route of the server span, call)
    "moderate": ("moderate", "/v1/moderate", _moderate),
    "moderations": ("moderations", "/v1/moderations", _moderations),
    "chat": ("chat", "/v1/chat/completions", _chat),
    "chat-stream": ("chat", "/v1/chat/completions", _chat_stream),
    "decisions": ("decisions", "/v1/decisions", _decisions),
}


class Stack:
    def __init__(self, client: TestClient, exporter: InMemorySpanExporter, metrics: Metrics,
                 log_dir: Path, backend: FakeBackend) -> None:
        self.client, self.exporter, self.metrics = client, exporter, metrics
        self.log_dir, self.backend = log_dir, backend

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def stack(store: SqlitePromptStore, caller_key: str, tmp_path: Path) -> Iterator[Stack]:
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(TracingSettings(sample_ratio=1.0), exporter=exporter)  # type: ignore[arg-type]
    metrics = Metrics()
    backend = FakeBackend()
    log = DecisionLog(tmp_path / "decisions", replica="gw-0")
    app = create_app(GatewaySettings(), store, backend, tracer_provider=provider, metrics=metrics,
                     models=["tiny-llama"], decision_log=log)
    with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as client:
        yield Stack(client, exporter, metrics, tmp_path / "decisions", backend)


def _records(stack: Stack) -> list[DecisionRecord]:
    stack.client.portal.call(stack.client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    return list(read_segments(stack.log_dir))


@pytest.mark.parametrize("door", list(FRONT_DOORS))
def test_every_front_door_takes_the_one_path(stack: Stack, door: str) -> None:
    front_door, route, call = FRONT_DOORS[door]
    reference = _moderate(stack.client, "ref-1")[1]  # the same listing through /v1/moderate
    stack.exporter.clear()
    before = {k: stack.sample("modgate_verdicts_total", prompt="listing-moderation", version="1",
                              arm="stable", decision=reference["decision"],
                              category=reference["category"] or "-")
              for k in ("v",)}
    total_before = stack.sample("modgate_stage_seconds_count", stage="total",
                                prompt="listing-moderation", version="1", arm="stable")
    auth_before = stack.sample("modgate_stage_seconds_count", stage="auth", prompt="-",
                               version="-", arm="-")

    _, got = call(stack.client, f"{door}-1")

    # same verdict, same version (the fake model answers per listing), same probabilities
    assert got == reference
    assert reference["decision_probability"] is not None and reference["category_probability"] is not None
    records = [r for r in _records(stack) if r.request_id.startswith(f"{door}-1")]
    assert len(records) == 1, records
    rec = records[0]
    assert rec.front_door == front_door and rec.kind == "moderation" and rec.arm == "stable"
    assert (rec.decision, rec.category, rec.prompt_version) == (
        reference["decision"], reference["category"], 1)
    assert rec.caller == "svc-listing"
    # the same metric series moved by one
    after = stack.sample("modgate_verdicts_total", prompt="listing-moderation", version="1",
                         arm="stable", decision=reference["decision"],
                         category=reference["category"] or "-")
    assert after - before["v"] == 1
    assert stack.sample("modgate_stage_seconds_count", stage="total", prompt="listing-moderation",
                        version="1", arm="stable") - total_before == 1
    assert stack.sample("modgate_stage_seconds_count", stage="auth", prompt="-", version="-",
                        arm="-") - auth_before == 1
    assert stack.sample("modgate_requests_total", route=route, code="200") >= 1
    # one trace, rooted in the front door's server span, with the same stages under it
    spans = stack.exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == [f"POST {route}"]
    assert {"auth", "prompt.resolve", "prompt.render", "chat tiny-llama", "verdict.validate"} <= {
        s.name for s in spans}


@pytest.mark.parametrize("door", list(FRONT_DOORS))
def test_truncated_allow_is_needs_review_everywhere_with_no_allow_text(stack: Stack, door: str) -> None:
    stack.backend.responder = lambda _req: '{"decision":"allow","category":"none","confidence":0.9'
    stack.backend.finish_reason = "length"
    _, route, call = FRONT_DOORS[door]
    text, got = call(stack.client, f"{door}-t")
    assert got["decision"] == "needs_review" and got["fail_reason"] == "truncated_output"
    assert got["decision_probability"] is None and got["category_probability"] is None
    assert "allow" not in text  # not in the body, not in any streamed delta
    rec = next(r for r in _records(stack) if r.request_id.startswith(f"{door}-t"))
    assert rec.decision == "needs_review" and rec.fail_reason == "truncated_output"
    assert stack.sample("modgate_verdict_failures_total", prompt="listing-moderation", version="1",
                        arm="stable", reason="truncated_output") == 1
    assert route  # every front door was exercised


def test_raw_chat_is_admitted_metered_and_logged_without_content(stack: Stack) -> None:
    secret = "my listing text that must not be logged"
    r = stack.client.post("/v1/chat/completions", headers={"x-request-id": "raw-1"},
                          json={"model": "tiny-llama", "messages": [{"role": "user", "content": secret}]})
    assert r.status_code == 200, r.text
    stack.client.portal.call(stack.client.app.state.gateway.service.decision_log.flush)  # type: ignore[attr-defined]
    everything = list(read_segments(stack.log_dir, kinds=None))
    raw = [rec for rec in everything if rec.request_id == "raw-1"]
    assert len(raw) == 1 and raw[0].kind == "raw_chat" and raw[0].arm == "raw"
    assert raw[0].front_door == "chat" and raw[0].prompt_name is None and raw[0].decision is None
    assert raw[0].prompt_tokens is not None
    assert not any(rec.request_id == "raw-1" for rec in read_segments(stack.log_dir))  # quality readers skip it
    dump = b"".join(p.read_bytes() for p in stack.log_dir.rglob("*.jsonl"))
    assert secret.encode() not in dump
    assert stack.sample("modgate_stage_seconds_count", stage="backend", prompt="-", version="-",
                        arm="raw") == 1
    assert b'route="/v1/chat/completions"' in generate_latest(stack.metrics.registry)
    roots = [s for s in stack.exporter.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots] == ["POST /v1/chat/completions"]


def test_durable_mode_answers_only_what_is_on_disk(store: SqlitePromptStore, caller_key: str,
                                                   tmp_path: Path) -> None:
    """decision_log.durability: durable: the verdict leaves only after its record is written;
    when the write fails the caller gets 503 decision_log_unavailable, not a verdict."""
    log = DecisionLog(tmp_path / "decisions", replica="gw-0", durable=True, durable_timeout_s=2)
    app = create_app(GatewaySettings(), store, FakeBackend(), decision_log=log)
    with TestClient(app, headers={"authorization": f"Bearer {caller_key}"}) as client:
        r = client.post("/v1/moderate", json={"item_id": "d-1", "seller_id": SELLER, "title": TITLE})
        assert r.status_code == 200, r.text
        assert [rec.request_id for rec in read_segments(tmp_path / "decisions")] == [r.json()["request_id"]]

        def broken(fd: int, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        import gateway.decision_log as dl
        original, dl._write_all = dl._write_all, broken  # type: ignore[attr-defined]
        try:
            r = client.post("/v1/moderate", json={"item_id": "d-2", "seller_id": SELLER, "title": TITLE})
        finally:
            dl._write_all = original  # type: ignore[attr-defined]
        assert r.status_code == 503 and r.json()["error"]["type"] == "decision_log_unavailable"
        assert "decision" not in r.json()


def test_a_draft_is_tried_through_the_same_checks_and_logged_nowhere(stack: Stack,
                                                                     example_spec: Any) -> None:
    service = stack.client.app.state.gateway.service  # type: ignore[attr-defined]
    draft = example_spec.model_copy(update={"description": "a draft nobody published"})
    stack.backend.responder = lambda _req: '{"decision":"allow","category":"none","confidence":0.9'
    stack.backend.finish_reason = "length"
    evs = stack.client.portal.call(lambda: service.try_draft(
        draft, [{"title": TITLE, "description": ""}, {"title": "kids bike", "description": ""}],
        locale="zh-CN", started=__import__("time").perf_counter(), request_id="draft-1", caller="ops"))
    assert [ev.verdict.decision for ev in evs] == ["needs_review", "needs_review"]  # fail closed
    assert evs[0].locale == "zh-CN" and evs[0].version.version == 0
    assert not [r for r in _records(stack) if r.request_id.startswith("draft-1")]
    bad = draft.model_copy(update={"model": "qwen-does-not-exist"})
    with pytest.raises(Exception) as info:
        stack.client.portal.call(lambda: service.try_draft(
            bad, [{"title": "x"}], locale=None, started=__import__("time").perf_counter(),
            request_id="draft-2", caller="ops"))
    assert type(info.value).__name__ == "UnknownModel" and "qwen-does-not-exist" in str(info.value)
