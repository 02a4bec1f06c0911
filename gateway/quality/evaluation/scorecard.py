"""Scorecards for one prompt version on one dataset, and the paired comparison of two.

How verdicts map to categories
------------------------------

*Flagged* means "not allowed": a gold row is flagged when `gold_decision != allow`; a prediction
is flagged when the model answered and `decision != allow`. `needs_review` counts as flagged,
and so does output the gateway could not parse (it becomes `needs_review` in production).

For each violation category C (every category of the prompt's verdict schema except `none`):

- a row is **positive for C** when it is flagged and `gold_category == C`;
- a prediction is **positive for C** when it is flagged and its `category == C`.

TP/FP/FN follow, per item, from those two facts; `support` = TP + FN (gold positives),
`predicted` = TP + FP. Precision = TP / predicted, recall = TP / support, F1 their harmonic mean;
precision and recall come with 95% Wilson score intervals (statsmodels `proportion_confint`,
`method="wilson"`). A precision with no predictions, or a recall with no support, is undefined
(None) and has no interval.

A backend **error** (no verdict at all) is positive for nothing: it is a miss (FN) when the row
is positive, and never a false positive. Errors are counted in `rates.error` and the report
warns about them; re-running retries them (errors are not cached).

Averages over the violation categories: **macro** = unweighted mean of precision, recall and F1
over the categories with support > 0 (an undefined precision counts as 0 there, like
scikit-learn's `zero_division=0`); **micro** = precision and recall of the summed TP/FP/FN.
**flagged** is the binary task "flag vs allow" with the same definitions (positive = flagged).

Each item also gets one **outcome label**, used by the confusion matrix and for correctness:
`none` for an allow; the category for a flagged verdict with a category other than `none`;
`needs_review` for a flagged verdict without a category (needs_review/none, a parse failure,
or a block/none); and, on the predicted side only, `error`. The gold side uses the same rule
(gold `needs_review`/`none`, e.g. a prompt injection in an otherwise fine listing, is
`needs_review`). An item is **correct** when its predicted outcome label equals its gold
outcome label; so block vs needs_review with the same category both count as correct (both
stop the listing), while allowing an item whose gold is needs_review is wrong.
`decision_accuracy` is the stricter share of items whose decision equals the gold decision.

Comparison (`compare(a, b)`): both scorecards must be for the same dataset. Items that either
version failed to answer (backend error) are left out, and counted. On the remaining items:
exact McNemar test (statsmodels `mcnemar(exact=True)`, i.e. a two-sided binomial test on the
discordant pairs) on per-item correctness; per category, the same test on recall (gold
positives caught by only one version) and on false positives (gold negatives flagged as C by
only one version). Every item whose outcome label or decision differs is listed: **fixed**
(b correct, a wrong), **broken** (a correct, b wrong) or **changed** (both right or both
wrong, but different verdicts); so fixed and broken are McNemar's two discordant counts.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from gateway.quality.evaluation.dataset import ALLOW, NO_CATEGORY, Dataset, DatasetRow
from gateway.quality.evaluation.runner import ItemResult
from prompt_registry import FAIL_CLOSED_DECISION, PromptVersion, ScorecardRecord

__all__ = [
    "CategoryDelta",
    "CategoryStats",
    "ChangedItem",
    "Comparison",
    "ItemOutcome",
    "Quality",
    "Scorecard",
    "build_scorecard",
    "compare",
    "mcnemar_exact",
    "registry_record",
    "wilson",
]

FLAGGED_NONE = "needs_review"   # outcome label: flagged without a category
ERROR = "error"                  # outcome label: the backend failed (predicted side only)
ALPHA = 0.05


def wilson(successes: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval for successes/n (None when n == 0)."""
    if n <= 0:
        return None
    low, high = proportion_confint(successes, n, alpha=ALPHA, method="wilson")
    return float(low), float(high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts."""
    if only_a + only_b == 0:
        return 1.0
    return float(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue)


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


# -- per-item outcomes -------------------------------------------------------------------------


def outcome_label(decision: str | None, category: str | None, *, error: bool = False) -> str:
    if error or decision is None:
        return ERROR
    if decision == ALLOW:
        return NO_CATEGORY
    if category is None or category == NO_CATEGORY:
        return FLAGGED_NONE
    return category


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    item_id: str
    locale: str
    gold_decision: str
    gold_category: str
    gold_label: str
    decision: str | None
    category: str | None
    confidence: float | None
    predicted_label: str
    correct: bool
    fail_reason: str | None
    error_type: str | None
    tags: list[str] = field(default_factory=list)
    # calibrated probabilities and who decided (gateway/verdict.py); None in older scorecards
    decision_probability: float | None = None
    category_probability: float | None = None
    block_probability: float | None = None
    probability_unresolved: float | None = None
    decided_by: str | None = None
    model_decision: str | None = None

    @property
    def gold_flagged(self) -> bool:
        return self.gold_decision != ALLOW

    @property
    def predicted_flagged(self) -> bool:
        return self.error_type is None and self.decision is not None and self.decision != ALLOW

    def gold_positive(self, category: str) -> bool:
        return self.gold_flagged and self.gold_category == category

    def predicted_positive(self, category: str) -> bool:
        return self.predicted_flagged and self.category == category


def _outcome(row: DatasetRow, res: ItemResult) -> ItemOutcome:
    gold = outcome_label(row.gold_decision, row.gold_category)
    pred = outcome_label(res.decision, res.category, error=res.error_type is not None)
    return ItemOutcome(item_id=row.item_id, locale=row.locale, gold_decision=row.gold_decision,
                       gold_category=row.gold_category, gold_label=gold, decision=res.decision,
                       category=res.category, confidence=res.confidence, predicted_label=pred,
                       correct=pred == gold, fail_reason=res.fail_reason,
                       error_type=res.error_type, tags=list(row.tags),
                       decision_probability=res.decision_probability,
                       category_probability=res.category_probability,
                       block_probability=res.block_probability,
                       probability_unresolved=res.probability_unresolved,
                       decided_by=res.decided_by, model_decision=res.model_decision)


# -- metrics -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CategoryStats:
    category: str
    support: int
    predicted: int
    tp: int
    fp: int
    fn: int
    precision: float | None
    precision_ci: tuple[float, float] | None
    recall: float | None
    recall_ci: tuple[float, float] | None
    f1: float | None

    @classmethod
    def from_counts(cls, category: str, tp: int, fp: int, fn: int) -> CategoryStats:
        p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        if p is None and r is None:
            f1 = None
        elif not p or not r:
            f1 = 0.0
        else:
            f1 = 2 * p * r / (p + r)
        return cls(category=category, support=tp + fn, predicted=tp + fp, tp=tp, fp=fp, fn=fn,
                   precision=p, precision_ci=wilson(tp, tp + fp), recall=r,
                   recall_ci=wilson(tp, tp + fn), f1=f1)


@dataclass(frozen=True, slots=True)
class Quality:
    n: int
    categories: list[CategoryStats]
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    micro: CategoryStats
    flagged: CategoryStats
    correct: int
    accuracy: float | None
    accuracy_ci: tuple[float, float] | None
    decision_accuracy: float | None

    def category(self, name: str) -> CategoryStats | None:
        return next((c for c in self.categories if c.category == name), None)


def quality(outcomes: Sequence[ItemOutcome], categories: Sequence[str]) -> Quality:
    """Per-category, macro, micro and flagged metrics of *outcomes* (see the module doc)."""
    stats = []
    for cat in categories:
        tp = sum(1 for o in outcomes if o.gold_positive(cat) and o.predicted_positive(cat))
        fp = sum(1 for o in outcomes if not o.gold_positive(cat) and o.predicted_positive(cat))
        fn = sum(1 for o in outcomes if o.gold_positive(cat) and not o.predicted_positive(cat))
        stats.append(CategoryStats.from_counts(cat, tp, fp, fn))
    supported = [s for s in stats if s.support > 0]
    if supported:
        macro_p: float | None = statistics.fmean(s.precision or 0.0 for s in supported)
        macro_r: float | None = statistics.fmean(s.recall or 0.0 for s in supported)
        macro_f1: float | None = statistics.fmean(s.f1 or 0.0 for s in supported)
    else:
        macro_p = macro_r = macro_f1 = None
    micro = CategoryStats.from_counts("micro", sum(s.tp for s in stats), sum(s.fp for s in stats),
                                      sum(s.fn for s in stats))
    ftp = sum(1 for o in outcomes if o.gold_flagged and o.predicted_flagged)
    ffp = sum(1 for o in outcomes if not o.gold_flagged and o.predicted_flagged)
    ffn = sum(1 for o in outcomes if o.gold_flagged and not o.predicted_flagged)
    correct = sum(1 for o in outcomes if o.correct)
    n = len(outcomes)
    return Quality(
        n=n, categories=stats, macro_precision=macro_p, macro_recall=macro_r, macro_f1=macro_f1,
        micro=micro, flagged=CategoryStats.from_counts("flagged", ftp, ffp, ffn), correct=correct,
        accuracy=_ratio(correct, n), accuracy_ci=wilson(correct, n),
        decision_accuracy=_ratio(sum(1 for o in outcomes if o.decision == o.gold_decision), n))


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    n: int
    rate: float | None
    ci: tuple[float, float] | None

    @classmethod
    def of(cls, count: int, n: int) -> Rate:
        return cls(count=count, n=n, rate=_ratio(count, n), ci=wilson(count, n))


@dataclass(frozen=True, slots=True)
class Scorecard:
    prompt: str
    version: int
    version_hash: str
    model: str
    dataset_sha256: str
    dataset_source: str
    created_at: str
    categories: list[str]          # violation categories (schema categories except none)
    overall: Quality
    per_locale: dict[str, Quality]
    labels: list[str]              # confusion rows (gold); columns are labels + [error]
    confusion: list[list[int]]
    decisions: list[str]           # decision confusion rows (gold); columns + [error]
    decision_confusion: list[list[int]]
    rates: dict[str, Rate]         # needs_review, parse_failure (of answered), error (of all)
    fail_reasons: dict[str, int]
    error_types: dict[str, int]
    latency_ms: dict[str, float | None]   # p50, p95, mean over answered items
    tokens: dict[str, int]                # prompt, completion, total
    cached: int                    # results taken from the cache
    items: list[ItemOutcome]
    # reliability of the calibrated probability and of the self-reported confidence
    # (gateway/quality/evaluation/calibration.py), keyed decision_probability / confidence
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return [*self.labels, ERROR]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scorecard:
        d = dict(data)
        d["overall"] = _quality_from(d["overall"])
        d["per_locale"] = {k: _quality_from(v) for k, v in d["per_locale"].items()}
        d["rates"] = {k: Rate(**_tuples(v)) for k, v in d["rates"].items()}
        d["items"] = [ItemOutcome(**v) for v in d["items"]]
        return cls(**d)


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if (k == "ci" or k.endswith("_ci")) and v is not None else v
            for k, v in d.items()}


def _stats_from(d: Mapping[str, Any]) -> CategoryStats:
    return CategoryStats(**_tuples(d))


def _quality_from(d: Mapping[str, Any]) -> Quality:
    q = _tuples(d)
    q["categories"] = [_stats_from(c) for c in d["categories"]]
    q["micro"], q["flagged"] = _stats_from(d["micro"]), _stats_from(d["flagged"])
    return Quality(**q)


def _confusion(outcomes: Iterable[ItemOutcome], rows: list[str], cols: list[str],
               gold: str, pred: str) -> list[list[int]]:
    counts = Counter((getattr(o, gold), getattr(o, pred) or ERROR) for o in outcomes)
    return [[counts.get((r, c), 0) for c in cols] for r in rows]


def build_scorecard(version: PromptVersion, dataset: Dataset, results: Sequence[ItemResult], *,
                    created_at: datetime | None = None) -> Scorecard:
    """The scorecard of *version* from its results on *dataset* (one result per row)."""
    from gateway.quality.evaluation.calibration import (
        calibration as reliability_of,  # imports this module
    )

    by_item = {r.item_id: r for r in results if r.version_hash == version.content_hash}
    missing = [row.item_id for row in dataset.rows if row.item_id not in by_item]
    if missing:
        raise ValueError(f"no result for {len(missing)} item(s) of the dataset, e.g. {missing[:3]}")
    schema = version.spec.verdict
    categories = [c for c in schema.categories if c != NO_CATEGORY]
    outcomes = [_outcome(row, by_item[row.item_id]) for row in dataset.rows]
    res = [by_item[row.item_id] for row in dataset.rows]
    answered = [r for r in res if r.error_type is None]
    labels = [NO_CATEGORY, *categories, FLAGGED_NONE]
    decisions = list(schema.decisions)
    lat = [r.latency_ms for r in answered]
    per_locale = {loc: quality([o for o in outcomes if o.locale == loc], categories)
                  for loc in sorted({o.locale for o in outcomes})}
    return Scorecard(
        prompt=version.name, version=version.version, version_hash=version.content_hash,
        model=version.spec.model, dataset_sha256=dataset.sha256, dataset_source=dataset.source,
        created_at=(created_at or datetime.now(UTC)).isoformat(timespec="seconds"),
        categories=categories, overall=quality(outcomes, categories), per_locale=per_locale,
        labels=labels, confusion=_confusion(outcomes, labels, [*labels, ERROR], "gold_label",
                                            "predicted_label"),
        decisions=decisions,
        decision_confusion=_confusion(outcomes, decisions, [*decisions, ERROR], "gold_decision",
                                      "decision"),
        rates={
            "needs_review": Rate.of(sum(1 for r in answered if r.decision == FAIL_CLOSED_DECISION),
                                    len(answered)),
            "parse_failure": Rate.of(sum(1 for r in answered if r.fail_reason), len(answered)),
            "error": Rate.of(len(res) - len(answered), len(res)),
        },
        fail_reasons=dict(Counter(r.fail_reason for r in answered if r.fail_reason)),
        error_types=dict(Counter(r.error_type for r in res if r.error_type)),
        latency_ms={"p50": float(np.percentile(lat, 50)) if lat else None,
                    "p95": float(np.percentile(lat, 95)) if lat else None,
                    "mean": statistics.fmean(lat) if lat else None},
        tokens={"prompt": sum(r.prompt_tokens for r in answered),
                "completion": sum(r.completion_tokens for r in answered),
                "total": sum(r.prompt_tokens + r.completion_tokens for r in answered)},
        cached=sum(1 for r in res if r.cached),
        items=outcomes,
        calibration={k: asdict(v) for k, v in reliability_of(outcomes).items()},
    )


# -- comparison --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CategoryDelta:
    category: str
    a: CategoryStats
    b: CategoryStats
    delta_precision: float | None
    delta_recall: float | None
    delta_f1: float | None
    recall_gained: int    # gold positives caught by b only
    recall_lost: int      # gold positives caught by a only
    recall_p: float       # exact McNemar on those two counts
    fp_removed: int       # gold negatives flagged as this category by a only
    fp_added: int         # gold negatives flagged as this category by b only
    fp_p: float


@dataclass(frozen=True, slots=True)
class ChangedItem:
    item_id: str
    locale: str
    status: str           # fixed | broken | changed
    gold: str             # gold_decision/gold_category
    a: str                # decision/category (or error)
    b: str
    tags: list[str]


@dataclass(frozen=True, slots=True)
class Comparison:
    prompt: str
    a_version: int
    b_version: int
    a_hash: str
    b_hash: str
    dataset_sha256: str
    n: int                          # items both versions answered
    excluded_errors: int            # items left out: a backend error in a or b
    both_correct: int
    only_a_correct: int
    only_b_correct: int
    both_wrong: int
    mcnemar_statistic: float
    mcnemar_p: float
    a_accuracy: float | None
    b_accuracy: float | None
    a: Quality
    b: Quality
    categories: list[CategoryDelta]
    overall: list[CategoryDelta]    # micro (any violation category right) and flagged (vs allow)
    fixed: int
    broken: int
    changed: int
    items: list[ChangedItem]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _delta(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else y - x


def _verdict_text(decision: str | None, category: str | None, error_type: str | None) -> str:
    if error_type:
        return f"error:{error_type}"
    return f"{decision}/{category if category is not None else '-'}"


def _paired(category: str, sa: CategoryStats | None, sb: CategoryStats | None,
            items: Sequence[tuple[ItemOutcome, ItemOutcome]], gold: Callable[[ItemOutcome], bool],
            hit: Callable[[ItemOutcome], bool], fp: Callable[[ItemOutcome], bool]) -> CategoryDelta:
    """Paired counts for one category: gold positives (*gold*) caught (*hit*) by only one
    version, and false positives (*fp*) made by only one version; exact McNemar p for each."""
    assert sa is not None and sb is not None
    gained = lost = removed = added = 0
    for x, y in items:
        if gold(x):
            gained += hit(y) and not hit(x)
            lost += hit(x) and not hit(y)
        removed += fp(x) and not fp(y)
        added += fp(y) and not fp(x)
    return CategoryDelta(
        category=category, a=sa, b=sb, delta_precision=_delta(sa.precision, sb.precision),
        delta_recall=_delta(sa.recall, sb.recall), delta_f1=_delta(sa.f1, sb.f1),
        recall_gained=gained, recall_lost=lost, recall_p=mcnemar_exact(lost, gained),
        fp_removed=removed, fp_added=added, fp_p=mcnemar_exact(removed, added))


def compare(a: Scorecard, b: Scorecard) -> Comparison:
    """Paired comparison of two versions on the same dataset (b is the candidate)."""
    if a.dataset_sha256 != b.dataset_sha256:
        raise ValueError("the scorecards are for different datasets "
                         f"({a.dataset_sha256[:12]} vs {b.dataset_sha256[:12]})")
    b_items = {o.item_id: o for o in b.items}
    pairs = [(o, b_items[o.item_id]) for o in a.items if o.item_id in b_items]
    answered = [(x, y) for x, y in pairs if x.error_type is None and y.error_type is None]
    categories = list(dict.fromkeys([*a.categories, *b.categories]))
    qa = quality([x for x, _ in answered], categories)
    qb = quality([y for _, y in answered], categories)
    both = sum(1 for x, y in answered if x.correct and y.correct)
    only_a = sum(1 for x, y in answered if x.correct and not y.correct)
    only_b = sum(1 for x, y in answered if y.correct and not x.correct)
    wrong = len(answered) - both - only_a - only_b
    if only_a + only_b:
        test = mcnemar([[both, only_a], [only_b, wrong]], exact=True)
        stat, p = float(test.statistic), float(test.pvalue)
    else:
        stat, p = 0.0, 1.0

    def category_delta(cat: str) -> CategoryDelta:
        return _paired(cat, qa.category(cat), qb.category(cat), answered,
                       gold=lambda o: o.gold_positive(cat),
                       hit=lambda o: o.predicted_positive(cat),
                       fp=lambda o: o.predicted_positive(cat) and not o.gold_positive(cat))

    deltas = [category_delta(cat) for cat in categories]

    def micro_hit(o: ItemOutcome) -> bool:
        return o.predicted_flagged and o.gold_flagged and o.category == o.gold_category

    overall = [
        _paired("micro", qa.micro, qb.micro, answered,
                gold=lambda o: o.gold_flagged and o.gold_category in categories, hit=micro_hit,
                fp=lambda o: o.predicted_flagged and o.category in categories and not micro_hit(o)),
        _paired("flagged", qa.flagged, qb.flagged, answered, gold=lambda o: o.gold_flagged,
                hit=lambda o: o.predicted_flagged,
                fp=lambda o: o.predicted_flagged and not o.gold_flagged),
    ]
    changed: list[ChangedItem] = []
    for x, y in answered:
        if x.predicted_label == y.predicted_label and x.decision == y.decision:
            continue
        status = ("fixed" if y.correct and not x.correct else
                  "broken" if x.correct and not y.correct else "changed")
        changed.append(ChangedItem(
            item_id=x.item_id, locale=x.locale, status=status,
            gold=f"{x.gold_decision}/{x.gold_category}",
            a=_verdict_text(x.decision, x.category, x.error_type),
            b=_verdict_text(y.decision, y.category, y.error_type), tags=x.tags))
    order = {"broken": 0, "fixed": 1, "changed": 2}
    changed.sort(key=lambda c: (order[c.status], c.item_id))
    counts = Counter(c.status for c in changed)
    return Comparison(
        prompt=b.prompt, a_version=a.version, b_version=b.version, a_hash=a.version_hash,
        b_hash=b.version_hash, dataset_sha256=a.dataset_sha256, n=len(answered),
        excluded_errors=len(pairs) - len(answered), both_correct=both, only_a_correct=only_a,
        only_b_correct=only_b, both_wrong=wrong, mcnemar_statistic=stat, mcnemar_p=p,
        a_accuracy=qa.accuracy, b_accuracy=qb.accuracy, a=qa, b=qb, categories=deltas,
        overall=overall,
        fixed=counts.get("fixed", 0), broken=counts.get("broken", 0),
        changed=counts.get("changed", 0), items=changed)


# -- registry summary --------------------------------------------------------------------------


def registry_record(sc: Scorecard, *, created_by: str = "", report: str = "") -> ScorecardRecord:
    """What the prompt registry keeps of *sc*, and promotion gates read: the counts behind
    every per-category, micro and flagged metric, correctness and failure rates."""
    from prompt_registry.gates import MetricCounts, RateCount

    def counts(s: CategoryStats) -> MetricCounts:
        return MetricCounts(tp=s.tp, fp=s.fp, fn=s.fn)

    def rate(r: Rate) -> RateCount:
        return RateCount(count=r.count, n=r.n)

    q = sc.overall
    return ScorecardRecord(
        prompt=sc.prompt, version=sc.version, version_hash=sc.version_hash,
        dataset_sha256=sc.dataset_sha256, dataset_source=sc.dataset_source, model=sc.model,
        items=q.n, correct=q.correct, categories={s.category: counts(s) for s in q.categories},
        micro=counts(q.micro), flagged=counts(q.flagged),
        parse_failures=rate(sc.rates["parse_failure"]), errors=rate(sc.rates["error"]),
        needs_review=rate(sc.rates["needs_review"]), created_at=datetime.fromisoformat(sc.created_at),
        created_by=created_by, report=report)
