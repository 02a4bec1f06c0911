"""Rollout operations shared by the admin API, the CLI and the automatic controller: start,
step, pause, resume, promote, abort, status, and the gate-driven decision.

Every transition is a compare-and-set on the rollout's revision and is audited with its
evidence, so two gateway replicas (or a human and the controller) can never both act on the
same state. Promotion moves the `production` label with compare-and-set against the stable
version, so it cannot overwrite a label someone moved meanwhile, and through the promotion gate
(`prompt_registry.gates`), like every production move: a manual promote is refused
(`GateRefused`) unless an admin overrides it; an automatic one (`hold_on_gate`) pauses the
rollout instead, with the gate's findings in `last_decision` and in the audit entry, so an
operator sees why it stopped (the canary keeps its weight; abort to send traffic back).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.rollouts.recorder import flips_view
from prompt_registry import GateOverride, GateRefused, GateReport, PromptNotFound, PromptStore
from prompt_registry.gates import gate_report, move_label
from prompt_registry.rollout_stats import build_rollout_stats
from prompt_registry.rollouts import (
    GateConfig,
    GateResult,
    Rollout,
    RolloutError,
    ShadowSpec,
    evaluate_gates,
    new_rollout,
)

__all__ = ["ACTIONS", "apply_action", "decide", "rollout_status", "start_rollout"]

ACTIONS = ("step", "pause", "resume", "promote", "abort")


def start_rollout(store: PromptStore, prompt: str, *, canary_version: int | None, steps: list[int],
                  shadows: list[ShadowSpec], step_hold_s: float, gates: GateConfig, auto: bool,
                  subject_key: str, actor: str, production_label: str = "production", note: str = "") -> Rollout:
    stable = store.labels(prompt).get(production_label)
    if stable is None:
        raise PromptNotFound(f"prompt {prompt!r} has no {production_label!r} label to roll out from")
    for v in [canary_version, *(s.version for s in shadows)]:
        if v is not None:
            store.get_version(prompt, v)  # raises PromptNotFound naming the version
    try:
        rollout = new_rollout(prompt, stable_version=stable, canary_version=canary_version, steps=steps,
                              shadows=shadows, step_hold_s=step_hold_s, gates=gates, auto=auto,
                              subject_key=subject_key, started_by=actor)
    except ValidationError as exc:
        raise RolloutError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    store.put_rollout(rollout, expected_revision=None, actor=actor,
                      note=note or f"start: canary v{canary_version} at {rollout.weight}%, shadows "
                      + (", ".join(f"v{s.version}@{s.sample_rate:.0%}" for s in shadows) or "none"))
    return rollout


def _current(store: PromptStore, prompt: str) -> Rollout:
    rollout = store.get_rollout(prompt)
    if rollout is None:
        raise PromptNotFound(f"prompt {prompt!r} has no rollout")
    return rollout


def apply_action(store: PromptStore, prompt: str, action: str, *, actor: str, note: str = "",
                 evidence: list[dict[str, Any]] | None = None, expected: Rollout | None = None,
                 production_label: str = "production", override: GateOverride | None = None,
                 hold_on_gate: bool = False) -> Rollout:
    """Apply one transition; raise RolloutError when the state does not allow it.

    `promote` goes through the promotion gate: GateRefused when it fails (unless *override*),
    or, with *hold_on_gate* (the automatic controller), the rollout is paused instead and the
    refusal recorded."""
    r = expected or _current(store, prompt)
    now = datetime.now(UTC)
    if action not in ACTIONS:
        raise RolloutError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if not r.active:
        raise RolloutError(f"rollout {r.id} of {prompt!r} is already {r.state}")
    report: GateReport | None = None
    if action == "step":
        if r.canary_version is None:
            raise RolloutError("a shadow-only rollout has no canary weight to step")
        if r.step_index + 1 >= len(r.steps):
            raise RolloutError(f"already at the last step ({r.weight}%); promote or abort")
        new = r.changed(step_index=r.step_index + 1, step_started_at=now, last_decision="step")
    elif action == "pause":
        if r.state == "paused":
            raise RolloutError("already paused")
        new = r.changed(state="paused", last_decision="pause")
    elif action == "resume":
        if r.state != "paused":
            raise RolloutError("not paused")
        new = r.changed(state="running", step_started_at=now, last_decision="resume")
    elif action == "promote":
        if r.canary_version is None:
            raise RolloutError("a shadow-only rollout has no canary to promote")
        try:
            _, report = move_label(store, prompt, production_label, r.canary_version,
                                   expected=r.stable_version, actor=actor,
                                   note=f"promoted by rollout {r.id}", override=override,
                                   production_label=production_label)
        except GateRefused as exc:
            if not hold_on_gate:
                raise
            report = exc.report
            action = "hold"
            new = r.changed(state="paused", last_decision=f"hold: promotion refused by the gate: "
                            f"{report.summary()}")
        else:
            new = r.changed(state="promoted", last_decision="promote")
    else:
        new = r.changed(state="aborted", last_decision="abort")
    detail: dict[str, Any] = {"action": action, "weight": new.weight, "note": note}
    if evidence is not None:
        detail["evidence"] = evidence
    if report is not None:
        detail["gate"] = report.as_dict()
    store.put_rollout(new, expected_revision=r.revision, actor=actor,
                      note=orjson.dumps(detail).decode())
    return new


def decide(rollout: Rollout, gates: list[GateResult], now: datetime) -> str | None:
    """What the gates say to do now: abort on any failing gate; step (or promote at the last
    step) when every gate passes and the step's hold time is over; otherwise nothing."""
    if rollout.state != "running" or not rollout.auto:
        return None
    if any(g.verdict == "fail" for g in gates):
        return "abort"
    if rollout.canary_version is None:
        return None  # shadow-only: evidence for people, no automatic action
    if all(g.verdict in ("pass", "skip") for g in gates) and now - rollout.step_started_at >= timedelta(seconds=rollout.step_hold_s):
        return "promote" if rollout.step_index + 1 >= len(rollout.steps) else "step"
    return None


def rollout_status(store: PromptStore, prompt: str, *, flips: int = 20,
                   production_label: str = "production") -> dict[str, Any]:
    """The rollout with its evidence; `promotion_gate` is what the promotion gate says of the
    canary version now (None without an active canary)."""
    r = _current(store, prompt)
    stats = build_rollout_stats(store.rollout_stats(r.id))
    gates = evaluate_gates(r, stats)
    next_step = None
    if r.active and r.canary_version is not None:
        next_step = (r.step_started_at + timedelta(seconds=r.step_hold_s)).isoformat(timespec="seconds")
    promotion = None
    if r.active and r.canary_version is not None:
        promotion = gate_report(store, prompt, r.canary_version, production_label=production_label).as_dict()
    return {
        "rollout": r.model_dump(mode="json"),
        "weight": r.weight,
        "stats": stats.as_dict(),
        "gates": [g.as_dict() for g in gates],
        "next_step_not_before": next_step,
        "would_decide": decide(r, gates, datetime.now(UTC)),
        "promotion_gate": promotion,
        "flips": [f.as_dict() for f in flips_view(store.rollout_flips(r.id, flips))],
    }
