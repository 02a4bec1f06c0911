"""Promotion gates: a version may become production only with a stored scorecard that meets
the criteria its prompt declares (the `evaluation` block of a prompt file).

Three parts:

- `ScorecardRecord`: what the registry stores of an offline evaluation (`modgate eval run`),
  keyed by (prompt, version, dataset sha256): per-category TP/FP/FN, the flag-vs-allow and
  micro counts, correctness and failure counts. Precision, recall, F1, accuracy and rates, with
  95 % Wilson intervals, are computed from the counts, so a stored record cannot disagree with
  itself. Re-evaluating a version on the same dataset replaces its record (the last write
  wins, and every write is audited), because the model behind a name can change.
- `evaluate_gate`: a pure function from (criteria, candidate scorecard, production scorecard)
  to a `GateReport` with one result per criterion (and per category for `*`).
- `move_label`: the one check every path that moves the production label goes through (the
  CLI, the admin API, manual and automatic rollout promotion, seeding). Refuses with
  `GateRefused` unless the gate passes or a `GateOverride` (reason required; the callers only
  build one for the admin scope) is given; the gate's verdict, or the override with who and
  why, is written into the label move's audit entry in the same atomic store write.

Which criteria apply: the gate policy *in force* for the prompt, never criteria or a dataset
the candidate brings along. In force is, in this order:

1. the prompt's gate policy kept in the registry (`GatePolicy`, one record per prompt, set only
   by the protected, audited `ops.set_gate_policy`: `modgate prompts gate-policy set`, `PUT
   /v1/prompts/{name}/gate-policy`, scope `gates:write` or `admin`); its `evaluation` may be
   None, an explicit "no gate";
2. else the current production version's `evaluation` block;
3. else nothing. Only then does the candidate's own block apply (a prompt with no production
   version, or an ungated one): it can only add a gate, never loosen one.

A candidate whose own block differs from the policy in force is judged by the policy in force;
the report says whether its block is the same, stricter (`at_least_as_strict`) or not. When the
policy in force is production's block and the candidate's is not at least as strict (looser,
on another dataset, or dropped), moving production to it would quietly make its block the
policy for every later move, so the move first keeps production's block in force as the
registry policy (audited, in the same operation). Every production move's audit entry names
the policy that judged it (its source and hash) and the dataset hash.

Moving the label to the version it already points at is not a move and is not judged. Rolling
back (`ops.rollback`) is not gated either: it returns to the version that held the label
before, and in an incident nothing may stand between an operator and the previous version.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prompt_registry.errors import ApprovalConflict, LabelConflict, RegistryError
from prompt_registry.lifecycle import assignable_or_raise
from prompt_registry.models import AGGREGATES, EACH_CATEGORY, EvaluationSpec, GateCriterion
from prompt_registry.rollouts import wilson_interval

if TYPE_CHECKING:
    from prompt_registry.store import GateReader, PromptStore

__all__ = [
    "APPROVAL_EXPIRY_S", "ApprovalRequest", "ApprovalRequired", "CriterionResult",
    "FourEyesRecord", "GateOverride", "GatePolicy", "GateRefused", "GateReport", "MetricCounts",
    "PolicyInForce", "RateCount", "ScorecardMismatch", "ScorecardRecord", "at_least_as_strict",
    "check_four_eyes_action", "check_recorded_action", "check_scorecard_version",
    "compare_blocks", "evaluate_gate", "evaluation_hash", "gate_report", "move_label",
    "policy_in_force", "scorecard_audit_note",
]

CONFIDENCE = 0.95
_EPS = 1e-12  # a value equal to its limit passes, whatever the float rounding


class GateRefused(RegistryError):
    """The promotion gate refused a production move. Carries the full report."""

    def __init__(self, report: GateReport) -> None:
        super().__init__(report.message())
        self.report = report


class ApprovalRequired(RegistryError):
    """Four eyes: a production move was recorded as a pending approval request instead of
    being made. Carries the request (its id is what a second key holder approves)."""

    def __init__(self, request: ApprovalRequest, *, prompt: str, created: bool) -> None:
        cur = "-" if request.expected is None else f"v{request.expected}"
        super().__init__(
            f"{prompt} {request.label}: {cur} -> v{request.version} needs the approval of a second "
            f"key holder (four eyes): request {request.id} by {request.requested_by}, expires "
            f"{request.expires_at.isoformat(timespec='seconds')}"
            + ("" if created else " (already pending)"))
        self.request = request
        self.prompt = prompt
        self.created = created


class ScorecardMismatch(RegistryError, ValueError):
    """A scorecard does not belong to the version it is stored under (content hash differs)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricCounts(_Strict):
    """Confusion counts for one category (or micro / flagged)."""

    tp: int = Field(0, ge=0)
    fp: int = Field(0, ge=0)
    fn: int = Field(0, ge=0)

    @property
    def support(self) -> int:
        return self.tp + self.fn

    @property
    def predicted(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float | None:
        return self.tp / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.support if self.support else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None and r is None:
            return None
        if not p or not r:
            return 0.0
        return 2 * p * r / (p + r)

    def as_dict(self) -> dict[str, Any]:
        pi = wilson_interval(self.tp, self.predicted, CONFIDENCE) if self.predicted else None
        ri = wilson_interval(self.tp, self.support, CONFIDENCE) if self.support else None
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "support": self.support,
                "predicted": self.predicted, "precision": self.precision,
                "precision_ci": list(pi) if pi else None, "recall": self.recall,
                "recall_ci": list(ri) if ri else None, "f1": self.f1}


