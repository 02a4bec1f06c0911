"""Threshold what-if on reviewer labels: what a version's verdicts would have been, and how
precise, at other operating points.

A version's operating points (`thresholds:` in its prompt file, `prompt_registry.models.
OperatingPoint`) turn the calibrated block probability of a verdict in their category into
`block`, `needs_review` or `allow` at serve time (`gateway.verdict.apply_thresholds`). The
decision log keeps what that function reads - the model's own decision
(`model_decision` or `decision`), the category, a `fail_reason`, and the block probability's
attributed mass and unresolved mass (`block_probability_low`, `decision_unresolved`) - so each
logged verdict can be decided again, by the same function, at any operating point. Joined with
the reviewer labels (`POST /v1/feedback`, gateway/quality/live_quality.py), that says what
precision, recall, review rate and block rate a point would have had on the traffic of the
window, per locale:

- **decisions**: the version's verdicts in the category (any arm: the caller's, a canary's, a
  shadow's; backend errors have no verdict and are left out, and counted);
- **no probability**: of them, those without a calibrated probability. They are not dropped:
  the operating point decides them as the gateway does (the model's decision stands, except
  that `allow` becomes `needs_review`);
- **block rate, review rate**: the share of the category's decisions the point blocks, or sends
  to review (over every decision of the window, labelled or not);
- **precision**: of the labelled decisions the point blocks, the share the reviewer confirmed
  as this category (95% Wilson interval);
- **recall**: of the labelled decisions the reviewer put in this category (whatever the model
  said), the share the point blocks (95% Wilson interval). Reviewers see a sample: precision
  is sound when blocked decisions are sampled fairly, recall only when allowed ones are too.

Points: the version's current ones (from the registry; "none" means the model decides), the one
`gateway.quality.evaluation.calibration.propose` (the proposer of `modgate eval thresholds`)
proposes from the labelled decisions of the version, all locales together (a version has one
operating point per category, not one per locale), and any the user asks for
(`--what-if counterfeit=0.85:0.4`, `parse_point`). Re-deciding at the current points must give
the logged decisions; the count that does not (`differs_from_log`) is shown, and is 0 unless
the log predates the fields above or the registry changed under it.

Limits: a record written before `block_probability_low` existed is re-decided from its rounded
`block_probability` when that probability was exact (`probability_unresolved` 0), and counts as
without a probability otherwise. A cascade's escalated decision logs the second model's
probabilities; the what-if re-decides that answer, but cannot say which first answers another
point would have escalated (the first model's probabilities are not logged): such decisions are
counted (`escalated`) so the reader knows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.calibration import CategoryProposal, propose
from gateway.quality.evaluation.dataset import NO_CATEGORY
from gateway.quality.evaluation.scorecard import ItemOutcome, wilson
from gateway.quality.live_quality import (
    ALL_LOCALES,
    FeedbackLabel,
    gold_of,
    labelled_request,
    locale_of,
    outcome,
)
from gateway.verdict import Verdict, apply_thresholds, logged_block_scores
from prompt_registry.models import OperatingPoint, PromptSpec

__all__ = ["HEADER", "OFF", "CategoryWhatIf", "PointStats", "Scenario", "VersionWhatIf",
           "WhatIfAccumulator", "logged_verdict", "notes", "parse_point", "plot", "plottable",
           "point_text", "redecide", "scenario_text", "table", "title"]

BLOCK, REVIEW, ALLOW = "block", "needs_review", "allow"
OFF = "off"   # --what-if CATEGORY=off: no operating point, the model's decision stands
Scenario = Literal["current", "proposed", "what-if"]
_CATEGORY = re.compile(r"^[a-z0-9_]{1,64}$")
EXAMPLE = "counterfeit=0.85:0.4"


def parse_point(text: str) -> tuple[str, OperatingPoint | None]:
    """`CATEGORY=BLOCK_AT:REVIEW_AT` (block at or above BLOCK_AT, allow below REVIEW_AT,
    needs_review between) or `CATEGORY=off` (no operating point). ValueError naming the problem
    otherwise; the category is checked against the prompts by the caller."""
    shown = text if len(text) <= 80 else text[:80] + "..."
    where = f"--what-if {shown!r}"
    cat, sep, value = text.partition("=")
    cat, value = cat.strip(), value.strip()
    if not sep or not cat or not value:
        raise ValueError(f"{where}: expected CATEGORY=BLOCK_AT:REVIEW_AT (e.g. {EXAMPLE}) or "
                         "CATEGORY=off")
    if not _CATEGORY.match(cat):
        raise ValueError(f"{where}: {cat[:64]!r} is not a category name (lower-case letters, "
                         "digits and _)")
    if value.lower() == OFF:
        return cat, None
    block_s, sep, review_s = value.partition(":")
    if not sep:
        raise ValueError(f"{where}: give both thresholds, BLOCK_AT:REVIEW_AT (e.g. {EXAMPLE}); "
                         "REVIEW_AT may equal BLOCK_AT for no review band")
    numbers = []
    for name, s in (("BLOCK_AT", block_s.strip()), ("REVIEW_AT", review_s.strip())):
        try:
            x = float(s)
        except ValueError:
            raise ValueError(f"{where}: {name} {s[:32]!r} is not a number") from None
        if not (math.isfinite(x) and 0.0 <= x <= 1.0):
            raise ValueError(f"{where}: {name} {s[:32]} is not a probability between 0 and 1")
        numbers.append(x)
    block_at, review_at = numbers
    if review_at > block_at:
        raise ValueError(f"{where}: REVIEW_AT ({review_at:g}) is above BLOCK_AT ({block_at:g}); "
                         "write the block threshold first: allow below REVIEW_AT, block from "
                         "BLOCK_AT up")
    return cat, OperatingPoint(block_at=block_at, review_at=review_at)


def point_text(point: OperatingPoint | None) -> str:
    return "none (model decides)" if point is None else f"{point.block_at:g}:{point.review_at:g}"


def logged_verdict(rec: DecisionRecord) -> Verdict | None:
    """The verdict the model gave, before any operating point, as `apply_thresholds` reads it;
    None for a backend error (no verdict)."""
    if rec.decision is None:
        return None
    scores = logged_block_scores(rec.block_probability_low, rec.decision_unresolved)
    if scores is None and rec.block_probability is not None and rec.probability_unresolved == 0:
        scores = logged_block_scores(rec.block_probability, 0.0)  # logged before the raw scores
    return Verdict(decision=rec.model_decision or rec.decision, category=rec.category,
                   confidence=rec.confidence, fail_reason=rec.fail_reason, decision_scores=scores)


@dataclass(frozen=True, slots=True)
class _Row:
    locale: str
    verdict: Verdict | None            # None: a backend error
    logged: str | None                 # the decision as logged (after the operating point)
    gold: tuple[str, str] | None       # the reviewer's (decision, category), when labelled
    item: ItemOutcome | None           # the labelled decision, as the proposer reads it
    escalated: bool


@dataclass(frozen=True, slots=True)
class PointStats:
    """One operating point of one category, in one locale (or ALL_LOCALES)."""

    scenario: Scenario
    point: OperatingPoint | None
    locale: str
    decisions: int                  # verdicts in the category
    no_probability: int             # of which without a calibrated probability
    blocked: int
    review: int
    labelled: int                   # verdicts in the category a reviewer labelled
    labelled_no_probability: int
    blocked_labelled: int           # labelled ones the point blocks
    tp: int                         # of them, confirmed as the category by the reviewer
    positives: int                  # labelled decisions (any category) the reviewer put in it
    differs_from_log: int           # decisions this point decides otherwise than the log says

    @property
    def block_rate(self) -> float | None:
        return self.blocked / self.decisions if self.decisions else None

    @property
    def review_rate(self) -> float | None:
        return self.review / self.decisions if self.decisions else None

    @property
    def precision(self) -> float | None:
        return self.tp / self.blocked_labelled if self.blocked_labelled else None

    @property
    def precision_ci(self) -> tuple[float, float] | None:
        return wilson(self.tp, self.blocked_labelled)

    @property
    def recall(self) -> float | None:
        return self.tp / self.positives if self.positives else None

    @property
    def recall_ci(self) -> tuple[float, float] | None:
        return wilson(self.tp, self.positives)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario,
                "point": None if self.point is None else self.point.model_dump(),
                "locale": self.locale, "decisions": self.decisions,
                "no_probability": self.no_probability, "blocked": self.blocked,
                "review": self.review, "block_rate": self.block_rate,
                "review_rate": self.review_rate, "labelled": self.labelled,
                "labelled_no_probability": self.labelled_no_probability,
                "blocked_labelled": self.blocked_labelled, "tp": self.tp,
                "positives": self.positives, "precision": self.precision,
                "precision_ci": self.precision_ci, "recall": self.recall,
                "recall_ci": self.recall_ci, "differs_from_log": self.differs_from_log}


@dataclass(frozen=True, slots=True)
class CurveMark:
    """Where a point sits on the proposer's precision-coverage curve (labelled decisions of
    the category with a probability, all locales)."""

    scenario: Scenario
    point: OperatingPoint | None
    coverage: float
    precision: float


@dataclass
class CategoryWhatIf:
    category: str
    proposal: CategoryProposal | None        # None: no labelled decision in the category
    rows: list[PointStats] = field(default_factory=list)
    marks: list[CurveMark] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        p = self.proposal
        return {"category": self.category,
                "proposal": None if p is None else {
                    "block_at": p.block_at, "review_at": p.review_at,
                    "population": p.population, "positives": p.positives},
                "rows": [r.to_dict() for r in self.rows],
                "marks": [{"scenario": m.scenario, "coverage": m.coverage,
                           "precision": m.precision} for m in self.marks]}


@dataclass
class VersionWhatIf:
    prompt: str
    version: int
    current_known: bool        # the version's operating points were read from the registry
    current: dict[str, OperatingPoint]
    decisions: int             # the version's decisions of the window (errors included)
    errors: int                # backend errors: no verdict to decide again
    escalated: int             # answered by a cascade's second model (see the module doc)
    labelled: int
    target: float
    categories: list[CategoryWhatIf] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "version": self.version,
                "current": ({c: p.model_dump() for c, p in self.current.items()}
                            if self.current_known else None),
                "decisions": self.decisions, "errors": self.errors,
                "escalated": self.escalated, "labelled": self.labelled,
                "target_precision": self.target,
                "categories": [c.to_dict() for c in self.categories]}


class WhatIfAccumulator:
    """`add` decision records (any arm), then `results(...)` per prompt version."""

    def __init__(self, labels: Mapping[str, FeedbackLabel]) -> None:
        self.labels = labels
        self.rows: dict[tuple[str, int], list[_Row]] = {}

    def add(self, rec: DecisionRecord) -> None:
        if rec.prompt_name is None or rec.prompt_version is None:
            return  # raw chat: no verdict
        label = self.labels.get(labelled_request(rec))
        self.rows.setdefault((rec.prompt_name, rec.prompt_version), []).append(_Row(
            locale=locale_of(rec), verdict=logged_verdict(rec), logged=rec.decision,
            gold=gold_of(label) if label is not None else None,
            item=outcome(rec, label) if label is not None else None,
            escalated=rec.escalation is not None))

    def versions(self) -> list[tuple[str, int]]:
        return sorted(self.rows)

    def categories(self, prompt: str) -> set[str]:
        """The violation categories *prompt*'s verdicts and labels used (when the registry
        cannot say which it has)."""
        return {c for (name, _), rows in self.rows.items() if name == prompt for r in rows
                for c in (r.verdict.category if r.verdict else None, r.gold[1] if r.gold else None)
                if c and c != NO_CATEGORY}

    def results(self, spec_of: Callable[[str, int], PromptSpec | None],
                points: Sequence[tuple[str, OperatingPoint | None]] = (),
                target: float = 0.9) -> list[VersionWhatIf]:
        """Per version with at least one labelled decision: each category with data, a current
        point or a point asked for, at its current, proposed and asked-for points.
        *spec_of* gives the version's spec (its operating points and categories), None when
        the registry cannot say (the current points are then unknown and not shown)."""
        out = []
        for (prompt, version), rows in sorted(self.rows.items()):
            labelled = [r for r in rows if r.gold is not None]
            if not labelled:
                continue
            spec = spec_of(prompt, version)
            current = dict(spec.thresholds or {}) if spec is not None else {}
            known = [c for c in spec.verdict.categories if c != NO_CATEGORY] if spec else None
            seen = {c for r in labelled for c in (r.gold[1] if r.gold else None,
                                                    r.verdict.category if r.verdict else None)
                    if c and c != NO_CATEGORY}
            asked = [c for c, _ in points if known is None or c in known]
            cats = sorted(seen | set(current) | set(asked))
            vw = VersionWhatIf(prompt=prompt, version=version, current_known=spec is not None,
                               current=current, decisions=len(rows),
                               errors=sum(1 for r in rows if r.verdict is None),
                               escalated=sum(1 for r in rows if r.escalated),
                               labelled=len(labelled), target=target)
            for cat in cats:
                vw.categories.append(_category(cat, rows, spec is not None, current.get(cat),
                                               [p for c, p in points if c == cat], target))
            out.append(vw)
        return out


def _category(cat: str, rows: Sequence[_Row], current_known: bool,
              current: OperatingPoint | None, asked: Sequence[OperatingPoint | None],
              target: float) -> CategoryWhatIf:
    items = [r.item for r in rows if r.item is not None]
    proposal = propose(items, [cat], target)[0] if items else None
    scenarios: list[tuple[Scenario, OperatingPoint | None]] = []
    if current_known:
        scenarios.append(("current", current))
    if proposal is not None and proposal.block_at is not None and proposal.review_at is not None:
        scenarios.append(("proposed", OperatingPoint(block_at=proposal.block_at,
                                                     review_at=proposal.review_at)))
    scenarios += [("what-if", p) for p in asked]
    locales = [ALL_LOCALES, *sorted({r.locale for r in rows})]
    cw = CategoryWhatIf(category=cat, proposal=proposal)
    for scenario, point in scenarios:
        decided = [(r, redecide(r.verdict, cat, point)) for r in rows]
        for loc in locales:
            mine = [(r, d) for r, d in decided if loc == ALL_LOCALES or r.locale == loc]
            cw.rows.append(_stats(scenario, point, loc, cat, mine))
        scored = [(r, d) for r, d in decided if r.gold is not None and r.verdict is not None
                  and r.verdict.category == cat and r.verdict.fail_reason is None
                  and r.verdict.decision_scores is not None]
        blocked = [r for r, d in scored if d == BLOCK]
        if scored and blocked:
            tp = sum(1 for r in blocked if _positive(r, cat))
            cw.marks.append(CurveMark(scenario, point, len(blocked) / len(scored), tp / len(blocked)))
    return cw


def redecide(verdict: Verdict | None, cat: str, point: OperatingPoint | None) -> str | None:
    """The decision the gateway would give *verdict* with *point* as its category's operating
    point: `apply_thresholds` itself, the serve-time function."""
    if verdict is None:
        return None
    if point is None or verdict.category != cat:
        return apply_thresholds(verdict, {}).decision
    return apply_thresholds(verdict, {cat: point}).decision


def _positive(r: _Row, cat: str) -> bool:
    return r.gold is not None and r.gold[0] != ALLOW and r.gold[1] == cat


def _stats(scenario: Scenario, point: OperatingPoint | None, locale: str, cat: str,
           decided: Iterable[tuple[_Row, str | None]]) -> PointStats:
    n = no_p = blocked = review = labelled = labelled_no_p = blocked_l = tp = positives = differs = 0
    for r, d in decided:
        positives += _positive(r, cat)
        v = r.verdict
        if v is None or v.category != cat:
            continue
        n += 1
        scored = v.decision_scores is not None
        no_p += not scored
        blocked += d == BLOCK
        review += d == REVIEW
        differs += d != r.logged
        if r.gold is not None:
            labelled += 1
            labelled_no_p += not scored
            if d == BLOCK:
                blocked_l += 1
                tp += _positive(r, cat)
    return PointStats(scenario=scenario, point=point, locale=locale, decisions=n,
                      no_probability=no_p, blocked=blocked, review=review, labelled=labelled,
                      labelled_no_probability=labelled_no_p, blocked_labelled=blocked_l, tp=tp,
                      positives=positives, differs_from_log=differs)


# -- how reports show it ---------------------------------------------------------------------------

HEADER = ["category", "operating point", "locale", "decisions", "no probability", "block rate",
          "review rate", "labelled", "precision (95% CI)", "recall (95% CI)"]


def scenario_text(scenario: Scenario, point: OperatingPoint | None) -> str:
    return f"{scenario} {point_text(point)}"


def table(vw: VersionWhatIf) -> list[list[str]]:
    """The rows of one version's what-if (HEADER): per category, each point in all locales
    and then each locale; a category whose proposal reaches no target says so."""
    from gateway.quality.evaluation.report import _ci, _pct

    out = []
    for cw in vw.categories:
        for r in cw.rows:
            out.append([cw.category, scenario_text(r.scenario, r.point), r.locale, str(r.decisions),
                        str(r.no_probability), _pct(r.block_rate), _pct(r.review_rate),
                        str(r.labelled), _ci(r.precision, r.precision_ci),
                        _ci(r.recall, r.recall_ci)])
        p = cw.proposal
        if p is not None and (p.block_at is None or p.review_at is None):
            out.append([cw.category, f"proposed: none reaches {vw.target:g}", ALL_LOCALES,
                        *[""] * (len(HEADER) - 3)])
    return out


def title(vw: VersionWhatIf, many: bool = True) -> str:
    current = (", ".join(f"{c} {point_text(p)}" for c, p in sorted(vw.current.items()))
               or "none (the model decides)") if vw.current_known else "unknown (registry not read)"
    return (f"{vw.prompt + ' ' if many else ''}v{vw.version}: {vw.labelled} labelled of "
            f"{vw.decisions} decision(s); current operating points: {current}")


def notes(vw: VersionWhatIf) -> list[str]:
    """What the reader must know about one version's what-if."""
    out = []
    if vw.errors:
        out.append(f"{vw.errors} backend error(s) have no verdict to decide again (left out)")
    if vw.escalated:
        out.append(f"{vw.escalated} decision(s) were answered by the cascade's second model: "
                   "re-decided on its probability; which first answers another point would "
                   "escalate is not known (the first model's probabilities are not logged)")
    differs = sum(r.differs_from_log for c in vw.categories for r in c.rows
                  if r.scenario == "current" and r.locale == ALL_LOCALES)
    if differs:
        out.append(f"{differs} decision(s) re-decided at the current points differ from the log "
                   "(logged before the raw scores were, or under other points)")
    return out


def plot(vw: VersionWhatIf, path: Path, plot_title: str) -> Path:
    """The proposer's precision-coverage curves of the version's categories (labelled
    decisions with a probability), the current, proposed and asked-for points marked."""
    from gateway.quality.evaluation.calibration import thresholds_plot

    proposals = [c.proposal for c in vw.categories if c.proposal is not None and c.proposal.curve]
    marks = {c.category: [(m.scenario, m.coverage, m.precision) for m in c.marks]
             for c in vw.categories}
    return thresholds_plot(proposals, path, plot_title, vw.target, marks=marks)


def plottable(vw: VersionWhatIf) -> bool:
    return any(c.proposal is not None and c.proposal.curve for c in vw.categories)
