from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_is_valid_and_paths_resolve_against_the_file() -> None:
    cfg = load_config(ROOT / "configs" / "modgate.yaml")
    assert cfg.registry_path() == ROOT / "data" / "registry.db"
    assert cfg.seed_path() == ROOT / "configs" / "prompts"
    assert cfg.serving.resolved_base_url() == "http://127.0.0.1:8000/v1"
    assert cfg.serving.models[0].is_tiny


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("serving:\n  models: []\n", "serving.models"),
        ("gateway:\n  port: 99999\nserving:\n  models: [{name: m, source: x}]\n", "gateway.port"),
        ("gateway:\n  prot: 1\nserving:\n  models: [{name: m, source: x}]\n", "gateway.prot: Extra inputs"),
        ("serving:\n  mode: grpc\n  models: [{name: m, source: x}]\n", "serving.mode"),
        ("serving: [\n", "malformed YAML"),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_local_ray_cluster_is_started_lean_unless_configured_otherwise(tmp_path: Path) -> None:
    from serving.config import RayClusterConfig

    assert RayClusterConfig().local_env() == {
        "RAY_enable_metrics_collection": "0", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "10000",
        "RAY_num_workers_soft_limit": "0"}
    cfg = RayClusterConfig(metrics_collection=True, serve_control_loop_interval_s=0.1, keep_idle_workers=True)
    env = cfg.local_env()
    assert env["RAY_enable_metrics_collection"] == "1"
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    # Collected metrics are exported at Ray's own pace; idle workers are kept as Ray keeps them.
    assert "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS" not in env and "RAY_num_workers_soft_limit" not in env
    with pytest.raises(ValueError, match="serve_control_loop_interval_s"):
        RayClusterConfig(serve_control_loop_interval_s=0)
    # vLLM's per-step metrics for Ray only where Ray collects them.
    assert not RayClusterConfig().collects_metrics
    assert RayClusterConfig(metrics_collection=True).collects_metrics
    assert RayClusterConfig(address="ray://head:10001").collects_metrics


def test_the_transport_is_handles_only_in_the_process_that_started_ray() -> None:
    """`auto` (the default): `modgate up` with one gateway process holds deployment handles;
    any other gateway process (beside `modgate serving`, or one of several workers) uses HTTP."""
    from serving.config import ModelConfig, ServingConfig

    models = [ModelConfig(name="m", source="tiny:models/m")]
    auto = ServingConfig(models=models)
    assert auto.transport == "auto"
    assert auto.transport_for(ray_driver=True) == "handle"
    assert auto.transport_for(ray_driver=False) == "http"
    assert ServingConfig(mode="http", base_url="http://x/v1", models=models).transport_for(ray_driver=True) == "http"
    for chosen in ("http", "handle"):
        assert ServingConfig(transport=chosen, models=models).transport_for(ray_driver=False) == chosen


def test_default_config_runs_several_workers_over_http(tmp_path: Path) -> None:
    """The shipped config (serving.mode ray, transport auto) accepts gateway.workers above 1:
    the workers reach the models over HTTP; only an explicit `handle` is refused."""
    cfg = load_config(ROOT / "configs" / "modgate.yaml", {"gateway.workers": 2})
    assert cfg.serving.transport_for(ray_driver=cfg.gateway.workers == 1) == "http"
    with pytest.raises(ConfigError, match="needs serving.transport: http"):
        load_config(ROOT / "configs" / "modgate.yaml", {"gateway.workers": 2, "serving.transport": "handle"})


def test_a_fixed_replica_count_is_not_autoscaled() -> None:
    """min = max replicas becomes Serve's `num_replicas`: no autoscaling metrics pushed by the
    replica and its callers' handles for a count that cannot change."""
    from serving.config import ModelConfig
    from serving.ray_app import llm_config_kwargs

    fixed = llm_config_kwargs(ModelConfig(name="m", source="s", deployment={"min_replicas": 2, "max_replicas": 2}), "s")
    assert fixed["deployment_config"] == {"num_replicas": 2, "max_ongoing_requests": 64}
    scaled = llm_config_kwargs(ModelConfig(name="m", source="s", deployment={"max_replicas": 3}), "s",
                               engine_metrics=False)
    assert scaled["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert fixed["log_engine_metrics"] is True and scaled["log_engine_metrics"] is False
