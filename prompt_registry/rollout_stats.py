"""Typed rollout statistics: the evidence a rollout's gates judge, and the one codec for the
flat counter keys it is stored under.

The gateway's recorder counts events per rollout into flat integer counters that the registry
store sums across replicas (`add_rollout_stats`: a hash in Redis, rows in SQLite), and the
gates in `prompt_registry.rollouts` judge them. The statistics are defined here, in the
registry, so that the gates read typed attributes and depend on nothing the gateway spells:

- a counter is a small frozen dataclass (`ArmCount`, `ArmFlag`, `ArmLatencySketch`, `ArmLatency`, `FeedbackCount`,
  `FeedbackOutcome`, `PairCount`, `PairConfusion`, `PairFlag`); `encode_key` and `decode_key`
  are the only place that knows the key strings. They are a bijection between counters and
  well-formed keys. The format is a contract with the counters already stored (changing it
  is a data migration):

      <arm>:requests | errors | verdicts | parse_failures      arm = stable | canary
      <arm>:flag:<category>                                    decisions other than allow
      <arm>:ms:<index> | <arm>:ms:z                            latency sketch bucket (z: <= 1 us)
      <arm>:lat:<bucket_ms>                                    old latency histogram (or "inf"):
                                                               read, no longer written
      fb:<arm>:n                                               reviewer labels received
      fb:<arm>:tp|fp|fn:<category>                             reviewer-judged outcomes
      pair:<v>:n | agree | errors | dropped                    shadow comparisons of version v
      pair:<v>:cm:<stable_category>:<candidate_category>       confusion matrix ('none' = allowed)
      pair:<v>:sflag:<category> | cflag:<category>             flags on each side of the pair

  A key that is not one of these decodes to None rather than raising: stores outlive code, and
  one stray key (written by a newer or older gateway, or by hand) must not take the status
  view or the controller down. `build_rollout_stats` keeps such keys in
  `RolloutStats.unknown`, out of the gates' way but still inspectable.
- `build_rollout_stats` turns the raw counter mapping a store returns into `RolloutStats`
  (per-arm, feedback and pair statistics with their derived rates), which the gates read by
  attribute; `RolloutStats.as_dict` is the JSON the status view has always printed.
- Latency is a mergeable log-bucket sketch (DDSketch-style): a latency x > 0 ms counts in
  bucket ceil(log(x) / log(gamma)), gamma = (1 + a) / (1 - a), a = `LATENCY_RELATIVE_ERROR`
  (1 %), so replicas merge by adding counters and every quantile is within 1 % of the exact
  one. `quantile_of` is *the* quantile (linear interpolation between order statistics, numpy's
  default): the sketch, the latency gate, the status view and the ops report (which has the
  raw latencies) all use it. Counters of the old fixed-bucket histogram still decode; their
  samples count at their bucket's upper bound (an upper estimate, flagged in the status).
- `Flip` is one shadow comparison whose verdicts differed, kept (as JSON) for people to look at.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar, assert_never

import orjson

__all__ = [
    "ARMS", "LATENCY_GAMMA", "LATENCY_RELATIVE_ERROR", "Arm", "ArmCount", "ArmFlag", "ArmLatency",
    "ArmLatencySketch", "ArmStats", "CategoryFeedback", "CounterKey", "FeedbackCount",
    "FeedbackOutcome", "FeedbackStats", "Flip", "FlipVerdict", "LatencySketch", "PairConfusion",
    "PairCount", "PairFlag", "PairStats", "RolloutStats", "as_arm", "build_rollout_stats",
    "cohen_kappa", "decode_key", "encode_key", "quantile_of", "sketch_index", "sketch_value",
]

Arm = Literal["stable", "canary"]
ARMS: tuple[Arm, ...] = ("stable", "canary")
ArmField = Literal["requests", "errors", "verdicts", "parse_failures"]
ARM_FIELDS: tuple[ArmField, ...] = ("requests", "errors", "verdicts", "parse_failures")
Outcome = Literal["tp", "fp", "fn"]
OUTCOMES: tuple[Outcome, ...] = ("tp", "fp", "fn")
PairField = Literal["n", "agree", "errors", "dropped"]
PAIR_FIELDS: tuple[PairField, ...] = ("n", "agree", "errors", "dropped")
Side = Literal["stable", "candidate"]
_SIDE_TAG: dict[Side, str] = {"stable": "sflag", "candidate": "cflag"}
_TAG_SIDE: dict[str, Side] = {"sflag": "stable", "cflag": "candidate"}
_ARM: dict[str, Arm] = {a: a for a in ARMS}
_ARM_FIELD: dict[str, ArmField] = {f: f for f in ARM_FIELDS}
_OUTCOME: dict[str, Outcome] = {o: o for o in OUTCOMES}
_PAIR_FIELD: dict[str, PairField] = {f: f for f in PAIR_FIELDS}
_K = TypeVar("_K")

# The latency sketch: relative accuracy a, bucket ratio gamma. Changing them is a data
# migration (the bucket index is in the stored keys).
LATENCY_RELATIVE_ERROR = 0.01
LATENCY_GAMMA = (1 + LATENCY_RELATIVE_ERROR) / (1 - LATENCY_RELATIVE_ERROR)
_LOG_GAMMA = math.log(LATENCY_GAMMA)
_SKETCH_MIN_MS = 1e-3   # at or below (and anything not a positive number): the zero bucket
_SKETCH_MAX_MS = 1e9    # above: counted here (11.6 days; no request waits that long)
_SEP = ":"
_OVERFLOW = "inf"   # the old histogram's overflow bucket
_ZERO = "z"         # the sketch's zero bucket


def as_arm(value: str) -> Arm | None:
    """*value* as one of the two arms that carry statistics; None for anything else (a pinned
    request belongs to no arm)."""
    return _ARM.get(value)


def _check_category(category: str) -> None:
    # Categories are lower_snake_case identifiers (VerdictSchema); a separator inside one
    # would make its key ambiguous, so refuse to write it rather than corrupt the counters.
    if not category or _SEP in category:
        raise ValueError(f"{category!r} cannot be part of a counter key")


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, not {version!r}")


# -- counters -----------------------------------------------------------------------------
# Construction validates, so every counter encodes to a key that decodes back to it.

@dataclass(frozen=True, slots=True)
class ArmCount:
    """Requests, backend errors, verdicts or unusable model outputs served by an arm."""

    arm: Arm
    name: ArmField

    def __post_init__(self) -> None:
        _check_arm(self.arm)
        if self.name not in _ARM_FIELD:
            raise ValueError(f"unknown arm counter {self.name!r}")


@dataclass(frozen=True, slots=True)
class ArmFlag:
    """A verdict of the arm that did not allow, by category ('none' when it named none)."""

    arm: Arm
    category: str

    def __post_init__(self) -> None:
        _check_arm(self.arm)
        _check_category(self.category)


@dataclass(frozen=True, slots=True)
class ArmLatencySketch:
    """A verdict of the arm whose latency fell in sketch bucket `index` (`sketch_index`; None:
    the zero bucket)."""

    arm: Arm
    index: int | None

    def __post_init__(self) -> None:
        _check_arm(self.arm)
        if self.index is not None and (isinstance(self.index, bool) or not isinstance(self.index, int)):
            raise ValueError(f"latency sketch index must be an integer or None, not {self.index!r}")


@dataclass(frozen=True, slots=True)
class ArmLatency:
    """The old fixed-bucket histogram (no longer written, still read): a verdict of the arm
    whose latency fell in the bucket ending at `upper_ms` (None: above the last bucket)."""

    arm: Arm
    upper_ms: int | None

    def __post_init__(self) -> None:
        _check_arm(self.arm)
        if self.upper_ms is not None and (isinstance(self.upper_ms, bool) or not isinstance(self.upper_ms, int)
                                          or self.upper_ms < 1):
            raise ValueError(f"latency bucket must be a positive integer or None, not {self.upper_ms!r}")


@dataclass(frozen=True, slots=True)
class FeedbackCount:
    """A reviewer label received for a request the arm answered."""

    arm: Arm

    def __post_init__(self) -> None:
        _check_arm(self.arm)


@dataclass(frozen=True, slots=True)
class FeedbackOutcome:
    """How the arm's answer compares with a reviewer's label, per category."""

    arm: Arm
    outcome: Outcome
    category: str

    def __post_init__(self) -> None:
        _check_arm(self.arm)
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown feedback outcome {self.outcome!r}")
        _check_category(self.category)


@dataclass(frozen=True, slots=True)
class PairCount:
    """Shadow comparisons of a candidate version: compared, same decision, failed, dropped."""

    version: int
    name: PairField

    def __post_init__(self) -> None:
        _check_version(self.version)
        if self.name not in _PAIR_FIELD:
            raise ValueError(f"unknown pair counter {self.name!r}")


@dataclass(frozen=True, slots=True)
class PairConfusion:
    """One cell of the stable-vs-candidate confusion matrix (categories, 'none' = allowed)."""

    version: int
    stable_category: str
    candidate_category: str

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_category(self.stable_category)
        _check_category(self.candidate_category)


@dataclass(frozen=True, slots=True)
class PairFlag:
    """A flag (decision other than allow) on one side of a shadow comparison."""

    version: int
    side: Side
    category: str

    def __post_init__(self) -> None:
        _check_version(self.version)
        if self.side not in _SIDE_TAG:
            raise ValueError(f"unknown pair side {self.side!r}")
        _check_category(self.category)


CounterKey = (ArmCount | ArmFlag | ArmLatencySketch | ArmLatency | FeedbackCount | FeedbackOutcome
              | PairCount | PairConfusion | PairFlag)


def sketch_index(ms: float) -> int | None:
    """The sketch bucket a latency (ms) counts in: ceil(log(ms) / log(gamma)); None for the
    zero bucket (at most 1 us, or not a positive number)."""
    if not ms > _SKETCH_MIN_MS:  # also NaN
        return None
    return math.ceil(math.log(min(ms, _SKETCH_MAX_MS)) / _LOG_GAMMA)


def sketch_value(index: int | None) -> float:
    """The value a bucket stands for: within `LATENCY_RELATIVE_ERROR` of every latency in it
    (bucket i holds (gamma^(i-1), gamma^i]; 2 gamma^i / (gamma + 1) is a relative distance
    a = (gamma - 1) / (gamma + 1) from both ends)."""
    if index is None:
        return 0.0
    return 2 * LATENCY_GAMMA ** index / (LATENCY_GAMMA + 1)


# -- the codec ----------------------------------------------------------------------------

def encode_key(counter: CounterKey) -> str:
    """The stored key of a counter (the format in the module docstring)."""
    match counter:
        case ArmCount(arm, name):
            return f"{arm}:{name}"
        case ArmFlag(arm, category):
            return f"{arm}:flag:{category}"
        case ArmLatencySketch(arm, index):
            return f"{arm}:ms:{_ZERO if index is None else index}"
        case ArmLatency(arm, upper):
            return f"{arm}:lat:{_OVERFLOW if upper is None else upper}"
        case FeedbackCount(arm):
            return f"fb:{arm}:n"
        case FeedbackOutcome(arm, outcome, category):
            return f"fb:{arm}:{outcome}:{category}"
        case PairCount(version, name):
            return f"pair:{version}:{name}"
        case PairConfusion(version, a, b):
            return f"pair:{version}:cm:{a}:{b}"
        case PairFlag(version, side, category):
            return f"pair:{version}:{_SIDE_TAG[side]}:{category}"
        case _:
            assert_never(counter)


def _positive_int(text: str) -> int | None:
    """The integer *text* spells in canonical form (no sign, no leading zero), else None:
    only canonical forms decode, so that decoding and re-encoding gives back the same key."""
    if not text.isascii() or not text.isdigit() or text.startswith("0"):
        return None
    return int(text)


def _int(text: str) -> int | None:
    """The (possibly negative) integer *text* spells in canonical form, else None."""
    if text.startswith("-"):
        n = _positive_int(text[1:])
        return None if n is None else -n
    return 0 if text == "0" else _positive_int(text)


def _category(text: str) -> str | None:
    return text or None


def decode_key(key: str) -> CounterKey | None:
    """The counter a stored key names, or None when the key is not one this codec writes."""
    parts = key.split(_SEP)
    head, n = parts[0], len(parts)
    if arm := as_arm(head):
        if n == 2 and (name := _ARM_FIELD.get(parts[1])):
            return ArmCount(arm, name)
        if n == 3 and parts[1] == "flag" and (cat := _category(parts[2])):
            return ArmFlag(arm, cat)
        if n == 3 and parts[1] == "ms":
            if parts[2] == _ZERO:
                return ArmLatencySketch(arm, None)
            if (index := _int(parts[2])) is not None:
                return ArmLatencySketch(arm, index)
        if n == 3 and parts[1] == "lat":
            if parts[2] == _OVERFLOW:
                return ArmLatency(arm, None)
            if (upper := _positive_int(parts[2])) is not None:
                return ArmLatency(arm, upper)
        return None
    if head == "fb" and n >= 3 and (arm := as_arm(parts[1])):
        if n == 3 and parts[2] == "n":
            return FeedbackCount(arm)
        if n == 4 and (outcome := _OUTCOME.get(parts[2])) and (cat := _category(parts[3])):
            return FeedbackOutcome(arm, outcome, cat)
        return None
    if head == "pair" and n >= 3 and (version := _positive_int(parts[1])) is not None:
        tag = parts[2]
        if n == 3 and (pname := _PAIR_FIELD.get(tag)):
            return PairCount(version, pname)
        if n == 5 and tag == "cm" and (a := _category(parts[3])) and (b := _category(parts[4])):
            return PairConfusion(version, a, b)
        if n == 4 and (side := _TAG_SIDE.get(tag)) and (cat := _category(parts[3])):
            return PairFlag(version, side, cat)
    return None


# -- statistics ---------------------------------------------------------------------------

def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def quantile_of(values: Sequence[float], q: float) -> float | None:
    """*The* q-quantile (0 <= q <= 1) of *values*: linear interpolation between the order
    statistics at ranks floor(h) and ceil(h), h = (n - 1) q (numpy's default method). None
    without values. The rollout sketch computes the same thing from its buckets."""
    if not values:
        return None
    ordered = sorted(values)
    lo, hi, frac = _ranks(q, len(ordered))
    return ordered[lo] + (ordered[hi] - ordered[lo]) * frac


def _ranks(q: float, n: int) -> tuple[int, int, float]:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} is not between 0 and 1")
    h = (n - 1) * q
    lo = math.floor(h)
    return lo, min(lo + 1, n - 1), h - lo


@dataclass(frozen=True, slots=True)
class LatencySketch:
    """Verdict latencies (ms) as sketch bucket counts (`sketch_index`; None: the zero bucket),
    mergeable by adding counts. `legacy` samples came from the old fixed-bucket histogram and
    count at their bucket's upper bound (`overflow` of them above its last bucket: +inf)."""

    counts: Mapping[int | None, int] = field(default_factory=dict)
    overflow: int = 0
    legacy: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values()) + self.overflow

    def _value_at(self, rank: int) -> float:
        """The value of the order statistic at *rank* (0-based)."""
        seen = 0
        for index in sorted(self.counts, key=lambda i: -math.inf if i is None else i):
            seen += self.counts[index]
            if rank < seen:
                return sketch_value(index)
        return math.inf

    def quantile(self, q: float) -> float | None:
        """`quantile_of` the recorded latencies, within 1 % (`LATENCY_RELATIVE_ERROR`): each
        order statistic is its bucket's value, and so is their interpolation. None without
        data; inf when it falls among the old histogram's overflow samples."""
        total = self.total
        if total == 0:
            return None
        lo, hi, frac = _ranks(q, total)
        a, b = self._value_at(lo), self._value_at(hi)
        if frac == 0.0 or a == b:
            return a
        return a + (b - a) * frac

    def as_dict(self) -> dict[str, object]:
        return {"n": self.total, "p50": self.quantile(0.5), "p95": self.quantile(0.95),
                "p99": self.quantile(0.99), "relative_error": LATENCY_RELATIVE_ERROR,
                "from_old_buckets": self.legacy}


