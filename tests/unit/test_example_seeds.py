"""Every configuration we ship starts: its seed prompts name models it serves.

`modgate up` seeds the registry from `registry.seed_dir` and refuses a prompt naming a model
the serving layer does not serve (nothing is seeded, the start fails). An example that seeds
the CPU prompts (`model: tiny-llama`) on a GPU model list therefore cannot start."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("configs/examples/*.yaml")])
LOCAL = [p for p in CONFIGS if (load_config(p).seed_path() or Path("/nonexistent")).is_dir()]


@pytest.mark.parametrize("config", LOCAL, ids=[p.name for p in LOCAL])
def test_every_shipped_config_seeds_its_own_served_models(config: Path, tmp_path: Path) -> None:
    cfg = load_config(config)
    seed = cfg.seed_path()
    assert seed is not None
    store = SqlitePromptStore(tmp_path / "r.db")
    try:
        names = seed_store(store, seed, served_models=[m.name for m in cfg.serving.models])
        assert names, f"{config.name}: {seed} seeded nothing"
    finally:
        store.close()


def test_the_gpu_node_seeds_are_the_repository_prompts_on_its_model() -> None:
    seeds = sorted((ROOT / "configs" / "examples" / "gpu-node-prompts").glob("*.yaml"))
    originals = sorted((ROOT / "configs" / "prompts").glob("*.yaml"))
    assert [p.name for p in seeds] == [p.name for p in originals]
    for seed, original in zip(seeds, originals, strict=True):
        ours, theirs = yaml.safe_load(seed.read_text()), yaml.safe_load(original.read_text())
        ours.pop("model"), theirs.pop("model")
        assert ours == theirs, f"{seed.name} drifted from configs/prompts; copy it again and set `model:`"


def test_the_examples_with_local_seeds_are_covered() -> None:
    assert {p.name for p in LOCAL} >= {"modgate.yaml", "gpu-node.yaml", "gpu-safeguard.yaml"}
