"""Calibration of a version's probabilities, and operating points proposed from a labelled set.

Reliability
-----------
Two numbers per answered item say how sure the model is of its decision: the `confidence` it
wrote, and the calibrated `decision_probability` (token log-probabilities, gateway/verdict.py).
Either is well calibrated when, among the items it puts near p, a share p had the decision
right. The target is "the decision the model generated equals the gold decision" (the model's
own decision, before any operating point). Items are binned into `BINS` equal-width bins of
[0, 1] (p = 1 in the last); the reliability diagram plots each bin's accuracy against its mean
predicted value, and the expected calibration error is the item-weighted mean gap:

    ECE = sum over bins b of (n_b / n) * |accuracy_b - mean_p_b|

Items without a value (backend error, unusable answer, no log-probabilities) are left out and
counted.

Operating points
----------------
A version's operating point for category C (prompt_registry.models.OperatingPoint) acts on the
verdicts the model puts in C, using the calibrated block probability. `propose` works on the
same population: the answered items whose model category is C and that have a block
probability. An item is positive when it is positive for C as the scorecard counts it (gold
decision not `allow`, gold category C).

- `block_at`: for each distinct score t (high to low), blocking every item with score >= t has
  precision TP/n with a 95% Wilson interval, and coverage n / population. The proposal is the
  lowest t whose Wilson lower bound is at least the target precision (the most coverage the
  data defends); none when no t reaches it.
- `review_at`: allowing every item with score < t has "allow precision" (share of those items
  that are not positive for C) with its Wilson interval; the proposal is the highest t <=
  block_at whose lower bound meets the same target; 0 (allow nothing on this category) when none
  does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.quality.evaluation.scorecard import ItemOutcome, wilson

__all__ = ["BINS", "CategoryProposal", "CurvePoint", "Reliability", "calibration", "propose",
           "proposals_yaml", "reliability", "reliability_plot", "thresholds_plot"]

BINS = 10
SOURCES = {"decision_probability": "calibrated (log-probabilities)",
           "confidence": "self-reported (confidence)"}


@dataclass(frozen=True, slots=True)
class Bin:
    low: float
    high: float
    n: int
    mean_p: float | None
    accuracy: float | None


@dataclass(frozen=True, slots=True)
class Reliability:
    n: int           # items with a value
    left_out: int    # answered or not, items without one
    ece: float | None
    bins: list[Bin]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reliability:
        return cls(n=d["n"], left_out=d["left_out"], ece=d["ece"], bins=[Bin(**b) for b in d["bins"]])


def reliability(pairs: Sequence[tuple[float, bool]], *, left_out: int = 0, bins: int = BINS) -> Reliability:
    """Reliability bins and ECE of (predicted probability, was right) pairs."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for p, right in pairs:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability {p} outside [0, 1]")
        members[min(int(p * bins), bins - 1)].append((p, right))
    out, gap = [], 0.0
    for i, m in enumerate(members):
        if m:
            mean_p = sum(p for p, _ in m) / len(m)
            acc = sum(1 for _, r in m if r) / len(m)
            gap += len(m) * abs(acc - mean_p)
            out.append(Bin(i / bins, (i + 1) / bins, len(m), mean_p, acc))
        else:
            out.append(Bin(i / bins, (i + 1) / bins, 0, None, None))
    n = len(pairs)
    return Reliability(n=n, left_out=left_out, ece=gap / n if n else None, bins=out)


def _model_decision(o: ItemOutcome) -> str | None:
    return o.model_decision or o.decision


def calibration(items: Sequence[ItemOutcome]) -> dict[str, Reliability]:
    """Reliability of the calibrated decision probability and of the self-reported confidence."""
    out = {}
    for source in SOURCES:
        pairs = [(float(v), _model_decision(o) == o.gold_decision) for o in items
                 if (v := getattr(o, source)) is not None and o.error_type is None and o.fail_reason is None]
        out[source] = reliability(pairs, left_out=len(items) - len(pairs))
    return out


# -- operating points ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    selected: int          # items at or above the threshold
    positives: int         # of them, positive for the category
    precision: float
    precision_low: float   # 95% Wilson lower bound
    coverage: float        # selected / population


@dataclass(frozen=True, slots=True)
class CategoryProposal:
    category: str
    population: int        # answered items the model put in this category, with a block probability
    positives: int
    curve: list[CurvePoint]
    block_at: float | None
    review_at: float | None
    block_point: CurvePoint | None
    allow_selected: int          # items below review_at
    allow_precision_low: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lower(k: int, n: int) -> float:
    ci = wilson(k, n)
    return 0.0 if ci is None else ci[0]


def propose(items: Sequence[ItemOutcome], categories: Sequence[str], target: float) -> list[CategoryProposal]:
    """Per violation category, the precision-coverage curve and proposed operating point."""
    if not 0.0 < target <= 1.0:
        raise ValueError("the target precision must be in (0, 1]")
    out = []
    for cat in categories:
        scored = sorted(((float(o.block_probability), o.gold_flagged and o.gold_category == cat)
                         for o in items
                         if o.error_type is None and o.fail_reason is None and o.category == cat
                         and o.block_probability is not None), key=lambda x: -x[0])
        n, positives = len(scored), sum(1 for _, pos in scored if pos)
        curve: list[CurvePoint] = []
        k = 0
        for i, (score, pos) in enumerate(scored):
            k += pos
            if i + 1 < n and scored[i + 1][0] == score:
                continue  # ties: a threshold selects all of them
            curve.append(CurvePoint(threshold=score, selected=i + 1, positives=k, precision=k / (i + 1),
                                    precision_low=_lower(k, i + 1), coverage=(i + 1) / n))
        meeting = [p for p in curve if p.precision_low >= target]
        block_point = min(meeting, key=lambda p: p.threshold) if meeting else None
        block_at = block_point.threshold if block_point else None
        review_at, allow_n, allow_low = _review_at(scored, block_at, target)
        out.append(CategoryProposal(category=cat, population=n, positives=positives, curve=curve,
                                    block_at=block_at, review_at=review_at, block_point=block_point,
                                    allow_selected=allow_n, allow_precision_low=allow_low))
    return out


