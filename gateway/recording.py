"""Decision-log records built from evaluations (no listing content ever goes in).

`decision_row` is what the request path logs: the record's fields as a plain dict, in
`DecisionRecord`'s field order, built from parts that are already checked (the verdict the
parser produced, the backend's result, the version the registry resolved, the request's own
ids) and written by the log as it is (`gateway.decision_log.encode_record`). Building the
validated model instead (`DecisionRecord(**row)`: strict validation of every field and the two
validators) cost ~20 µs per moderation, seven per cent of the plain scenario's CPU per request,
to re-check values whose types the code already fixes. `tests/unit/test_recording.py` holds the
two equal: for every shape of evaluation (allow, block, needs_review, fail-closed, thresholds
overruled, cascades, shadows) the row's line is byte for byte the validated record's line.
`decision_record` is the validated model of the same row, for callers that want the model.
"""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.decision_log import DecisionRecord, FrontDoor, LogRow
from gateway.pipeline import Evaluation
from prompt_registry import PromptVersion

__all__ = ["decision_record", "decision_row", "failure_record"]


def decision_row(ev: Evaluation, *, request_id: str, item_id: str, subject: str, arm: str,
                 latency_ms: float, trace_id: str | None, shadow_of: str | None = None,
                 front_door: FrontDoor | None = None, caller: str | None = None) -> LogRow:
    """The decision record of `ev` as the log writes it (see the module docstring). The keys
    are `DecisionRecord`'s fields in declaration order, every one present, each value of the
    type validation would leave (floats as float: `latency_ms` is rounded from a float)."""
    v = ev.verdict
    result = ev.result
    first = ev.escalated_from
    if first is None:
        escalation = escalation_error = first_model = first_decision = first_category = None
        first_confidence = first_margin = None
        first_fail_reason = None
        first_prompt_tokens = first_completion_tokens = None
    else:  # a cascade's first answer, beside the escalated one (ids and the verdict only)
        fv, fr = first.verdict, first.result
        escalation, escalation_error = ev.escalation, ev.escalation_error
        first_model, first_decision, first_category = fr.model, fv.decision, fv.category
        first_confidence, first_fail_reason, first_margin = fv.confidence, fv.fail_reason, fv.decision_margin
        first_prompt_tokens, first_completion_tokens = fr.prompt_tokens, fr.completion_tokens
    scored = v.decision_scores is not None or v.category_scores is not None
    version = ev.version
    return {
        "ts": datetime.now(UTC), "kind": "moderation", "request_id": request_id,
        "item_id": item_id, "subject": subject, "prompt_name": version.name,
        "prompt_version": version.version, "label": ev.label, "arm": arm, "shadow_of": shadow_of,
        "decision": v.decision, "category": v.category, "confidence": v.confidence,
        "fail_reason": v.fail_reason, "error_type": None, "model": result.model,
        "latency_ms": round(latency_ms, 3), "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_prompt_tokens": result.cached_prompt_tokens, "locale": ev.locale,
        "trace_id": trace_id, "front_door": front_door, "caller": caller,
        "reasoning_tokens": result.reasoning_tokens, "escalation": escalation,
        "escalation_error": escalation_error, "first_model": first_model,
        "first_decision": first_decision, "first_category": first_category,
        "first_confidence": first_confidence, "first_fail_reason": first_fail_reason,
        "first_prompt_tokens": first_prompt_tokens,
        "first_completion_tokens": first_completion_tokens,
        # Without scores (no log-probabilities) every probability is None: skip the properties.
        "decision_probability": v.decision_probability if scored else None,
        "category_probability": v.category_probability if scored else None,
        "block_probability": v.block_probability if scored else None,
        "probability_unresolved": v.probability_unresolved if scored else None,
        "decided_by": v.decided_by, "model_decision": v.model_decision,
        "block_probability_low": v.block_probability_low if scored else None,
        "decision_unresolved": v.decision_unresolved if scored else None,
        "first_decision_margin": first_margin,
    }


def decision_record(ev: Evaluation, *, request_id: str, item_id: str, subject: str, arm: str,
                    latency_ms: float, trace_id: str | None, shadow_of: str | None = None,
                    front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    """`decision_row` validated into the model (raises `ValidationError` on a bad value)."""
    return DecisionRecord(**decision_row(
        ev, request_id=request_id, item_id=item_id, subject=subject, arm=arm,
        latency_ms=latency_ms, trace_id=trace_id, shadow_of=shadow_of, front_door=front_door,
        caller=caller))


def failure_record(version: PromptVersion, *, request_id: str, item_id: str, subject: str, arm: str,
                   error_type: str, latency_ms: float, trace_id: str | None,
                   front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    return DecisionRecord(
        ts=datetime.now(UTC), request_id=request_id, item_id=item_id, subject=subject,
        prompt_name=version.name, prompt_version=version.version, label=None, arm=arm,  # type: ignore[arg-type]
        error_type=error_type, model=version.spec.model, latency_ms=round(latency_ms, 3),
        trace_id=trace_id, front_door=front_door, caller=caller)
