"""Cascades: a version's unsure verdicts answered again by a second, larger model.

A prompt version may name a second model (`cascade:` in its spec, `prompt_registry.models.
CascadeSpec`). After the first model's verdict is validated, `escalation_trigger` decides
whether it stands. The version lists the triggers it uses in `cascade.escalate_on` (default
`[needs_review]`); only those are tried, in this order, and the first that fires is recorded
(the decision log's `escalation`, the metric's `trigger`):

- `needs_review`: the verdict is `needs_review`, the fail-closed ones included;
- `low_margin` (listed together with `min_margin`): the verdict's calibrated decision margin
  (`Verdict.decision_margin`: probability of the generated decision minus the next most likely
  one, from the token log-probabilities; its worst case within their bounds when they are
  inexact) is below `min_margin`. A verdict without a calibrated margin (the engine sent no
  log-probabilities, the gateway asks for none (`gateway.verdict_top_logprobs: 0`), a
  fail-closed verdict when `needs_review` is not listed, tokens that do not spell the answer)
  cannot show it is sure, so it escalates too, recorded as `margin_unavailable`: fail closed,
  and countable apart. The margin is computed only for a cascade with `min_margin` (this runs
  on every moderation);
- `low_confidence` (listed together with `min_confidence`): the confidence the model wrote is
  below `min_confidence` (a verdict without one stands). Versions already stored use it and
  keep working; prefer `low_margin` for new ones: the written confidence is a number the model
  generates, not a probability, while the margin is measured from the model's own token
  distribution and its calibration is reported per version by `modgate eval run`
  (reliability diagram, ECE).

A trigger that is not listed never fires: with `escalate_on: [low_margin]` a model-written
`needs_review` with a wide margin stands.

The second
call is an ordinary `ModerationPipeline.evaluate` of the same version with the cascade's model,
sampling and reasoning (`PromptSpec.second_spec`): the same render, admission slot (per model),
resilient backend, deadline and fail-closed validation as the first. Its verdict is the answer;
the first is kept on the evaluation (`Evaluation.escalated_from`) and the decision log records
both.

When the second call fails (the model is down, saturated, out of time, not served) the answer
is `needs_review` with `fail_reason: escalation_failed`: the first verdict was the one judged
not good enough to stand, so it never becomes the answer, and a dead second model does not turn
unsure answers into errors either. The error type is kept (`escalation_error`).

Metrics: `modgate_verdicts_total` counts each model's answer (a request whose escalation the
second model answered counts twice; one whose second call failed, once);
`modgate_escalations_total` counts escalations by trigger and outcome (answered, failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.pipeline import Evaluation, ModerationPipeline
from gateway.problems import ModelSaturated, QueueTimeout, problem_for
from gateway.prompt_cache import Resolved
from gateway.verdict import Verdict
from prompt_registry import FAIL_CLOSED_DECISION, PromptSpec, PromptVersion
from prompt_registry.models import CascadeSpec
from serving import BackendError

__all__ = ["ESCALATION_FAILED", "MARGIN_UNAVAILABLE", "escalate", "escalation_trigger", "evaluate",
           "trigger_for"]

log = logging.getLogger("modgate.gateway")

ESCALATION_FAILED = "escalation_failed"
MARGIN_UNAVAILABLE = "margin_unavailable"  # low_margin asked for, no calibrated probability
_ESCALATION_ERRORS = (BackendError, ModelSaturated, QueueTimeout)


def escalation_trigger(spec: PromptSpec, verdict: Verdict) -> str | None:
    """Why *verdict* goes to the cascade's model (`needs_review`, `low_margin`,
    `margin_unavailable`, `low_confidence`), or None when it stands (no cascade, or a verdict
    the version trusts). The margin is computed only for a cascade that reads it (this runs on
    every moderation)."""
    c = spec.cascade
    if c is None:
        return None
    margin = verdict.decision_margin if c.min_margin is not None else None
    return trigger_for(c, verdict.decision, confidence=verdict.confidence, margin=margin)


def trigger_for(cascade: CascadeSpec | None, decision: str, *, confidence: float | None,
                margin: float | None) -> str | None:
    """`escalation_trigger` on a verdict's recorded fields (the evaluation applies it to its
    item results): the first trigger of the module doc's list that fires."""
    c = cascade
    if c is None:
        return None
    if "needs_review" in c.escalate_on and decision == FAIL_CLOSED_DECISION:
        return "needs_review"
    if "low_margin" in c.escalate_on and c.min_margin is not None:
        if margin is None:
            return MARGIN_UNAVAILABLE
        if margin < c.min_margin:
            return "low_margin"
    if ("low_confidence" in c.escalate_on and c.min_confidence is not None
            and confidence is not None and confidence < c.min_confidence):
        return "low_confidence"
    return None