def _review_at(scored: list[tuple[float, bool]], block_at: float | None,
               target: float) -> tuple[float | None, int, float | None]:
    """The highest t <= block_at (a score, or block_at) such that the items scored below t are
    negatives with a Wilson lower bound >= target: (t, items below, lower bound). (0.0, 0,
    None) when none qualifies; None without a block_at."""
    if block_at is None:
        return None, 0, None
    for t in sorted({s for s, _ in scored if s <= block_at} | {block_at}, reverse=True):
        below = [pos for s, pos in scored if s < t]
        if below:
            low = _lower(sum(1 for pos in below if not pos), len(below))
            if low >= target:
                return t, len(below), low
    return 0.0, 0, None


def proposals_yaml(proposals: Sequence[CategoryProposal], *, target: float, source: str) -> str:
    """The `thresholds:` block to paste into the prompt file, with the evidence as comments."""
    body = []
    for p in proposals:
        bp = p.block_point
        if p.block_at is None or p.review_at is None or bp is None:
            body.append(f"  # {p.category}: not proposed - no threshold reaches the target on "
                        f"{p.population} item(s) ({p.positives} positive)")
            continue
        allow = (f"allow below: {p.allow_selected} item(s), allow precision lower bound "
                 f"{p.allow_precision_low:.3f}" if p.allow_precision_low is not None else
                 "no allow band reaches the target: review_at 0 allows nothing")
        body += [f"  # {p.category}: block {bp.selected}/{p.population} item(s) (coverage "
                 f"{bp.coverage:.0%}), precision {bp.precision:.3f}, lower bound "
                 f"{bp.precision_low:.3f}; {allow}",
                 f"  {p.category}: {{block_at: {p.block_at:.6g}, review_at: {p.review_at:.6g}}}"]
    proposed = any(not line.lstrip().startswith("#") for line in body)
    return "\n".join([f"# Proposed by `modgate eval thresholds` from {source}",
                      f"# target: 95% Wilson lower bound of precision >= {target:g}",
                      "thresholds:" if proposed else "# thresholds: none proposed", *body]) + "\n"


# -- plots -------------------------------------------------------------------------------------


def reliability_plot(data: dict[str, Reliability], path: Path, title: str) -> Path:
    """Reliability diagram: per source, each bin's accuracy against its mean predicted value."""
    from gateway.quality.reporting import figure

    fig = figure(6.5, 5.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfect calibration")
    for (source, label), marker in zip(SOURCES.items(), ("o", "s"), strict=True):
        rel = data.get(source)
        if rel is None or not rel.n:
            continue
        pts = [(b.mean_p, b.accuracy, b.n) for b in rel.bins
               if b.n and b.mean_p is not None and b.accuracy is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                label=f"{label}: ECE {rel.ece:.3f} (n={rel.n})")
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    return _finish(fig, ax, path, title, "predicted probability of the decision (bin mean)",
                   "share of decisions that were right", "upper left")


MARKERS = {"current": "o", "proposed": "*", "what-if": "D"}


def thresholds_plot(proposals: Sequence[CategoryProposal], path: Path, title: str,
                    target: float | None = None,
                    marks: Mapping[str, Sequence[tuple[str, float, float]]] | None = None) -> Path:
    """Precision (with its Wilson lower bound) against coverage, per category; with a
    *target*, its line and each category's proposed block point (a star on its lower bound).
    *marks* (category -> (kind, coverage, precision), kind a key of MARKERS) are drawn on the
    curves instead: where operating points sit (the threshold what-if)."""
    from gateway.quality.reporting import figure

    fig = figure(7.5, 5.5)
    ax = fig.subplots()
    for p in proposals:
        if not p.curve:
            continue
        line, = ax.step([c.coverage for c in p.curve], [c.precision for c in p.curve], where="post",
                        label=f"{p.category} (n={p.population})")
        ax.plot([c.coverage for c in p.curve], [c.precision_low for c in p.curve], linestyle=":",
                color=line.get_color(), linewidth=1)
        if marks is not None:
            for kind, coverage, precision in marks.get(p.category, ()):
                ax.scatter([coverage], [precision], color=line.get_color(),
                           marker=MARKERS.get(kind, "x"), s=90 if kind == "proposed" else 45,
                           edgecolors="black", linewidths=0.6, zorder=3)
        elif target is not None and p.block_point is not None:
            ax.scatter([p.block_point.coverage], [p.block_point.precision_low], color=line.get_color(),
                       marker="*", s=90, zorder=3)
    if marks is not None:
        for kind, marker in MARKERS.items():
            ax.scatter([], [], color="#777777", marker=marker, label=f"{kind} point")
    if target is not None:
        ax.axhline(target, color="#c44e52", linewidth=1, linestyle="--", label=f"target {target:g}")
    return _finish(fig, ax, path, title, "coverage (share of the category's verdicts blocked at "
                   "the threshold)", "precision (solid); 95% Wilson lower bound (dotted)", "lower left")


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str, legend: str) -> Path:
    """Axes on [0, 1] both ways, labels, grid, legend and title; the figure saved as *path*."""
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=110)
    return path
