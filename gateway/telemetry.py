"""Tracing (OpenTelemetry) and metrics (Prometheus) for the gateway.

Attribute names live here, in one place. GenAI semantic conventions (`gen_ai.*`) where they
exist; our own (`prompt.*`, `traffic.arm`, `moderation.*`, `shadow.of`) beside them. Listing
content, API keys and auth headers are never put in spans, metrics or logs.

Trace shape for one moderation (the engine's own `llm_request` span joins the same trace when
vLLM is started with `otlp_traces_endpoint`, because the HTTP backend sends `traceparent`):

    POST /v1/moderate            SERVER  (parent: the caller's traceparent, if any)
      ├─ auth
      ├─ prompt.resolve
      ├─ prompt.render
      ├─ chat <model>            CLIENT  gen_ai.* attributes
      │    └─ llm_request        (vLLM engine, via Ray Serve)
      └─ verdict.validate
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from bisect import bisect_left
from contextvars import ContextVar, Token
from typing import Any, Literal, cast

from opentelemetry import context, trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Attr", "Metrics", "TracingSettings", "build_tracer_provider", "current_span", "request_span", "stage"]


class Attr:
    """Span attribute names."""

    GEN_AI_OPERATION = "gen_ai.operation.name"
    GEN_AI_PROVIDER = "gen_ai.provider.name"
    GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
    GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
    GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    PROMPT_NAME = "prompt.name"
    PROMPT_VERSION = "prompt.version"
    PROMPT_LABEL = "prompt.label"
    PROMPT_LOCALE = "prompt.locale"
    PROMPT_STALE = "prompt.stale"
    TRAFFIC_ARM = "traffic.arm"
    SHADOW_OF = "shadow.of"
    DECISION = "moderation.decision"
    CATEGORY = "moderation.category"
    FAIL_REASON = "moderation.fail_reason"
    ERROR_TYPE = "error.type"
    REQUEST_ID = "modgate.request_id"
    CACHED_TOKENS = "modgate.usage.cached_input_tokens"


class TracingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exporter: Literal["none", "console", "otlp_grpc", "otlp_http"] = "none"
    endpoint: str | None = Field(None, description="collector endpoint, e.g. http://otel-collector:4317 "
                                 "(grpc) or http://otel-collector:4318/v1/traces (http)")
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="share of new traces recorded; "
                                "a caller's sampled traceparent is always honoured")
    service_name: str = "modgate-gateway"
    export_batch_size: int = Field(
        64, ge=1, le=4096, description="spans per export. Encoding a batch holds the interpreter "
        "lock on the request thread's process, so small frequent batches keep request p99 flat "
        "(OpenTelemetry's default of 512 paused requests ~10 ms at each export)")
    export_interval_ms: int = Field(500, ge=10, le=60_000, description="longest a span waits "
                                    "before it is exported")


def build_tracer_provider(settings: TracingSettings, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider for the gateway. *exporter* overrides the configured one (tests pass an
    in-memory exporter and get synchronous export)."""
    root = TraceIdRatioBased(settings.sample_ratio)
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(root), id_generator=_RootIds(root.bound),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    if settings.exporter == "console":
        provider.add_span_processor(_batch(ConsoleSpanExporter(), settings))
    elif settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        provider.add_span_processor(_batch(GrpcExporter(endpoint=settings.endpoint, insecure=True), settings))
    elif settings.exporter == "otlp_http" and settings.endpoint and not _stock_otlp_options():
        from gateway.span_export import OtlpHttpSpanExporter

        provider.add_span_processor(_batch(OtlpHttpSpanExporter(settings.endpoint), settings))
    elif settings.exporter == "otlp_http":
        import requests
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        # The exporter's own session, minus the environment lookups `requests` makes on every
        # export (~/.netrc, proxy variables): they cost the event loop GIL time in profiles, and
        # a trace collector is a sidecar or an in-cluster service, not something behind a proxy.
        session = requests.Session()
        session.trust_env = False
        provider.add_span_processor(_batch(HttpExporter(endpoint=settings.endpoint, session=session),
                                           settings))
    return provider