class RateCount(_Strict):
    count: int = Field(0, ge=0)
    n: int = Field(0, ge=0)

    @property
    def rate(self) -> float | None:
        return self.count / self.n if self.n else None


class ScorecardRecord(_Strict):
    """The part of a scorecard the registry keeps and gates read (the full report, with items,
    plots and per-locale numbers, stays in the files `modgate eval run` writes)."""

    prompt: str = Field(..., min_length=1)
    version: int = Field(..., ge=1)
    version_hash: str = Field(..., min_length=1, description="content hash of the version scored")
    dataset_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    dataset_source: str = ""
    model: str = ""
    items: int = Field(..., ge=0)
    correct: int = Field(0, ge=0)
    categories: dict[str, MetricCounts]
    micro: MetricCounts
    flagged: MetricCounts
    parse_failures: RateCount = Field(default_factory=RateCount, description="of answered items")
    errors: RateCount = Field(default_factory=RateCount, description="of all items (no verdict)")
    needs_review: RateCount = Field(default_factory=RateCount, description="of answered items")
    created_at: datetime
    created_by: str = ""
    report: str = Field("", description="where the full report was written")

    @field_validator("correct")
    @classmethod
    def _correct(cls, v: int, info: Any) -> int:
        items = info.data.get("items")
        if items is not None and v > items:
            raise ValueError("more correct items than items")
        return v

    def counts(self, category: str) -> MetricCounts | None:
        if category == "micro":
            return self.micro
        if category == "flagged":
            return self.flagged
        return self.categories.get(category)

    def as_dict(self) -> dict[str, Any]:
        acc_ci = wilson_interval(self.correct, self.items, CONFIDENCE) if self.items else None
        return {
            "prompt": self.prompt, "version": self.version, "version_hash": self.version_hash,
            "dataset_sha256": self.dataset_sha256, "dataset_source": self.dataset_source,
            "model": self.model, "items": self.items, "created_at": self.created_at.isoformat(),
            "created_by": self.created_by, "report": self.report,
            "accuracy": self.correct / self.items if self.items else None,
            "accuracy_ci": list(acc_ci) if acc_ci else None,
            "categories": {k: v.as_dict() for k, v in self.categories.items()},
            "micro": self.micro.as_dict(), "flagged": self.flagged.as_dict(),
            "rates": {k: {"count": r.count, "n": r.n, "rate": r.rate}
                      for k, r in (("parse_failure", self.parse_failures), ("error", self.errors),
                                   ("needs_review", self.needs_review))},
        }


class GateOverride(_Strict):
    """Move production although the gate fails. Only built for callers with the admin scope."""

    reason: str = Field(..., min_length=1, max_length=2000)
    by: str = Field(..., min_length=1, description="who overrides (the admin key's name)")

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("an override needs a reason")
        return v.strip()


APPROVAL_EXPIRY_S = 24 * 3600.0
ApprovalState = Literal["pending", "approved", "denied", "expired", "failed"]
_KEEP_DECIDED = 50  # decided requests kept in the record (all are in the audit log)


class ApprovalRequest(_Strict):
    """A production move waiting for a second key holder (four eyes). `expected` is the
    version production held when it was requested: the move is a compare-and-set on it."""

    id: str = Field(..., pattern=r"^[0-9a-f]{12}$")
    label: str = Field(..., min_length=1)
    version: int = Field(..., ge=1)
    expected: int | None = Field(None, ge=1)
    requested_by: str = Field(..., min_length=1, description="the requesting key holder")
    requested_at: datetime
    expires_at: datetime
    note: str = ""
    override: GateOverride | None = None
    rollout_id: str | None = None
    state: ApprovalState = "pending"
    decided_by: str = ""
    decided_at: datetime | None = None
    reason: str = ""

    def state_at(self, now: datetime) -> ApprovalState:
        """The state, counting a pending request past its expiry as expired."""
        return "expired" if self.state == "pending" and now >= self.expires_at else self.state

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["state"] = self.state_at(now or datetime.now(UTC))
        return data


