"""Rollout operations shared by the admin API, the CLI and the automatic controller: start,
step, pause, resume, promote, abort, status, and the gate-driven decision.

Every transition is a compare-and-set on the rollout's revision and is audited with its
evidence, so two gateway replicas (or a human and the controller) can never both act on the
same state. Promotion moves the `production` label with compare-and-set against the stable
version, so it cannot overwrite a label someone moved meanwhile, and through the promotion gate
(`prompt_registry.gates`), like every production move: a manual promote is refused
(`GateRefused`) unless an admin overrides it; an automatic one (`hold_on_gate`) pauses the
rollout instead at its last safe weight (or 0: `on_promotion_refused`), with the gate's
findings in `last_decision` and in the audit entry, so an operator sees why it stopped.
Under four eyes a promotion (manual or automatic) holds the rollout paused at its step, with
`last_decision` "awaiting approval <id>"; approving the request moves production and
`complete_approved_promotion` marks the rollout promoted.

The promotion gate guards traffic, not only the label: a canary version whose gate fails does
not start without an admin override, and one that has not passed its gate never serves more
than `unproven_max_weight` (default 50 %) of traffic: its steps above that are refused at
start, `step` refuses to go past it, the controller promotes instead of stepping past it, and
a canary above it whose gate stops passing is put back (`fallback`). Only a promotion, through
the gate, gives it all the traffic.

Every transition's audit note is JSON with the rollout as stored after it, so every rollout,
finished ones included, can be listed and shown with its transitions and evidence
(`rollout_history`, `rollout_detail`).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.rollouts.recorder import flips_view
from prompt_registry import (
    ApprovalRequest,
    ApprovalRequired,
    GateOverride,
    GateRefused,
    GateReport,
    PromptNotFound,
    PromptStore,
)
from prompt_registry.gates import gate_report, move_label
from prompt_registry.lifecycle import assignable_or_raise
from prompt_registry.ops import check_model_served, summarize
from prompt_registry.rollout_stats import build_rollout_stats
from prompt_registry.rollouts import (
    UNPROVEN_MAX_WEIGHT,
    GateConfig,
    GateResult,
    Rollout,
    RolloutError,
    ShadowSpec,
    check_unproven_steps,
    evaluate_gates,
    new_rollout,
)

__all__ = ["ACTIONS", "apply_action", "complete_approved_promotion", "decide", "find_rollout", "needs_fallback", "rollout_detail",
           "rollout_history", "rollout_status", "rollout_view", "start_rollout"]

ACTIONS = ("step", "pause", "resume", "promote", "abort")


def start_rollout(store: PromptStore, prompt: str, *, canary_version: int | None, steps: list[int],
                  shadows: list[ShadowSpec], step_hold_s: float, gates: GateConfig, auto: bool,
                  subject_key: str, actor: str, production_label: str = "production", note: str = "",
                  override: GateOverride | None = None, unproven_max_weight: int = UNPROVEN_MAX_WEIGHT,
                  on_promotion_refused: str = "last_safe",
                  served_models: Collection[str] | None = None) -> Rollout:
    """Start a rollout. A canary version whose promotion gate fails is refused (GateRefused)
    unless an admin *override* is given (recorded in the audit entry); one that has not passed
    its gate (failed and overridden, or no gate declared) may only take steps within
    *unproven_max_weight* (RolloutError otherwise): its last step is the promotion itself.
    A canary or shadow version whose model is not served (*served_models*, when given) is
    refused (UnservedModel): the canary's callers would get errors, the shadow's calls fail."""
    stable = store.labels(prompt).get(production_label)
    if stable is None:
        raise PromptNotFound(f"prompt {prompt!r} has no {production_label!r} label to roll out from")
    lifecycle = store.get_lifecycle(prompt)
    for v in [canary_version, *(s.version for s in shadows)]:
        if v is not None:
            version = store.get_version(prompt, v)  # raises PromptNotFound naming the version
            assignable_or_raise(lifecycle, prompt, v, what="rollout")
            check_model_served(version, served_models)
    try:
        rollout = new_rollout(prompt, stable_version=stable, canary_version=canary_version, steps=steps,
                              shadows=shadows, step_hold_s=step_hold_s, gates=gates, auto=auto,
                              subject_key=subject_key, started_by=actor,
                              unproven_max_weight=unproven_max_weight,
                              on_promotion_refused=on_promotion_refused)
    except ValidationError as exc:
        raise RolloutError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    gate_note = ""
    report: GateReport | None = None
    if canary_version is not None and canary_version != stable:
        report = gate_report(store, prompt, canary_version, production_label=production_label)
        if report.verdict == "fail":
            if override is None:
                raise GateRefused(report)
            gate_note = f"GATE OVERRIDDEN by {override.by}: {override.reason} ({report.summary()})"
        else:
            gate_note = report.summary()
        if report.verdict != "pass":
            check_unproven_steps(rollout)
    summary = (f"start: canary v{canary_version} at {rollout.weight}%, shadows "
               + (", ".join(f"v{s.version}@{s.sample_rate:.0%}" for s in shadows) or "none"))
    if note:  # the operator's why goes beside the description, never in place of it (#21)
        summary = f"{summary} | {note}"
    store.put_rollout(rollout, expected_revision=None, actor=actor,
                      note=_note("start", rollout, note=summary, gate=report, extra={"gate_note": gate_note}))
    return rollout


def _note(action: str, rollout: Rollout, *, note: str = "", evidence: list[dict[str, Any]] | None = None,
          gate: GateReport | None = None, extra: dict[str, Any] | None = None) -> str:
    """The audit note of a rollout transition: JSON with the action, the weight, the rollout
    as stored after it (the history view reads it back) and the evidence."""
    detail: dict[str, Any] = {"action": action, "weight": rollout.weight, "note": note}
    if evidence is not None:
        detail["evidence"] = evidence
    if gate is not None:
        detail["gate"] = gate.as_dict()
    detail.update(extra or {})
    detail["rollout"] = rollout.model_dump(mode="json")
    return orjson.dumps(detail).decode()


def _current(store: PromptStore, prompt: str) -> Rollout:
    rollout = store.get_rollout(prompt)
    if rollout is None:
        raise PromptNotFound(f"prompt {prompt!r} has no rollout")
    return rollout


def _proven(store: PromptStore, r: Rollout, production_label: str) -> GateReport:
    assert r.canary_version is not None
    return gate_report(store, r.prompt, r.canary_version, production_label=production_label)


def apply_action(store: PromptStore, prompt: str, action: str, *, actor: str, note: str = "",
                 evidence: list[dict[str, Any]] | None = None, expected: Rollout | None = None,
                 production_label: str = "production", override: GateOverride | None = None,
                 hold_on_gate: bool = False, why: str = "", gate: GateReport | None = None) -> Rollout:
    """Apply one transition; raise RolloutError when the state does not allow it.

    `step` past `unproven_max_weight` needs a canary that passes its promotion gate now
    (RolloutError otherwise: promote instead). `promote` goes through the promotion gate:
    GateRefused when it fails (unless *override*), or, with *hold_on_gate* (the automatic
    controller), the rollout is paused at its last safe weight and the refusal recorded.
    `fallback` (the controller's, not offered to people) does the same when a canary above the
    unproven share no longer passes its gate (*why*)."""
    r = expected or _current(store, prompt)
    now = datetime.now(UTC)
    if action not in (*ACTIONS, "fallback"):
        raise RolloutError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if not r.active:
        raise RolloutError(f"rollout {r.id} of {prompt!r} is already {r.state}")
    report: GateReport | None = None
    if action == "step":
        if r.canary_version is None:
            raise RolloutError("a shadow-only rollout has no canary weight to step")
        nxt = r.next_weight
        if nxt is None:
            raise RolloutError(f"already at the last step ({r.weight}%); promote or abort")
        if nxt > r.unproven_max_weight:
            report = _proven(store, r, production_label)
            if report.verdict != "pass":
                raise RolloutError(
                    f"v{r.canary_version} has not passed its promotion gate ({report.summary()}), so it "
                    f"may serve at most {r.unproven_max_weight}% of traffic: the next step ({nxt}%) is "
                    "the promotion itself; promote (through the gate) or abort")
        new = r.changed(step_index=r.step_index + 1, step_started_at=now, last_decision="step", held_weight=None)
    elif action == "pause":
        if r.state == "paused":
            raise RolloutError("already paused")
        new = r.changed(state="paused", last_decision="pause")
    elif action == "resume":
        if r.state != "paused":
            raise RolloutError("not paused")
        new = r.changed(state="running", step_started_at=now, last_decision="resume", held_weight=None)
    elif action == "fallback":
        report = gate
        new = r.fallen_back(f"fallback: {why}")
    elif action == "promote":
        if r.canary_version is None:
            raise RolloutError("a shadow-only rollout has no canary to promote")
        try:
            _, report = move_label(store, prompt, production_label, r.canary_version,
                                   expected=r.stable_version, actor=actor,
                                   note=f"promoted by rollout {r.id}", override=override,
                                   production_label=production_label,
                                   record_refusal=not hold_on_gate,  # a hold is its own entry
                                   rollout_id=r.id)
        except ApprovalRequired as exc:
            # four eyes: hold at the current step until a second key holder approves (the
            # approval moves production and completes the rollout) or denies
            action = "pause"
            new = r.changed(state="paused", last_decision=f"awaiting approval {exc.request.id}: "
                            f"promotion of v{r.canary_version} needs a second key holder "
                            f"(requested by {exc.request.requested_by})")
            note = note or new.last_decision
        except GateRefused as exc:
            if not hold_on_gate:
                raise
            report = exc.report
            action = "hold"
            new = r.fallen_back(f"hold: promotion refused by the gate: {report.summary()}")
        else:
            new = r.changed(state="promoted", last_decision="promote", held_weight=None)
    else:
        new = r.changed(state="aborted", last_decision="abort")
    store.put_rollout(new, expected_revision=r.revision, actor=actor,
                      note=_note(action, new, note=note, evidence=evidence, gate=report,
                                 extra={"override": override.model_dump()} if override and action == "promote" else None))
    return new


def complete_approved_promotion(store: PromptStore, prompt: str, request: ApprovalRequest, *,
                                actor: str, production_label: str = "production") -> Rollout | None:
    """After a four-eyes approval moved production (`prompt_registry.ops.approve_request`):
    mark the rollout that asked for it promoted, when it is still the prompt's active rollout
    and production now serves its canary. None when there is nothing to complete."""
    r = store.get_rollout(prompt)
    if (r is None or not r.active or request.rollout_id != r.id
            or store.labels(prompt).get(production_label) != r.canary_version):
        return None
    new = r.changed(state="promoted", last_decision="promote", held_weight=None)
    store.put_rollout(new, expected_revision=r.revision, actor=actor,
                      note=_note("promote", new, note=f"approval {request.id} by {request.decided_by}"))
    return new


def needs_fallback(store: PromptStore, r: Rollout, production_label: str = "production") -> GateReport | None:
    """The failing (or absent) gate report when *r* serves its canary above the unproven share
    although the canary does not pass its promotion gate (any more); None when all is well."""
    if not r.active or r.canary_version is None or r.weight <= r.unproven_max_weight:
        return None
    report = _proven(store, r, production_label)
    return None if report.verdict == "pass" else report


def decide(rollout: Rollout, gates: list[GateResult], now: datetime, *, proven: bool = True) -> str | None:
    """What the gates say to do now: abort on any failing gate; step (or promote at the last
    step) when every gate passes or is skipped and the step's hold time is over; otherwise
    nothing. With *proven* False (the canary has not passed its promotion gate), a step past
    `unproven_max_weight` is replaced by the promotion itself."""
    if rollout.state != "running" or not rollout.auto:
        return None
    if any(g.verdict == "fail" for g in gates):
        return "abort"
    if rollout.canary_version is None:
        return None  # shadow-only: evidence for people, no automatic action
    if all(g.verdict in ("pass", "skip") for g in gates) and now - rollout.step_started_at >= timedelta(seconds=rollout.step_hold_s):
        nxt = rollout.next_weight
        if nxt is None or (not proven and nxt > rollout.unproven_max_weight):
            return "promote"
        return "step"
    return None


def _serving(r: Rollout, production: int | None) -> list[dict[str, Any]]:
    """Who answers callers now: version, arm and share of traffic (%)."""
    if r.active and r.canary_version is not None and r.weight > 0:
        return [{"version": r.stable_version, "arm": "stable", "share": 100 - r.weight},
                {"version": r.canary_version, "arm": "canary", "share": r.weight}]
    version = r.stable_version if r.active else production
    return [] if version is None else [{"version": version, "arm": "stable", "share": 100}]


def _outcome(store: PromptStore, r: Rollout, production: int | None, production_label: str) -> str:
    """One sentence: what happened to the rollout and what serves now."""
    if r.active:
        if r.canary_version is None:
            return f"{r.state}: shadows only; production v{r.stable_version} serves all traffic"
        text = (f"{r.state}: canary v{r.canary_version} serves {r.weight}% of traffic, production "
                f"v{r.stable_version} the rest")
        return text + (f" ({r.last_decision})" if r.state == "paused" and r.last_decision else "")
    when = r.updated_at.isoformat(timespec="seconds")
    if r.state == "promoted":
        text = f"promoted v{r.canary_version} to {production_label} at {when}"
        if production == r.canary_version:
            return f"{text}; v{production} serves all traffic"
    else:
        text = f"aborted at {when}; the canary got no more traffic"
        if production == r.stable_version:
            return f"{text}; production v{production} serves all traffic"
    moves = [e for e in store.audit(r.prompt) if e.action == "label" and e.label == production_label
             and e.at >= r.updated_at]
    how = f" ({moves[-1].note or 'moved'} by {moves[-1].actor} at {moves[-1].at.isoformat(timespec='seconds')})" \
        if moves else ""
    return f"{text}; {production_label} has since moved to v{production}{how}, which serves all traffic"


def rollout_status(store: PromptStore, prompt: str, *, flips: int = 20,
                   production_label: str = "production") -> dict[str, Any]:
    """The prompt's current (or last) rollout with its evidence (`rollout_view`)."""
    return rollout_view(store, _current(store, prompt), flips=flips, production_label=production_label)


def rollout_view(store: PromptStore, r: Rollout, *, flips: int = 20,
                 production_label: str = "production") -> dict[str, Any]:
    """A rollout with its evidence. An active one: gates with what each still needs, the next
    step, what the gates would decide, the promotion gate's verdict on the canary now. A
    finished one: no live gates (nothing is decided any more); `outcome` says what happened
    and `serving` what answers callers now, `final_evidence` the gates at its last transition."""
    stats = build_rollout_stats(store.rollout_stats(r.id))
    production = store.labels(prompt := r.prompt).get(production_label)
    gates = evaluate_gates(r, stats) if r.active else []
    next_step = None
    promotion = None
    if r.active and r.canary_version is not None:
        next_step = (r.step_started_at + timedelta(seconds=r.step_hold_s)).isoformat(timespec="seconds")
        promotion = gate_report(store, prompt, r.canary_version, production_label=production_label).as_dict()
    final = None
    if not r.active:
        for t in reversed(_transitions(store, prompt, r.id)):
            if t.get("evidence") is not None:
                final = t["evidence"]
                break
    return {
        "rollout": r.model_dump(mode="json"),
        "weight": r.weight,
        "outcome": _outcome(store, r, production, production_label),
        "serving": _serving(r, production),
        "stats": stats.as_dict(),
        "gates": [g.as_dict() for g in gates],
        "final_evidence": final,
        "next_step_not_before": next_step,
        "would_decide": decide(r, gates, datetime.now(UTC)) if r.active else None,
        "promotion_gate": promotion,
        "flips": [f.as_dict() for f in flips_view(store.rollout_flips(r.id, flips))],
    }


# -- history ------------------------------------------------------------------------------

def _rollout_entries(store: PromptStore, prompt: str) -> list[tuple[str | None, dict[str, Any]]]:
    """Every rollout audit entry of *prompt* as (rollout id or None, transition). Entries
    written before the notes carried the rollout have no id; a plain-text note starts one."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for e in store.audit(prompt):
        if e.action != "rollout":
            continue
        try:
            d = orjson.loads(e.note) if e.note.startswith("{") else None
        except orjson.JSONDecodeError:
            d = None
        if not isinstance(d, dict):
            d = {"action": "start", "note": e.note}
        snapshot = d.get("rollout")
        rid = snapshot.get("id") if isinstance(snapshot, dict) else None
        t = {"at": e.at.isoformat(timespec="seconds"), "actor": e.actor, "state": e.label,
             "stable_version": e.from_version, "canary_version": e.to_version, **d}
        out.append((rid if isinstance(rid, str) else None, t))
    return out


def _grouped(store: PromptStore, prompt: str) -> dict[str, list[dict[str, Any]]]:
    """Transitions per rollout id, oldest first. Old entries without an id are grouped from
    one start to the next under "legacy-N"; the current rollout claims the last such group
    when its own start predates the JSON notes."""
    groups: dict[str, list[dict[str, Any]]] = {}
    legacy = 0
    current_legacy: str | None = None
    for rid, t in _rollout_entries(store, prompt):
        if rid is None:
            if t.get("action") == "start" or current_legacy is None:
                legacy += 1
                current_legacy = f"legacy-{legacy}"
            rid = current_legacy
        else:
            current_legacy = None
        groups.setdefault(rid, []).append(t)
    current = store.get_rollout(prompt)
    if current is not None and current.id not in groups and legacy:
        groups[current.id] = groups.pop(f"legacy-{legacy}")
    return groups


def _transitions(store: PromptStore, prompt: str, rollout_id: str) -> list[dict[str, Any]]:
    return _grouped(store, prompt).get(rollout_id, [])


def _snapshot(store: PromptStore, prompt: str, rollout_id: str,
              transitions: list[dict[str, Any]]) -> Rollout | None:
    current = store.get_rollout(prompt)
    if current is not None and current.id == rollout_id:
        return current
    for t in reversed(transitions):
        try:
            return Rollout.model_validate(t["rollout"])
        except (KeyError, ValidationError):
            continue
    return None


def rollout_history(store: PromptStore, prompt: str, *, production_label: str = "production") -> list[dict[str, Any]]:
    """Every rollout of *prompt*, newest first: id, versions, state, when and by whom, the
    last decision and the number of transitions (`rollout_detail` shows one in full)."""
    summarize(store, prompt)  # PromptNotFound for an unknown prompt
    out = []
    for rid, ts in _grouped(store, prompt).items():
        r = _snapshot(store, prompt, rid, ts)
        first, last = ts[0], ts[-1]
        out.append({
            "id": rid, "state": r.state if r else last.get("state"),
            "stable_version": r.stable_version if r else first.get("stable_version"),
            "canary_version": r.canary_version if r else first.get("canary_version"),
            "shadows": [s.version for s in r.shadows] if r else [],
            "started_at": first["at"], "started_by": first["actor"], "updated_at": last["at"],
            "last_decision": r.last_decision if r else last.get("action", ""),
            "weight": r.weight if r else 0, "transitions": len(ts),
        })
    return out[::-1]


def rollout_detail(store: PromptStore, prompt: str, rollout_id: str, *, flips: int = 20,
                   production_label: str = "production") -> dict[str, Any]:
    """One rollout by id, finished ones included: its view (`rollout_view`) and every
    transition with its evidence and gate verdicts."""
    transitions = _transitions(store, prompt, rollout_id)
    r = _snapshot(store, prompt, rollout_id, transitions)
    if r is None:
        if not transitions:
            raise PromptNotFound(f"prompt {prompt!r} has no rollout {rollout_id!r}")
        return {"rollout": None, "transitions": _public(transitions)}
    return {**rollout_view(store, r, flips=flips, production_label=production_label),
            "transitions": _public(transitions)}


def find_rollout(store: PromptStore, rollout_id: str) -> str:
    """The prompt a rollout id belongs to (for `modgate rollouts show ID`)."""
    for prompt in store.list_prompts():
        if rollout_id in _grouped(store, prompt):
            return prompt
    raise PromptNotFound(f"no rollout {rollout_id!r}")


def _public(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transitions without the full rollout snapshot each carries (the view has the final one)."""
    return [{k: v for k, v in t.items() if k != "rollout"} for t in transitions]
