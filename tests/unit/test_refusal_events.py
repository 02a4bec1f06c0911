"""Issue 16, item 10: a promotion-gate refusal of a production move is audited (action
"gate_refused"), so the webhook dispatcher, which derives events from the audit log, sends
`gate.refused` with `source: "label_move"`; a rollout's held promotion still gives one
`gate.refused` (its own "hold" entry), not two."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.rollouts.ops import apply_action, start_rollout
from gateway.webhooks import events_from_audit
from prompt_registry import GateOverride, GateRefused, ops
from prompt_registry.rollouts import GateConfig
from prompt_registry.sqlite_store import SqlitePromptStore
from tests.unit.test_webhooks import (
    PROMPT,
    Receiver,
    dispatcher,
    publish,
    receiving,
    score,
    settings,
    subscriber,
    wait_for,
)


def test_a_refused_label_move_is_sent_as_gate_refused(store: SqlitePromptStore, tmp_path: Path) -> None:
    async def run() -> None:
        async with receiving(Receiver()) as rx:
            d = dispatcher(settings(subscriber(rx.url, events=["gate.refused", "label.moved"])),
                           store, tmp_path / "data")
            d.start()
            try:
                await wait_for(lambda: (tmp_path / "data" / "webhooks" / "cursor.json").exists())
                v2 = publish(store, tmp_path, "catch obfuscated ids")
                score(store, 1)
                score(store, v2, good=False)
                with pytest.raises(GateRefused):
                    ops.set_label(store, PROMPT, "production", v2, actor="mallory")
                await wait_for(lambda: len(rx.got) == 1)
                await d.drain(5)
            finally:
                await d.aclose()
        (got,) = rx.got
        assert got.type == "gate.refused" and got.body["actor"] == "mallory"
        assert got.body["data"] == {"label": "production", "production_version": 1, "version": v2,
                                    "source": "label_move"}
        assert got.body["audit"]["note"].startswith("gate failed on dataset")
        assert store.labels(PROMPT)["production"] == 1

    asyncio.run(run())


def test_a_held_rollout_promotion_is_one_refusal_and_a_manual_one_is_audited(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    v2 = publish(store, tmp_path, "catch obfuscated ids")
    score(store, 1)
    score(store, v2)
    gates = GateConfig(min_samples=1)
    start_rollout(store, PROMPT, canary_version=v2, steps=[5], shadows=[], step_hold_s=0,
                  gates=gates, auto=True, subject_key="seller_id", actor="alice")
    score(store, v2, good=False)
    before = len(store.audit(PROMPT))
    apply_action(store, PROMPT, "promote", actor="rollout-controller", hold_on_gate=True)
    entries = store.audit(PROMPT)[before:]
    types = [e.type for i, x in enumerate(entries) for e in events_from_audit(PROMPT, before + i, x)]
    assert types == ["rollout.paused", "gate.refused"], "the hold is the one record of the refusal"
    apply_action(store, PROMPT, "resume", actor="bob")
    before = len(store.audit(PROMPT))
    with pytest.raises(GateRefused):
        apply_action(store, PROMPT, "promote", actor="bob")
    assert [e.action for e in store.audit(PROMPT)[before:]] == ["gate_refused"]
    apply_action(store, PROMPT, "promote", actor="admin",
                 override=GateOverride(reason="legal sign-off", by="admin"))
    assert store.labels(PROMPT)["production"] == v2
