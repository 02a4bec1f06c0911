"""One configuration schema for gateway, registry and serving, loaded from YAML.

Relative paths in a config file resolve against `data_dir` (for data) or the file's own
directory (for `data_dir` and `registry.seed_dir`), never against the current directory, so a
config means the same thing wherever `modgate` is started. Invalid configuration fails at
start-up with a message naming the file, the field and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.decision_log import DecisionLogSettings
from gateway.limits import CallerLimitsSettings
from gateway.samples import SampleSettings
from gateway.telemetry import TracingSettings
from gateway.webhook_settings import WebhookSettings
from serving.config import ServingConfig

__all__ = ["AppConfig", "ConfigError", "ConsoleSettings", "GatewaySettings", "RegistrySettings", "load_config"]

DEFAULT_CONFIG = Path("configs/modgate.yaml")


class ConfigError(Exception):
    """Configuration could not be loaded; the message names file, field and reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowSettings(_Strict):
    max_concurrency: int = Field(4, ge=1, description="shadow evaluations running at once")
    max_pending: int = Field(64, ge=1, description="queued + running; beyond this shadows are dropped")
    timeout_s: float = Field(10.0, gt=0)
    priority: int = Field(0, description="vLLM priority for shadow requests (higher = later); "
                          "needs engine scheduling_policy: priority when non-zero")


class ConsoleSettings(_Strict):
    """The web console at /console (`gateway.api.console`)."""

    enabled: bool = Field(True, description="serve the console at /console")
    idle_timeout_s: float = Field(1800.0, gt=0, le=86400.0, description="a console session ends "
                                  "after this long without a request")
    max_sessions: int = Field(1000, ge=1, le=100_000, description="sessions kept (in "
                              "data_dir/console-sessions.db, shared by this host's worker "
                              "processes); the least recently used goes first")
    secure_cookie: Literal["auto", "always"] = Field(
        "auto", description="auto: the session cookie is Secure when the request came over https "
        "(behind a TLS-terminating proxy, run uvicorn with proxy headers or say always)")
    max_playground_listings: int = Field(8, ge=1, le=32, description="listings per playground run "
                                         "(each is one unit of the caller's quota)")


class GatewaySettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="gateway processes serving `port` on this "
                         "host (SO_REUSEPORT: the kernel spreads connections over them). They "
                         "share /metrics (summed), caller limits (shared memory, or Redis) and "
                         "the SQLite registry's change detection; each writes its own "
                         "decision-log stream. In Kubernetes scale by pods and keep 1 per pod "
                         "unless a pod has several cores")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="serve /metrics on its own "
                                     "listener at this port (and not on `port`), so a "
                                     "NetworkPolicy can admit only the monitoring namespace to it; "
                                     "null: /metrics on the API port")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies above get 413")
    max_title_chars: int = Field(500, ge=1)
    max_description_chars: int = Field(20_000, ge=1)
    request_timeout_s: float = Field(30.0, gt=0, description="deadline for one moderation")
    default_prompt: str = "listing-moderation"
    default_label: str = "production"
    preload_prompts: list[str] = Field(default_factory=list,
                                       description="prompts (besides the default) loaded at start; "
                                       "readiness fails while any is missing")
    prompt_refresh_s: float = Field(30.0, gt=0, description="re-read cached labels this often "
                                    "even without a change event")
    prompt_max_staleness_s: float = Field(600.0, gt=0, description="serve last-known-good "
                                          "prompts at most this long while the store is down")
    auth: Literal["required", "disabled"] = Field(
        "required", description="API keys on every route; 'disabled' only for local experiments")
    key_cache_s: float = Field(10.0, ge=0, description="key records are re-read this often "
                               "(revocation delay)")
    protected_labels: list[str] = Field(default_factory=lambda: ["production"],
                                        description="moving these needs the labels:protected scope")
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    rollout_controller: bool = Field(True, description="judge running rollouts by their gates and "
                                     "step/promote/abort them automatically")
    rollout_tick_s: float = Field(5.0, gt=0, description="how often the rollout controller runs")
    caller_limits: CallerLimitsSettings = Field(default_factory=CallerLimitsSettings)
    readiness_probe_timeout_s: float = Field(10.0, gt=0)
    readiness_cache_s: float = Field(5.0, ge=0, description="/readyz answers from a health check "
                                     "at most this old (one model probe per interval, whatever "
                                     "the probe rate)")
    max_moderation_inputs: int = Field(32, ge=1, le=1024, description="inputs per /v1/moderations "
                                       "call; each counts against the caller's rate and "
                                       "concurrency limits")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this "
                                  "(slow clients); the request deadline also covers reading it")
    max_connections: int | None = Field(None, ge=1, description="open connections this gateway "
                                        "process accepts (uvicorn limit_concurrency; beyond, 503)")
    max_inflight_per_model: int = Field(256, ge=1, description="concurrent engine calls per model "
                                        "from this gateway process")
    max_queued_per_model: int = Field(512, ge=0, description="requests waiting for a slot; beyond "
                                      "this the gateway answers 429 at once")
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    verdict_top_logprobs: int = Field(
        10, ge=0, le=20, description="alternatives per generated token asked of the engine for "
        "the calibrated probabilities of a verdict (more: less unresolved mass, larger answers "
        "from the engine); 0: none asked, probabilities are null and operating points fail "
        "closed on allow. `modgate eval` always asks for 20")


