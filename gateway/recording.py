"""Decision-log records built from evaluations (no listing content ever goes in)."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.decision_log import DecisionRecord, FrontDoor
from gateway.pipeline import Evaluation
from prompt_registry import PromptVersion

__all__ = ["decision_record", "failure_record"]


def decision_record(ev: Evaluation, *, request_id: str, item_id: str, subject: str, arm: str,
                    latency_ms: float, trace_id: str | None, shadow_of: str | None = None,
                    front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    v = ev.verdict
    return DecisionRecord(
        ts=datetime.now(UTC), request_id=request_id, item_id=item_id, subject=subject,
        prompt_name=ev.version.name, prompt_version=ev.version.version, label=ev.label, arm=arm,  # type: ignore[arg-type]
        shadow_of=shadow_of, decision=v.decision, category=v.category, confidence=v.confidence,
        fail_reason=v.fail_reason, model=ev.result.model, latency_ms=round(latency_ms, 3),
        prompt_tokens=ev.result.prompt_tokens, completion_tokens=ev.result.completion_tokens,
        locale=ev.locale, trace_id=trace_id, front_door=front_door, caller=caller)


def failure_record(version: PromptVersion, *, request_id: str, item_id: str, subject: str, arm: str,
                   error_type: str, latency_ms: float, trace_id: str | None,
                   front_door: FrontDoor | None = None, caller: str | None = None) -> DecisionRecord:
    return DecisionRecord(
        ts=datetime.now(UTC), request_id=request_id, item_id=item_id, subject=subject,
        prompt_name=version.name, prompt_version=version.version, label=None, arm=arm,  # type: ignore[arg-type]
        error_type=error_type, model=version.spec.model, latency_ms=round(latency_ms, 3),
        trace_id=trace_id, front_door=front_door, caller=caller)
