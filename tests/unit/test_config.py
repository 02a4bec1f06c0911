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
