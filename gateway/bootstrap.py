"""The composition root: one function that builds a production gateway from its configuration.

`modgate gateway` and `modgate up` serve what `build_gateway` returns; tests and benchmarks
that want the real wiring call it too (with their own backend when they have one), so there is
no second way to assemble the server. It picks the serving backend (OpenAI-compatible HTTP, or
Ray Serve handles when the gateway runs inside the Ray cluster), wraps it in the resilience
layer (deadlines, retries, breaker), and adds the caller limiter (Redis when the registry is on
Redis), tracing, the decision log and the feedback log from the config file.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from gateway.api.app import create_app
from gateway.api.console.sessions import SqliteSessionStore
from gateway.config import AppConfig, ConfigError
from gateway.decision_log import DecisionLog
from gateway.feedback import FeedbackLog
from gateway.limits import build_caller_limiter
from gateway.samples import SampleRecorder, open_configured
from gateway.telemetry import Metrics, build_tracer_provider
from gateway.webhooks import RolloutMetrics, WebhookDispatcher
from gateway.workers import WorkerContext
from prompt_registry import PromptStore
from serving import InferenceBackend

__all__ = ["build_backend", "build_gateway"]


def build_backend(cfg: AppConfig, metrics: Metrics) -> InferenceBackend:
    """The configured serving backend inside `ResilientBackend`."""
    from serving.http_backend import OpenAIHttpBackend
    from serving.resilience import ResilientBackend

    api_key = os.environ.get(cfg.serving.api_key_env) if cfg.serving.api_key_env else None
    http = OpenAIHttpBackend(cfg.serving.resolved_base_url(), api_key=api_key,
                             keepalive_s=cfg.serving.keepalive_s)
    inner: InferenceBackend = http
    if cfg.serving.mode == "ray" and cfg.serving.transport == "handle":
        from serving.ray_handle_backend import RayHandleBackend

        inner = RayHandleBackend(cfg.serving.ray.app_name, stream_fallback=http,
                                 batch=cfg.serving.handle_batch)
    return ResilientBackend(inner, cfg.serving.resilience, registry=metrics.registry)


def build_gateway(cfg: AppConfig, store: PromptStore, *,
                  backend: InferenceBackend | None = None,
                  worker: WorkerContext | None = None) -> FastAPI:
    """The gateway app as the config describes it. The caller owns *store*; the app owns and
    closes the backend (the configured one unless *backend* is given). *worker* is set in the
    worker processes of a multi-worker gateway (`gateway.workers`; see `gateway.workers`)."""
    # Ray turns the root logger to INFO; one line per backend call is noise and costs latency.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    metrics = Metrics()
    # Built even with no subscribers: its loop also refreshes the rollout gauges.
    webhook_settings = cfg.webhooks
    if worker is not None and not worker.delivers_webhooks:
        webhook_settings = webhook_settings.model_copy(update={"subscribers": []})
    webhooks = WebhookDispatcher(webhook_settings, store, cfg.data_path(), registry=metrics.registry,
                                 rollout_metrics=RolloutMetrics(metrics.registry))
    redis_url = ((cfg.registry.redis_url or os.environ.get(cfg.registry.redis_url_env))
                 if cfg.registry.store == "redis" else None)
    shared = (worker.limits_path, worker.index) if worker is not None else None
    limiter = build_caller_limiter(cfg.gateway.caller_limits, redis_url=redis_url,
                                   key_prefix=cfg.registry.redis_key_prefix, registry=metrics.registry,
                                   shared=shared)
    replica = worker.replica if worker is not None else None
    try:
        sample_store = open_configured(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    samples = (SampleRecorder(sample_store, cfg.samples, registry=metrics.registry)
               if sample_store is not None else None)
    return create_app(cfg.gateway, store, backend or build_backend(cfg, metrics),
                      tracer_provider=build_tracer_provider(cfg.tracing), metrics=metrics,
                      limiter=limiter, models=[m.name for m in cfg.serving.models],
                      decision_log=DecisionLog.from_settings(cfg.decision_log, cfg.data_path(),
                                                             replica=replica),
                      feedback_log=FeedbackLog(cfg.data_path() / "feedback", replica=replica),
                      webhooks=webhooks, samples=samples, console_sessions=_console_sessions(cfg))


def _console_sessions(cfg: AppConfig) -> SqliteSessionStore | None:
    """Console sessions in a file every worker process of this host shares (a browser's
    connections land on any of them), surviving restarts."""
    console = cfg.gateway.console
    if not console.enabled:
        return None
    return SqliteSessionStore(cfg.data_path() / "console-sessions.db", idle_s=console.idle_timeout_s,
                              max_sessions=console.max_sessions)