# Options of OpenTelemetry's own OTLP/HTTP exporter that gateway.span_export does not implement:
# when one is set in the environment, the stock exporter runs, so that it applies.
_STOCK_OTLP_ENV = tuple(f"OTEL_EXPORTER_OTLP_{signal}{option}" for signal in ("", "TRACES_")
                        for option in ("HEADERS", "COMPRESSION", "CERTIFICATE", "CLIENT_KEY",
                                       "CLIENT_CERTIFICATE", "TIMEOUT"))


def _stock_otlp_options() -> list[str]:
    return [name for name in _STOCK_OTLP_ENV if os.environ.get(name)]


def _batch(exporter: SpanExporter, settings: TracingSettings) -> BatchSpanProcessor:
    return BatchSpanProcessor(exporter, max_export_batch_size=settings.export_batch_size,
                              schedule_delay_millis=settings.export_interval_ms)


# -- the request's root span, and the current span, without the API's layers ---------------------
#
# With 10 % sampling nine requests in ten are not recorded, yet going through the OpenTelemetry
# API cost them the sampler, two generator context managers and, at every stage, a chain of five
# calls to find the current span. `request_span` decides the sampling of a new trace itself, with
# the provider's own rule on the same random trace id, and makes the unsampled root exactly as the
# SDK would (same ids, flags and context key: the W3C `traceparent` sent upstream and the shadow's
# link are unchanged); a sampled root, or any request with a caller's trace context, still goes
# through the SDK. `current_span` reads the context variable the API reads.

_RUNTIME = context._RUNTIME_CONTEXT  # noqa: SLF001 - read only, to skip the API's call chain
_CURRENT: ContextVar[context.Context] | None = (
    _RUNTIME._current_context if type(_RUNTIME) is ContextVarsRuntimeContext else None)  # noqa: SLF001


def current_span() -> trace.Span:
    """`trace.get_current_span()`, in two C calls when the default context runtime is in use."""
    if _CURRENT is None:
        return trace.get_current_span()
    span = _CURRENT.get().get(_SPAN_KEY)
    return INVALID_SPAN if span is None else cast(trace.Span, span)


