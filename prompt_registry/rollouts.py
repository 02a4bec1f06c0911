"""Rollouts: a candidate prompt version meets live traffic gradually, and is promoted or
aborted on measured evidence.

A `Rollout` (one active per prompt) holds the stable version, a canary version with a weight
(0-100 %, stepped on a schedule) and shadow versions with sample rates. It lives in the
registry store, so it survives restarts and every gateway replica sharing the store sees the
same state; writes are compare-and-set on `revision`.

State machine:

    running --step--> running (next weight) --...--> promote --> promoted (canary is production)
       |  ^                                           \\
     pause resume                                      abort --> aborted (weight 0, production unchanged)
       v  |
     paused

Gates (`evaluate_gates`) turn the rollout's statistics (`prompt_registry.rollout_stats`, typed
so that the gates do not depend on how the gateway spells its counters) into a decision. No
decision is taken below `min_samples`; rates are judged by their Wilson score interval, so a
canary is aborted only when the *lower* bound of its failure rate is above the limit, and
promoted only when the *upper* bound is below it (and likewise for agreement and flag-rate
drift).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompt_registry.errors import RegistryError
from prompt_registry.rollout_stats import RolloutStats

__all__ = [
    "GateConfig", "GateResult", "Rollout", "RolloutConflict", "RolloutError", "ShadowSpec",
    "UNPROVEN_MAX_WEIGHT", "canary_verdicts_needed", "check_unproven_steps", "evaluate_gates",
    "new_rollout", "sample_needs", "samples_to_pass",
    "wilson_interval",
]

State = Literal["running", "paused", "promoted", "aborted"]
ACTIVE: tuple[str, ...] = ("running", "paused")
UNPROVEN_MAX_WEIGHT = 50  # default: % of traffic a version without a passing promotion gate may get


class RolloutError(RegistryError):
    """An operation that the rollout's current state does not allow."""