@dataclass(frozen=True, slots=True)
class CategoryFeedback:
    """Reviewer-judged outcomes of one arm in one category."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    def as_dict(self) -> dict[str, object]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall}


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    """Reviewer labels received for an arm's answers, and their outcomes per category."""

    n: int = 0
    categories: Mapping[str, CategoryFeedback] = field(default_factory=dict)

    def category(self, name: str) -> CategoryFeedback:
        """The category's outcomes; all zero when no label concerned it."""
        return self.categories.get(name) or CategoryFeedback()

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "categories": {k: v.as_dict() for k, v in self.categories.items()}}


@dataclass(frozen=True, slots=True)
class ArmStats:
    """What one arm (stable or canary) served."""

    requests: int = 0
    errors: int = 0
    verdicts: int = 0
    parse_failures: int = 0
    flags: Mapping[str, int] = field(default_factory=dict)
    latency: LatencySketch = field(default_factory=LatencySketch)
    feedback: FeedbackStats = field(default_factory=FeedbackStats)
    recorded: bool = False  # any counter of this arm exists (the status view prints only those)

    @property
    def p50_ms(self) -> float | None:
        return self.latency.quantile(0.5)

    @property
    def p95_ms(self) -> float | None:
        return self.latency.quantile(0.95)

    @property
    def p99_ms(self) -> float | None:
        return self.latency.quantile(0.99)

    @property
    def flag_rates(self) -> dict[str, float]:
        """Flags per category over verdicts (empty without verdicts)."""
        if not self.verdicts:
            return {}
        return {k: v / self.verdicts for k, v in self.flags.items()}

    def as_dict(self) -> dict[str, object]:
        if not self.recorded:
            return {}
        return {"requests": self.requests, "errors": self.errors, "verdicts": self.verdicts,
                "parse_failures": self.parse_failures, "flags": dict(self.flags),
                "latency_ms": self.latency.as_dict(), "feedback": self.feedback.as_dict(),
                "p95_ms": self.p95_ms, "flag_rates": self.flag_rates}