class FourEyesRecord(_Strict):
    """A prompt's four-eyes setting and its approval requests: one record per prompt, written
    by compare-and-set on `revision` (each write audited). When `enabled`, a production move
    (by label or by promotion) is recorded as a request that a second key holder with the
    promote scope approves (or denies); it expires after `expiry_s`."""

    prompt: str = Field(..., min_length=1)
    revision: int = Field(..., ge=1)
    enabled: bool
    expiry_s: float = Field(APPROVAL_EXPIRY_S, gt=0, le=30 * 24 * 3600)
    set_by: str = Field(..., min_length=1)
    set_at: datetime
    reason: str = ""
    requests: list[ApprovalRequest] = Field(default_factory=list)

    def find(self, request_id: str) -> ApprovalRequest | None:
        return next((r for r in self.requests if r.id == request_id), None)

    def with_request(self, request: ApprovalRequest) -> FourEyesRecord:
        """The next revision with *request* added or replaced (decided ones trimmed)."""
        others = [r for r in self.requests if r.id != request.id]
        kept = [*others, request]
        decided = [r for r in kept if r.state != "pending"]
        drop = {r.id for r in decided[:-_KEEP_DECIDED]} if len(decided) > _KEEP_DECIDED else set()
        return self.model_copy(update={"revision": self.revision + 1,
                                       "requests": [r for r in kept if r.id not in drop]})

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        return {"prompt": self.prompt, "revision": self.revision, "enabled": self.enabled,
                "expiry_s": self.expiry_s, "set_by": self.set_by, "set_at": self.set_at.isoformat(),
                "reason": self.reason, "requests": [r.as_dict(now) for r in self.requests]}


def evaluation_hash(spec: EvaluationSpec | None) -> str:
    """sha256 of an evaluation block's canonical JSON (sorted keys); of `null` for "no gate".
    Names a gate policy in audit entries and reports."""
    data = None if spec is None else spec.model_dump(mode="json")
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


class GatePolicy(_Strict):
    """A prompt's promotion gate policy kept in the registry. Once stored it is the policy in
    force for the prompt, whatever the versions' own `evaluation` blocks say. Written only by
    the protected, audited `ops.set_gate_policy` (or kept in force by a production move, see
    `move_label`); every write is a compare-and-set on `revision`."""

    prompt: str = Field(..., min_length=1)
    revision: int = Field(..., ge=1, description="1 for the first record, +1 per change")
    evaluation: EvaluationSpec | None = Field(..., description="dataset and criteria; null: no gate")
    set_by: str = Field(..., min_length=1)
    set_at: datetime
    reason: str = ""

    @property
    def sha256(self) -> str:
        return evaluation_hash(self.evaluation)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "revision": self.revision, "sha256": self.sha256,
                "evaluation": None if self.evaluation is None else self.evaluation.model_dump(mode="json"),
                "set_by": self.set_by, "set_at": self.set_at.isoformat(), "reason": self.reason}


PolicySource = Literal["registry", "production", "candidate", "none"]


@dataclass(frozen=True)
class PolicyInForce:
    """Which gate policy judges a production move, and where it comes from."""

    source: PolicySource
    evaluation: EvaluationSpec | None
    version: int | None = None    # production / candidate: the version whose block it is
    revision: int | None = None   # registry: the record's revision

    @property
    def sha256(self) -> str:
        return evaluation_hash(self.evaluation)

    def describe(self) -> str:
        if self.source == "registry":
            what = "" if self.evaluation is not None else ": no gate"
            return f"registry gate policy r{self.revision}{what}"
        if self.source == "production":
            return f"production v{self.version}'s evaluation block"
        if self.source == "candidate":
            return f"v{self.version}'s own evaluation block (no policy in force)"
        return "no gate policy in force"

    def label(self) -> str:
        """e.g. "production v1's evaluation block (policy 3f2a1b4c5d6e)"."""
        if self.source == "none":
            return self.describe()
        return f"{self.describe()} (policy {self.sha256[:12]})"

    def as_dict(self) -> dict[str, Any]:
        ev = self.evaluation
        return {"source": self.source, "version": self.version, "revision": self.revision,
                "sha256": None if self.source == "none" else self.sha256,
                "description": self.label(),
                "evaluation": None if ev is None else ev.model_dump(mode="json")}


BlockRelation = Literal["absent", "same", "stricter", "not_stricter"]

# For a `min`, a bound reading a lower value is at least as hard to meet; for a `max`, a higher.
_MIN_HARDNESS = {"upper": 0, "estimate": 1, "lower": 2}
_MAX_HARDNESS = {"lower": 0, "estimate": 1, "upper": 2}


