"""The gateway's ASGI app: wiring only.

`create_app` builds the parts once (prompt cache, auth, caller limits, admission, pipeline,
rollout recorder, shadow dispatcher, rollout controller, and the moderation service they make
up), ties their background work to the app's lifespan, installs the one error edge and mounts
the adapters. What a request does lives in `gateway.moderation`; how a route reads and writes
its wire format lives in the adapter modules of this package. `gateway.bootstrap` builds the
real dependencies from a configuration file and calls this.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.admission import AdmissionControl
from gateway.api.admin import build_admin_router
from gateway.api.console import CONSOLE_WRITES, build_console_router, mount_offline_docs
from gateway.api.console.sessions import SessionBackend
from gateway.api.decisions import build_decisions_router
from gateway.api.edge import error_response, http_error_headers, problem_of, request_id_of
from gateway.api.feedback import build_feedback_router
from gateway.api.guard import RequestGuard
from gateway.api.moderate import add_moderate_route
from gateway.api.openai import build_openai_router
from gateway.api.ops import build_ops_router
from gateway.api.review import ReviewQueue, build_review_router
from gateway.api.rollouts import build_rollout_router
from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.feedback import FeedbackLog
from gateway.limits import CallerLimiter, build_caller_limiter
from gateway.moderation import ModerationService
from gateway.pipeline import ModerationPipeline
from gateway.problems import PROBLEM_TABLE, ApiError, Problem
from gateway.prompt_cache import PromptCache
from gateway.rollouts.controller import RolloutController
from gateway.rollouts.recorder import RolloutRecorder
from gateway.rollouts.shadow import ShadowDispatcher
from gateway.samples import SampleRecorder
from gateway.telemetry import Metrics
from gateway.webhooks import WebhookDispatcher
from prompt_registry import PromptStore
from serving import InferenceBackend

__all__ = ["Gateway", "create_app"]

# The front doors authenticate before reading and bound their own bodies (gateway.api.edge).
# The console's writes authenticate (session + CSRF token) before reading and bound their bodies.
SELF_GUARDED = frozenset({"/v1/moderate", "/v1/moderations", "/v1/chat/completions", "/v1/decisions",
                          *CONSOLE_WRITES})
ADMIN_MAX_BODY_BYTES = 1 << 20  # publishing a prompt file

log = logging.getLogger("modgate.gateway")


@dataclass(frozen=True)
class Gateway:
    """The parts of one running gateway (`app.state.gateway`): what tests and benchmarks may
    look at, in one typed place."""

    service: ModerationService
    admission: AdmissionControl
    recorder: RolloutRecorder
    shadows: ShadowDispatcher
    controller: RolloutController
    cache: PromptCache
    metrics: Metrics


def create_app(
    settings: GatewaySettings,
    store: PromptStore,
    backend: InferenceBackend,
    *,
    cache: PromptCache | None = None,
    tracer_provider: TracerProvider | None = None,
    metrics: Metrics | None = None,
    models: list[str] | None = None,
    decision_log: DecisionLog | None = None,
    feedback_log: FeedbackLog | None = None,
    limiter: CallerLimiter | None = None,
    webhooks: WebhookDispatcher | None = None,
    samples: SampleRecorder | None = None,
    console_sessions: SessionBackend | None = None,
) -> FastAPI:
    """Build the gateway app. The caller owns `store`; the app closes `backend` on shutdown
    (and shuts down `tracer_provider`, flushing spans)."""
    metrics = metrics or Metrics()
    limiter = limiter or build_caller_limiter(settings.caller_limits, registry=metrics.registry)
    provider = tracer_provider or TracerProvider(sampler=ALWAYS_OFF)
    tracer = provider.get_tracer("modgate.gateway")
    cache = cache or PromptCache(store, refresh_s=settings.prompt_refresh_s,
                                 max_staleness_s=settings.prompt_max_staleness_s)
    auth = Authenticator(store, required=settings.auth == "required", cache_s=settings.key_cache_s)
    admission = AdmissionControl(max_inflight=settings.max_inflight_per_model,
                                 max_queued=settings.max_queued_per_model)
    pipeline = ModerationPipeline(cache, backend, tracer=tracer, metrics=metrics, admission=admission,
                                  top_logprobs=settings.verdict_top_logprobs or None)
    recorder = RolloutRecorder(store)
    shadows = ShadowDispatcher(pipeline, recorder, max_concurrency=settings.shadow.max_concurrency,
                               max_pending=settings.shadow.max_pending, timeout_s=settings.shadow.timeout_s,
                               priority=settings.shadow.priority, decision_log=decision_log)
    controller = RolloutController(store, recorder, interval_s=settings.rollout_tick_s,
                                   production_label=settings.default_label)
    service = ModerationService(settings=settings, cache=cache, pipeline=pipeline, auth=auth,
                                limiter=limiter, recorder=recorder, shadows=shadows, metrics=metrics,
                                decision_log=decision_log, served_models=tuple(models or ()),
                                samples=samples)
    preload_keys = [(name, settings.default_label)
                    for name in dict.fromkeys([settings.default_prompt, *settings.preload_prompts])]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        cache.start()
        recorder.start()
        if settings.rollout_controller:
            controller.start()
        if webhooks is not None:
            webhooks.start()
        if decision_log is not None:
            await decision_log.start()
        if samples is not None:
            samples.start()
        failures = {k: e for k, e in (await cache.preload(preload_keys)).items() if e}
        for (name, label), error in failures.items():
            log.error("prompt %s:%s could not be preloaded: %s", name, label, error)
        try:
            yield
        finally:
            await shadows.aclose()
            await controller.aclose()
            await recorder.aclose()
            if decision_log is not None:
                await decision_log.aclose()
            if samples is not None:
                await samples.aclose()
            if webhooks is not None:
                await webhooks.aclose()
            await cache.aclose()
            await backend.aclose()
            await limiter.aclose()
            provider.shutdown()

    app = FastAPI(
        title="modgate",
        summary="Content-moderation gateway: versioned prompts served on vLLM via Ray Serve",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # /docs is served offline (gateway.api.console.docs); ReDoc needs a CDN
        redoc_url=None,
    )
    app.router.redirect_slashes = False  # a redirect would be built from the caller's Host header
    app.add_middleware(RequestGuard, auth=auth, routes=app.router.routes, self_guarded=SELF_GUARDED,
                       max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                       body_limits={"/v1/prompts": ADMIN_MAX_BODY_BYTES})
    app.state.gateway = Gateway(service=service, admission=admission, recorder=recorder,
                                shadows=shadows, controller=controller, cache=cache, metrics=metrics)
    _install_error_edge(app)

    add_moderate_route(app, service, tracer, metrics)  # the hot route, matched first
    app.include_router(build_openai_router(service, tracer, metrics, list(models or [])))
    app.include_router(build_decisions_router(service, tracer, metrics))
    app.include_router(build_admin_router(store, auth, protected_labels=settings.protected_labels,
                                          production_label=settings.default_label,
                                          on_change=cache.refresh_now,
                                          served_models=list(models) if models else None))
    app.include_router(build_feedback_router(store, auth, recorder, feedback_log, cache=cache,
                                             default_prompt=settings.default_prompt,
                                             default_label=settings.default_label))
    app.include_router(build_rollout_router(store, auth, production_label=settings.default_label,
                                            on_change=cache.refresh_now,
                                            served_models=list(models) if models else None))
    app.include_router(build_ops_router(service, backend, preload_keys,
                                        serve_metrics=settings.metrics_port is None))
    review_queue = ReviewQueue(samples.store if samples is not None else None, feedback_log, cache)
    app.state.review_queue = review_queue  # the console's queue page shows the same queue
    app.include_router(build_review_router(review_queue, auth, store))
    mount_offline_docs(app)
    if settings.console.enabled:
        app.include_router(build_console_router(app, store, auth, service, settings, recorder=recorder,
                                                feedback_log=feedback_log, sessions=console_sessions))
    return app


def _install_error_edge(app: FastAPI) -> None:
    """Routes that do not render their own errors (admin, rollouts, feedback, ops) end here:
    every exception goes through the one table (`gateway.problems`) and out in our shape."""

    async def _any_error(request: Request, exc: Exception) -> Response:
        rid = request_id_of(request)
        return error_response(problem_of(exc, rid, request.url.path), rid)

    # Every class of the table gets the handler, so Starlette answers them in its exception
    # middleware (a handler for `Exception` alone runs in the server-error middleware, which
    # answers and then re-raises); `Exception` stays the net for our bugs.
    handled: list[type[Exception]] = [ApiError, *(c for c in PROBLEM_TABLE if issubclass(c, Exception)),
                                      Exception]
    for cls in handled:
        app.add_exception_handler(cls, _any_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        fields = tuple({"field": ".".join(str(p) for p in e["loc"] if p != "body") or "(body)",
                        "problem": "unknown field" if e["type"] == "extra_forbidden" else e["msg"]}
                       for e in exc.errors())
        return error_response(Problem(422, "invalid_request", "request failed validation",
                                      fields=fields), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        response = error_response(Problem(exc.status_code, kind, str(exc.detail)),
                                  request_id_of(request))
        for key, value in http_error_headers(request, exc).items():
            response.headers[key] = value
        return response