class RegistrySettings(_Strict):
    store: Literal["sqlite", "redis"] = "sqlite"
    path: str = Field("registry.db", description="SQLite file, relative to data_dir")
    redis_url: str | None = Field(None, description="redis://host:port/db; overrides redis_url_env")
    redis_url_env: str = Field("MODGATE_REDIS_URL", description="env var holding the Redis URL")
    redis_key_prefix: str = Field("modgate", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    seed_dir: str | None = Field("prompts", description="prompt YAML seeded on first start")


class ModelPrice(_Strict):
    """What one model's tokens cost, per 1,000 (in `reporting.currency`)."""

    prompt_per_1k: float = Field(..., ge=0, description="per 1,000 prompt tokens not served from "
                                 "the prefix cache")
    completion_per_1k: float = Field(..., ge=0, description="per 1,000 completion tokens")
    cached_prompt_per_1k: float | None = Field(None, ge=0, description="per 1,000 prompt tokens "
                                               "served from the prefix cache; null: as prompt_per_1k")


class ReportingSettings(_Strict):
    """Settings of the offline reports (`modgate report ops`); the gateway does not read them."""

    currency: str = Field("USD", pattern=r"^[A-Za-z]{3}$", description="ISO 4217 code the prices "
                          "are in")
    prices: dict[str, ModelPrice] = Field(default_factory=dict, description="price per model name "
                                          "(as the decision log records `model`); a model without "
                                          "a price gets tokens but no cost in the report")


class AppConfig(_Strict):
    data_dir: Path = Path("../data")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    serving: ServingConfig
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    decision_log: DecisionLogSettings = Field(default_factory=DecisionLogSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    samples: SampleSettings = Field(default_factory=SampleSettings)
    reporting: ReportingSettings = Field(default_factory=ReportingSettings)
    # Directory of the config file; set by load_config, used to resolve relative paths.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _workers_supported(self) -> AppConfig:
        # Handles need a Ray driver per process; the worker processes are not in the cluster.
        if self.gateway.workers > 1 and self.serving.mode == "ray" and self.serving.transport == "handle":
            raise ValueError("gateway.workers above 1 needs serving.transport: http (Ray handles "
                             "are reachable only from the process that joined the Ray cluster)")
        return self

    def data_path(self) -> Path:
        return self.data_dir if self.data_dir.is_absolute() else (self.base_dir / self.data_dir).resolve()

    def registry_path(self) -> Path:
        p = Path(self.registry.path)
        return p if p.is_absolute() else self.data_path() / p

    def seed_path(self) -> Path | None:
        if self.registry.seed_dir is None:
            return None
        p = Path(self.registry.seed_dir)
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> AppConfig:
    path = Path(path or DEFAULT_CONFIG)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass --config or set MODGATE_CONFIG)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    data["base_dir"] = path.resolve().parent
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  - {loc}: {msg}" if loc else f"  - {msg}")
        raise ConfigError("\n".join(lines)) from None