def _implies(c: GateCriterion, p: GateCriterion) -> bool:
    """Whether meeting criterion *c* guarantees meeting *p* (conservatively: False when unsure)."""
    if c.metric != p.metric or c.category != p.category:
        return False
    if p.max_drop_vs_production is not None:
        return (c.max_drop_vs_production is not None
                and c.max_drop_vs_production <= p.max_drop_vs_production)
    if p.min is not None:
        return (c.min is not None and c.min >= p.min
                and _MIN_HARDNESS[c.bound] >= _MIN_HARDNESS[p.bound])
    assert p.max is not None
    return c.max is not None and c.max <= p.max and _MAX_HARDNESS[c.bound] >= _MAX_HARDNESS[p.bound]


def at_least_as_strict(candidate: EvaluationSpec | None, policy: EvaluationSpec | None) -> bool:
    """Whether every version passing *candidate* would also pass *policy*: the same dataset,
    and each of the policy's criteria implied by one of the candidate's (same metric and
    category; a higher `min`, lower `max` or smaller allowed drop, on a bound at least as hard).
    Extra criteria only add. No policy is met by anything; no candidate block meets none."""
    if policy is None:
        return True
    if candidate is None or candidate.dataset.sha256 != policy.dataset.sha256:
        return False
    return all(any(_implies(c, p) for c in candidate.criteria) for p in policy.criteria)


def compare_blocks(candidate: EvaluationSpec | None, in_force: EvaluationSpec | None) -> BlockRelation:
    """How a candidate's own `evaluation` block relates to the policy in force."""
    if candidate is None:
        return "same" if in_force is None else "absent"
    if candidate == in_force:
        return "same"
    return "stricter" if at_least_as_strict(candidate, in_force) else "not_stricter"


Verdict = Literal["pass", "fail"]


@dataclass(frozen=True)
class CriterionResult:
    criterion: str            # the criterion as declared, e.g. "counterfeit precision lower bound >= 0.900"
    metric: str
    category: str | None
    value: float | None       # the value compared (bound or estimate); None when unavailable
    limit: float | None
    baseline: float | None    # production's estimate, for max_drop_vs_production
    samples: int              # the denominator behind the value
    verdict: Verdict
    detail: str               # one line with the numbers

    def as_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "metric": self.metric, "category": self.category,
                "value": self.value, "limit": self.limit, "baseline": self.baseline,
                "samples": self.samples, "verdict": self.verdict, "detail": self.detail}