class RolloutConflict(RolloutError):
    """A concurrent writer changed the rollout first (compare-and-set lost)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowSpec(_Strict):
    version: int = Field(..., ge=1, le=2**31 - 1)
    sample_rate: float = Field(..., gt=0.0, le=1.0)


class GateConfig(_Strict):
    min_samples: int = Field(200, ge=1, description="no decision with fewer canary (or shadow) samples")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    max_error_rate: float | None = Field(0.02, ge=0, le=1, description="backend errors / requests "
                                         "(null: gate off)")
    max_parse_failure_rate: float | None = Field(0.02, ge=0, le=1, description="unusable outputs / "
                                                 "verdicts (null: gate off)")
    max_p95_latency_ms: float | None = Field(None, gt=0, description="canary p95 must stay below")
    min_agreement: float | None = Field(0.80, ge=0, le=1, description="decision agreement with stable "
                                        "(from shadow comparisons of the canary version; skipped "
                                        "when the canary version is not shadowed)")
    max_flag_rate_drift: float | None = Field(0.10, ge=0, le=1, description="|flag rate canary - stable| "
                                              "per category")
    min_feedback: int = Field(50, ge=1, description="reviewer labels per category needed before the "
                              "precision and recall gates decide")
    min_precision: float | None = Field(None, ge=0, le=1, description="canary precision per category "
                                        "(from reviewer feedback) must be at least this")
    max_recall_drop: float | None = Field(None, ge=0, le=1, description="canary recall per category may "
                                          "be at most this much below stable's (from reviewer feedback)")


class Rollout(_Strict):
    id: str
    prompt: str
    stable_version: int = Field(..., ge=1)
    canary_version: int | None = Field(None, ge=1)
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    step_index: int = 0
    step_hold_s: float = Field(3600.0, ge=0, description="minimum time at each weight")
    shadows: list[ShadowSpec] = Field(default_factory=list)
    subject_key: Literal["seller_id", "item_id", "subject"] = "seller_id"
    salt: str
    auto: bool = Field(True, description="step, promote and abort by the gates without a human")
    gates: GateConfig = Field(default_factory=GateConfig)
    state: State = "running"
    revision: int = 0
    started_at: datetime
    step_started_at: datetime
    updated_at: datetime
    started_by: str = ""
    last_decision: str = ""
    unproven_max_weight: int = Field(
        UNPROVEN_MAX_WEIGHT, ge=0, le=99, description="the most traffic (%) a canary version that has "
        "not passed its promotion gate may get; past it, the next step is the promotion itself")
    on_promotion_refused: Literal["last_safe", "zero"] = Field(
        "last_safe", description="where the canary weight goes when the promotion gate refuses the "
        "promotion: the last step within unproven_max_weight, or 0")
    held_weight: int | None = Field(None, ge=0, le=99, description="set after a refused promotion "
                                    "or a fallback: the canary's weight until resumed")

    @model_validator(mode="after")
    def _check(self) -> Rollout:
        if any(not 0 <= w <= 100 for w in self.steps) or self.steps != sorted(self.steps):
            raise ValueError("steps must be increasing weights between 0 and 100")
        if self.canary_version is not None and not self.steps:
            raise ValueError("a canary needs at least one step")
        if self.canary_version is None and not self.shadows:
            raise ValueError("a rollout needs a canary version, shadow versions, or both")
        if self.canary_version == self.stable_version:
            raise ValueError("the canary version is the stable version")
        if not 0 <= self.step_index < max(1, len(self.steps)):
            raise ValueError("step_index out of range")
        return self

    @property
    def weight(self) -> int:
        """Current canary share of traffic, in percent."""
        if self.canary_version is None or self.state not in ("running", "paused"):
            return 0
        if self.held_weight is not None:
            return self.held_weight
        return self.steps[self.step_index]

    @property
    def next_weight(self) -> int | None:
        """The weight of the next step; None at the last one (next comes the promotion)."""
        return self.steps[self.step_index + 1] if self.step_index + 1 < len(self.steps) else None

    def safe_step(self) -> int | None:
        """The index of the last step reached whose weight an unproven canary may have."""
        for i in range(self.step_index, -1, -1):
            if self.steps[i] <= self.unproven_max_weight:
                return i
        return None

    def fallen_back(self, why: str) -> Rollout:
        """Paused at the last safe weight (or 0, per `on_promotion_refused`), saying why."""
        safe = self.safe_step()
        zero = self.on_promotion_refused == "zero" or safe is None
        new = self.changed(state="paused", step_index=self.step_index if safe is None else safe,
                           held_weight=0 if zero else None)
        return new.model_copy(update={"last_decision": f"{why}; canary back to {new.weight}%"})

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def changed(self, **update: object) -> Rollout:
        now = datetime.now(UTC)
        return self.model_copy(update={**update, "revision": self.revision + 1, "updated_at": now})


def new_rollout(prompt: str, *, stable_version: int, canary_version: int | None, steps: list[int],
                shadows: list[ShadowSpec], step_hold_s: float, gates: GateConfig, auto: bool,
                subject_key: str, started_by: str, unproven_max_weight: int = UNPROVEN_MAX_WEIGHT,
                on_promotion_refused: str = "last_safe") -> Rollout:
    now = datetime.now(UTC)
    return Rollout(id=uuid.uuid4().hex[:12], prompt=prompt, stable_version=stable_version,
                   canary_version=canary_version, steps=steps, shadows=shadows,
                   step_hold_s=step_hold_s, gates=gates, auto=auto, subject_key=subject_key,  # type: ignore[arg-type]
                   salt=uuid.uuid4().hex, started_at=now, step_started_at=now, updated_at=now,
                   started_by=started_by, unproven_max_weight=unproven_max_weight,
                   on_promotion_refused=on_promotion_refused)  # type: ignore[arg-type]


def check_unproven_steps(rollout: Rollout) -> None:
    """Refuse steps an unproven canary may not take: every weight at most
    `unproven_max_weight`, except a last step of 100, which is the promotion itself."""
    cap = rollout.unproven_max_weight
    served = rollout.steps[:-1] if rollout.steps and rollout.steps[-1] == 100 else rollout.steps
    if not served or any(w > cap for w in served):
        raise RolloutError(
            f"v{rollout.canary_version} has not passed its promotion gate, so it may serve at most "
            f"{cap}% of traffic: steps {','.join(map(str, rollout.steps))} go past that (a last step of "
            f"100 is the promotion itself, through the gate); use steps within {cap}%, e.g. "
            f"5,25,{cap},100")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


Verdict = Literal["pass", "fail", "wait", "skip"]


@dataclass(frozen=True)
class GateResult:
    """One gate's judgement. `needs`: samples (of what `samples` counts) the gate must have
    before it can pass at all at the configured confidence, i.e. with a perfect record (None:
    it never can, e.g. a limit of 0); `note` says why a gate waits or is skipped."""

    name: str
    value: float | None
    low: float | None
    high: float | None
    limit: float | None
    samples: int
    verdict: Verdict
    needs: int | None = None
    note: str = ""

    @property
    def more(self) -> int | None:
        """How many more samples before the gate can decide in favour (0: enough already)."""
        return None if self.needs is None else max(0, self.needs - self.samples)

    def as_dict(self) -> dict[str, object]:
        return {"gate": self.name, "value": self.value, "interval": [self.low, self.high],
                "limit": self.limit, "samples": self.samples, "verdict": self.verdict,
                "needs": self.needs, "more": self.more, "note": self.note}


def samples_to_pass(limit: float, confidence: float) -> int | None:
    """The smallest n at which a perfect record (0 bad of n) passes a rate gate with *limit*:
    the Wilson upper bound of 0/n, z^2 / (n + z^2), at or below the limit. The same n serves
    the two-sample gates (flag-rate drift, recall drop), whose Newcombe bound with equal,
    perfect proportions is that same Wilson bound. None when no n suffices (limit 0)."""
    if limit >= 1.0:
        return 1
    if limit <= 0.0:
        return None
    z2 = _z(confidence) ** 2
    n = max(1, math.ceil(z2 * (1.0 - limit) / limit) - 1)
    while wilson_interval(0, n, confidence)[1] > limit:  # float rounding at the boundary
        n += 1
    return n


def _at_least(floor: int, n: int | None) -> int | None:
    return None if n is None else max(floor, n)


def sample_needs(cfg: GateConfig) -> dict[str, int | None]:
    """Per gate that is switched on: the samples it needs before it can pass (a perfect record,
    the configured confidence, and `min_samples` / `min_feedback`). Error and parse-failure
    rates count canary requests and verdicts; latency and flag-rate drift count canary (and
    stable) verdicts; agreement counts shadow comparisons of the canary version; precision and
    recall count reviewer labels per category."""
    c = cfg.confidence
    out: dict[str, int | None] = {}
    if cfg.max_error_rate is not None:
        out["error_rate"] = _at_least(cfg.min_samples, samples_to_pass(cfg.max_error_rate, c))
    if cfg.max_parse_failure_rate is not None:
        out["parse_failure_rate"] = _at_least(cfg.min_samples, samples_to_pass(cfg.max_parse_failure_rate, c))
    if cfg.max_p95_latency_ms is not None:
        out["p95_latency_ms"] = cfg.min_samples
    if cfg.min_agreement is not None:
        out["disagreement_rate"] = _at_least(cfg.min_samples, samples_to_pass(1.0 - cfg.min_agreement, c))
    if cfg.max_flag_rate_drift is not None:
        out["flag_rate_drift"] = _at_least(cfg.min_samples, samples_to_pass(cfg.max_flag_rate_drift, c))
    if cfg.min_precision is not None:
        out["imprecision"] = _at_least(cfg.min_feedback, samples_to_pass(1.0 - cfg.min_precision, c))
    if cfg.max_recall_drop is not None:
        out["recall_drop"] = _at_least(cfg.min_feedback, samples_to_pass(cfg.max_recall_drop, c))
    return out


def canary_verdicts_needed(cfg: GateConfig) -> int | None:
    """Canary samples (requests, verdicts) before every canary-counted gate can pass: what a
    step waits for at the least, whatever the hold time (None: some gate never passes)."""
    needs = sample_needs(cfg)
    counted = [needs[k] for k in ("error_rate", "parse_failure_rate", "p95_latency_ms", "flag_rate_drift")
               if k in needs]
    if any(n is None for n in counted):
        return None
    return max([n for n in counted if n is not None], default=cfg.min_samples)


def _rate_gate(name: str, bad: int, n: int, limit: float, cfg: GateConfig,
               min_samples: int | None = None) -> GateResult:
    """Pass when the upper bound of the bad rate is below the limit, fail when the lower bound
    is above it; otherwise (or with too few samples) wait for more evidence."""
    floor = min_samples or cfg.min_samples
    lo, hi = wilson_interval(bad, n, cfg.confidence)
    value = bad / n if n else None
    needs = _at_least(floor, samples_to_pass(limit, cfg.confidence))
    note = ""
    if n < floor:
        verdict: Verdict = "wait"
        note = f"no decision below {floor} samples"
    elif lo > limit:
        verdict = "fail"
    elif hi <= limit:
        verdict = "pass"
    else:
        verdict = "wait"
        note = "the interval straddles the limit: more samples narrow it"
    return GateResult(name, value, lo, hi, limit, n, verdict, needs, note)


def evaluate_gates(rollout: Rollout, stats: RolloutStats) -> list[GateResult]:
    """Judge the canary from the rollout's aggregated statistics (`build_rollout_stats` of the
    store's counters). A gate switched off (its limit None) is absent; a gate that cannot be
    measured in this rollout (agreement when the canary version is not shadowed) is listed
    with verdict "skip" and the reason, and does not hold the rollout."""
    cfg = rollout.gates
    out: list[GateResult] = []
    canary, stable = stats.canary, stats.stable
    verdicts = canary.verdicts
    if cfg.max_error_rate is not None:
        out.append(_rate_gate("error_rate", canary.errors, canary.requests, cfg.max_error_rate, cfg))
    if cfg.max_parse_failure_rate is not None:
        out.append(_rate_gate("parse_failure_rate", canary.parse_failures, verdicts,
                              cfg.max_parse_failure_rate, cfg))
    if cfg.max_p95_latency_ms is not None:
        p95 = canary.p95_ms
        if verdicts < cfg.min_samples or p95 is None:
            v: Verdict = "wait"
        else:
            v = "pass" if p95 <= cfg.max_p95_latency_ms else "fail"
        out.append(GateResult("p95_latency_ms", p95, None, None, cfg.max_p95_latency_ms, verdicts, v,
                              cfg.min_samples, f"no decision below {cfg.min_samples} samples" if v == "wait" else ""))
    if cfg.min_agreement is not None and rollout.canary_version is not None:
        limit = 1.0 - cfg.min_agreement
        if rollout.canary_version in {s.version for s in rollout.shadows}:
            pair = stats.pair(rollout.canary_version)
            out.append(_rate_gate("disagreement_rate", pair.n - pair.agree, pair.n, limit, cfg))
        else:
            out.append(GateResult("disagreement_rate", None, None, None, limit, 0, "skip", None,
                                  f"v{rollout.canary_version} is not shadowed, so agreement with stable "
                                  f"is not measured (shadow it: --shadow {rollout.canary_version}:RATE)"))
    if cfg.max_flag_rate_drift is not None:
        worst: GateResult | None = None
        for cat in sorted(set(canary.flags) | set(stable.flags)):
            g = _drift_gate(f"flag_rate_drift[{cat}]", canary.flags.get(cat, 0), verdicts,
                            stable.flags.get(cat, 0), stable.verdicts, cfg)
            if worst is None or _rank(g) > _rank(worst):
                worst = g
        if worst is None:
            n = min(verdicts, stable.verdicts)
            needs = _at_least(cfg.min_samples, samples_to_pass(cfg.max_flag_rate_drift, cfg.confidence))
            waiting = needs is None or n < needs
            worst = GateResult("flag_rate_drift", None, None, None, cfg.max_flag_rate_drift, n,
                               "wait" if waiting else "pass", needs,
                               "no flags in either arm yet" if waiting else "no flags in either arm")
        out.append(worst)
    cfb, sfb = canary.feedback, stable.feedback
    if cfg.min_precision is not None:
        limit = 1.0 - cfg.min_precision
        for cat, c in sorted(cfb.categories.items()):
            out.append(_rate_gate(f"imprecision[{cat}]", c.fp, c.tp + c.fp, limit, cfg, cfg.min_feedback))
        if not cfb.categories:
            out.append(GateResult("imprecision", None, None, None, limit, 0, "wait",
                                  _at_least(cfg.min_feedback, samples_to_pass(limit, cfg.confidence)),
                                  "no reviewer labels for the canary yet"))
    if cfg.max_recall_drop is not None:
        cats = sorted(set(cfb.categories) | set(sfb.categories))
        for cat in cats:
            c, st = cfb.category(cat), sfb.category(cat)
            out.append(_drop_gate(f"recall_drop[{cat}]", st.tp, st.tp + st.fn, c.tp, c.tp + c.fn, cfg))
        if not cats:
            out.append(GateResult("recall_drop", None, None, None, cfg.max_recall_drop, 0, "wait",
                                  _at_least(cfg.min_feedback, samples_to_pass(cfg.max_recall_drop, cfg.confidence)),
                                  "no reviewer labels yet"))
    return out


def _drop_gate(name: str, a: int, na: int, b: int, nb: int, cfg: GateConfig) -> GateResult:
    """How far proportion b (canary) falls below a (stable), Newcombe interval; one-sided."""
    limit = cfg.max_recall_drop or 0.0
    needs = _at_least(cfg.min_feedback, samples_to_pass(limit, cfg.confidence))
    if na < cfg.min_feedback or nb < cfg.min_feedback:
        return GateResult(name, None, None, None, limit, min(na, nb), "wait", needs,
                          f"no decision below {cfg.min_feedback} labelled positives in each arm")
    d, lo, hi = newcombe_interval(a, na, b, nb, cfg.confidence)
    verdict: Verdict = "fail" if lo > limit else "pass" if hi <= limit else "wait"
    return GateResult(name, d, lo, hi, limit, min(na, nb), verdict, needs)


def _rank(g: GateResult) -> int:
    return {"skip": 0, "pass": 0, "wait": 1, "fail": 2}[g.verdict]


def newcombe_interval(a: int, na: int, b: int, nb: int, confidence: float) -> tuple[float, float, float]:
    """a/na - b/nb and its Newcombe (hybrid Wilson score) interval: (difference, low, high)."""
    p1, p2 = a / na, b / nb
    l1, u1 = wilson_interval(a, na, confidence)
    l2, u2 = wilson_interval(b, nb, confidence)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _drift_gate(name: str, a: int, na: int, b: int, nb: int, cfg: GateConfig) -> GateResult:
    """Difference of two proportions with a Newcombe (Wilson-based) interval; two-sided."""
    limit = cfg.max_flag_rate_drift or 0.0
    needs = _at_least(cfg.min_samples, samples_to_pass(limit, cfg.confidence))
    if na < cfg.min_samples or nb < cfg.min_samples:
        return GateResult(name, None, None, None, limit, min(na, nb), "wait", needs,
                          f"no decision below {cfg.min_samples} verdicts in each arm")
    d, lo, hi = newcombe_interval(a, na, b, nb, cfg.confidence)
    if lo > limit or hi < -limit:
        verdict: Verdict = "fail"
    elif -limit <= lo and hi <= limit:
        verdict = "pass"
    else:
        verdict = "wait"
    return GateResult(name, d, lo, hi, limit, min(na, nb), verdict, needs)
