"""Model and serving configuration (strict: unknown keys are errors).

A model entry names a model the gateway can route to (`name`), where its weights come from
(`source`: a Hugging Face id or a local directory), vLLM engine arguments and Ray Serve
deployment options. The special source form `tiny:<dir>` means "the locally built random tiny
Llama in <dir>, built on first start if missing" — the zero-download default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.resilience import ResilienceSettings

__all__ = ["DeploymentOptions", "ModelConfig", "RayClusterConfig", "ServingConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(_Strict):
    """Ray Serve deployment options for one model's replicas."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    # CPU bundle per replica: vLLM's CPU build runs the engine on the replica's own cores.
    replica_cpus: float = Field(1.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)


class ModelConfig(_Strict):
    """One model served by vLLM inside a Ray Serve deployment."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: str = Field(..., min_length=1, description="HF model id, local path, or tiny:<dir>")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="environment of the engine "
                                "processes, e.g. OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf "
                                "with engine_kwargs.otlp_traces_endpoint")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith("tiny:")

    @property
    def tiny_dir(self) -> str:
        return self.source.removeprefix("tiny:")


class RayClusterConfig(_Strict):
    """How `modgate up` starts Ray locally. In a cluster (KubeRay) Ray is already running."""

    address: str | None = Field(None, description="existing cluster address; None starts one")
    # Logical CPUs Ray advertises. Ray Serve LLM schedules its ingress beside each engine's
    # placement group, so a 2-core laptop must over-advertise (measured: 8 works).
    num_cpus: int = Field(8, ge=2)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    app_name: str = "llm"
    start_timeout_s: float = Field(600.0, gt=0)
    # Ray's own background work, for a cluster `modgate up` starts itself. On a CPU-only machine
    # it runs on the cores the engine needs: issue #4's benchmark measured the handle path at
    # 13.2 items/s with Ray's defaults and 14.1 with these (benchmarks/engine_throughput.py).
    # A KubeRay cluster is configured in its pod spec instead (k8s/), where GPU engines do not
    # compete with it and Ray's metrics are worth their cost.
    metrics_collection: bool = Field(
        False, description="Ray's own metrics (RAY_enable_metrics_collection), and with them Ray "
        "Serve's 100 ms metrics export loop in every replica and handle and vLLM's per-step metrics "
        "for Ray (log_engine_metrics); off, nothing would collect them. The gateway's /metrics "
        "has the per-version figures (tokens, cached tokens, latency) either way")
    serve_control_loop_interval_s: float = Field(
        0.5, gt=0, le=10, description="how often the Serve controller reconciles deployments and "
        "health (Ray's default 0.1 s); request routing does not wait on it, replica recovery and "
        "autoscaling react up to this much later")
    usage_stats: bool = Field(False, description="Ray's anonymous usage reporting (no internet here anyway)")
    keep_idle_workers: bool = Field(
        False, description="keep Ray's idle worker processes (Ray's default: up to num_cpus of "
        "them). Serve runs every model and proxy in an actor of its own; the idle workers left over "
        "from start-up tasks only cost CPU (each ~0.6 % of a core, measured) and memory, so they are "
        "stopped after a second of idleness (RAY_num_workers_soft_limit=0)")

    @property
    def collects_metrics(self) -> bool:
        """Whether Ray's metrics reach anything: a cluster joined at `address` is configured by
        its operators (assume yes); one `modgate up` starts only with `metrics_collection`."""
        return self.address is not None or self.metrics_collection

    def local_env(self) -> dict[str, str]:
        """Environment for a Ray cluster started locally (inherited by every Ray process)."""
        env = {"RAY_enable_metrics_collection": "1" if self.metrics_collection else "0",
               "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": f"{self.serve_control_loop_interval_s:g}",
               "RAY_USAGE_STATS_ENABLED": "1" if self.usage_stats else "0"}
        if not self.metrics_collection:
            # Serve exports its request counters and latencies to Ray's metric API every 100 ms
            # in every replica and handle; with collection off nobody reads them.
            env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] = "10000"
        if not self.keep_idle_workers:
            env["RAY_num_workers_soft_limit"] = "0"
        return env


class HandleBatchConfig(_Strict):
    """Requests per Ray call on the `handle` transport (see serving/hop_batcher.py). A request
    that arrives while fewer than `max_hops` calls are in flight goes at once; otherwise it
    waits for a call to finish, for `max_size` companions, or for `max_wait_ms`. `max_size: 1`
    sends one request per call (no batching). The defaults are the best setting measured by
    benchmarks/handle_hop.py (RESULTS.md): ~5x the calls/s of one request per call at 32 in
    flight, and no added latency one at a time."""

    max_size: int = Field(16, ge=1, le=256, description="requests per Ray call (1: no batching)")
    max_wait_ms: float = Field(2.0, ge=0, le=1000, description="longest a request waits for companions")
    max_hops: int = Field(2, ge=1, le=1024, description="Ray calls in flight per model before "
                          "requests start to queue for a batch")


class ServingConfig(_Strict):
    """Where the gateway finds models: a local Ray Serve app it starts, or an external server."""

    mode: str = Field("ray", pattern=r"^(ray|http)$")
    transport: str = Field("auto", pattern=r"^(auto|http|handle)$", description="ray mode: reach "
                           "models over Ray Serve's HTTP proxy, or through deployment handles from "
                           "this process (no proxy and ingress hops, several requests per Ray call: "
                           "see handle_batch; needs the gateway in the Ray cluster, as `modgate up` "
                           "with one gateway process is). auto: handle where the gateway is the "
                           "process that started Ray (`modgate up`, gateway.workers 1), http elsewhere")
    # OpenAI-compatible base URL. In `ray` mode it is derived from the Ray HTTP host/port.
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="env var holding the backend API key")
    keepalive_s: float = Field(4.0, gt=0, le=300, description="how long an idle pooled connection "
                               "to the model server is kept: less than the server keeps it open (uvicorn-"
                               "based servers, vLLM's and Ray Serve's proxy: 5 s), so the client drops it "
                               "first (serving/http_backend.py)")
    ray: RayClusterConfig = Field(default_factory=RayClusterConfig)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    handle_batch: HandleBatchConfig = Field(default_factory=HandleBatchConfig)
    models: list[ModelConfig] = Field(..., min_length=1)

    def transport_for(self, *, ray_driver: bool) -> str:
        """The transport a gateway process uses: `auto` becomes `handle` in the one process that
        started (or joined) Ray to serve the models (*ray_driver*), and `http` anywhere else (a
        `modgate gateway` beside `modgate serving`, the worker processes of `gateway.workers`),
        which cannot hold deployment handles. Measured on the CPU stack, the handle path spends
        about half the CPU of Ray Serve's proxy and ingress (benchmarks/engine_throughput.py)."""
        if self.transport != "auto":
            return self.transport
        return "handle" if ray_driver and self.mode == "ray" else "http"

    def resolved_base_url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.ray.http_host}:{self.ray.http_port}/v1"

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)