@dataclass(frozen=True)
class GateReport:
    """The verdict of the promotion gate for one version against the current production."""

    prompt: str
    version: int
    production_version: int | None
    declared_by: int | None          # the version whose evaluation block applies (None: the
                                     # registry's policy, or no gate)
    dataset_sha256: str | None       # None: no gate
    dataset_path: str
    items: int | None                # items in the candidate's scorecard
    results: list[CriterionResult] = field(default_factory=list)
    relative: bool = False           # some criterion compares with production's scorecard
    policy: PolicyInForce | None = None          # what judged (None: a bare evaluate_gate call)
    candidate_block: BlockRelation = "same"      # the candidate's own block vs the policy
    candidate_evaluation: EvaluationSpec | None = None

    @property
    def verdict(self) -> Literal["pass", "fail", "none"]:
        if self.dataset_sha256 is None:
            return "none"
        return "fail" if any(r.verdict == "fail" for r in self.results) else "pass"

    @property
    def failures(self) -> list[CriterionResult]:
        return [r for r in self.results if r.verdict == "fail"]

    def dataset_label(self) -> str:
        """e.g. "dataset e08b6d315ed6 (datasets/listings-sample.jsonl, 194 items)"."""
        sha = (self.dataset_sha256 or "")[:12]
        extras = [p for p in (self.dataset_path,
                              f"{self.items} items" if self.items is not None else "") if p]
        return f"dataset {sha}" + (f" ({', '.join(extras)})" if extras else "")

    def policy_label(self) -> str:
        return self.policy.label() if self.policy is not None else "no gate declared"

    def candidate_note(self) -> str:
        """What became of the candidate's own `evaluation` block, when it is not what judged."""
        own = self.candidate_evaluation
        if self.policy is None or self.policy.source in ("candidate", "none"):
            return ""
        if self.candidate_block == "absent":
            return f"v{self.version} declares no evaluation block; the policy in force still applies"
        if self.candidate_block != "not_stricter" or own is None:
            return ""
        n = len(own.criteria)
        return (f"v{self.version}'s own evaluation block (dataset {own.dataset.sha256[:12]}, {n} "
                f"criteri{'on' if n == 1 else 'a'}) is not at least as strict as the policy in "
                "force and does not apply; changing the policy is its own protected step "
                "(modgate prompts gate-policy set, scope gates:write)")

    def message(self) -> str:
        """Why the gate refuses (or passes), naming the policy in force and each failed
        criterion with its numbers."""
        where = self.dataset_label()
        if self.verdict == "none":
            return f"{self.prompt} v{self.version}: no promotion gate ({self.policy_label()})"
        if self.verdict == "pass":
            return (f"{self.prompt} v{self.version} passes its promotion gate "
                    f"({len(self.results)} check(s) on {where}; judged by {self.policy_label()})")
        fails = self.failures
        head = (f"{self.prompt} v{self.version} fails its promotion gate: {len(fails)} of "
                f"{len(self.results)} check(s) failed on {where}")
        lines = [head, f"  policy in force: {self.policy_label()}",
                 *(f"  - {r.detail}" for r in fails)]
        if self.candidate_note():
            lines.append(f"  {self.candidate_note()}")
        if self.hint():
            lines.append(f"  {self.hint()}")
        return "\n".join(lines)

    def hint(self) -> str:
        """The command that computes the missing scorecards, when some are missing."""
        missing = [r for r in self.failures if r.metric == "scorecard" or "no stored scorecard" in r.detail]
        if not missing:
            return ""
        versions = [self.version]
        if self.relative and self.production_version is not None:
            versions.insert(0, self.production_version)
        flags = " ".join(f"--version {v}" for v in versions)
        return (f"to score it: modgate eval run --prompt {self.prompt} {flags} "
                f"--dataset {self.dataset_path or 'FILE'}")

    def summary(self) -> str:
        """One line for an audit note: the verdict, the dataset hash and the policy (source and
        hash) that judged."""
        if self.verdict == "none":
            return self.policy_label()
        sha = (self.dataset_sha256 or "")[:12]
        policy = f" [policy: {self.policy_label()}]"
        if self.verdict == "pass":
            return f"gate passed on dataset {sha} ({len(self.results)} checks){policy}"
        return f"gate failed on dataset {sha}: " + "; ".join(r.detail for r in self.failures) + policy

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "version": self.version,
                "production_version": self.production_version, "declared_by": self.declared_by,
                "policy": self.policy.as_dict() if self.policy is not None else None,
                "candidate_block": self.candidate_block,
                "dataset": {"sha256": self.dataset_sha256, "path": self.dataset_path,
                            "items": self.items},
                "verdict": self.verdict, "message": self.message(),
                "criteria": [r.as_dict() for r in self.results],
                # the report's sentences, so a client (the remote CLI) prints what a local one does
                "summary": self.summary(), "policy_label": self.policy_label(),
                "dataset_label": self.dataset_label(), "candidate_note": self.candidate_note(),
                "hint": self.hint()}


def scorecard_audit_note(record: ScorecardRecord, note: str, *, replaced: bool) -> str:
    """The audit note of a stored scorecard (the same on every store)."""
    m = record.micro
    text = (f"scorecard on dataset {record.dataset_sha256[:12]} ({record.items} items): micro "
            f"precision {_fmt(m.precision)}, recall {_fmt(m.recall)}")
    if replaced:
        text += "; replaces the earlier scorecard"
    return f"{text} | {note}" if note else text


def check_scorecard_version(record: ScorecardRecord, content_hash: str) -> None:
    if record.version_hash != content_hash:
        raise ScorecardMismatch(
            f"scorecard of {record.prompt} v{record.version} was computed for content "
            f"{record.version_hash[:12]}, but v{record.version} is {content_hash[:12]}")


# -- evaluation (pure) -------------------------------------------------------------------------

def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def _value(rec: ScorecardRecord, metric: str, category: str | None,
           bound: str) -> tuple[float | None, int, str]:
    """(value, samples, why-undefined) of a metric as the criterion's bound reads it."""
    if metric in ("precision", "recall", "f1"):
        assert category is not None
        c = rec.counts(category)
        if c is None:
            return None, 0, f"no {category!r} category in the scorecard"
        if metric == "f1":
            return c.f1, c.support, "no support and no predictions"
        k, n = c.tp, (c.predicted if metric == "precision" else c.support)
        why = "no predictions" if metric == "precision" else "no gold positives"
    elif metric == "accuracy":
        k, n, why = rec.correct, rec.items, "no items"
    else:
        rate = {"parse_failure_rate": rec.parse_failures, "error_rate": rec.errors,
                "needs_review_rate": rec.needs_review}[metric]
        k, n, why = rate.count, rate.n, "no items"
    if n == 0:
        return None, 0, why
    if bound == "estimate":
        return k / n, n, ""
    lo, hi = wilson_interval(k, n, CONFIDENCE)
    return (lo if bound == "lower" else hi), n, ""