def cohen_kappa(matrix: Mapping[str, Mapping[str, int]]) -> float | None:
    """Cohen's kappa of a confusion matrix (rows: stable, columns: candidate): agreement beyond
    what the two sides' label frequencies give by chance. None without data, and None when it
    is undefined: both sides answered one and the same class only (chance agreement is then 1,
    and 1.000 would claim an agreement nothing measured)."""
    labels = set(matrix) | {b for row in matrix.values() for b in row}
    n = sum(v for row in matrix.values() for v in row.values())
    if n == 0:
        return None
    po = sum(matrix.get(k, {}).get(k, 0) for k in labels) / n
    pe = sum((sum(matrix.get(k, {}).values()) / n) * (sum(row.get(k, 0) for row in matrix.values()) / n)
             for k in labels)
    if pe >= 1.0:
        return None
    return (po - pe) / (1 - pe)


@dataclass(frozen=True, slots=True)
class PairStats:
    """Shadow comparisons of one candidate version with the stable verdicts."""

    version: int
    n: int = 0
    agree: int = 0
    errors: int = 0
    dropped: int = 0
    confusion: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    stable_flags: Mapping[str, int] = field(default_factory=dict)
    candidate_flags: Mapping[str, int] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """Share of comparisons with the same decision."""
        return _ratio(self.agree, self.n)

    @property
    def kappa(self) -> float | None:
        return cohen_kappa(self.confusion)

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "agree": self.agree, "errors": self.errors, "dropped": self.dropped,
                "confusion": {k: dict(v) for k, v in self.confusion.items()},
                "stable_flags": dict(self.stable_flags), "candidate_flags": dict(self.candidate_flags),
                "agreement": self.agreement, "kappa": self.kappa}


