"""Turn model output into a verdict, failing closed.

Anything that is not exactly a valid verdict under the prompt's schema (unparseable, truncated,
wrong enum value, missing or extra field) becomes `needs_review` with a `fail_reason`. Nothing
here can produce `allow` unless the model produced a valid `allow` (or a version's operating
point turned a well-measured low block probability into one, see below).

Calibrated probabilities
------------------------
`confidence` is a number the model writes; it is not a probability. When the engine reports
token log-probabilities, `score_field` derives one for the decision and for the category: at
the tokens where the values the schema allows diverge, the engine's top alternatives are
mapped to the allowed values they can begin (an alternative compatible with no allowed value is
dropped, which renormalises over the allowed values), following the generated token where
it is still shared by several values (chain rule). Mass that cannot be given to one value -
alternatives the top-k did not list (1 minus the listed mass, an upper bound), or a shared
alternative other than the generated one, whose continuation the engine did not report - is
kept as `unresolved`: each value's probability then lies between its attributed mass and that
plus the unresolved mass, and the point estimate is computed from the attributed mass alone.
vLLM 0.32 (default `logprobs_mode: raw_logprobs`) applies the structured-output mask to the
logits before it computes the log-probabilities, so forbidden tokens already carry no mass and
with enough alternatives the unresolved mass is zero. The probabilities never change a
decision by themselves; missing log-probabilities leave them None.

Operating points
----------------
`apply_thresholds` applies a version's per-category operating points (`PromptSpec.thresholds`)
to the calibrated probability of `block`, using its bounds so an inexact probability never
blocks or allows on a guess: block when the lower bound is at or above `block_at`, allow when
the upper bound is below `review_at`, needs_review otherwise; `decided_by` is then `threshold`.
Fail closed: an unusable answer stays `needs_review`; a verdict in a category with an
operating point but without a probability keeps the model's decision unless that is `allow`,
which becomes `needs_review` (`decided_by: fail_closed`): the version said this category is
decided by probability, and there is none to say allow with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import orjson

from prompt_registry import FAIL_CLOSED_DECISION, VerdictSchema
from prompt_registry.models import OperatingPoint
from serving.protocol import TokenLogprob

__all__ = ["TOP_LOGPROBS", "ChoiceScores", "DecidedBy", "Verdict", "apply_thresholds", "logged_block_scores",
           "parse_verdict", "score_field"]

# Alternatives asked for at each generated token: vLLM's default cap (`max_logprobs` 20) and
# OpenAI's maximum; enough for every prefix token of a short enum under the grammar mask.
TOP_LOGPROBS = 20
# Unresolved mass below this counts as exact (float32 log-probabilities do not sum to 1 exactly).
EXACT_TOLERANCE = 1e-3
BLOCK = "block"
ALLOW = "allow"

DecidedBy = Literal["model", "threshold", "fail_closed"]


@dataclass(frozen=True, slots=True)
class ChoiceScores:
    """Calibrated probabilities of the allowed values of one verdict field.

    `attributed[v]` is the mass resolved to value v (a lower bound on its probability);
    `unresolved` the mass that could not be given to a single value (1 - sum of attributed).
    """

    attributed: Mapping[str, float]
    unresolved: float

    @property
    def exact(self) -> bool:
        return self.unresolved <= EXACT_TOLERANCE

    def probability(self, value: str) -> float | None:
        """Point estimate from the resolved mass alone; None when nothing was resolved."""
        resolved = 1.0 - self.unresolved
        if value not in self.attributed or resolved <= 0.0:
            return None
        return round(min(1.0, self.attributed[value] / resolved), 6)

    def bounds(self, value: str) -> tuple[float, float] | None:
        if value not in self.attributed:
            return None
        low = self.attributed[value]
        return low, min(1.0, low + self.unresolved)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: str
    category: str | None
    confidence: float | None
    fail_reason: str | None = None
    decision_scores: ChoiceScores | None = None
    category_scores: ChoiceScores | None = None
    decided_by: DecidedBy = "model"
    model_decision: str | None = None  # what the model answered, when not the model decided

    @property
    def generated_decision(self) -> str:
        return self.model_decision or self.decision

    @property
    def decision_probability(self) -> float | None:
        """Calibrated probability of the decision the model generated."""
        s = self.decision_scores
        return None if s is None else s.probability(self.generated_decision)

    @property
    def category_probability(self) -> float | None:
        """Calibrated probability of the category, given the generated decision."""
        s, c = self.category_scores, self.category
        return None if s is None or c is None else s.probability(c)

    @property
    def block_probability(self) -> float | None:
        s = self.decision_scores
        return None if s is None else s.probability(BLOCK)

    @property
    def block_probability_low(self) -> float | None:
        """The mass attributed to `block` (the lower bound operating points compare with
        `block_at`); with `decision_unresolved` all `apply_thresholds` reads of the scores."""
        s = self.decision_scores
        return None if s is None or BLOCK not in s.attributed else s.attributed[BLOCK]

    @property
    def decision_unresolved(self) -> float | None:
        s = self.decision_scores
        return None if s is None else s.unresolved

    @property
    def decision_margin(self) -> float | None:
        """How far the generated decision is ahead of the next most likely allowed decision:
        its calibrated probability minus the largest other one (top-1 minus top-2 of the
        renormalised decision distribution when the model generated its most likely decision;
        negative when it did not). When the probabilities are inexact (unresolved mass above
        `EXACT_TOLERANCE`) it is the worst case within their bounds, the generated decision's
        lower bound minus the others' upper bound, so an inexact probability never makes a
        verdict look surer than it is. None without decision scores (a cascade's `low_margin`
        trigger then escalates: gateway/cascade.py)."""
        s = self.decision_scores
        chosen = self.generated_decision
        if s is None or chosen not in s.attributed:
            return None
        runner_up = max((p for v, p in s.attributed.items() if v != chosen), default=0.0)
        ahead = s.attributed[chosen] - runner_up
        margin = ahead / (1.0 - s.unresolved) if s.exact else ahead - s.unresolved
        return round(margin, 6)

    @property
    def probability_unresolved(self) -> float | None:
        """The larger unresolved mass of the two fields (0 when both are exact)."""
        masses = [s.unresolved for s in (self.decision_scores, self.category_scores) if s is not None]
        return round(max(masses), 6) if masses else None


_WITHOUT_CONFIDENCE = frozenset({"decision", "category"})  # a verdict's exact keys
_WITH_CONFIDENCE = _WITHOUT_CONFIDENCE | {"confidence"}


def _fail(reason: str) -> Verdict:
    return Verdict(decision=FAIL_CLOSED_DECISION, category=None, confidence=None, fail_reason=reason,
                   decided_by="fail_closed")


def parse_verdict(text: str, finish_reason: str | None, schema: VerdictSchema, *,
                  logprobs: Sequence[TokenLogprob] | None = None,
                  thresholds: Mapping[str, OperatingPoint] | None = None) -> Verdict:
    """The verdict in *text*, with calibrated probabilities when *logprobs* (the generated
    tokens) are given, and the version's operating points applied when *thresholds* are."""
    if finish_reason == "length":
        return _fail("truncated_output")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _fail("unparseable_output")
    if not isinstance(data, dict):
        return _fail("invalid_verdict")
    if data.keys() != (_WITH_CONFIDENCE if schema.confidence else _WITHOUT_CONFIDENCE):
        return _fail("invalid_verdict")
    decision, category = data["decision"], data["category"]
    if decision not in schema.decisions or category not in schema.categories:
        return _fail("invalid_verdict")
    confidence: float | None = None
    if schema.confidence:
        raw = data["confidence"]
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return _fail("invalid_verdict")
        confidence = float(raw)
        if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
            return _fail("invalid_verdict")
    verdict = Verdict(decision=decision, category=category, confidence=confidence)
    if logprobs:
        verdict = _scored(verdict, text, logprobs, schema)
    return apply_thresholds(verdict, thresholds) if thresholds else verdict


