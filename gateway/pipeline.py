"""The moderation pipeline, shared by every API that evaluates a prompt (`/v1/moderate`, the
OpenAI-compatible routes, shadow evaluation): resolve a prompt version, pick the locale
variant, render it in the sandbox, call the model under a deadline with the verdict's exact
output constraint, and validate the verdict (fail closed). Each stage is a span and a
histogram observation labelled by prompt version and traffic arm."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AnyValue

from gateway.admission import AdmissionControl
from gateway.problems import ModelSaturated
from gateway.prompt_cache import PromptCache, Resolved
from gateway.telemetry import Attr, Metrics, current_span, stage
from gateway.verdict import TOP_LOGPROBS, Verdict, parse_verdict
from prompt_registry import PromptSpec, PromptVersion, render_messages
from prompt_registry.models import Message
from serving import BackendError, ChatRequest, ChatResult, InferenceBackend

__all__ = ["Evaluation", "ModerationPipeline"]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One prompt version evaluated on one input."""

    version: PromptVersion
    label: str | None
    arm: str
    locale: str
    stale: bool
    verdict: Verdict
    result: ChatResult
    deprecated: bool = False
    # A cascade (gateway/cascade.py): the first model's evaluation this one replaced, why it
    # escalated, and the error type when the second call failed (the verdict is then the
    # fail-closed one, built from the first).
    escalated_from: Evaluation | None = None
    escalation: str | None = None
    escalation_error: str | None = None

    @property
    def rationale(self) -> str | None:
        """A reasoning model's analysis for this verdict: never logged, never on a span, never
        in the decision log. The opt-in sample store (gateway/samples.py), the one place
        listing-derived text may be kept, stores it with a sampled item's content."""
        return self.result.reasoning

    def prompt_ref(self) -> dict[str, object]:
        ref: dict[str, object] = {"name": self.version.name, "version": self.version.version,
                                  "label": self.label, "locale": self.locale, "stale": self.stale}
        if self.deprecated:
            ref["deprecated"] = True
        return ref


@dataclass(frozen=True, slots=True)
class _ChatPlan:
    """What `build_chat` derives from a spec and a requested locale, the same for every
    request: made once per (spec, locale) rather than once per request."""

    spec: PromptSpec  # held: the id it is cached under cannot be reused while it lives
    used_locale: str
    templates: list[Message]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    regex: str
    reasoning_effort: str | None


_plans: dict[tuple[int, str | None], _ChatPlan] = {}
_PLANS_MAX = 1024  # distinct (spec, requested locale) pairs; a caller's made-up locales only churn it


def _plan(spec: PromptSpec, locale: str | None) -> _ChatPlan:
    key = (id(spec), locale)
    plan = _plans.get(key)
    if plan is not None and plan.spec is spec:
        return plan
    used_locale, templates = spec.select_locale(locale)
    plan = _ChatPlan(spec=spec, used_locale=used_locale, templates=templates, model=spec.model,
                     max_tokens=spec.max_output_tokens(), temperature=spec.sampling.temperature,
                     top_p=spec.sampling.top_p, seed=spec.sampling.seed, regex=spec.verdict.regex(),
                     reasoning_effort=spec.reasoning.effort if spec.reasoning else None)
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    _plans[key] = plan
    return plan


