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
        "RAY_USAGE_STATS_ENABLED": "0"}
    cfg = RayClusterConfig(metrics_collection=True, serve_control_loop_interval_s=0.1)
    assert cfg.local_env()["RAY_enable_metrics_collection"] == "1"
    assert cfg.local_env()["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
    with pytest.raises(ValueError, match="serve_control_loop_interval_s"):
        RayClusterConfig(serve_control_loop_interval_s=0)
