"""Evaluate a cascade version against each of its models alone.

A version with a `cascade:` (gateway/cascade.py) answers with its own model and, where that
verdict escalates, with the cascade's model. To say whether the second model is worth its
cost, `modgate eval run` evaluates three things on the same rows:

- **first alone**: the version's model on every row (the version without its cascade);
- **second alone**: the cascade's model on every row (`PromptSpec.second_spec`);
- **cascade**: per row the first answer, or the second where the first escalates
  (`gateway.cascade.trigger_for` on the first answer's decision, confidence and calibrated
  decision margin: the serve-time rule, `low_margin` and `margin_unavailable` included),
  costing the sum of both calls' tokens and latency (they run one after the other).

The cascade's results are the version's results (its scorecard, promotion gates): that is what
production answers. The model is called once per row and model; answers are cached like any
evaluation's, under each model's own answer hash, so "first alone" shares its cache with the
same prompt version without a cascade. A backend error of either call is an error of the
cascade's item (retried on the next run, like any evaluation error).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cascade import second_version, trigger_for
from gateway.quality.evaluation.runner import ItemResult, run_eval
from gateway.quality.evaluation.scorecard import Scorecard, build_scorecard
from prompt_registry import PromptVersion
from serving import InferenceBackend

if TYPE_CHECKING:
    from gateway.quality.evaluation.dataset import Dataset, DatasetRow

__all__ = ["CascadeRun", "cascade_summary", "combine", "first_version", "run_cascades",
           "summary_markdown", "write_cascade_report"]

ARMS = ("first", "second", "cascade")


def first_version(version: PromptVersion) -> PromptVersion:
    """*version* without its cascade: what its own model answers alone."""
    return PromptVersion.model_construct(
        spec=version.spec.model_copy(update={"cascade": None}), version=version.version,
        content_hash=version.content_hash, created_at=version.created_at,
        created_by=version.created_by)


@dataclass(frozen=True, slots=True)
class CascadeRun:
    """One cascade version on a dataset: results of each model alone and of the cascade (one
    per row, in row order), and why each escalated item escalated."""

    version: PromptVersion
    first: list[ItemResult]
    second: list[ItemResult]
    cascade: list[ItemResult]
    triggers: dict[str, str]  # item id -> trigger, for the items that escalated


def combine(version: PromptVersion, first: ItemResult, second: ItemResult) -> tuple[ItemResult, str | None]:
    """The cascade's result for one row, and the trigger when it escalated."""
    if first.error_type is not None or first.decision is None:
        return first, None  # no first verdict: the request fails before any escalation
    trigger = trigger_for(version.spec.cascade, first.decision, confidence=first.confidence,
                          margin=first.decision_margin)
    if trigger is None:
        return first, None
    both = replace(second, latency_ms=first.latency_ms + second.latency_ms,
                   prompt_tokens=first.prompt_tokens + second.prompt_tokens,
                   completion_tokens=first.completion_tokens + second.completion_tokens,
                   cached=first.cached and second.cached)
    return both, trigger


async def run_cascades(versions: Sequence[PromptVersion], rows: Sequence[DatasetRow],
                       backend: InferenceBackend, **kwargs: Any) -> list[CascadeRun]:
    """Evaluate each cascade *version* (first alone, second alone, cascade) on *rows*; the
    keyword arguments are `run_eval`'s. One `run_eval` call for all of them, so its
    concurrency bound holds across models."""
    variants = [v for version in versions for v in (first_version(version), second_version(version))]
    results = await run_eval(variants, rows, backend, **kwargs)
    n = len(rows)
    runs = []
    for i, version in enumerate(versions):
        first = results[2 * i * n:(2 * i + 1) * n]
        second = results[(2 * i + 1) * n:(2 * i + 2) * n]
        cascade: list[ItemResult] = []
        triggers: dict[str, str] = {}
        for a, b in zip(first, second, strict=True):
            result, trigger = combine(version, a, b)
            cascade.append(result)
            if trigger is not None:
                triggers[a.item_id] = trigger
        runs.append(CascadeRun(version, first, second, cascade, triggers))
    return runs


