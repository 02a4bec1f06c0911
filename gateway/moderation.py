"""The moderation service: the one path every front door takes.

`/v1/moderate`, `/v1/moderations` (one call per input), `/v1/chat/completions` with a registry
prompt (streaming or not) and raw chat completions are thin adapters: they parse their wire
format into a `ModerationCall` (or a raw `ChatRequest`), call this service, and render what it
returns. Everything that makes a moderation trustworthy happens here, in this order, for all
of them:

    rollout lookup → subject → traffic assignment → resolve → render → admission
    → backend call → validate (fail closed) → [cascade: the same again with the version's
    second model when the verdict escalates] → record (metrics, decision log, rollout
    evidence, verdict memo, shadow dispatch)

(authentication and the caller's own limits come first, through `admit`, because they decide
whether the body is even read). A second path through the gateway is where the next bypass of
the audit trail or of fail-closed would come from, so there is none: a front door that needs
something new adds it here.

Failures are domain exceptions (`gateway.problems`); a failed moderation is still recorded,
against its rollout arm and in the decision log, when it got as far as a prompt version.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway import cascade
from gateway.auth import Authenticator, _Anonymous
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog, DecisionRecord, FrontDoor
from gateway.limits import CallerLimiter, Lease
from gateway.pipeline import Evaluation, ModerationPipeline
from gateway.problems import Forbidden, ModelRejectedInput, UnknownModel, UnknownPrompt, problem_for
from gateway.prompt_cache import PromptCache, Resolved
from gateway.recording import decision_row, failure_record
from gateway.rollouts.recorder import RolloutRecorder
from gateway.rollouts.shadow import ShadowDispatcher
from gateway.rollouts.traffic import assign
from gateway.samples import SampleRecorder
from gateway.telemetry import Metrics, current_span, stage
from gateway.verdict import Verdict
from prompt_registry import PromptNotFound, PromptSpec, PromptVersion
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.models import PROMPT_NAME_PATTERN
from prompt_registry.rollouts import Rollout
from serving import BackendError, BackendRejectedInput, BackendTimeout, ChatRequest, ChatResult
from serving.protocol import ChatChunk

__all__ = ["Caller", "FrontDoor", "Moderation", "ModerationCall", "ModerationService", "verdict_content"]

log = logging.getLogger("modgate.gateway")

PROMPT_NAME = re.compile(PROMPT_NAME_PATTERN)  # the registry's name rule
_NO_PROMPT = {"prompt": "-", "version": "-", "arm": "-"}
PIN_SCOPE = "moderate:pin"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller holding units of its own quota for one HTTP request (one per
    moderation it asked for)."""

    key_id: str
    name: str
    leases: list[Lease]
    may_pin: bool = False  # holds `moderate:pin`: may ask for a version or label by name

    async def release(self) -> None:
        leases, self.leases[:] = list(self.leases), []
        for lease in leases:
            await lease.release()


@dataclass(frozen=True, slots=True)
class ModerationCall:
    """One listing to moderate, as every front door describes it."""

    front_door: FrontDoor
    request_id: str
    item_id: str
    variables: Mapping[str, object]
    locale: str | None = None
    prompt: str | None = None
    version: int | None = None  # pin a version: no rollout, arm `pinned`
    label: str | None = None  # pin a label other than the production one: arm `pinned`
    subject: str | None = None  # stickiness key; default seller_id (or item_id, per rollout)
    seller_id: str | None = None
    sampling: Mapping[str, Any] | None = None  # caller overrides, already clamped (chat only)
    caller: str | None = None  # the API key's name, for the decision log
    may_pin: bool = False  # the caller holds `moderate:pin` (version/label pins are refused without)
    prompt_field: str = "prompt"  # the wire field that named the prompt, for error messages
    pin_field: str = "prompt_version"  # the wire field that pinned, for error messages


