"""`modgate eval run` on a cascade version (issue 19, item 3): the version is scored as
production serves it, and the report compares the cascade with each of its models alone
(quality, tokens, latency). Two model names on the fake backend, each with its own error rate
on the shipped sample dataset."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

import gateway.cli.eval as eval_cli
from gateway.quality.evaluation.cascade import cascade_summary, run_cascades, summary_markdown
from gateway.quality.evaluation.dataset import load_dataset
from gateway.quality.evaluation.scorecard import build_scorecard
from prompt_registry import PromptSpec, PromptVersion
from serving import ChatRequest
from serving.fake_backend import FakeBackend
from tests.unit.test_cascade import _scored_tokens

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "datasets" / "listings-sample.jsonl"
SMALL, BIG = "tiny-llama", "big-llama"


def _verdict(decision: str, category: str, confidence: float = 0.9) -> str:
    return json.dumps({"decision": decision, "category": category, "confidence": confidence},
                      separators=(",", ":"))


def _oracle() -> Callable[[ChatRequest], str]:
    """The small model answers needs_review on ~30 % of items, the big one is wrong on ~20 %
    (a different, stable share per model); otherwise each answers the gold verdict."""
    rows = load_dataset(SAMPLE).rows

    def respond(request: ChatRequest) -> str:
        user = request.messages[-1]["content"]
        for row in rows:
            if json.dumps({"title": row.title, "description": row.description}, ensure_ascii=False) in user:
                rng = random.Random(f"{request.model}:{row.item_id}")
                if request.model == SMALL and rng.random() < 0.3:
                    return _verdict("needs_review", "none", 0.4)
                if request.model == BIG and rng.random() < 0.2:
                    return _verdict("allow", "none") if row.gold_flagged else _verdict("block", "adult")
                return _verdict(row.gold_decision, row.gold_category)
        return "not a verdict"
    return respond


def _cascade_spec(example_spec: PromptSpec) -> PromptSpec:
    data = example_spec.model_dump(mode="json", exclude_none=True)
    data["cascade"] = {"model": BIG}
    return PromptSpec.model_validate(data)


class Calls(FakeBackend):
    def __init__(self) -> None:
        super().__init__(responder=_oracle())
        self.by_model: dict[str, int] = {}

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> Any:
        self.by_model[request.model] = self.by_model.get(request.model, 0) + 1
        return await super().chat(request, timeout_s=timeout_s)


def test_the_cascade_is_scored_against_each_model_alone(example_spec: PromptSpec, tmp_path: Path) -> None:
    spec = _cascade_spec(example_spec)
    version = PromptVersion(spec=spec, version=3, content_hash=spec.content_hash(),
                            created_at=datetime(2026, 1, 1, tzinfo=UTC))
    dataset = load_dataset(SAMPLE)
    backend = Calls()

    def run() -> list[Any]:
        return asyncio.run(run_cascades([version], list(dataset.rows), backend, concurrency=4,
                                        cache_dir=tmp_path / "cache", priority=5, timeout_s=5.0,
                                        progress=False))
    (r,) = run()
    n = len(dataset)
    assert backend.by_model == {SMALL: n, BIG: n}  # each model once per item
    escalated = {a.item_id for a in r.first if a.decision == "needs_review"}
    assert set(r.triggers) == escalated and set(r.triggers.values()) == {"needs_review"}
    assert 0.2 * n < len(escalated) < 0.4 * n
    for a, b, c in zip(r.first, r.second, r.cascade, strict=True):
        if a.item_id in escalated:
            assert (c.decision, c.category) == (b.decision, b.category)
            assert c.completion_tokens == a.completion_tokens + b.completion_tokens
            assert c.latency_ms == pytest.approx(a.latency_ms + b.latency_ms)
        else:
            assert c == a

    summary = cascade_summary(r, dataset)
    arms = summary["arms"]
    assert (arms["first"]["model"], arms["second"]["model"]) == (SMALL, BIG)
    assert arms["first"]["needs_review_rate"] > arms["cascade"]["needs_review_rate"]
    assert arms["cascade"]["accuracy"] > max(arms["first"]["accuracy"], arms["second"]["accuracy"])
    assert arms["cascade"]["tokens"]["total"] == arms["first"]["tokens"]["total"] + sum(
        b.prompt_tokens + b.completion_tokens for b in r.second if b.item_id in escalated)
    assert arms["cascade"]["tokens"]["total"] < arms["first"]["tokens"]["total"] + arms["second"]["tokens"]["total"]
    # the cascade's results are the version's scorecard
    assert build_scorecard(version, dataset, r.cascade).overall.accuracy == arms["cascade"]["accuracy"]

    # run again: every answer from the cache
    backend.by_model.clear()
    (again,) = run()
    assert backend.by_model == {} and again.cascade == [replace_cached(c) for c in r.cascade]


def replace_cached(result: Any) -> Any:
    from dataclasses import replace

    return replace(result, cached=True, latency_ms=pytest.approx(result.latency_ms, abs=1e-3))


def test_cli_run_writes_the_cascade_report(tmp_path: Path, example_spec: PromptSpec,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import load_config
    from gateway.stores import open_store
    from prompt_registry.loader import seed_store

    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["registry"]["seed_dir"] = str(ROOT / "configs" / "prompts")
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    store = open_store(load_config(path))
    try:
        seed_store(store, ROOT / "configs" / "prompts")  # v1
        assert store.publish(_cascade_spec(example_spec), actor="test").version.version == 2
    finally:
        store.close()
    backends: list[Calls] = []
    monkeypatch.setattr(eval_cli, "make_backend", lambda cfg: backends.append(Calls()) or backends[-1])
    result = CliRunner().invoke(eval_cli.eval_app, [
        "run", "--config", str(path), "--prompt", "listing-moderation", "--version", "1",
        "--version", "2", "--dataset", str(SAMPLE), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    n = len(load_dataset(SAMPLE))
    # v1 and v2's first model share their answers (same prompt and model): n calls, plus n big
    assert backends[0].by_model == {SMALL: n, BIG: n}
    out = json.loads(result.output)
    (cascade,) = out["cascades"]
    assert cascade["version"] == 2 and cascade["escalated"] > 0
    v2 = next(s for s in out["scorecards"] if s["version"] == 2)
    assert v2["accuracy"] == cascade["arms"]["cascade"]["accuracy"]
    md = Path(cascade["paths"]["markdown"]).read_text(encoding="utf-8")
    assert "second model alone" in md and BIG in md and "**cascade**" in md
    assert json.loads(Path(cascade["paths"]["json"]).read_text())["escalated"] == cascade["escalated"]

    text = CliRunner().invoke(eval_cli.eval_app, [
        "run", "--config", str(path), "--prompt", "listing-moderation", "--version", "2",
        "--dataset", str(SAMPLE)], catch_exceptions=False)
    assert text.exit_code == 0, text.output
    assert backends[1].by_model == {}  # all cached
    assert "v2 cascade: escalated" in text.output and "second alone" in text.output


class MarginCalls(Calls):
    """The small model answers the gold verdict on every item, but on a stable ~30 % its
    decision is a close call (probability 0.55 against 0.45 for the next, margin 0.1) and on
    ~10 % its engine sends no log-probabilities; otherwise it is sure (0.95). The big model is
    the oracle's. What the cascade should escalate is known per item from the same rule."""

    CLOSE, BLIND = 0.3, 0.1

    @staticmethod
    def kind(item_id: str) -> str:
        x = random.Random(f"margin:{item_id}").random()
        return "close" if x < MarginCalls.CLOSE else "blind" if x < MarginCalls.CLOSE + MarginCalls.BLIND else "sure"

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> Any:
        result = await super().chat(request, timeout_s=timeout_s)
        if request.model != SMALL:
            return result
        row = next(r for r in load_dataset(SAMPLE).rows
                   if json.dumps({"title": r.title, "description": r.description}, ensure_ascii=False)
                   in request.messages[-1]["content"])
        text = _verdict(row.gold_decision, row.gold_category, 0.99)
        kind = self.kind(row.item_id)
        if kind == "blind":
            return replace(result, text=text, logprobs=None)
        p = 0.55 if kind == "close" else 0.95
        other = next(d for d in ("allow", "block", "needs_review") if d != row.gold_decision)
        return replace(result, text=text, logprobs=_scored_tokens(
            text, {row.gold_decision: p, other: 1.0 - p}))


