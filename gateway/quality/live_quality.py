"""Live precision and recall per prompt version: reviewer labels joined with the decision log.

Reviewer labels arrive through `POST /v1/feedback` and are appended to
`<data_dir>/feedback/feedback-<yyyymmdd>-<replica>.jsonl` (gateway/feedback.py). The decision
log holds every verdict (gateway/decision_log.py). They join on `request_id`:

- a label is for the request the caller sent, so it applies to the decision the caller got
  (arm `stable`, `canary` or `pinned`, same `request_id`) **and** to every shadow evaluation of
  that request (arm `shadow`, `shadow_of` = the label's `request_id`): shadowed candidate
  versions get live precision and recall on the very items the reviewers labelled;
- when a request got several labels (a correction, an appeal), the newest one counts;
- a label whose request is not in the decision log (outside the time window, or the log's
  retention) is not counted.

The metrics are the offline scorecard's (`gateway.quality.evaluation.scorecard.quality`): outcome labels,
per-category TP/FP/FN, precision and recall with 95% Wilson intervals, micro average and
"flagged vs allow". A decision that failed (backend error, no verdict) and was labelled counts
as a miss, as offline.

Read the numbers with the sampling in mind: reviewers see a sample of decisions. Precision is
sound when flagged decisions are sampled fairly; recall only when allowed ones are sampled too
(a review queue that only holds flagged items never shows what was missed, and recall then
looks perfect). Every view says how many decisions of each version were reviewed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from gateway.decision_log import DecisionRecord
from gateway.feedback import FeedbackScan, feedback_lines
from gateway.quality.evaluation.dataset import ALLOW, NO_CATEGORY
from gateway.quality.evaluation.scorecard import (
    ItemOutcome,
    Quality,
    outcome_label,
    quality,
    wilson,
)

__all__ = ["ALL_LOCALES", "FeedbackLabel", "FeedbackRead", "HeadlineAccumulator", "LiveQuality",
           "LiveQualityAccumulator", "TrafficHeadline", "gold_of", "labelled_request",
           "live_quality", "locale_of", "outcome", "read_feedback", "verdict_text"]

PRIMARY_ARMS = ("stable", "canary", "pinned")
ALL_LOCALES = "all"          # the row of a split that holds every locale
UNKNOWN_LOCALE = "unknown"   # a decision logged without a locale


def locale_of(rec: DecisionRecord) -> str:
    return rec.locale or UNKNOWN_LOCALE


def _seen_categories(outcomes: Iterable[ItemOutcome]) -> list[str]:
    return sorted({c for o in outcomes for c in (o.gold_category, o.category)
                   if c and c != NO_CATEGORY})


@dataclass(frozen=True, slots=True)
class FeedbackLabel:
    ts: datetime
    request_id: str
    decision: str
    category: str | None
    reviewer: str = ""
    note: str = ""


@dataclass
class FeedbackRead(FeedbackScan):
    labels: dict[str, FeedbackLabel] = field(default_factory=dict)
    bad_lines: int = 0


def read_feedback(directory: Path, not_before: datetime | None = None) -> FeedbackRead:
    """Every reviewer label under *directory*, the newest per request id.

    Files of days before *not_before* are skipped (a label comes after its decision, so they
    cannot hold labels for decisions made since then); labels are not filtered by time. An
    unreadable line (torn by a crash, hand-edited) is skipped and counted.
    """
    out = FeedbackRead()
    for line in feedback_lines(directory, not_before, out):
        try:
            d = orjson.loads(line)
            ts = datetime.fromisoformat(d["ts"])
            label = FeedbackLabel(
                ts=ts if ts.tzinfo else ts.replace(tzinfo=UTC), request_id=str(d["request_id"]),
                decision=str(d["decision"]), category=d.get("category"),
                reviewer=str(d.get("reviewer") or ""), note=str(d.get("note") or ""))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            out.bad_lines += 1
            continue
        old = out.labels.get(label.request_id)
        if old is None or label.ts >= old.ts:
            out.labels[label.request_id] = label
    return out


def gold_of(label: FeedbackLabel) -> tuple[str, str]:
    """The reviewer's label as a dataset gold pair: an allow has category `none`."""
    if label.decision == ALLOW:
        return ALLOW, NO_CATEGORY
    return label.decision, label.category or NO_CATEGORY


def verdict_text(decision: str | None, category: str | None, error_type: str | None = None) -> str:
    if error_type:
        return f"error:{error_type}"
    return f"{decision}/{category or NO_CATEGORY}"


def labelled_request(rec: DecisionRecord) -> str:
    """The request id a reviewer label for this decision carries."""
    return rec.shadow_of if rec.arm == "shadow" and rec.shadow_of else rec.request_id


def outcome(rec: DecisionRecord, label: FeedbackLabel) -> ItemOutcome:
    gold_decision, gold_category = gold_of(label)
    gold = outcome_label(gold_decision, gold_category)
    pred = outcome_label(rec.decision, rec.category, error=rec.error_type is not None)
    return ItemOutcome(item_id=rec.item_id, locale=rec.locale or "", gold_decision=gold_decision,
                       gold_category=gold_category, gold_label=gold, decision=rec.decision,
                       category=rec.category, confidence=rec.confidence, predicted_label=pred,
                       correct=pred == gold, fail_reason=rec.fail_reason, error_type=rec.error_type,
                       decision_probability=rec.decision_probability,
                       category_probability=rec.category_probability,
                       block_probability=rec.block_probability,
                       probability_unresolved=rec.probability_unresolved,
                       decided_by=rec.decided_by, model_decision=rec.model_decision)


