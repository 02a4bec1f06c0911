"""Decision-log records built from evaluations (no listing content ever goes in)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.decision_log import DecisionRecord, FrontDoor
from gateway.pipeline import Evaluation
from prompt_registry import PromptVersion

__all__ = ["decision_record", "failure_record"]


def decision_record(ev: Evaluation, *, request_id: str, item_id: str, subject: str, arm: str,
                    latency_ms: float, trace_id: str | None, shadow_of: str | None = None,
                    front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    v = ev.verdict
    first = ev.escalated_from
    return DecisionRecord(
        ts=datetime.now(UTC), request_id=request_id, item_id=item_id, subject=subject,
        prompt_name=ev.version.name, prompt_version=ev.version.version, label=ev.label, arm=arm,  # type: ignore[arg-type]
        shadow_of=shadow_of, decision=v.decision, category=v.category, confidence=v.confidence,
        decision_probability=v.decision_probability,
        category_probability=v.category_probability,
        block_probability=v.block_probability, probability_unresolved=v.probability_unresolved,
        decided_by=v.decided_by, model_decision=v.model_decision,
        block_probability_low=v.block_probability_low, decision_unresolved=v.decision_unresolved,
        fail_reason=v.fail_reason, model=ev.result.model, latency_ms=round(latency_ms, 3),
        prompt_tokens=ev.result.prompt_tokens, completion_tokens=ev.result.completion_tokens,
        cached_prompt_tokens=ev.result.cached_prompt_tokens, locale=ev.locale, trace_id=trace_id,
        front_door=front_door, caller=caller,
        reasoning_tokens=ev.result.reasoning_tokens,
        **({} if first is None else _first_answer(ev, first)))


def _first_answer(ev: Evaluation, first: Evaluation) -> dict[str, Any]:
    """A cascade's first answer, beside the escalated one (ids and the verdict only, like
    every field of the log: never the reasoning)."""
    return {"escalation": ev.escalation, "escalation_error": ev.escalation_error,
            "first_model": first.result.model, "first_decision": first.verdict.decision,
            "first_category": first.verdict.category, "first_confidence": first.verdict.confidence,
            "first_fail_reason": first.verdict.fail_reason,
            "first_decision_margin": first.verdict.decision_margin,
            "first_prompt_tokens": first.result.prompt_tokens,
            "first_completion_tokens": first.result.completion_tokens}


def failure_record(version: PromptVersion, *, request_id: str, item_id: str, subject: str, arm: str,
                   error_type: str, latency_ms: float, trace_id: str | None,
                   front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    return DecisionRecord(
        ts=datetime.now(UTC), request_id=request_id, item_id=item_id, subject=subject,
        prompt_name=version.name, prompt_version=version.version, label=None, arm=arm,  # type: ignore[arg-type]
        error_type=error_type, model=version.spec.model, latency_ms=round(latency_ms, 3),
        trace_id=trace_id, front_door=front_door, caller=caller)