def _arm_summary(sc: Scorecard, model: str) -> dict[str, Any]:
    q, r = sc.overall, sc.rates
    return {"model": model, "macro_f1": q.macro_f1, "accuracy": q.accuracy,
            "flagged_precision": q.flagged.precision, "flagged_recall": q.flagged.recall,
            "needs_review_rate": r["needs_review"].rate, "parse_failures": r["parse_failure"].count,
            "errors": r["error"].count, "tokens": dict(sc.tokens),
            "latency_ms": dict(sc.latency_ms)}


def cascade_summary(run: CascadeRun, dataset: Dataset) -> dict[str, Any]:
    """Quality, tokens and latency of the cascade against each model alone (JSON-ready)."""
    version = run.version
    cascade = version.spec.cascade
    assert cascade is not None
    scorecards = {"first": build_scorecard(first_version(version), dataset, run.first),
                  "second": build_scorecard(second_version(version), dataset, run.second),
                  "cascade": build_scorecard(version, dataset, run.cascade)}
    models = {"first": version.spec.model, "second": cascade.model,
              "cascade": f"{version.spec.model} -> {cascade.model}"}
    n = len(run.cascade)
    return {
        "prompt": version.name, "version": version.version, "version_hash": version.content_hash,
        "dataset_sha256": dataset.sha256, "items": n,
        "escalate_on": list(cascade.escalate_on), "min_confidence": cascade.min_confidence,
        "min_margin": cascade.min_margin,
        "escalated": len(run.triggers), "escalation_rate": len(run.triggers) / n if n else None,
        "by_trigger": dict(Counter(run.triggers.values())),
        "arms": {arm: _arm_summary(scorecards[arm], models[arm]) for arm in ARMS},
    }


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The cascade comparison as a Markdown table (one row per arm)."""
    lines = [f"# {summary['prompt']} v{summary['version']}: cascade against each model alone", "",
             f"{summary['items']} items (dataset sha256 {summary['dataset_sha256'][:12]}); "
             f"escalated {summary['escalated']} ({_f(summary['escalation_rate'])}) on "
             f"{', '.join(summary['escalate_on'])}"
             + (f" (min_confidence {summary['min_confidence']})" if summary["min_confidence"] else "")
             + (f" (min_margin {summary['min_margin']})" if summary.get("min_margin") else "")
             + "; by trigger: " + (", ".join(f"{k} {v}" for k, v in sorted(summary["by_trigger"].items()))
                                   or "none"), "",
             "| | model | macro F1 | accuracy | flagged precision | flagged recall | needs_review | "
             "errors | tokens (prompt + completion) | latency p50 / p95 (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"first": "first model alone", "second": "second model alone", "cascade": "**cascade**"}
    for arm in ARMS:
        a = summary["arms"][arm]
        lines.append(
            f"| {names[arm]} | {a['model']} | {_f(a['macro_f1'])} | {_f(a['accuracy'])} | "
            f"{_f(a['flagged_precision'])} | {_f(a['flagged_recall'])} | {_f(a['needs_review_rate'])} | "
            f"{a['errors']} | {a['tokens']['prompt']} + {a['tokens']['completion']} | "
            f"{_f(a['latency_ms']['p50'], 0)} / {_f(a['latency_ms']['p95'], 0)} |")
    lines += ["", "The cascade's tokens and latency are those of both calls where it escalated "
              "(they run one after the other). Its row is the version's scorecard."]
    return "\n".join(lines) + "\n"


def write_cascade_report(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """`v<N>-cascade.json` and `v<N>-cascade.md` in *out_dir*."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"v{summary['version']}-cascade.json",
             "markdown": out_dir / f"v{summary['version']}-cascade.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(summary_markdown(summary), encoding="utf-8")
    return paths