def _scored(verdict: Verdict, text: str, logprobs: Sequence[TokenLogprob], schema: VerdictSchema) -> Verdict:
    """*verdict* with the calibrated scores of its decision and category, when the tokens
    spell *text* in the regex's exact shape (key order fixed, no whitespace). The tokens may
    go on past the text: vLLM reports the stop token too (the tiny model's `<|end|>`), which is
    not part of the answer."""
    if not "".join(t.token for t in logprobs).startswith(text):
        return verdict
    head = '{"decision":"'
    category_start = len(head) + len(verdict.decision) + len('","category":"')
    if not text.startswith(f'{head}{verdict.decision}","category":"{verdict.category}"'):
        return verdict
    return replace(verdict,
                   decision_scores=score_field(logprobs, text, len(head), verdict.decision, schema.decisions),
                   category_scores=score_field(logprobs, text, category_start, str(verdict.category),
                                               schema.categories))


def _compatible(prefix: str, full: str) -> bool:
    """One is a prefix of the other: *prefix* can still become (or already contains) *full*."""
    return full.startswith(prefix) or prefix.startswith(full)


def score_field(tokens: Sequence[TokenLogprob], text: str, value_start: int, chosen: str,
                allowed: Sequence[str]) -> ChoiceScores | None:
    """Calibrated probabilities of the *allowed* values of the string field whose value
    (*chosen*, followed by its closing quote) starts at character *value_start* of *text*,
    the concatenation of *tokens* (see the module doc). None when the tokens cannot be read
    (the generated token is not among the allowed continuations, or carries no mass)."""
    full = {v: text[:value_start] + v + '"' for v in allowed}
    if chosen not in full or not text.startswith(full[chosen]):
        return None
    attributed = dict.fromkeys(allowed, 0.0)
    unresolved = 0.0
    weight = 1.0  # probability of the generated path so far, among the allowed values
    live = set(allowed)
    offset = 0
    for tok in tokens:
        start, offset = offset, offset + len(tok.token)
        if offset <= value_start:
            continue
        before = text[:start]
        live = {v for v in live if _compatible(before, full[v])}
        if len(live) <= 1:
            break
        alternatives = list(dict.fromkeys(tok.top))  # duplicates would count twice
        if all(a != tok.token for a, _ in alternatives):
            alternatives.append((tok.token, tok.logprob))
        rest = {v: full[v][start:] for v in live}  # what each live value still has to spell
        listed = 0.0
        groups: list[tuple[str, float, set[str]]] = []
        for alt, logprob in alternatives:
            p = math.exp(min(logprob, 0.0)) if logprob > -math.inf else 0.0  # NaN, -inf: no mass
            listed += p
            values = {v for v, r in rest.items() if _compatible(alt, r)}
            if values:
                groups.append((alt, p, values))
        missing = max(0.0, 1.0 - listed)
        denominator = sum(p for _, p, _ in groups) + missing
        generated = next((g for g in groups if g[0] == tok.token), None)
        if generated is None or generated[1] <= 0.0 or denominator <= 0.0:
            return None
        for alt, p, values in groups:
            if alt == tok.token:
                continue
            share = weight * p / denominator
            if len(values) == 1:
                attributed[next(iter(values))] += share
            else:
                unresolved += share
        unresolved += weight * missing / denominator
        weight *= generated[1] / denominator
        live = generated[2]
    if live != {chosen}:
        return None  # the tokens ended before the value was decided
    attributed[chosen] += weight
    return ChoiceScores(attributed={v: round(p, 9) for v, p in attributed.items()},
                        unresolved=round(unresolved, 9))