@dataclass(frozen=True, slots=True)
class Moderation:
    """A validated verdict and everything the front doors render about it."""

    request_id: str
    item_id: str
    evaluation: Evaluation
    arm: str
    latency_ms: float
    trace_id: str | None

    @property
    def verdict(self) -> Verdict:
        return self.evaluation.verdict

    @property
    def version(self) -> PromptVersion:
        return self.evaluation.version

    def content(self) -> str:
        """The validated verdict as JSON text, in the prompt's verdict shape: what an OpenAI
        client reads as `message.content`. Never the model's raw text, so a client that reads
        the standard field gets the fail-closed decision too."""
        return verdict_content(self.evaluation)


def verdict_content(ev: Evaluation) -> str:
    v = ev.verdict
    body: dict[str, object] = {"decision": v.decision, "category": v.category}
    if ev.version.spec.verdict.confidence:
        body["confidence"] = v.confidence
    return orjson.dumps(body).decode()


@dataclass(slots=True)
class _Progress:
    """How far a moderation got, for recording a failure (typed, not a dict)."""

    subject: str = ""
    arm: str = "stable"
    rollout: Rollout | None = None
    version: PromptVersion | None = None


def _trace_id() -> str | None:
    ctx = current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None


@dataclass
class ModerationService:
    """Built once at start-up (`gateway.api.app.create_app`); shared by every front door."""

    settings: GatewaySettings
    cache: PromptCache
    pipeline: ModerationPipeline
    auth: Authenticator
    limiter: CallerLimiter
    recorder: RolloutRecorder
    shadows: ShadowDispatcher
    metrics: Metrics
    decision_log: DecisionLog | None = None
    served_models: tuple[str, ...] = ()  # the models the serving layer runs (empty: not checked)
    samples: SampleRecorder | None = None  # listing content for a share of traffic (opt-in)
    clock: Callable[[], float] = field(default=time.perf_counter)

    # -- who may call ------------------------------------------------------------------------

    async def admit(self, authorization: str | None, x_api_key: str | None, *, request_id: str,
                    scope: str = "moderate") -> Caller:
        """Authenticate, check the scope, and take one unit of the caller's own quota (released
        with `Caller.release`). Raises `Unauthenticated`, `Forbidden` or `CallerLimited`."""
        principal = await self.authenticate(authorization, x_api_key, scope=scope)
        lease = await self.limiter.acquire(principal.key_id, request_id, name=principal.name)
        return Caller(principal.key_id, principal.name, [lease], principal.allows(PIN_SCOPE))

    async def charge(self, caller: Caller, units: int, *, request_id: str) -> None:
        """Take *units* of the caller's quota in all (it holds one from `admit`): a request that
        asks for N moderations counts N against its rate and concurrency limits. All or
        nothing: on a refusal the extra units taken are given back before it propagates."""
        taken: list[Lease] = []
        try:
            for i in range(1, units):
                taken.append(await self.limiter.acquire(caller.key_id, f"{request_id}-{i}",
                                                        name=caller.name))
        except BaseException:
            for lease in taken:
                await lease.release()
            raise
        caller.leases.extend(taken)

    async def authenticate(self, authorization: str | None, x_api_key: str | None, *,
                           scope: str) -> ApiKeyRecord | _Anonymous:
        """The calling key, checked for *scope*, without taking any quota (listings of what
        the gateway serves)."""
        with stage(self.pipeline.tracer, self.metrics, "auth", _NO_PROMPT):
            principal = await self.auth.authenticate(authorization, x_api_key)
            self.auth.require(principal, scope)
        return principal

    def deadline(self, started: float) -> float:
        return started + self.settings.request_timeout_s

    def remaining(self, deadline: float) -> float:
        left = deadline - self.clock()
        if left <= 0:
            raise BackendTimeout(f"request deadline of {self.settings.request_timeout_s:.1f}s exceeded")
        return left

    # -- moderation ----------------------------------------------------------------------------

    async def moderate(self, call: ModerationCall, *, started: float) -> Moderation:
        """Moderate one listing. Raises domain exceptions; a failure after the prompt version is
        known is recorded (rollout arm, decision log) before it propagates."""
        progress = _Progress()
        try:
            return await self._moderate(call, started, progress)
        except Exception as exc:
            self._record_failure(call, progress, exc, started)
            raise

    async def moderate_many(self, calls: Sequence[ModerationCall], *, started: float,
                            concurrency: int) -> list[Moderation]:
        """Several listings of one request, at most *concurrency* at a time; the first failure
        decides the answer (the others are cancelled)."""
        semaphore = asyncio.Semaphore(concurrency)

        async def one(call: ModerationCall) -> Moderation:
            async with semaphore:
                return await self.moderate(call, started=started)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(call)) for call in calls]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _moderate(self, call: ModerationCall, started: float, progress: _Progress) -> Moderation:
        settings = self.settings
        name = call.prompt or settings.default_prompt
        if not PROMPT_NAME.match(name):
            raise UnknownPrompt(f"{name[:64]!r}… is not a prompt name" if len(name) > 64 else
                                f"{name!r} is not a prompt name", field=call.prompt_field)
        label_pin = call.label if call.label not in (None, settings.default_label) else None
        pinned = call.version is not None or label_pin is not None
        if pinned and not call.may_pin:
            # A pin bypasses the rollout (and its gates): serving an unpromoted version to live
            # traffic is a privilege of its own, not part of `moderate`.
            raise Forbidden(f"API key {call.caller!r} lacks the {PIN_SCOPE!r} scope needed to "
                            "pin a prompt version or label", field=call.pin_field)
        production = None
        if not pinned:
            # The prompt must exist before its name keys any per-name state (the rollout cache).
            try:
                production = await self.cache.resolve(name, settings.default_label)
            except PromptNotFound as exc:
                raise UnknownPrompt(str(exc), field=call.prompt_field) from None
        rollout = None if pinned else await self.cache.rollout(name)
        if rollout is not None and not rollout.active:
            rollout = None
        subject = call.subject or (call.item_id if rollout is not None and rollout.subject_key == "item_id"
                                   else call.seller_id or call.item_id)
        assignment = assign(rollout, subject, item_id=call.item_id, pin=call.version)
        arm = "pinned" if label_pin is not None else assignment.arm
        progress.subject, progress.arm, progress.rollout = subject, arm, rollout
        label: str | None
        try:
            if label_pin is not None:
                label = label_pin
                resolved = await self.pipeline.resolve(name, label=label_pin, arm="pinned")
            elif assignment.version is None:
                label = settings.default_label
                resolved = await self.pipeline.resolve(name, label=label, resolved=production)
            else:
                label = settings.default_label if assignment.arm == "stable" else None
                resolved = await self.pipeline.resolve(name, version=assignment.version,
                                                       arm=assignment.arm)
        except PromptNotFound as exc:
            raise UnknownPrompt(str(exc), field=call.prompt_field) from None
        progress.version = resolved.version
        variables = call.variables
        if variables.get("locale") is None:  # templates may show the locale; default: the prompt's
            variables = {**variables, "locale": call.locale or resolved.version.spec.default_locale}
        ev = await cascade.evaluate(  # the version's own model, then its cascade's if it escalates
            self.pipeline, resolved, variables, call.locale, request_id=call.request_id,
            timeout_s=self.remaining(self.deadline(started)), label=label, arm=arm,
            sampling=call.sampling)
        verdict = ev.verdict
        if verdict.fail_reason:
            log.warning("moderation %s: model output rejected (%s); answering %s", call.request_id,
                        verdict.fail_reason, verdict.decision)
        latency_ms = (self.clock() - started) * 1000.0
        trace_id = _trace_id()
        if self.decision_log is not None:
            record = decision_row(
                ev, request_id=call.request_id, item_id=call.item_id, subject=subject,
                arm=arm, latency_ms=latency_ms, trace_id=trace_id,
                front_door=call.front_door, caller=call.caller)
            if self.decision_log.durable:
                # durable mode: no answer leaves before its record is on disk (and none is
                # counted as evidence either: DecisionLogUnavailable fails the request here)
                await self.decision_log.append_durable(record)
            else:
                self.decision_log.append(record)
        if self.samples is not None:  # never blocks: a full queue drops and counts
            self.samples.offer(request_id=call.request_id, item_id=call.item_id,
                               variables=variables, ev=ev, arm=arm)
        if rollout is not None and arm in ("stable", "canary"):
            self.recorder.primary(rollout.id, arm, verdict, latency_ms)
            self.recorder.memo(call.request_id, rollout.id, arm, name, ev.version.version, verdict)
            for version in assignment.shadows:
                self.shadows.submit(rollout, version, ev, variables, call.locale,
                                    request_id=call.request_id, item_id=call.item_id, subject=subject)
        self.metrics.observe_stage(latency_ms / 1000.0, "total", {"prompt": ev.version.name,
                                   "version": str(ev.version.version), "arm": arm})
        return Moderation(request_id=call.request_id, item_id=call.item_id, evaluation=ev,
                          arm=arm, latency_ms=latency_ms, trace_id=trace_id)

    def _record_failure(self, call: ModerationCall, progress: _Progress, exc: Exception,
                        started: float) -> None:
        """A failed moderation still counts: against its rollout arm, and in the decision log.
        Only failures of ours or of the model (5xx) are decisions that did not happen; a
        refusal (4xx: overloaded, unknown prompt) is not."""
        problem = problem_for(exc)
        if problem is None or problem.status < 500 or progress.version is None:
            return
        latency_ms = (self.clock() - started) * 1000.0
        rollout = progress.rollout
        if rollout is not None and progress.arm in ("stable", "canary"):
            self.recorder.primary(rollout.id, progress.arm, None, latency_ms)
        self.metrics.child(self.metrics.errors, prompt=progress.version.name, arm=progress.arm,
                           type=problem.type).inc()
        if self.decision_log is not None:
            self.decision_log.append(failure_record(
                progress.version, request_id=call.request_id, item_id=call.item_id,
                subject=progress.subject, arm=progress.arm, error_type=problem.type,
                latency_ms=latency_ms, trace_id=_trace_id(), front_door=call.front_door,
                caller=call.caller))

    # -- drafts ---------------------------------------------------------------------------------

    async def try_draft(self, spec: PromptSpec, listings: Sequence[Mapping[str, object]], *,
                        locale: str | None, started: float, request_id: str,
                        caller: str | None) -> list[Evaluation]:
        """Evaluate an unpublished prompt spec on a handful of listings (the console's
        playground): the same render, admission, backend call and fail-closed validation as a
        moderation, but no version is published, no rollout is touched and nothing goes to the
        decision log (a draft's verdicts are not decisions). Metrics carry `arm="draft"`,
        `version="0"`. The caller's quota was charged one unit per listing by the adapter."""
        for model in spec.models():
            if self.served_models and model not in self.served_models:
                raise UnknownModel(f"the draft names model {model!r}, which this gateway does not "
                                   f"serve (served: {', '.join(self.served_models)})",
                                   field="model" if model == spec.model else "cascade.model")
        version = PromptVersion.model_construct(spec=spec, version=0, content_hash=spec.content_hash(),
                                                created_at=datetime.now(UTC), created_by=caller or "")
        resolved = Resolved(version, stale=False)
        deadline = self.deadline(started)
        semaphore = asyncio.Semaphore(4)

        async def one(i: int, listing: Mapping[str, object]) -> Evaluation:
            async with semaphore:
                variables = {**listing}
                if variables.get("locale") is None:
                    variables["locale"] = locale or spec.default_locale
                return await cascade.evaluate(
                    self.pipeline, resolved, variables, locale, request_id=f"{request_id}-{i}",
                    timeout_s=self.remaining(deadline), label=None, arm="draft")

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, listing)) for i, listing in enumerate(listings)]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    # -- raw chat ------------------------------------------------------------------------------

    async def raw_chat(self, chat: ChatRequest, *, started: float, caller: str | None) -> ChatResult:
        """A chat completion with the caller's own messages (no registry prompt): through
        admission, with spans and metrics, recorded in the decision log as `raw_chat` without
        any content."""
        deadline = self.deadline(started)
        error: str | None = None
        result: ChatResult | None = None
        try:
            async with self.pipeline.admission.slot(chat.model, timeout_s=self.remaining(deadline)):
                result = await self.pipeline.call_backend(
                    chat, {"prompt": "-", "version": "-", "arm": "raw"}, deadline)
            return result
        except Exception as exc:
            failure = _raw_failure(exc)
            error = _error_type(failure)
            if failure is exc:
                raise
            raise failure from None
        finally:
            self._record_raw(chat, started, caller, result, error)

    async def raw_stream(self, chat: ChatRequest, *, started: float,
                         caller: str | None) -> AsyncGenerator[ChatChunk, None]:
        """The streaming form of `raw_chat`: the engine slot is held until the stream ends; the
        first chunk is awaited by the adapter before it sends headers, so a failure before any
        text still gets a real status."""
        deadline = self.deadline(started)
        chunks: list[ChatChunk] = []
        error: str | None = None
        async with self.pipeline.admission.slot(chat.model, timeout_s=self.remaining(deadline)):
            stream = self.pipeline.backend.stream_chat(chat, timeout_s=self.remaining(deadline))
            try:
                async for chunk in stream:
                    if chunk.finish_reason or chunk.prompt_tokens is not None:
                        chunks.append(chunk)
                    yield chunk
            except Exception as exc:
                failure = _raw_failure(exc)
                error = _error_type(failure)
                if failure is exc:
                    raise
                raise failure from None
            finally:
                close = getattr(stream, "aclose", None)  # backends return async generators
                if close is not None:
                    await close()
                self._record_raw_stream(chat, started, caller, chunks, error)

    def _record_raw_stream(self, chat: ChatRequest, started: float, caller: str | None,
                           chunks: list[ChatChunk], error: str | None) -> None:
        prompt_tokens = next((c.prompt_tokens for c in reversed(chunks) if c.prompt_tokens is not None), None)
        completion_tokens = next((c.completion_tokens for c in reversed(chunks)
                                  if c.completion_tokens is not None), None)
        self._append_raw(chat, started, caller, error, prompt_tokens, completion_tokens, chat.model)

    def _record_raw(self, chat: ChatRequest, started: float, caller: str | None,
                    result: ChatResult | None, error: str | None) -> None:
        self._append_raw(chat, started, caller, error if result is None else None,
                         result.prompt_tokens if result else None,
                         result.completion_tokens if result else None,
                         result.model if result else chat.model)

    def _append_raw(self, chat: ChatRequest, started: float, caller: str | None, error: str | None,
                    prompt_tokens: int | None, completion_tokens: int | None, model: str) -> None:
        m = self.metrics
        if prompt_tokens is not None:
            m.child(m.tokens, prompt="-", version="-", kind="input").inc(prompt_tokens)
        if completion_tokens is not None:
            m.child(m.tokens, prompt="-", version="-", kind="output").inc(completion_tokens)
        if error is not None:
            m.child(m.errors, prompt="-", arm="raw", type=error).inc()
        if self.decision_log is None:
            return
        self.decision_log.append(DecisionRecord(
            ts=datetime.now(UTC), kind="raw_chat", request_id=chat.request_id or "",
            item_id=chat.request_id or "", subject=caller or "-", prompt_name=None,
            prompt_version=None, arm="raw", front_door="chat", caller=caller,
            error_type=error, model=model,
            latency_ms=round((self.clock() - started) * 1000.0, 3), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, trace_id=_trace_id()))

    # -- readiness -----------------------------------------------------------------------------

    async def resolve_default(self) -> Resolved:
        return await self.cache.resolve(self.settings.default_prompt, self.settings.default_label)


def _raw_failure(exc: Exception) -> Exception:
    """What a raw chat completion's failure is for its caller: an upstream refusal of the
    caller's own parameters is the caller's 400 (`ModelRejectedInput`), anything else as is."""
    if isinstance(exc, BackendRejectedInput):
        return ModelRejectedInput(str(exc), field=exc.param)
    return exc


def _error_type(exc: Exception) -> str:
    problem = problem_for(exc)
    if problem is not None:
        return problem.type
    return "internal_error" if not isinstance(exc, BackendError) else type(exc).__name__
