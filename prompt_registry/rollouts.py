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
    "evaluate_gates", "new_rollout", "wilson_interval",
]

State = Literal["running", "paused", "promoted", "aborted"]
ACTIVE: tuple[str, ...] = ("running", "paused")


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
    max_error_rate: float = Field(0.02, ge=0, le=1, description="backend errors / requests")
    max_parse_failure_rate: float = Field(0.02, ge=0, le=1, description="unusable outputs / verdicts")
    max_p95_latency_ms: float | None = Field(None, gt=0, description="canary p95 must stay below")
    min_agreement: float | None = Field(0.80, ge=0, le=1, description="decision agreement with stable "
                                        "(from shadow comparisons of the canary version)")
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
        return self.steps[self.step_index]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def changed(self, **update: object) -> Rollout:
        now = datetime.now(UTC)
        return self.model_copy(update={**update, "revision": self.revision + 1, "updated_at": now})


def new_rollout(prompt: str, *, stable_version: int, canary_version: int | None, steps: list[int],
                shadows: list[ShadowSpec], step_hold_s: float, gates: GateConfig, auto: bool,
                subject_key: str, started_by: str) -> Rollout:
    now = datetime.now(UTC)
    return Rollout(id=uuid.uuid4().hex[:12], prompt=prompt, stable_version=stable_version,
                   canary_version=canary_version, steps=steps, shadows=shadows,
                   step_hold_s=step_hold_s, gates=gates, auto=auto, subject_key=subject_key,  # type: ignore[arg-type]
                   salt=uuid.uuid4().hex, started_at=now, step_started_at=now, updated_at=now,
                   started_by=started_by)


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


@dataclass(frozen=True)
class GateResult:
    name: str
    value: float | None
    low: float | None
    high: float | None
    limit: float | None
    samples: int
    verdict: Literal["pass", "fail", "wait"]

    def as_dict(self) -> dict[str, object]:
        return {"gate": self.name, "value": self.value, "interval": [self.low, self.high],
                "limit": self.limit, "samples": self.samples, "verdict": self.verdict}


def _rate_gate(name: str, bad: int, n: int, limit: float, cfg: GateConfig,
               min_samples: int | None = None) -> GateResult:
    """Pass when the upper bound of the bad rate is below the limit, fail when the lower bound
    is above it; otherwise (or with too few samples) wait for more evidence."""
    lo, hi = wilson_interval(bad, n, cfg.confidence)
    value = bad / n if n else None
    if n < (min_samples or cfg.min_samples):
        verdict: Literal["pass", "fail", "wait"] = "wait"
    elif lo > limit:
        verdict = "fail"
    elif hi <= limit:
        verdict = "pass"
    else:
        verdict = "wait"
    return GateResult(name, value, lo, hi, limit, n, verdict)


def evaluate_gates(rollout: Rollout, stats: RolloutStats) -> list[GateResult]:
    """Judge the canary from the rollout's aggregated statistics (`build_rollout_stats` of the
    store's counters)."""
    cfg = rollout.gates
    out: list[GateResult] = []
    canary, stable = stats.canary, stats.stable
    verdicts = canary.verdicts
    out.append(_rate_gate("error_rate", canary.errors, canary.requests, cfg.max_error_rate, cfg))
    out.append(_rate_gate("parse_failure_rate", canary.parse_failures, verdicts,
                          cfg.max_parse_failure_rate, cfg))
    if cfg.max_p95_latency_ms is not None:
        p95 = canary.p95_ms
        if verdicts < cfg.min_samples or p95 is None:
            v: Literal["pass", "fail", "wait"] = "wait"
        else:
            v = "pass" if p95 <= cfg.max_p95_latency_ms else "fail"
        out.append(GateResult("p95_latency_ms", p95, None, None, cfg.max_p95_latency_ms, verdicts, v))
    if cfg.min_agreement is not None and rollout.canary_version is not None:
        pair = stats.pair(rollout.canary_version)
        out.append(_rate_gate("disagreement_rate", pair.n - pair.agree, pair.n, 1.0 - cfg.min_agreement, cfg))
    if cfg.max_flag_rate_drift is not None:
        worst: GateResult | None = None
        for cat in sorted(set(canary.flags) | set(stable.flags)):
            g = _drift_gate(f"flag_rate_drift[{cat}]", canary.flags.get(cat, 0), verdicts,
                            stable.flags.get(cat, 0), stable.verdicts, cfg)
            if worst is None or _rank(g) > _rank(worst):
                worst = g
        out.append(worst or GateResult("flag_rate_drift", None, None, None, cfg.max_flag_rate_drift,
                                       verdicts, "wait" if verdicts < cfg.min_samples else "pass"))
    cfb, sfb = canary.feedback, stable.feedback
    if cfg.min_precision is not None:
        for cat, c in sorted(cfb.categories.items()):
            out.append(_rate_gate(f"imprecision[{cat}]", c.fp, c.tp + c.fp, 1.0 - cfg.min_precision, cfg,
                                  cfg.min_feedback))
    if cfg.max_recall_drop is not None:
        for cat in sorted(set(cfb.categories) | set(sfb.categories)):
            c, st = cfb.category(cat), sfb.category(cat)
            out.append(_drop_gate(f"recall_drop[{cat}]", st.tp, st.tp + st.fn, c.tp, c.tp + c.fn, cfg))
    return out


def _drop_gate(name: str, a: int, na: int, b: int, nb: int, cfg: GateConfig) -> GateResult:
    """How far proportion b (canary) falls below a (stable), Newcombe interval; one-sided."""
    limit = cfg.max_recall_drop or 0.0
    if na < cfg.min_feedback or nb < cfg.min_feedback:
        return GateResult(name, None, None, None, limit, min(na, nb), "wait")
    d, lo, hi = newcombe_interval(a, na, b, nb, cfg.confidence)
    verdict: Literal["pass", "fail", "wait"] = "fail" if lo > limit else "pass" if hi <= limit else "wait"
    return GateResult(name, d, lo, hi, limit, min(na, nb), verdict)


def _rank(g: GateResult) -> int:
    return {"pass": 0, "wait": 1, "fail": 2}[g.verdict]


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
    if na < cfg.min_samples or nb < cfg.min_samples:
        return GateResult(name, None, None, None, limit, min(na, nb), "wait")
    d, lo, hi = newcombe_interval(a, na, b, nb, cfg.confidence)
    if lo > limit or hi < -limit:
        verdict: Literal["pass", "fail", "wait"] = "fail"
    elif -limit <= lo and hi <= limit:
        verdict = "pass"
    else:
        verdict = "wait"
    return GateResult(name, d, lo, hi, limit, min(na, nb), verdict)
