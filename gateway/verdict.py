"""Turn model output into a verdict, failing closed.

Anything that is not exactly a valid verdict under the prompt's schema (unparseable, truncated,
wrong enum value, missing or extra field) becomes `needs_review` with a `fail_reason`. Nothing
here can produce `allow` unless the model produced a valid `allow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from prompt_registry import FAIL_CLOSED_DECISION, VerdictSchema

__all__ = ["Verdict", "parse_verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: str
    category: str | None
    confidence: float | None
    fail_reason: str | None = None


def _fail(reason: str) -> Verdict:
    return Verdict(decision=FAIL_CLOSED_DECISION, category=None, confidence=None, fail_reason=reason)


def parse_verdict(text: str, finish_reason: str | None, schema: VerdictSchema) -> Verdict:
    if finish_reason == "length":
        return _fail("truncated_output")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _fail("unparseable_output")
    if not isinstance(data, dict):
        return _fail("invalid_verdict")
    expected = {"decision", "category"} | ({"confidence"} if schema.confidence else set())
    if set(data) != expected:
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
    return Verdict(decision=decision, category=category, confidence=confidence)
