"""The calibrated probabilities of a verdict, as every front door shows them.

`gateway.verdict` derives the probabilities (issue 19, item 1); this module decides, once for
every adapter, how they are shown beside the gateway's answer, so that `/v1/moderate`,
`/v1/moderations`, `/v1/chat/completions` and `/v1/decisions` carry the same figures for the
same moderation and none of them can put a number where there is none:

- `verdict_fields`: the verdict with its probabilities and where they come from
  (`probability_source`): `logprobs` (calibrated from the engine's token log-probabilities),
  `unavailable` (the model answered but no usable log-probabilities came with it: an engine
  without them, `gateway.verdict_top_logprobs: 0`, tokens that do not spell the answer) or
  `fail_closed` (no usable answer at all: `fail_reason` is set). The probabilities are then
  null, never a default.
- `decision_withheld` / `category_withheld`: why the probabilities may not stand in for the
  answer on a surface whose numbers callers read as the answer (OpenAI's `category_scores`,
  the Decisions API's probabilities): besides missing ones, `threshold` (a version's
  operating point changed the model's decision, so the model's probabilities describe another
  decision) and `not_most_probable` (a sampled answer that is not the model's most probable
  value). A withheld number is null (moderations) or a refusal (decisions) with the reason
  beside it, so a score can never read as `allow` beside a `needs_review` or `block` answer.
"""

from __future__ import annotations

from typing import Any, Literal

from gateway.verdict import ALLOW, ChoiceScores, Verdict

__all__ = ["ProbabilitySource", "Withheld", "category_withheld", "decision_withheld",
           "probability_source", "value_probabilities", "verdict_fields"]

ProbabilitySource = Literal["logprobs", "unavailable", "fail_closed"]
Withheld = Literal["fail_closed", "unavailable", "threshold", "not_most_probable"]


def probability_source(verdict: Verdict) -> ProbabilitySource:
    if verdict.fail_reason is not None:
        return "fail_closed"
    return "logprobs" if verdict.decision_scores is not None else "unavailable"


def verdict_fields(verdict: Verdict) -> dict[str, Any]:
    """The verdict as the front doors render it (`/v1/moderate`'s body, the `modgate.verdict`
    extension): `decision_probability` is the probability of `model_decision`, the decision
    the model generated, which differs from `decision` only when an operating point or fail
    closed decided (`decided_by`).

    One exception, the fail-closed rule: when an operating point (or a missing probability)
    overruled a model `allow`, the answer does not show that `allow` nor its probability
    beside the `needs_review` or `block` it serves (`model_decision` and both probabilities
    null, `decided_by` says why). A caller reading either would read an allow; the decision
    log keeps both for the specialist (`decisions export`, the threshold what-if)."""
    overruled_allow = verdict.generated_decision == ALLOW and verdict.decision != ALLOW
    return {
        "decision": verdict.decision,
        "category": verdict.category,
        "confidence": verdict.confidence,
        "decision_probability": None if overruled_allow else verdict.decision_probability,
        "category_probability": None if overruled_allow else verdict.category_probability,
        "probability_source": probability_source(verdict),
        "probability_unresolved": verdict.probability_unresolved,
        "decided_by": verdict.decided_by,
        "model_decision": (None if verdict.fail_reason is not None or overruled_allow
                           else verdict.generated_decision),
        "fail_reason": verdict.fail_reason,
    }


def value_probabilities(scores: ChoiceScores, values: list[str]) -> dict[str, float] | None:
    """The point estimate of every allowed value, or None when one has none."""
    out: dict[str, float] = {}
    for value in values:
        p = scores.probability(value)
        if p is None:
            return None
        out[value] = p
    return out


def _most_probable(probabilities: dict[str, float], value: str) -> bool:
    return probabilities[value] >= max(probabilities.values())


def decision_withheld(verdict: Verdict, decisions: list[str]) -> Withheld | None:
    """Why the decision's probabilities may not be shown as the answer's (None: they may)."""
    if verdict.fail_reason is not None:
        return "fail_closed"
    scores = verdict.decision_scores
    probabilities = value_probabilities(scores, decisions) if scores is not None else None
    if probabilities is None or verdict.decision not in probabilities:
        return "unavailable"
    if verdict.decision != verdict.generated_decision:
        return "threshold"
    return None if _most_probable(probabilities, verdict.decision) else "not_most_probable"


def category_withheld(verdict: Verdict, decisions: list[str], categories: list[str]) -> Withheld | None:
    """Why the category's probabilities may not be shown as the answer's. They are
    conditional on the decision the model generated, so they are withheld whenever the
    decision's are."""
    reason = decision_withheld(verdict, decisions)
    if reason is not None:
        return reason
    scores = verdict.category_scores
    probabilities = value_probabilities(scores, categories) if scores is not None else None
    if probabilities is None or verdict.category not in probabilities:
        return "unavailable"
    return None if _most_probable(probabilities, verdict.category) else "not_most_probable"
