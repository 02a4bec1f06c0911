"""Operational routes: liveness, readiness, Prometheus metrics and the prompt-cache snapshot.

With several worker processes (`gateway.workers`), prometheus-client runs in multiprocess mode
(`gateway.workers.multiprocess_dir`): each process keeps its metric values in files of one
per-run directory, and whichever worker answers `/metrics` sums every worker's counters and
histograms (gauges as their `multiprocess_mode` says) with `MultiProcessCollector`. Collectors
that compute their samples at scrape time (the rollout gauges, read from the registry store,
the same in every worker) are not in those files: the answering worker adds its own. The
workers write their values to the files in the background (`gateway.metric_files`): the
answering worker's own are current, the others' at most `metric_files.FLUSH_S` old.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from gateway import metric_files
from gateway.api.edge import ERROR_RESPONSES, json_response
from gateway.ids import new_id
from gateway.moderation import ModerationService
from gateway.problems import GatewayError
from gateway.telemetry import Metrics
from gateway.workers import multiprocess_dir
from prompt_registry import PromptVersion, RegistryError
from serving import BackendError, ChatRequest, InferenceBackend

__all__ = ["build_ops_router"]


class _HealthCache:
    """The readiness check, run at most once per `readiness_cache_s` and once at a time."""

    def __init__(self, service: ModerationService, backend: InferenceBackend,
                 preload_keys: list[tuple[str, str]]) -> None:
        self._service, self._backend, self._keys = service, backend, preload_keys
        self._result: tuple[bool, dict[str, Any]] | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> tuple[bool, dict[str, Any]]:
        max_age = self._service.settings.readiness_cache_s
        async with self._lock:
            now = time.monotonic()
            if self._result is None or now - self._checked_at >= max_age:
                self._result = await self._check()
                self._checked_at = time.monotonic()
            return self._result

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        cache, settings, backend = self._service.cache, self._service.settings, self._backend
        checks: dict[str, Any] = {}
        ok = True
        version = None
        prompts: dict[str, Any] = {}
        resolved_versions: list[tuple[str, PromptVersion]] = []
        for name, label in self._keys:
            try:
                resolved = await cache.resolve(name, label)
                prompts[f"{name}:{label}"] = {"ok": True, "version": resolved.version.version,
                                              "stale": resolved.stale}
                version = version or resolved.version
                resolved_versions.append((f"{name}:{label}", resolved.version))
            except RegistryError as exc:
                ok = False
                prompts[f"{name}:{label}"] = {"ok": False, "error": str(exc)}
        checks["prompts"] = prompts
        models = self._models(resolved_versions)
        if models:
            checks["models"] = models
            ok = ok and all(m["ok"] for m in models.values())
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
        return ok, checks

    def _models(self, versions: list[tuple[str, PromptVersion]]) -> dict[str, dict[str, Any]]:
        """Every model the preloaded labels' versions call, their own and their cascade's, and
        whether the serving layer serves it (`served_models`, from the configuration; empty:
        not known, nothing reported). A version stored before its cascade's model left the
        configuration would escalate every unsure verdict into `escalation_failed`: not ready,
        like an unserved own model. Only the default prompt's own model is probed (a 1-token
        generation): a cascade's model that is served but down is answered per request, fail
        closed (`escalation_failed`, `modgate_escalations_total{outcome="failed"}`), and must
        not take every replica out of service."""
        served = self._service.served_models
        if not served:
            return {}
        models: dict[str, dict[str, Any]] = {}
        for where, version in versions:
            for model in version.spec.models():
                role = "" if model == version.spec.model else " (cascade)"
                entry = models.setdefault(model, {"ok": model in served, "used_by": []})
                entry["used_by"].append(f"{where}{role}")
                if not entry["ok"]:
                    entry["error"] = (f"model {model!r} is not served by this gateway (served: "
                                      f"{', '.join(served)})")
        return models


def exposition(service: ModerationService) -> Response:
    """The Prometheus exposition, with the prompt-cache gauges brought up to date."""
    metrics = service.metrics
    for e in service.cache.snapshot():
        metrics.cache_age.labels(prompt=e["prompt"], label=e["label"]).set(e["age_s"])
        metrics.cache_stale.labels(prompt=e["prompt"], label=e["label"]).set(1 if e["stale"] else 0)
    return Response(generate_latest(_scrape_registry(metrics)), media_type=CONTENT_TYPE_LATEST)


_AGGREGATED: weakref.WeakKeyDictionary[CollectorRegistry, CollectorRegistry] = weakref.WeakKeyDictionary()


def _scrape_registry(metrics: Metrics) -> CollectorRegistry:
    """*metrics*' own registry, or in multiprocess mode one that sums every worker's files
    plus this worker's scrape-time collectors (module docstring). Built once per registry."""
    path = multiprocess_dir()
    if path is None:
        return metrics.registry
    metric_files.flush()  # this worker's own figures as of now; the others' are at most FLUSH_S old
    agg = _AGGREGATED.get(metrics.registry)
    if agg is None:
        agg = CollectorRegistry()
        MultiProcessCollector(agg, path)  # type: ignore[no-untyped-call]
        # The registry's own index of collectors: prometheus-client has no public listing.
        for collector in list(metrics.registry._collector_to_names):
            if not isinstance(collector, MetricWrapperBase):
                agg.register(collector)
        _AGGREGATED[metrics.registry] = agg
    return agg