def test_the_comparison_covers_the_low_margin_trigger(example_spec: PromptSpec, tmp_path: Path) -> None:
    data = example_spec.model_dump(mode="json", exclude_none=True)
    data["cascade"] = {"model": BIG, "escalate_on": ["low_margin"], "min_margin": 0.5}
    spec = PromptSpec.model_validate(data)
    version = PromptVersion(spec=spec, version=4, content_hash=spec.content_hash(),
                            created_at=datetime(2026, 1, 1, tzinfo=UTC))
    dataset = load_dataset(SAMPLE)
    backend = MarginCalls()

    def run() -> Any:
        (r,) = asyncio.run(run_cascades([version], list(dataset.rows), backend, concurrency=4,
                                        cache_dir=tmp_path / "cache", priority=5, timeout_s=5.0,
                                        progress=False))
        return r
    r = run()
    expected = {row.item_id: {"close": "low_margin", "blind": "margin_unavailable"}[k]
                for row in dataset.rows if (k := MarginCalls.kind(row.item_id)) != "sure"}
    assert r.triggers == expected
    assert set(expected.values()) == {"low_margin", "margin_unavailable"}
    for a, b, c in zip(r.first, r.second, r.cascade, strict=True):
        assert a.decision_margin == {"close": pytest.approx(0.1), "blind": None,
                                     "sure": pytest.approx(0.9)}[MarginCalls.kind(a.item_id)]
        assert (c.decision, c.category) == (
            (b.decision, b.category) if a.item_id in expected else (a.decision, a.category))

    summary = cascade_summary(r, dataset)
    assert summary["escalate_on"] == ["low_margin"] and summary["min_margin"] == 0.5
    assert summary["by_trigger"] == dict(Counter(expected.values()))
    assert summary["escalated"] == len(expected)
    # the first model answers gold everywhere: escalating its close calls to a worse model costs
    assert arms_accuracy(summary, "first") > arms_accuracy(summary, "cascade") > arms_accuracy(summary, "second")
    md = summary_markdown(summary)
    assert "min_margin 0.5" in md and "low_margin" in md and "margin_unavailable" in md

    # the margins come back from the answer cache (log-probabilities are cached with the answers)
    backend.by_model.clear()
    again = run()
    assert backend.by_model == {} and again.triggers == r.triggers


def arms_accuracy(summary: dict[str, Any], arm: str) -> float:
    return float(summary["arms"][arm]["accuracy"])
