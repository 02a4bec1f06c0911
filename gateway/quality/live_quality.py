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

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.dataset import ALLOW, NO_CATEGORY
from gateway.quality.evaluation.scorecard import ItemOutcome, Quality, outcome_label, quality

__all__ = ["FeedbackLabel", "FeedbackRead", "LiveQuality", "LiveQualityAccumulator", "gold_of",
           "labelled_request", "live_quality", "outcome", "read_feedback", "verdict_text"]

_FILE = re.compile(r"^feedback-(\d{8})-.*\.jsonl$")
PRIMARY_ARMS = ("stable", "canary", "pinned")


@dataclass(frozen=True, slots=True)
class FeedbackLabel:
    ts: datetime
    request_id: str
    decision: str
    category: str | None
    reviewer: str = ""
    note: str = ""


@dataclass
class FeedbackRead:
    labels: dict[str, FeedbackLabel] = field(default_factory=dict)
    files: int = 0
    lines: int = 0
    bad_lines: int = 0


def read_feedback(directory: Path, not_before: datetime | None = None) -> FeedbackRead:
    """Every reviewer label under *directory*, the newest per request id.

    Files of days before *not_before* are skipped (a label comes after its decision, so they
    cannot hold labels for decisions made since then); labels are not filtered by time. An
    unreadable line (torn by a crash, hand-edited) is skipped and counted.
    """
    out = FeedbackRead()
    if not directory.is_dir():
        return out
    first_day = not_before.astimezone(UTC).strftime("%Y%m%d") if not_before else None
    for path in sorted(directory.iterdir()):
        m = _FILE.match(path.name)
        if m is None or (first_day is not None and m.group(1) < first_day):
            continue
        out.files += 1
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        for line in raw.splitlines():
            if not line.strip():
                continue
            out.lines += 1
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
                       correct=pred == gold, fail_reason=rec.fail_reason, error_type=rec.error_type)


@dataclass(frozen=True, slots=True)
class LiveQuality:
    prompt: str
    version: int
    arm: str
    decisions: int      # decisions of this version and arm in the window (with or without label)
    reviewed: int       # of which a reviewer labelled
    quality: Quality

    @property
    def review_share(self) -> float | None:
        return self.reviewed / self.decisions if self.decisions else None


class LiveQualityAccumulator:
    """Feed decision records one by one (`add`), then read `results()`; keeps only the
    labelled ones."""

    def __init__(self, labels: dict[str, FeedbackLabel]) -> None:
        self.labels = labels
        self.totals: dict[tuple[str, int, str], int] = {}
        self.outcomes: dict[tuple[str, int, str], list[ItemOutcome]] = {}
        self.matched: set[str] = set()

    def add(self, rec: DecisionRecord) -> None:
        if rec.prompt_name is None or rec.prompt_version is None:
            return  # a raw_chat record: no prompt, no verdict, nothing to score
        key = (rec.prompt_name, rec.prompt_version, rec.arm)
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
            seen = {c for outs in self.outcomes.values() for o in outs
                    for c in (o.gold_category, o.category) if c and c != NO_CATEGORY}
            categories = sorted(seen)
        arm_order = {a: i for i, a in enumerate([*PRIMARY_ARMS, "shadow"])}
        keys = sorted(self.outcomes, key=lambda k: (k[0], k[1], arm_order.get(k[2], 9)))
        return [LiveQuality(prompt=k[0], version=k[1], arm=k[2], decisions=self.totals[k],
                            reviewed=len(self.outcomes[k]),
                            quality=quality(self.outcomes[k], list(categories)))
                for k in keys]


def live_quality(records: Iterable[DecisionRecord], labels: dict[str, FeedbackLabel],
                 categories: Sequence[str] | None = None) -> list[LiveQuality]:
    acc = LiveQualityAccumulator(labels)
    for rec in records:
        acc.add(rec)
    return acc.results(categories)