def build_metrics_app(service: ModerationService) -> Starlette:
    """`/metrics` alone, for its own listener (`gateway.metrics_port`): the port a
    NetworkPolicy opens to the monitoring namespace only, while the API port stays without it."""

    async def metrics_endpoint(_request: Request) -> Response:
        return exposition(service)

    return Starlette(routes=[Route("/metrics", metrics_endpoint, methods=["GET"])])


def build_ops_router(service: ModerationService, backend: InferenceBackend,
                     preload_keys: list[tuple[str, str]], *, serve_metrics: bool = True) -> APIRouter:
    router = APIRouter()
    cache = service.cache

    @router.get("/v1/cache/prompts", tags=["prompt registry"], responses=ERROR_RESPONSES)
    async def cache_snapshot(request: Request) -> Response:
        """Which version of each prompt label this replica is serving, how old, and whether it
        is last-known-good (store unreachable); `process` is the answering process's id (with
        `gateway.workers` above 1, each worker has its own cache). Needs `prompts:read`."""
        await service.authenticate(request.headers.get("authorization"),
                                   request.headers.get("x-api-key"), scope="prompts:read")
        stats = cache.stats
        return json_response({"process": os.getpid(), "entries": cache.snapshot(), "stats": {
            "hits": stats.hits, "misses": stats.misses, "refreshes": stats.refreshes,
            "refresh_failures": stats.refresh_failures, "stale_served": stats.stale_served,
            "events": stats.events}})

    if serve_metrics:
        @router.get("/metrics", include_in_schema=False)
        async def prometheus_metrics() -> Response:
            """Prometheus exposition (unauthenticated, like most scrape targets: keep the port
            cluster-internal; see k8s NetworkPolicy, or `gateway.metrics_port`)."""
            return exposition(service)

    @router.get("/healthz")
    async def healthz() -> Response:
        """Process is alive (no dependency checks)."""
        return json_response({"status": "ok"})

    health = _HealthCache(service, backend, preload_keys)

    @router.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Ready when the default prompt resolves, its model answers a 1-token probe and every
        model the preloaded versions call (their cascades' too) is served. The
        check runs at most once per `readiness_cache_s` (probes never turn into model load);
        anonymous callers get only ready or not (no backend URL, no error texts), any valid
        key the checks."""
        ok, checks = await health.get()
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        if request.headers.get("authorization") or request.headers.get("x-api-key"):
            try:
                await service.auth.authenticate(request.headers.get("authorization"),
                                                request.headers.get("x-api-key"))
                body["checks"] = checks
            except GatewayError:
                pass  # an invalid key sees what anonymous callers see: ready or not
        return json_response(body, 200 if ok else 503)

    return router
