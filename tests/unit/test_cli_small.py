"""Small CLI items a new user tripped on (#21)."""

from __future__ import annotations

import pytest
import typer

from gateway.cli.registry import _actor
from gateway.cli.rollouts import _shadow


def test_a_shadow_rate_out_of_range_says_so_not_that_the_shape_is_wrong() -> None:
    with pytest.raises(typer.BadParameter, match=r"the rate 1.5 is a share of traffic, in \(0, 1\]"):
        _shadow("2:1.5")
    with pytest.raises(typer.BadParameter, match="is not VERSION:RATE"):
        _shadow("two:0.5")
    assert _shadow("3:0.2").sample_rate == 0.2


def test_an_empty_user_is_never_recorded_as_a_bare_root(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MODGATE_ACTOR", "LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "")
    who = _actor(None)
    assert who != "root" and who.startswith("uid ")
    monkeypatch.setenv("MODGATE_ACTOR", "ana")
    assert _actor(None) == "ana" and _actor("bo") == "bo"


def test_a_start_note_is_added_to_the_automatic_description(tmp_path: object) -> None:
    from pathlib import Path

    from gateway.rollouts.ops import start_rollout
    from prompt_registry.gates import GateOverride
    from prompt_registry.loader import seed_store
    from prompt_registry.rollouts import GateConfig
    from prompt_registry.sqlite_store import SqlitePromptStore

    root = Path(__file__).resolve().parents[2]
    store = SqlitePromptStore(Path(str(tmp_path)) / "r.db")
    seed_store(store, root / "configs" / "prompts")
    spec = store.resolve("listing-moderation", "production").spec
    v2 = store.publish(spec.model_copy(update={"description": "v2"}), actor="t").version.version
    start_rollout(store, "listing-moderation", canary_version=v2, steps=[10], shadows=[],
                  step_hold_s=60, gates=GateConfig(), auto=False, subject_key="seller_id",
                  actor="t", note="ticket OPS-12", override=GateOverride(reason="test", by="t"))
    note = store.audit("listing-moderation")[-1].note
    assert "start: canary v2 at 10%" in note and "ticket OPS-12" in note
    store.close()


def test_the_yaml_of_a_version_leaves_nulls_out_and_parses_back(example_spec: object) -> None:
    """`prompts diff` showed defaulted `max: null` lines (#21)."""
    from datetime import UTC, datetime

    from prompt_registry.loader import parse_prompt_text
    from prompt_registry.models import PromptSpec, PromptVersion
    from prompt_registry.ops import spec_as_yaml

    assert isinstance(example_spec, PromptSpec)
    v = PromptVersion(spec=example_spec, version=1, content_hash=example_spec.content_hash(),
                      created_at=datetime.now(UTC))
    text = spec_as_yaml(v)
    assert ": null" not in text
    assert parse_prompt_text(text, source="v1.yaml") == example_spec
