"""Agreement between reviewers: Cohen's kappa for each pair of reviewers on the requests both
labelled.

Reviewer labels are read from the feedback log (`<data_dir>/feedback/feedback-*.jsonl`, written
by `POST /v1/feedback`). A reviewer is the API key that sent the label (`reviewer`), and, when
one key sends labels for several people (`modgate feedback import` of a review tool's export),
the display name sent with it: `key (display name)`. Each reviewer's newest label per request
counts. Labels compare as `allow` or `block/<category>`.

Kappa is undefined (None) when the two reviewers' chance agreement is 1, i.e. both gave one
and the same class to every common request: there is nothing to tell agreement from chance,
and 1.000 would claim a reliability nobody measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path

import orjson

from gateway.feedback import feedback_lines
from prompt_registry.rollout_stats import cohen_kappa as rollout_cohen_kappa

__all__ = ["PairAgreement", "ReviewerLabel", "cohen_kappa", "pair_agreement", "read_reviewer_labels"]



@dataclass(frozen=True, slots=True)
class ReviewerLabel:
    ts: datetime
    request_id: str
    reviewer: str
    label: str  # allow, or block/<category>


@dataclass(frozen=True, slots=True)
class PairAgreement:
    a: str
    b: str
    common: int          # requests both labelled
    agreement: float     # share of them with the same label
    kappa: float | None  # None: undefined (both gave one and the same class only)
    classes: int         # distinct labels the two gave on the common requests


def _label(decision: str, category: str | None) -> str:
    return decision if decision == "allow" or not category or category == "none" \
        else f"{decision}/{category}"


def read_reviewer_labels(directory: Path, not_before: datetime | None = None) -> list[ReviewerLabel]:
    """The newest label of each reviewer for each request (unreadable lines are skipped)."""
    newest: dict[tuple[str, str], ReviewerLabel] = {}
    for line in feedback_lines(directory, not_before):
        try:
            d = orjson.loads(line)
            ts = datetime.fromisoformat(d["ts"])
            who = str(d.get("reviewer") or "")
            shown = d.get("display_name")
            if shown and shown != who:
                who = f"{who} ({shown})" if who else str(shown)
            label = ReviewerLabel(ts if ts.tzinfo else ts.replace(tzinfo=UTC),
                                  str(d["request_id"]), who,
                                  _label(str(d["decision"]), d.get("category")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        key = (label.request_id, label.reviewer)
        old = newest.get(key)
        if old is None or label.ts >= old.ts:
            newest[key] = label
    return list(newest.values())


def cohen_kappa(pairs: Iterable[tuple[str, str]]) -> float | None:
    """Cohen's kappa of paired labels; None when undefined (chance agreement of 1) or empty.
    The registry's kappa (the one shadow pairs are judged by) over the pairs' matrix."""
    matrix: dict[str, Counter[str]] = {}
    for x, y in pairs:
        matrix.setdefault(x, Counter())[y] += 1
    return rollout_cohen_kappa(matrix)


def pair_agreement(labels: Iterable[ReviewerLabel],
                   requests: set[str] | None = None) -> list[PairAgreement]:
    """Agreement of every pair of reviewers with at least one commonly labelled request
    (restricted to *requests* when given), most common requests first."""
    by_reviewer: dict[str, dict[str, str]] = {}
    for lb in labels:
        if requests is None or lb.request_id in requests:
            by_reviewer.setdefault(lb.reviewer, {})[lb.request_id] = lb.label
    out = []
    for a, b in combinations(sorted(by_reviewer), 2):
        common = sorted(by_reviewer[a].keys() & by_reviewer[b].keys())
        if not common:
            continue
        pairs = [(by_reviewer[a][r], by_reviewer[b][r]) for r in common]
        out.append(PairAgreement(
            a=a, b=b, common=len(common),
            agreement=sum(1 for x, y in pairs if x == y) / len(pairs),
            kappa=cohen_kappa(pairs), classes=len({c for p in pairs for c in p})))
    out.sort(key=lambda p: (-p.common, p.a, p.b))
    return out