def _name(metric: str, category: str | None, bound: str) -> str:
    what = metric.replace("_", " ")
    if category is not None:
        what = f"{category} {what}"
    return what + {"lower": " lower bound", "upper": " upper bound", "estimate": ""}[bound]


def _judge(crit: GateCriterion, category: str | None, cand: ScorecardRecord,
           prod: ScorecardRecord | None, production_version: int | None,
           each: bool) -> CriterionResult | None:
    """One criterion on one category; None when `*` skips an undefined category."""
    desc = crit.describe()
    name = _name(crit.metric, category, crit.bound)
    value, n, why = _value(cand, crit.metric, category, crit.bound)

    def result(verdict: Verdict, detail: str, limit: float | None,
               baseline: float | None = None) -> CriterionResult:
        return CriterionResult(desc, crit.metric, category, value, limit, baseline, n, verdict, detail)

    if crit.max_drop_vs_production is not None:
        drop = crit.max_drop_vs_production
        if production_version is None:
            return result("pass", f"{name}: no production version to compare with", None)
        if prod is None:
            return result("fail", f"{name}: no stored scorecard of production v{production_version} "
                          "on this dataset to compare with", None)
        base, _, _ = _value(prod, crit.metric, category, "estimate")
        if base is None:
            return None if each else result(
                "pass", f"{name}: undefined for production v{production_version}; nothing to keep", None)
        limit = base - drop
        if value is None:
            return result("fail", f"{name} undefined ({why}); production v{production_version} "
                          f"has {_fmt(base)}", limit, base)
        if value + _EPS >= limit:
            return result("pass", f"{name} {_fmt(value)} vs production v{production_version}'s "
                          f"{_fmt(base)} (allowed drop {drop:.3f})", limit, base)
        return result("fail", f"{name} {_fmt(value)} is {base - value:.3f} below production "
                      f"v{production_version}'s {_fmt(base)} (allowed drop {drop:.3f})", limit, base)
    if value is None:
        if each:
            return None
        return result("fail", f"{name} undefined ({why})", crit.min if crit.min is not None else crit.max)
    if crit.min is not None:
        ok = value + _EPS >= crit.min
        return result("pass" if ok else "fail",
                      f"{name} {_fmt(value)} {'>=' if ok else '<'} {crit.min:.3f} (n={n})", crit.min)
    assert crit.max is not None
    ok = value - _EPS <= crit.max
    return result("pass" if ok else "fail",
                  f"{name} {_fmt(value)} {'<=' if ok else '>'} {crit.max:.3f} (n={n})", crit.max)


def evaluate_gate(spec: EvaluationSpec, candidate: ScorecardRecord | None,
                  production: ScorecardRecord | None, *, prompt: str, version: int,
                  production_version: int | None, declared_by: int | None,
                  policy: PolicyInForce | None = None, candidate_block: BlockRelation = "same",
                  candidate_evaluation: EvaluationSpec | None = None) -> GateReport:
    """Judge *candidate* (the scorecard of *version* on the policy's dataset) by *spec*;
    *production* is the current production version's scorecard on the same dataset (needed by
    `max_drop_vs_production`). *policy* says where *spec* comes from (for the report). Pure: no
    store access."""
    sha = spec.dataset.sha256
    relative = any(c.max_drop_vs_production is not None for c in spec.criteria)

    def report(items: int | None, results: list[CriterionResult]) -> GateReport:
        return GateReport(prompt=prompt, version=version, production_version=production_version,
                          declared_by=declared_by, dataset_sha256=sha, dataset_path=spec.dataset.path,
                          items=items, results=results, relative=relative, policy=policy,
                          candidate_block=candidate_block, candidate_evaluation=candidate_evaluation)

    if candidate is None:
        missing = CriterionResult("scorecard", "scorecard", None, None, None, None, 0, "fail",
                                  f"no stored scorecard of v{version} on dataset {sha[:12]}")
        return report(None, [missing])
    if candidate.dataset_sha256 != sha:
        raise ValueError("the candidate scorecard is for another dataset")
    results: list[CriterionResult] = []
    for crit in spec.criteria:
        if crit.max_drop_vs_production is not None and production_version is not None and production is None:
            results.append(CriterionResult(
                crit.describe(), crit.metric, crit.category, None, None, None, 0, "fail",
                f"{_name(crit.metric, crit.category, crit.bound)}: no stored scorecard of production "
                f"v{production_version} on this dataset to compare with"))
        elif crit.category == EACH_CATEGORY:
            cats = [c for c in candidate.categories if c not in AGGREGATES]
            judged = [_judge(crit, c, candidate, production, production_version, True) for c in cats]
            kept = [r for r in judged if r is not None]
            if not kept:
                kept = [CriterionResult(crit.describe(), crit.metric, EACH_CATEGORY, None, None, None,
                                        0, "pass", f"{_name(crit.metric, '*', crit.bound)}: "
                                        "undefined for every category; nothing to judge")]
            results += kept
        else:
            r = _judge(crit, crit.category, candidate, production, production_version, False)
            assert r is not None
            results.append(r)
    return report(candidate.items, results)