def logged_block_scores(block_low: float | None, unresolved: float | None) -> ChoiceScores | None:
    """The decision's scores as far as `apply_thresholds` reads them, rebuilt from the two
    numbers the decision log keeps (`block_probability_low`, `decision_unresolved`): a verdict
    carrying them is decided by an operating point exactly as at serve time. The threshold
    what-if (gateway/quality/whatif.py) re-decides logged verdicts through this."""
    if block_low is None or unresolved is None:
        return None
    return ChoiceScores(attributed={BLOCK: block_low}, unresolved=unresolved)


def apply_thresholds(verdict: Verdict, thresholds: Mapping[str, OperatingPoint]) -> Verdict:
    """The verdict after the version's operating point for its category (module doc)."""
    if verdict.fail_reason is not None or verdict.category is None:
        return verdict
    point = thresholds.get(verdict.category)
    if point is None:
        return verdict
    bounds = verdict.decision_scores.bounds(BLOCK) if verdict.decision_scores is not None else None
    if bounds is None:
        if verdict.decision == ALLOW:
            return replace(verdict, decision=FAIL_CLOSED_DECISION, decided_by="fail_closed",
                           model_decision=verdict.decision)
        return verdict
    low, high = bounds
    if low >= point.block_at:
        decision = BLOCK
    elif high < point.review_at:
        decision = ALLOW
    else:
        decision = FAIL_CLOSED_DECISION
    return replace(verdict, decision=decision, decided_by="threshold", model_decision=verdict.decision)