def second_version(version: PromptVersion) -> PromptVersion:
    """*version* as its cascade's model answers it: same name, number and hash (it is the same
    release), the second model's spec."""
    spec = version.spec.second_spec()
    if spec is None:
        raise ValueError(f"{version.name} v{version.version} has no cascade")
    return PromptVersion.model_construct(spec=spec, version=version.version,
                                         content_hash=version.content_hash,
                                         created_at=version.created_at, created_by=version.created_by)


async def evaluate(pipeline: ModerationPipeline, resolved: Resolved, variables: Mapping[str, object],
                   locale: str | None, *, request_id: str, timeout_s: float, label: str | None,
                   arm: str = "stable", priority: int = 0, queue: bool = True,
                   sampling: Mapping[str, Any] | None = None) -> Evaluation:
    """`pipeline.evaluate`, then the cascade when the version has one and the verdict
    escalates; both calls share *timeout_s*."""
    started = time.perf_counter()
    first = await pipeline.evaluate(resolved, variables, locale, request_id=request_id,
                                    timeout_s=timeout_s, label=label, arm=arm, priority=priority,
                                    queue=queue, sampling=sampling)
    trigger = escalation_trigger(resolved.version.spec, first.verdict)
    if trigger is None:
        return first
    return await escalate(pipeline, resolved, first, trigger, variables, locale,
                          request_id=request_id,
                          timeout_s=timeout_s - (time.perf_counter() - started),
                          priority=priority, queue=queue, sampling=sampling)


async def escalate(pipeline: ModerationPipeline, resolved: Resolved, first: Evaluation, trigger: str,
                   variables: Mapping[str, object], locale: str | None, *, request_id: str,
                   timeout_s: float, priority: int = 0, queue: bool = True,
                   sampling: Mapping[str, Any] | None = None) -> Evaluation:
    """The second model's evaluation of what *first* answered, carrying *first*; on a failure
    of the second call, *first* with the fail-closed verdict and the error type."""
    version = resolved.version
    labels = {"prompt": version.name, "version": str(version.version), "arm": first.arm}
    m = pipeline.metrics
    try:
        if timeout_s <= 0:
            raise QueueTimeout("no time left in the request deadline for the cascade's model")
        second = await pipeline.evaluate(
            replace(resolved, version=second_version(version)), variables, locale,
            request_id=f"{request_id}-cascade", timeout_s=timeout_s, label=first.label,
            arm=first.arm, priority=priority, queue=queue, sampling=sampling)
    except _ESCALATION_ERRORS as exc:
        problem = problem_for(exc)
        error = problem.type if problem is not None else type(exc).__name__
        log.warning("moderation %s: escalation to %s failed (%s); answering %s", request_id,
                    version.spec.cascade.model if version.spec.cascade else "?", error,
                    FAIL_CLOSED_DECISION)
        m.child(m.escalations, trigger=trigger, outcome="failed", **labels).inc()
        closed = Verdict(decision=FAIL_CLOSED_DECISION, category=None, confidence=None,
                         fail_reason=ESCALATION_FAILED)
        return replace(first, verdict=closed, escalated_from=first, escalation=trigger,
                       escalation_error=error)
    m.child(m.escalations, trigger=trigger, outcome="answered", **labels).inc()
    return replace(second, version=version, escalated_from=first, escalation=trigger)
