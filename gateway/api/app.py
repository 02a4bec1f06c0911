"""The gateway's HTTP API: `POST /v1/moderate`, `GET /healthz`, `GET /readyz`.

Request path: read the body under a size limit → validate → resolve the prompt label from the
in-memory cache → render in the sandbox → call the model with a constrained output shape and a
deadline → validate the verdict (fail closed) → answer with the prompt version that served it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.admission import AdmissionControl
from gateway.api.admin import build_admin_router
from gateway.api.models import ErrorBody, ModerationRequest, ModerationResponse
from gateway.api.openai import build_openai_router
from gateway.api.rollouts import build_rollout_router
from gateway.api.routing import DirectRoute
from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.errors import (
    ERROR_RESPONSES,
    ApiError,
    error_response,
    http_error_headers,
    json_response,
    map_exception,
    read_json_object,
)
from gateway.feedback import FeedbackLog, build_feedback_router
from gateway.ids import new_id
from gateway.limits import CallerLimiter, build_caller_limiter
from gateway.pipeline import ModerationPipeline
from gateway.prompt_cache import PromptCache
from gateway.recording import decision_record, failure_record
from gateway.rollouts.controller import RolloutController
from gateway.rollouts.recorder import RolloutRecorder
from gateway.rollouts.shadow import ShadowDispatcher
from gateway.rollouts.traffic import assign
from gateway.telemetry import Attr, Metrics, stage
from prompt_registry import PromptNotFound, PromptStore, RegistryError
from serving import BackendError, ChatRequest, InferenceBackend

__all__ = ["create_app"]

T = TypeVar("T")

log = logging.getLogger("modgate.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")






def _validation_fields(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append({"field": loc, "problem": msg})
    return out


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run *work*, cancelling it if the caller disconnects first, so the engine call is
    aborted (closing the backend connection makes Ray Serve and vLLM drop the request) instead
    of computing a verdict nobody will read. Call only after the body has been read. One
    watcher task per request; the work itself runs inline in the request's task."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                me.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            me.uncancel()
            raise ApiError(499, "client_disconnected", "the caller went away; work was aborted") from None
        raise
    finally:
        watcher.cancel()


_TRACE_HEADERS = (b"traceparent", b"tracestate")


def _incoming_trace_context(request: Request) -> Any:
    """The caller's W3C trace context, read in one pass over the raw headers (the propagator
    API on Starlette's header mapping cost ~9 % of a request in profiles)."""
    carrier = {k.decode(): v.decode("latin-1") for k, v in request.scope["headers"] if k in _TRACE_HEADERS}
    return propagate.extract(carrier) if carrier else None


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None


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
    preload_keys = [(name, settings.default_label)
                    for name in dict.fromkeys([settings.default_prompt, *settings.preload_prompts])]

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        cache.start()
        recorder.start()
        if settings.rollout_controller:
            controller.start()
        if decision_log is not None:
            await decision_log.start()
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
            await cache.aclose()
            await backend.aclose()
            await limiter.aclose()
            provider.shutdown()

    app = FastAPI(
        title="modgate",
        summary="Content-moderation gateway: versioned prompts served on vLLM via Ray Serve",
        version="0.1.0",
        lifespan=lifespan,
    )
    admission = AdmissionControl(max_inflight=settings.max_inflight_per_model,
                                 max_queued=settings.max_queued_per_model)
    pipeline = ModerationPipeline(cache, backend, tracer=tracer, metrics=metrics, admission=admission)
    recorder = RolloutRecorder(store)
    shadows = ShadowDispatcher(pipeline, recorder, max_concurrency=settings.shadow.max_concurrency,
                               max_pending=settings.shadow.max_pending, timeout_s=settings.shadow.timeout_s,
                               priority=settings.shadow.priority, decision_log=decision_log)
    controller = RolloutController(store, recorder, interval_s=settings.rollout_tick_s,
                                   production_label=settings.default_label)
    app.state.recorder = recorder
    app.state.shadows = shadows
    app.state.controller = controller
    app.state.decision_log = decision_log
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.tracer = tracer
    app.state.pipeline = pipeline
    app.state.settings = settings
    app.state.prompt_cache = cache
    app.state.limiter = limiter
    app.state.backend = backend
    app.state.auth = auth

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc, request.headers.get("x-request-id"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        fields = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "(body)",
                   "problem": "unknown field" if e["type"] == "extra_forbidden" else e["msg"]}
                  for e in exc.errors()]
        return error_response(ApiError(422, "invalid_request", "request failed validation", fields=fields),
                              request.headers.get("x-request-id"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {400: "malformed_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        response = error_response(ApiError(exc.status_code, kind, str(exc.detail)),
                                  request.headers.get("x-request-id"))
        for key, value in http_error_headers(request, exc).items():
            response.headers[key] = value
        return response

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError) -> Response:
        err = map_exception(exc) or ApiError(500, "internal_error", "internal error")
        return error_response(err, request.headers.get("x-request-id"))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ApiError(500, "internal_error", "internal error; see gateway logs"),
                              request.headers.get("x-request-id"))

    app.include_router(build_admin_router(store, auth, protected_labels=settings.protected_labels,
                                          production_label=settings.default_label,
                                          on_change=cache.refresh_now))
    app.include_router(build_openai_router(pipeline, auth, settings, list(models or []), limiter=limiter))
    app.include_router(build_feedback_router(store, auth, recorder, feedback_log))
    app.include_router(build_rollout_router(store, auth, production_label=settings.default_label,
                                            on_change=cache.refresh_now))

    @app.get("/v1/cache/prompts", tags=["prompt registry"], responses=ERROR_RESPONSES)
    async def cache_snapshot(request: Request) -> Response:
        """Which version of each prompt label this replica is serving, how old, and whether it
        is last-known-good (store unreachable). Needs `prompts:read`."""
        principal = await auth.authenticate(request.headers.get("authorization"),
                                            request.headers.get("x-api-key"))
        auth.require(principal, "prompts:read")
        stats = cache.stats
        return json_response({"entries": cache.snapshot(), "stats": {
            "hits": stats.hits, "misses": stats.misses, "refreshes": stats.refreshes,
            "refresh_failures": stats.refresh_failures, "stale_served": stats.stale_served,
            "events": stats.events}})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus exposition (unauthenticated, like most scrape targets: keep the port
        cluster-internal; see k8s NetworkPolicy)."""
        for e in cache.snapshot():
            metrics.cache_age.labels(prompt=e["prompt"], label=e["label"]).set(e["age_s"])
            metrics.cache_stale.labels(prompt=e["prompt"], label=e["label"]).set(1 if e["stale"] else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        """Process is alive (no dependency checks)."""
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready when the default prompt resolves and its model answers a 1-token probe."""
        checks: dict[str, Any] = {}
        ok = True
        version = None
        prompts: dict[str, Any] = {}
        for name, label in preload_keys:
            try:
                resolved = await cache.resolve(name, label)
                prompts[f"{name}:{label}"] = {"ok": True, "version": resolved.version.version,
                                              "stale": resolved.stale}
                version = version or resolved.version
            except RegistryError as exc:
                ok = False
                prompts[f"{name}:{label}"] = {"ok": False, "error": str(exc)}
        checks["prompts"] = prompts
        try:
            health = await asyncio.wait_for(backend.check_health(), settings.readiness_probe_timeout_s)
            checks["backend"] = {"ok": True, **health}
        except (BackendError, TimeoutError) as exc:
            ok = False
            checks["backend"] = {"ok": False, "error": str(exc) or type(exc).__name__}
        else:
            if version is not None:
                model = version.spec.model
                probe = ChatRequest(model=model, messages=[{"role": "user", "content": "ping"}],
                                    max_tokens=1, request_id=f"readyz-{new_id()}")
                try:
                    await backend.chat(probe, timeout_s=settings.readiness_probe_timeout_s)
                    checks["model"] = {"ok": True, "name": model}
                except BackendError as exc:
                    ok = False
                    checks["model"] = {"ok": False, "name": model, "error": str(exc)}
        return json_response({"status": "ready" if ok else "not_ready", "checks": checks}, 200 if ok else 503)

    async def moderate(request: Request) -> Response:
        """Moderate one listing with the prompt's `production` version. Needs the `moderate` scope."""
        start = time.perf_counter()
        rid = request.headers.get("x-request-id")
        if not rid or not _REQUEST_ID.match(rid):
            rid = new_id()
        parent = _incoming_trace_context(request)
        code = 200
        track: dict[str, Any] = {}
        with tracer.start_as_current_span("POST /v1/moderate", context=parent, kind=SpanKind.SERVER,
                                          attributes={Attr.REQUEST_ID: rid}) as root:
            try:
                with stage(tracer, metrics, "auth", {"prompt": "-", "version": "-", "arm": "-"}):
                    principal = await auth.authenticate(request.headers.get("authorization"),
                                                        request.headers.get("x-api-key"))
                    auth.require(principal, "moderate")
                lease = await limiter.acquire(principal.key_id, rid, name=principal.name)
                try:
                    body = await _moderate(request, rid, start, track)
                finally:
                    await lease.release()
            except Exception as exc:
                err = map_exception(exc)
                if err is not None:
                    _record_failure(rid, track, err, start)
                code = err.status if err is not None else 500
                root.set_attribute(Attr.ERROR_TYPE, err.type if err else "internal_error")
                if code >= 500:
                    root.set_status(Status(StatusCode.ERROR, err.type if err else "internal_error"))
                metrics.child(metrics.requests, route="/v1/moderate", code=str(code)).inc()
                if err is None:
                    raise
                if err.status >= 500:
                    log.warning("moderation %s failed: %s: %s", rid, err.type, err.message)
                return error_response(err, rid)
            ctx = root.get_span_context()
            if ctx.is_valid and ctx.trace_flags.sampled:
                body["trace_id"] = format(ctx.trace_id, "032x")
            root.set_attribute(Attr.PROMPT_NAME, body["prompt"]["name"])
            root.set_attribute(Attr.PROMPT_VERSION, body["prompt"]["version"])
            root.set_attribute(Attr.TRAFFIC_ARM, body["arm"])
            root.set_attribute(Attr.DECISION, body["decision"])
        metrics.child(metrics.requests, route="/v1/moderate", code=str(code)).inc()
        metrics.child(metrics.stage_seconds, stage="total", prompt=body["prompt"]["name"],
                      version=str(body["prompt"]["version"]), arm=body["arm"]).observe(
            time.perf_counter() - start)
        return json_response(body, headers={"x-request-id": rid})

    # The hot route: served as a DirectRoute (no per-request dependency solving) and matched first.
    app.router.add_api_route(
        "/v1/moderate", moderate, methods=["POST"], route_class_override=DirectRoute,
        response_model=ModerationResponse,
        responses={code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429, 502, 503, 504)},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": ModerationRequest.model_json_schema()}}}},
    )
    app.router.routes.insert(0, app.router.routes.pop())

    async def _moderate(request: Request, rid: str, start: float, track: dict[str, Any]) -> dict[str, Any]:
        payload = await read_json_object(request, settings.max_body_bytes)
        try:
            req = ModerationRequest.model_validate(payload)
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", "request body failed validation",
                           fields=_validation_fields(exc)) from None
        too_long = [
            {"field": f, "problem": f"longer than {limit} characters"}
            for f, value, limit in (("title", req.title, settings.max_title_chars),
                                    ("description", req.description, settings.max_description_chars))
            if len(value) > limit
        ]
        if too_long:
            raise ApiError(422, "content_too_long", "listing content exceeds the size limit",
                           fields=too_long)

        name = req.prompt or settings.default_prompt
        rollout = await cache.rollout(name) if req.prompt_version is None else None
        if rollout is not None and not rollout.active:
            rollout = None
        subject = req.subject or (req.item_id if rollout and rollout.subject_key == "item_id" else req.seller_id)
        assignment = assign(rollout, subject, item_id=req.item_id, pin=req.prompt_version)
        label = settings.default_label if assignment.arm == "stable" else None
        track.update(req=req, subject=subject, arm=assignment.arm, rollout=rollout)
        try:
            if assignment.version is None:
                resolved = await pipeline.resolve(name, label=settings.default_label)
            else:
                resolved = await pipeline.resolve(name, version=assignment.version, arm=assignment.arm)
        except PromptNotFound as exc:
            raise ApiError(404, "unknown_prompt", str(exc)) from None
        track["version"] = resolved.version
        remaining = settings.request_timeout_s - (time.perf_counter() - start)
        variables = req.model_dump()
        ev = await _unless_disconnected(request, pipeline.evaluate(
            resolved, variables, req.locale, request_id=rid, timeout_s=remaining, label=label,
            arm=assignment.arm))
        verdict = ev.verdict
        if verdict.fail_reason:
            log.warning("moderation %s: model output rejected (%s); answering %s", rid,
                        verdict.fail_reason, verdict.decision)
        latency_ms = (time.perf_counter() - start) * 1000.0
        if rollout is not None and assignment.arm in ("stable", "canary"):
            recorder.primary(rollout.id, assignment.arm, verdict, latency_ms)
            recorder.memo(rid, rollout.id, assignment.arm, name, ev.version.version, verdict)
            for version in assignment.shadows:
                shadows.submit(rollout, version, ev, variables, req.locale, request_id=rid,
                               item_id=req.item_id, subject=subject)
        if decision_log is not None:
            decision_log.append(decision_record(
                ev, request_id=rid, item_id=req.item_id, subject=subject, arm=assignment.arm,
                latency_ms=latency_ms, trace_id=_trace_id()))
        return {
            "request_id": rid,
            "item_id": req.item_id,
            "decision": verdict.decision,
            "category": verdict.category,
            "confidence": verdict.confidence,
            "fail_reason": verdict.fail_reason,
            "prompt": ev.prompt_ref(),
            "arm": assignment.arm,
            "model": ev.result.model,
            "latency_ms": round(latency_ms, 3),
            "usage": {"prompt_tokens": ev.result.prompt_tokens,
                      "completion_tokens": ev.result.completion_tokens},
            "trace_id": None,
        }

    def _record_failure(rid: str, track: dict[str, Any], err: ApiError, start: float) -> None:
        """A failed moderation still counts: against its rollout arm, and in the decision log."""
        version = track.get("version")
        rollout = track.get("rollout")
        arm = track.get("arm", "stable")
        latency_ms = (time.perf_counter() - start) * 1000.0
        if rollout is not None and arm in ("stable", "canary") and err.status >= 500:
            recorder.primary(rollout.id, arm, None, latency_ms)
        req = track.get("req")
        if decision_log is not None and version is not None and req is not None and err.status >= 500:
            decision_log.append(failure_record(
                version, request_id=rid, item_id=req.item_id, subject=track["subject"], arm=arm,
                error_type=err.type, latency_ms=latency_ms, trace_id=_trace_id()))

    return app
