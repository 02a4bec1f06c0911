"""The automatic rollout controller: every `interval_s`, judge each running rollout by its gates
and step, promote or abort it. Runs in every gateway replica; compare-and-set on the rollout
revision makes sure only one replica acts on a given state (the others see a conflict and
re-read).

A promotion the promotion gate refuses (no passing stored scorecard for the canary version) is
not forced: the rollout is paused at its last safe weight (within `unproven_max_weight`, or 0)
with the gate's findings (action "hold" in the audit log, `last_decision` in the status), for
an operator to score the version, promote by hand or abort. A canary that has not passed its
gate is promoted, not stepped, past `unproven_max_weight`; one that serves more than that and
whose gate stops passing (say a new scorecard) is put back ("fallback") on every tick, whether
the rollout is automatic, manual or paused."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from gateway.rollouts.ops import apply_action, decide, needs_fallback
from gateway.rollouts.recorder import RolloutRecorder
from prompt_registry import PromptStore, RegistryError
from prompt_registry.gates import gate_report
from prompt_registry.rollout_stats import build_rollout_stats
from prompt_registry.rollouts import RolloutError, evaluate_gates

__all__ = ["RolloutController"]

log = logging.getLogger("modgate.rollouts")


class RolloutController:
    def __init__(self, store: PromptStore, recorder: RolloutRecorder | None = None, *,
                 interval_s: float = 5.0, production_label: str = "production",
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = store
        self._recorder = recorder
        self._interval_s = interval_s
        self._label = production_label
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.decisions: list[tuple[str, str]] = []

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout controller tick failed")

    async def tick(self) -> list[tuple[str, str]]:
        """Judge every running rollout once; return the (prompt, action) taken."""
        if self._recorder is not None:
            await self._recorder.flush()
        taken = []
        try:
            rollouts = await asyncio.to_thread(self._store.list_rollouts)
        except RegistryError as exc:
            log.warning("rollout controller: store unavailable: %s", exc)
            return []
        for r in rollouts:
            try:
                if r.active and (refused := await asyncio.to_thread(needs_fallback, self._store, r, self._label)):
                    await asyncio.to_thread(
                        apply_action, self._store, r.prompt, "fallback", actor="rollout-controller",
                        expected=r, production_label=self._label, gate=refused,
                        why=f"v{r.canary_version} serves {r.weight}% but does not pass its promotion "
                            f"gate ({refused.summary()})")
                    log.warning("rollout %s of %s: fallback: v%s does not pass its promotion gate",
                                r.id, r.prompt, r.canary_version)
                    taken.append((r.prompt, "fallback"))
                    continue
            except (RolloutError, RegistryError) as exc:
                log.info("rollout %s of %s: no fallback this tick: %s", r.id, r.prompt, exc)
                continue
            if r.state != "running" or not r.auto:
                continue
            try:
                stats = build_rollout_stats(await asyncio.to_thread(self._store.rollout_stats, r.id))
                gates = evaluate_gates(r, stats)
                proven = True
                nxt = r.next_weight
                if r.canary_version is not None and nxt is not None and nxt > r.unproven_max_weight:
                    report = await asyncio.to_thread(gate_report, self._store, r.prompt, r.canary_version,
                                                     production_label=self._label)
                    proven = report.verdict == "pass"
                action = decide(r, gates, self._clock(), proven=proven)
                if action is None:
                    continue
                evidence = [g.as_dict() for g in gates]
                new = await asyncio.to_thread(
                    apply_action, self._store, r.prompt, action, actor="rollout-controller",
                    note="decided by the gates", evidence=evidence, expected=r,
                    production_label=self._label, hold_on_gate=True)
                if action == "promote" and new.state != "promoted":
                    action = "hold"
                    log.warning("rollout %s of %s: promotion held: %s", r.id, r.prompt, new.last_decision)
                log.warning("rollout %s of %s: %s (gates: %s)", r.id, r.prompt, action,
                            ", ".join(f"{g.name}={g.verdict}" for g in gates))
                taken.append((r.prompt, action))
            except (RolloutError, RegistryError) as exc:
                log.info("rollout %s of %s: no action this tick: %s", r.id, r.prompt, exc)
        self.decisions.extend(taken)
        return taken

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