class _RootIds(RandomIdGenerator):
    """The SDK's random ids, plus what `request_span` needs to decide a new trace's sampling
    before the SDK does: the ratio sampler's bound, and a trace id drawn ahead (`prime`) that
    the SDK's next `generate_trace_id` on this thread returns, so a root `request_span` found
    sampled is sampled by the SDK on the same id (not drawn twice: that would sample 1 % at a
    10 % ratio)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._primed = threading.local()
        self._tracer: object = None
        self._fast = False

    def prime(self, trace_id: int) -> None:
        self._primed.trace_id = trace_id

    def generate_trace_id(self) -> int:
        primed: int | None = getattr(self._primed, "trace_id", None)
        if primed is not None:
            self._primed.trace_id = None
            return primed
        return super().generate_trace_id()

    def fast_for(self, tracer: trace.Tracer) -> bool:
        """Whether *tracer* starts spans exactly as `request_span` assumes: enabled, and
        without the SDK's own span metrics (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED), which
        count unsampled spans too."""
        if tracer is not self._tracer:
            enabled = getattr(tracer, "_is_enabled", None)
            metrics = getattr(tracer, "_tracer_metrics", None)
            self._fast = (_CURRENT is not None and getattr(tracer, "id_generator", None) is self
                          and enabled is not None and bool(enabled())
                          and type(metrics).__name__ == "NoOpTracerMetrics")
            self._tracer = tracer
        return self._fast


_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
# An unsampled span of a random trace id: the SDK sets W3C's random-trace-id flag (0x02).
_UNSAMPLED_FLAGS = TraceFlags(TraceFlags.RANDOM_TRACE_ID)


class request_span:  # noqa: N801 - used like tracer.start_as_current_span, which it stands for
    """`tracer.start_as_current_span(name, context=parent, kind=SERVER, attributes=...)` for a
    request's root span. A new trace (no caller's context, no current span) that the ratio
    does not sample becomes a non-recording span made and made current here, as the SDK makes
    it, without the SDK's layers; everything else is the SDK's own call."""

    __slots__ = ("tracer", "name", "parent", "attributes", "token", "cm")

    def __init__(self, tracer: trace.Tracer, name: str, parent: context.Context | None,
                 attributes: dict[str, Any]) -> None:
        self.tracer, self.name, self.parent, self.attributes = tracer, name, parent, attributes
        self.token: Token[context.Context] | None = None
        self.cm: Any = None

    def __enter__(self) -> trace.Span:
        ids = getattr(self.tracer, "id_generator", None)
        if (self.parent is None and type(ids) is _RootIds and ids.fast_for(self.tracer)
                and _CURRENT is not None):
            current = _CURRENT.get()
            if current.get(_SPAN_KEY) is None:
                trace_id = random.getrandbits(128)
                while not trace_id:
                    trace_id = random.getrandbits(128)
                if trace_id & _LIMIT >= ids.bound:
                    span = NonRecordingSpan(SpanContext(trace_id, ids.generate_span_id(), False,
                                                        _UNSAMPLED_FLAGS))
                    self.token = _CURRENT.set(context.Context({**current, _SPAN_KEY: span}))
                    return span
                ids.prime(trace_id)
        self.cm = self.tracer.start_as_current_span(self.name, context=self.parent, kind=SpanKind.SERVER,
                                                    attributes=self.attributes)
        return cast(trace.Span, self.cm.__enter__())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self.token is not None:
            assert _CURRENT is not None
            _CURRENT.reset(self.token)
        else:
            self.cm.__exit__(exc_type, exc, tb)



_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
_BOUNDS = (*_LATENCY_BUCKETS, math.inf)  # stage_seconds' upper bounds, as prometheus-client holds them


class Metrics:
    """Prometheus metrics on a registry of their own (served at /metrics).

    `child(metric, **labels)` memoises labelled children: `labels()` takes a lock and builds a
    tuple on every call, which showed up in the gateway's hot-path profile."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[tuple[str, str], ...]], Any] = {}
        self._values: dict[tuple[Counter | Gauge, tuple[str, ...]], Any] = {}
        self._stages: dict[tuple[str, str, str, str], tuple[Any, list[Any]]] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("modgate_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.stage_seconds = Histogram(
            "modgate_stage_seconds", "Time spent per request stage",
            ["stage", "prompt", "version", "arm"], buckets=_LATENCY_BUCKETS, registry=r)
        self.verdicts = Counter("modgate_verdicts", "Verdicts by prompt version, arm, decision and category",
                                ["prompt", "version", "arm", "decision", "category"], registry=r)
        self.verdict_failures = Counter(
            "modgate_verdict_failures", "Model outputs that could not be used (answered needs_review)",
            ["prompt", "version", "arm", "reason"], registry=r)
        self.escalations = Counter(
            "modgate_escalations", "Cascade escalations to a version's second model, by trigger "
            "(needs_review, low_margin, margin_unavailable, low_confidence) and outcome (answered, failed)",
            ["prompt", "version", "arm", "trigger", "outcome"], registry=r)
        self.errors = Counter("modgate_moderation_errors", "Moderations answered with an error",
                              ["prompt", "arm", "type"], registry=r)
        self.tokens = Counter("modgate_tokens", "Tokens by prompt version and kind (input, output, "
                              "cached_input)", ["prompt", "version", "kind"], registry=r)
        # multiprocess_mode: how the worker processes of one gateway (gateway.workers) add up.
        self.inflight = Gauge("modgate_inflight_requests", "Moderations in progress", ["model"],
                              registry=r, multiprocess_mode="livesum")
        self.shed = Counter("modgate_shed_requests", "Requests refused with 429 because a model's "
                            "queue was full", ["model"], registry=r)
        self.shadow_dropped = Counter("modgate_shadow_dropped", "Shadow evaluations dropped because "
                                      "the shadow queue was full", ["prompt", "version"], registry=r)
        self.shadow_comparisons = Counter(
            "modgate_shadow_comparisons", "Shadow verdicts compared with the stable verdict, by whether "
            "the decisions agree (sum over replicas; agreement = agree=true / all)",
            ["prompt", "stable_version", "candidate_version", "agree"], registry=r)
        self.cache_events = Counter("modgate_prompt_cache_events", "Prompt cache activity",
                                    ["kind"], registry=r)
        self.cache_age = Gauge("modgate_prompt_cache_age_seconds",
                               "Seconds since each cached prompt label was last read from the store",
                               ["prompt", "label"], registry=r, multiprocess_mode="liveall")
        self.cache_stale = Gauge("modgate_prompt_cache_stale",
                                 "1 while a prompt label is served as last-known-good", ["prompt", "label"],
                                 registry=r, multiprocess_mode="liveall")


    def child(self, metric: Any, **labels: str) -> Any:
        key = (id(metric), tuple(labels.items()))
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(**labels)
        return c

    # The hot path's own calls (~20 changes per moderation): the labelled child's value is
    # looked up once per label set and changed directly, skipping prometheus-client's per-call
    # layers (the keyword labels, the observability checks and, for histograms, the loop over
    # the buckets). The values are prometheus-client's own (or gateway.metric_files' in
    # worker mode), so scrapes and the multiprocess files see exactly what `child(...).inc()`
    # and `.observe()` would have made.

    def count(self, counter: Counter, amount: float, *labelvalues: str) -> None:
        """`counter.labels(*labelvalues).inc(amount)`: label values in the counter's label order."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value = self._values.get((counter, labelvalues))
        if value is None:
            value = self._values[(counter, labelvalues)] = counter.labels(*labelvalues)._value  # noqa: SLF001
        value.inc(amount)

    def gauge_add(self, gauge: Gauge, amount: float, *labelvalues: str) -> None:
        """`gauge.labels(*labelvalues).inc(amount)` (a negative amount: `dec`)."""
        value = self._values.get((gauge, labelvalues))
        if value is None:
            value = self._values[(gauge, labelvalues)] = gauge.labels(*labelvalues)._value  # noqa: SLF001
        value.inc(amount)

    def observe_stage(self, seconds: float, stage: str, labels: dict[str, str]) -> None:
        """`stage_seconds.labels(stage=stage, **labels).observe(seconds)`; *labels* holds
        prompt, version and arm."""
        key = (stage, labels["prompt"], labels["version"], labels["arm"])
        bucketed = self._stages.get(key)
        if bucketed is None:
            child = self.stage_seconds.labels(*key)
            bucketed = self._stages[key] = (child._sum, child._buckets)  # noqa: SLF001
        bucketed[0].inc(seconds)
        # prometheus' bucket: the first upper bound >= seconds (the last is +Inf)
        bucketed[1][bisect_left(_BOUNDS, seconds)].inc(1.0)


class stage:  # noqa: N801 - used like the context-manager function it replaced
    """A span and a histogram observation for one stage of a request. Inside a trace that is not
    sampled no child span is made at all (the parent's non-recording span stands in): with
    10 % sampling, 90 % of requests skip the span machinery. A class rather than a
    @contextmanager generator: it runs several times per request, and the generator protocol
    cost more than the work. A sampled stage's span is started and made current by hand
    (`start_span`, `context.attach`) rather than through `start_as_current_span`, whose two
    nested generator context managers cost more than the span; on an exception it records it
    and sets the ERROR status exactly as `trace.use_span` does."""

    __slots__ = ("tracer", "metrics", "name", "labels", "attributes", "start", "span", "token")

    def __init__(self, tracer: trace.Tracer, metrics: Metrics, name: str, labels: dict[str, str],
                 attributes: dict[str, Any] | None = None) -> None:
        self.tracer, self.metrics, self.name = tracer, metrics, name
        self.labels, self.attributes = labels, attributes
        self.span: trace.Span | None = None

    def __enter__(self) -> trace.Span:
        self.start = time.perf_counter()
        current = current_span()
        if current.is_recording():
            span = self.span = self.tracer.start_span(self.name, attributes=self.attributes)
            self.token = context.attach(trace.set_span_in_context(span))
            return span
        return current

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        span = self.span
        if span is not None:
            context.detach(self.token)
            if isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
        self.metrics.observe_stage(time.perf_counter() - self.start, self.name, self.labels)