@dataclass(frozen=True, slots=True)
class RolloutStats:
    """All the evidence of one rollout, summed over every gateway replica."""

    stable: ArmStats = field(default_factory=ArmStats)
    canary: ArmStats = field(default_factory=ArmStats)
    pairs: Mapping[int, PairStats] = field(default_factory=dict)
    unknown: Mapping[str, int] = field(default_factory=dict)  # keys the codec does not know

    def pair(self, version: int) -> PairStats:
        """Comparisons of *version*; all zero when it was never shadowed."""
        return self.pairs.get(version) or PairStats(version)

    def as_dict(self) -> dict[str, object]:
        """The status view's JSON (`stats` in `modgate rollouts status --json` and the admin
        API): an arm without counters is `{}`, pairs are keyed by the version as a string."""
        return {"stable": self.stable.as_dict(), "canary": self.canary.as_dict(),
                "pairs": {str(v): p.as_dict() for v, p in sorted(self.pairs.items())}}


@dataclass
class _ArmAcc:
    counts: dict[ArmField, int] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)
    latency: dict[int | None, int] = field(default_factory=dict)
    overflow: int = 0
    legacy: int = 0
    fb_n: int = 0
    fb: dict[str, dict[Outcome, int]] = field(default_factory=dict)
    recorded: bool = False

    def build(self) -> ArmStats:
        return ArmStats(
            requests=self.counts.get("requests", 0), errors=self.counts.get("errors", 0),
            verdicts=self.counts.get("verdicts", 0), parse_failures=self.counts.get("parse_failures", 0),
            flags=self.flags, latency=LatencySketch(self.latency, self.overflow, self.legacy),
            feedback=FeedbackStats(self.fb_n, {c: CategoryFeedback(o.get("tp", 0), o.get("fp", 0), o.get("fn", 0))
                                               for c, o in self.fb.items()}),
            recorded=self.recorded)