#: Audit actions only their own store write may leave (`PromptWriter.record_audit` refuses them).
FOUR_EYES_ACTIONS = frozenset({"four_eyes", "approval_requested", "approval_approved",
                               "approval_denied", "approval_expired", "approval_failed"})
OWNED_AUDIT_ACTIONS = frozenset({"publish", "label", "rollout", "scorecard", "gate_policy",
                                 *FOUR_EYES_ACTIONS})


def check_recorded_action(action: str) -> None:
    """For `record_audit`: an action a dedicated write owns cannot be recorded on its own."""
    if not action or action in OWNED_AUDIT_ACTIONS:
        raise ValueError(f"audit action {action!r} cannot be recorded on its own")


def check_four_eyes_action(action: str) -> None:
    """For `put_four_eyes`: only the four-eyes actions."""
    if action not in FOUR_EYES_ACTIONS:
        raise ValueError(f"audit action {action!r} is not a four-eyes action")


# -- store-backed check ------------------------------------------------------------------------

def policy_in_force(store: GateReader, name: str, production: int | None) -> PolicyInForce:
    """The gate policy in force for *name* while *production* holds the production label: the
    registry's record, else production's `evaluation` block, else none."""
    record = store.get_gate_policy(name)
    if record is not None:
        return PolicyInForce("registry", record.evaluation, revision=record.revision)
    if production is not None:
        block = store.get_version(name, production).spec.evaluation
        if block is not None:
            return PolicyInForce("production", block, version=production)
    return PolicyInForce("none", None)


def gate_report(store: GateReader, name: str, version: int, *,
                production_label: str = "production") -> GateReport:
    """The promotion gate's verdict for making *version* of *name* production now."""
    production = store.labels(name).get(production_label)
    return _report(store, name, version, production)


def _report(store: GateReader, name: str, version: int, production: int | None) -> GateReport:
    own = store.get_version(name, version).spec.evaluation
    in_force = policy_in_force(store, name, production)
    policy = in_force
    if in_force.source == "none" and own is not None:
        # Nothing is in force (no production version yet, or an ungated prompt): the
        # candidate's own block can only add a gate here, never loosen one.
        policy = PolicyInForce("candidate", own, version=version)
    relation = compare_blocks(own, in_force.evaluation)
    declared_by = policy.version
    spec = policy.evaluation
    if spec is None:
        return GateReport(name, version, production, declared_by, None, "", None, policy=policy,
                          candidate_block=relation, candidate_evaluation=own)
    sha = spec.dataset.sha256
    cand = store.get_scorecard(name, version, sha)
    prod = store.get_scorecard(name, production, sha) if production is not None else None
    return evaluate_gate(spec, cand, prod, prompt=name, version=version,
                         production_version=production, declared_by=declared_by, policy=policy,
                         candidate_block=relation, candidate_evaluation=own)


def _keep_in_force(store: PromptStore, report: GateReport, *, actor: str) -> str:
    """When production's own block is the policy in force and the candidate's block is not at
    least as strict, moving production to the candidate would make its block the policy for
    every later move: a loosening nobody approved. Keep production's block in force as the
    registry's policy (compare-and-set: no record may exist yet; audited). Returns a note for
    the label move's audit entry ("" when nothing needed keeping)."""
    policy = report.policy
    if policy is None or policy.source != "production" or report.candidate_block in ("same", "stricter"):
        return ""
    record = GatePolicy(prompt=report.prompt, revision=1, evaluation=policy.evaluation,
                        set_by=actor, set_at=datetime.now(UTC),
                        reason=f"kept in force when production moved to v{report.version}")
    why = ("declares no evaluation block" if report.candidate_block == "absent"
           else "has an evaluation block that is not at least as strict")
    store.put_gate_policy(record, expected_revision=0, actor=actor, note=(
        f"r1 (policy {record.sha256[:12]}): {policy.describe()} kept in force as the registry's "
        f"gate policy: production moves to v{report.version}, which {why}"))
    return f"{policy.describe()} kept in force as registry gate policy r1"