@dataclass(frozen=True, slots=True)
class LiveQuality:
    prompt: str
    version: int
    arm: str
    decisions: int      # decisions of this version and arm in the window (with or without label)
    reviewed: int       # of which a reviewer labelled
    quality: Quality
    locale: str | None = None   # set when the accumulator splits by locale

    @property
    def review_share(self) -> float | None:
        return self.reviewed / self.decisions if self.decisions else None


class LiveQualityAccumulator:
    """Feed decision records one by one (`add`), then read `results()`; keeps only the
    labelled ones. `by_locale=True` keeps one result per locale of each version and arm."""

    def __init__(self, labels: dict[str, FeedbackLabel], *, by_locale: bool = False) -> None:
        self.labels = labels
        self.by_locale = by_locale
        self.totals: dict[tuple[str, int, str, str | None], int] = {}
        self.outcomes: dict[tuple[str, int, str, str | None], list[ItemOutcome]] = {}
        self.matched: set[str] = set()

    def add(self, rec: DecisionRecord) -> None:
        if rec.prompt_name is None or rec.prompt_version is None:
            return  # a raw_chat record: no prompt, no verdict, nothing to score
        key = (rec.prompt_name, rec.prompt_version, rec.arm,
               locale_of(rec) if self.by_locale else None)
        self.totals[key] = self.totals.get(key, 0) + 1
        rid = labelled_request(rec)
        label = self.labels.get(rid)
        if label is not None:
            self.outcomes.setdefault(key, []).append(outcome(rec, label))
            self.matched.add(rid)

    def results(self, categories: Sequence[str] | None = None) -> list[LiveQuality]:
        """Per (prompt, version, arm) with at least one label, in that order. *categories*
        defaults to every violation category seen in labels or verdicts."""
        if categories is None:
            categories = _seen_categories(o for outs in self.outcomes.values() for o in outs)
        arm_order = {a: i for i, a in enumerate([*PRIMARY_ARMS, "shadow"])}
        keys = sorted(self.outcomes, key=lambda k: (k[0], k[1], arm_order.get(k[2], 9), k[3] or ""))
        return [LiveQuality(prompt=k[0], version=k[1], arm=k[2], decisions=self.totals[k],
                            reviewed=len(self.outcomes[k]),
                            quality=quality(self.outcomes[k], list(categories)), locale=k[3])
                for k in keys]


def live_quality(records: Iterable[DecisionRecord], labels: dict[str, FeedbackLabel],
                 categories: Sequence[str] | None = None) -> list[LiveQuality]:
    acc = LiveQualityAccumulator(labels)
    for rec in records:
        acc.add(rec)
    return acc.results(categories)


# -- the headline: what callers got, per prompt and locale ----------------------------------------


@dataclass(frozen=True, slots=True)
class TrafficHeadline:
    """The caller traffic (stable, canary and pinned arms; not shadows) of one prompt in one
    locale (or ALL_LOCALES): how much, how much went to review, how precise it was."""
    prompt: str
    locale: str
    decisions: int
    errors: int          # backend failures, no verdict
    needs_review: int
    reviewed: int        # decisions a reviewer labelled
    quality: Quality | None

    @property
    def answered(self) -> int:
        return self.decisions - self.errors

    @property
    def review_rate(self) -> float | None:
        return self.needs_review / self.answered if self.answered else None

    @property
    def review_ci(self) -> tuple[float, float] | None:
        return wilson(self.needs_review, self.answered)

    @property
    def precision(self) -> float | None:
        return self.quality.micro.precision if self.quality else None

    @property
    def precision_ci(self) -> tuple[float, float] | None:
        return self.quality.micro.precision_ci if self.quality else None

    def to_dict(self) -> dict[str, object]:
        """As `--json` shows it (`feedback quality`, `report ops`)."""
        return {"prompt": self.prompt, "locale": self.locale, "decisions": self.decisions,
                "errors": self.errors, "needs_review": self.needs_review,
                "review_rate": self.review_rate, "review_rate_ci": self.review_ci,
                "reviewed": self.reviewed, "precision": self.precision,
                "precision_ci": self.precision_ci}


class HeadlineAccumulator:
    """`add` decision records, then `results()`: one TrafficHeadline per prompt for all
    locales, then one per locale seen. Precision is the micro average of the reviewed caller
    decisions (a verdict is right when its outcome label is the reviewer's)."""

    def __init__(self, labels: dict[str, FeedbackLabel]) -> None:
        self.labels = labels
        self.counts: dict[tuple[str, str], list[int]] = {}   # decisions, errors, needs_review
        self.outcomes: dict[tuple[str, str], list[ItemOutcome]] = {}

    def add(self, rec: DecisionRecord) -> None:
        if rec.prompt_name is None or rec.arm not in PRIMARY_ARMS:
            return
        label = self.labels.get(rec.request_id)
        for key in ((rec.prompt_name, ALL_LOCALES), (rec.prompt_name, locale_of(rec))):
            c = self.counts.setdefault(key, [0, 0, 0])
            c[0] += 1
            c[1] += rec.error_type is not None
            c[2] += rec.decision == "needs_review"
            if label is not None:
                self.outcomes.setdefault(key, []).append(outcome(rec, label))

    def results(self, categories: Sequence[str] | None = None) -> list[TrafficHeadline]:
        if categories is None:
            categories = _seen_categories(o for outs in self.outcomes.values() for o in outs)
        keys = sorted(self.counts, key=lambda k: (k[0], k[1] != ALL_LOCALES, k[1]))
        out = []
        for key in keys:
            n, errors, nr = self.counts[key]
            outs = self.outcomes.get(key, [])
            out.append(TrafficHeadline(prompt=key[0], locale=key[1], decisions=n, errors=errors,
                                       needs_review=nr, reviewed=len(outs),
                                       quality=quality(outs, list(categories)) if outs else None))
        return out