@dataclass
class _PairAcc:
    counts: dict[PairField, int] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    flags: dict[Side, dict[str, int]] = field(default_factory=lambda: {"stable": {}, "candidate": {}})

    def build(self, version: int) -> PairStats:
        return PairStats(version, n=self.counts.get("n", 0), agree=self.counts.get("agree", 0),
                         errors=self.counts.get("errors", 0), dropped=self.counts.get("dropped", 0),
                         confusion=self.confusion, stable_flags=self.flags["stable"],
                         candidate_flags=self.flags["candidate"])


def _add(d: dict[_K, int], key: _K, value: int) -> None:
    d[key] = d.get(key, 0) + value


def build_rollout_stats(counters: Mapping[str, int] | Iterable[tuple[str, int]]) -> RolloutStats:
    """`RolloutStats` from the raw counters a store returns (`PromptStore.rollout_stats`).
    Keys the codec does not know are kept in `unknown`, not judged and not fatal."""
    items = counters.items() if isinstance(counters, Mapping) else counters
    arms: dict[Arm, _ArmAcc] = {a: _ArmAcc() for a in ARMS}
    pairs: dict[int, _PairAcc] = {}
    unknown: dict[str, int] = {}
    for key, raw in items:
        value = int(raw)
        c = decode_key(key)
        if c is None:
            _add(unknown, key, value)
            continue
        match c:
            case ArmCount(arm, name):
                _add(arms[arm].counts, name, value)
            case ArmFlag(arm, category):
                _add(arms[arm].flags, category, value)
            case ArmLatencySketch(arm, index):
                _add(arms[arm].latency, index, value)
            case ArmLatency(arm, upper):  # the old histogram: its upper bound, an upper estimate
                acc = arms[arm]
                acc.legacy += value
                if upper is None:
                    acc.overflow += value
                else:
                    _add(acc.latency, sketch_index(upper), value)
            case FeedbackCount(arm):
                arms[arm].fb_n += value
            case FeedbackOutcome(arm, outcome, category):
                _add(arms[arm].fb.setdefault(category, {}), outcome, value)
            case PairCount(version, name):
                _add(pairs.setdefault(version, _PairAcc()).counts, name, value)
            case PairConfusion(version, a, b):
                _add(pairs.setdefault(version, _PairAcc()).confusion.setdefault(a, {}), b, value)
            case PairFlag(version, side, category):
                _add(pairs.setdefault(version, _PairAcc()).flags[side], category, value)
        if not isinstance(c, PairCount | PairConfusion | PairFlag):
            arms[c.arm].recorded = True
    return RolloutStats(stable=arms["stable"].build(), canary=arms["canary"].build(),
                        pairs={v: p.build(v) for v, p in sorted(pairs.items())}, unknown=unknown)