def move_label(store: PromptStore, name: str, label: str, version: int, *,
               expected: int | None = None, actor: str, note: str = "",
               override: GateOverride | None = None, production_label: str = "production",
               record_refusal: bool = True, holder: str | None = None,
               rollout_id: str | None = None,
               approved: ApprovalRequest | None = None) -> tuple[int | None, GateReport | None]:
    """Point *label* at *version*, through the promotion gate when *label* is the production
    label. Returns (previous version, gate report or None when not gated).

    The gate is judged against the production version read here, and the move is a
    compare-and-set against that same version (when *expected* is None), so a concurrent move
    makes this fail with LabelConflict rather than promote on a stale comparison. The audit
    entry of a production move names the policy that judged it (source and hash) and the
    dataset's hash.

    A refusal leaves an audit entry of its own (action "gate_refused", label = the production
    label, from = production, to = the candidate, note = the gate's summary) before GateRefused
    is raised, so the webhook dispatcher announces `gate.refused`. *record_refusal* False is
    for a caller that records the refusal in its own audit entry (the rollout controller's
    held promotion).

    Any label move to a version the label does not already point at is refused
    (VersionRetired) when that version is deprecated or blocked (`prompt_registry.lifecycle`).

    Four eyes: when the prompt's four-eyes record is enabled, a production move that the gate
    lets through (or an admin overrides) is not made: a pending approval request is recorded
    (audited "approval_requested"; *holder*, the requesting key holder, defaults to *actor*;
    *rollout_id* names a promoting rollout) and ApprovalRequired raised. The same pending
    move (label, version, expected production) is not requested twice. Only
    `ops.approve_request` passes *approved*, the request as approved in the store: the move
    is then made, judged by the gate again.
    """
    if store.labels(name).get(label) != version:  # a new pointer: never to a retired version
        assignable_or_raise(store.get_lifecycle(name), name, version, what=f"label {label!r}")
    if label != production_label:
        return store.set_label(name, label, version, expected=expected, actor=actor, note=note), None
    current = store.labels(name).get(label)
    if expected is not None and (current or 0) != expected:
        raise LabelConflict(f"label {label!r} of {name!r} points at {current}, not {expected}")
    kept = ""
    if current == version:
        report = None
        gate_note = "already production; not judged"
    else:
        report = _report(store, name, version, current)
        if report.verdict == "fail":
            if override is None:
                if record_refusal:
                    store.record_audit(name, "gate_refused", label=label, from_version=current,
                                       to_version=version, actor=actor, note=report.summary())
                raise GateRefused(report)
            gate_note = f"GATE OVERRIDDEN by {override.by}: {override.reason} ({report.summary()})"
        else:
            gate_note = report.summary()
        if approved is not None:
            _check_approved(store, name, label, version, approved)
            gate_note = f"{gate_note} | four eyes: approval {approved.id} of {approved.requested_by}'s " \
                        f"request by {approved.decided_by}"
        else:
            record = store.get_four_eyes(name)
            if record is not None and record.enabled:
                raise _request_approval(store, record, name, label, version, current, actor=actor,
                                        holder=holder or actor, note=note, override=override,
                                        rollout_id=rollout_id, gate_note=gate_note)
        kept = _keep_in_force(store, report, actor=actor)
    full = " | ".join(p for p in (note, gate_note, kept) if p)
    previous = store.set_label(name, label, version, expected=current or 0, actor=actor, note=full)
    return previous, report


def _check_approved(store: PromptStore, name: str, label: str, version: int,
                    approved: ApprovalRequest) -> None:
    record = store.get_four_eyes(name)
    stored = record.find(approved.id) if record is not None else None
    if (stored is None or stored.state != "approved" or stored.label != label
            or stored.version != version or not stored.decided_by):
        raise ApprovalConflict(f"approval {approved.id} of {name!r} is not an approved request "
                               f"to move {label} to v{version}")


def _request_approval(store: PromptStore, record: FourEyesRecord, name: str, label: str,
                      version: int, current: int | None, *, actor: str, holder: str, note: str,
                      override: GateOverride | None, rollout_id: str | None,
                      gate_note: str) -> ApprovalRequired:
    """Record a pending approval request for a production move (or find the same pending one)
    and return the ApprovalRequired to raise."""
    now = datetime.now(UTC)
    for r in record.requests:
        if (r.state_at(now) == "pending" and r.label == label and r.version == version
                and r.expected == current):
            return ApprovalRequired(r, prompt=name, created=False)
    request = ApprovalRequest(
        id=secrets.token_hex(6), label=label, version=version, expected=current,
        requested_by=holder, requested_at=now, expires_at=now + timedelta(seconds=record.expiry_s),
        note=note, override=override, rollout_id=rollout_id)
    store.put_four_eyes(record.with_request(request), expected_revision=record.revision,
                        actor=actor, action="approval_requested", label=label,
                        from_version=current, to_version=version, note=(
                            f"approval {request.id} requested by {holder}, expires "
                            f"{request.expires_at.isoformat(timespec='seconds')}"
                            + (f" | {note}" if note else "") + f" | {gate_note}"))
    return ApprovalRequired(request, prompt=name, created=True)