class ModerationPipeline:
    def __init__(self, cache: PromptCache, backend: InferenceBackend, *,
                 tracer: trace.Tracer | None = None, metrics: Metrics | None = None,
                 admission: AdmissionControl | None = None,
                 top_logprobs: int | None = TOP_LOGPROBS) -> None:
        self.cache = cache
        self.top_logprobs = top_logprobs  # alternatives per token for calibration; None: not asked
        self.backend = backend
        self.admission = admission or AdmissionControl(max_inflight=256, max_queued=1024)
        self.tracer = tracer or trace.get_tracer("modgate.gateway")
        self.metrics = metrics or Metrics()

    async def resolve(self, name: str, *, label: str | None = None, version: int | None = None,
                      arm: str = "stable", resolved: Resolved | None = None) -> Resolved:
        """A label (from the hot cache) or a pinned version (immutable, cached for good).
        *resolved*: the label's lookup the caller already made for this request (the service
        resolves the production label first to prove the name): recorded as this stage
        without looking the label up a second time."""
        # The histogram is labelled with the prompt only once the registry has it: a name as
        # sent by a caller must never become a metric label (a flood of made-up names would
        # grow every /metrics scrape without bound).
        labels = {"prompt": "-", "version": "-", "arm": arm}
        with stage(self.tracer, self.metrics, "prompt.resolve", labels,
                   {Attr.PROMPT_NAME: name, Attr.PROMPT_LABEL: label or "", Attr.TRAFFIC_ARM: arm}) as span:
            if version is not None:
                resolved = await self.cache.get_version(name, version)
            elif resolved is not None:
                pass
            elif label is not None:
                resolved = await self.cache.resolve(name, label)
            else:
                raise ValueError("resolve needs a label or a version")
            labels["prompt"] = resolved.version.name
            span.set_attribute(Attr.PROMPT_VERSION, resolved.version.version)
            span.set_attribute(Attr.PROMPT_STALE, resolved.stale)
            return resolved

    @staticmethod
    def build_chat(version: PromptVersion, variables: Mapping[str, object], locale: str | None, *,
                   request_id: str, priority: int = 0,
                   top_logprobs: int | None = TOP_LOGPROBS) -> tuple[str, ChatRequest]:
        plan = _plan(version.spec, locale)
        messages = render_messages(plan.templates, plan.spec.variables, variables)
        return plan.used_locale, ChatRequest(
            model=plan.model, messages=messages, max_tokens=plan.max_tokens,
            temperature=plan.temperature, top_p=plan.top_p, seed=plan.seed, regex=plan.regex,
            request_id=request_id, priority=priority, reasoning_effort=plan.reasoning_effort,
            top_logprobs=top_logprobs)

    async def evaluate(self, resolved: Resolved, variables: Mapping[str, object], locale: str | None, *,
                       request_id: str, timeout_s: float, label: str | None, arm: str = "stable",
                       priority: int = 0, queue: bool = True,
                       sampling: Mapping[str, Any] | None = None) -> Evaluation:
        """Evaluate *resolved* on *variables*. `queue=False` refuses (429) instead of waiting
        when the model is saturated: for traffic that must never wait (shadow). `sampling`
        overrides the version's sampling parameters (already clamped by the caller's adapter);
        the output stays constrained to the verdict shape whatever they say."""
        start = time.perf_counter()
        deadline = start + timeout_s
        version = resolved.version
        spec = version.spec
        labels = {"prompt": version.name, "version": str(version.version), "arm": arm}
        with stage(self.tracer, self.metrics, "prompt.render", labels, {Attr.PROMPT_NAME: version.name}):
            used_locale, chat = self.build_chat(version, variables, locale, request_id=request_id,
                                                priority=priority, top_logprobs=self.top_logprobs)
            if sampling:
                chat = replace(chat, **sampling)
        queued = time.perf_counter()
        try:
            async with self.admission.slot(chat.model, timeout_s=deadline - queued, wait=queue):
                self.metrics.observe_stage(time.perf_counter() - queued, "queue", labels)
                result = await self.call_backend(chat, labels, deadline, version=version, locale=used_locale)
        except ModelSaturated:
            self.metrics.child(self.metrics.shed, model=chat.model).inc()
            raise
        with stage(self.tracer, self.metrics, "verdict.validate", labels) as span:
            verdict = parse_verdict(result.text, result.finish_reason, spec.verdict,
                                    logprobs=result.logprobs, thresholds=spec.thresholds)
            if span.is_recording():
                span.set_attribute(Attr.DECISION, verdict.decision)
                span.set_attribute(Attr.CATEGORY, verdict.category or "")
                if verdict.fail_reason:
                    span.set_attribute(Attr.FAIL_REASON, verdict.fail_reason)
        evaluation = self._finish(version, label, arm, used_locale, resolved.stale, verdict, result, labels)
        return replace(evaluation, deprecated=True) if resolved.deprecated else evaluation

    async def call_backend(self, chat: ChatRequest, labels: dict[str, str], deadline: float,
                           span_attrs: Mapping[str, AnyValue] | None = None, *,
                           version: PromptVersion | None = None, locale: str | None = None) -> ChatResult:
        """One backend call as a client span, with the in-flight gauge and the `backend` stage
        histogram; the caller holds the admission slot. The span's attributes are built only
        when the trace is sampled: *span_attrs*, else from *chat* and, for a prompt's
        evaluation, its *version* and *locale*."""
        called = time.perf_counter()
        self.metrics.gauge_add(self.metrics.inflight, 1.0, chat.model)
        parent = current_span()
        if parent.is_recording():
            if span_attrs is None:
                span_attrs = {Attr.GEN_AI_OPERATION: "chat", Attr.GEN_AI_PROVIDER: "vllm",
                              Attr.GEN_AI_REQUEST_MODEL: chat.model,
                              Attr.GEN_AI_REQUEST_MAX_TOKENS: chat.max_tokens,
                              Attr.TRAFFIC_ARM: labels["arm"]}
                if version is not None:
                    span_attrs = {**span_attrs, Attr.GEN_AI_REQUEST_TEMPERATURE: chat.temperature,
                                  Attr.PROMPT_NAME: version.name, Attr.PROMPT_VERSION: version.version,
                                  Attr.PROMPT_LOCALE: locale or ""}
            cm: Any = self.tracer.start_as_current_span(f"chat {chat.model}", kind=SpanKind.CLIENT,
                                                        attributes=span_attrs)
        else:
            cm = nullcontext(parent)
        with cm as span:
            try:
                result = await self.backend.chat(chat, timeout_s=max(0.001, deadline - called))
            except BackendError as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.set_attribute(Attr.ERROR_TYPE, type(exc).__name__)
                raise
            finally:
                self.metrics.gauge_add(self.metrics.inflight, -1.0, chat.model)
                self.metrics.observe_stage(time.perf_counter() - called, "backend", labels)
            if span.is_recording():
                span.set_attribute(Attr.GEN_AI_RESPONSE_MODEL, result.model)
                span.set_attribute(Attr.GEN_AI_RESPONSE_FINISH_REASONS, [result.finish_reason or ""])
                span.set_attribute(Attr.GEN_AI_USAGE_INPUT_TOKENS, result.prompt_tokens)
                span.set_attribute(Attr.GEN_AI_USAGE_OUTPUT_TOKENS, result.completion_tokens)
                if result.cached_prompt_tokens is not None:
                    span.set_attribute(Attr.CACHED_TOKENS, result.cached_prompt_tokens)
        return result

    def _finish(self, version: PromptVersion, label: str | None, arm: str, used_locale: str, stale: bool,
                verdict: Verdict, result: ChatResult, labels: dict[str, str]) -> Evaluation:
        m = self.metrics
        m.count(m.verdicts, 1.0, labels["prompt"], labels["version"], labels["arm"], verdict.decision,
                verdict.category or "-")
        if verdict.fail_reason:
            m.child(m.verdict_failures, reason=verdict.fail_reason, **labels).inc()
        m.count(m.tokens, result.prompt_tokens, version.name, labels["version"], "input")
        m.count(m.tokens, result.completion_tokens, version.name, labels["version"], "output")
        if result.cached_prompt_tokens is not None:
            m.count(m.tokens, result.cached_prompt_tokens, version.name, labels["version"], "cached_input")
        return Evaluation(version=version, label=label, arm=arm, locale=used_locale, stale=stale,
                          verdict=verdict, result=result)