# -- flips --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FlipVerdict:
    """One side of a flip: the version and what it answered."""

    version: int
    decision: str
    category: str | None
    fail_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Flip:
    """A shadow comparison where the candidate's decision or category differed from stable's.

    Stored as a JSON record per flip (`PromptStore.add_rollout_stats(..., flips)`); the stable
    side carries no fail_reason (the caller got that verdict; its failures count elsewhere)."""

    at: str
    request_id: str
    item_id: str
    stable: FlipVerdict
    candidate: FlipVerdict

    def as_dict(self) -> dict[str, object]:
        s, c = self.stable, self.candidate
        return {"at": self.at, "request_id": self.request_id, "item_id": self.item_id,
                "stable": {"version": s.version, "decision": s.decision, "category": s.category},
                "candidate": {"version": c.version, "decision": c.decision, "category": c.category,
                              "fail_reason": c.fail_reason}}

    def to_json(self) -> str:
        return orjson.dumps(self.as_dict()).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Flip | None:
        """The flip a stored record holds, None when the record is not one (a flip is evidence
        for people to read; one damaged record must not hide the others)."""
        try:
            d = orjson.loads(raw)
            s, c = d["stable"], d["candidate"]
            return cls(at=str(d["at"]), request_id=str(d["request_id"]), item_id=str(d["item_id"]),
                       stable=_flip_verdict(s, with_reason=False), candidate=_flip_verdict(c, with_reason=True))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None


def _flip_verdict(d: Mapping[str, object], *, with_reason: bool) -> FlipVerdict:
    version, decision, category, reason = d["version"], d["decision"], d.get("category"), d.get("fail_reason")
    if not isinstance(version, int) or not isinstance(decision, str):
        raise TypeError("flip verdict needs an integer version and a decision")
    if category is not None and not isinstance(category, str):
        raise TypeError("flip category must be a string or null")
    if reason is not None and not isinstance(reason, str):
        raise TypeError("flip fail_reason must be a string or null")
    return FlipVerdict(version, decision, category, reason if with_reason else None)
