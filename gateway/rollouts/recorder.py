"""Evidence for rollouts: counters per arm and per (stable, candidate) pair, shared by every
gateway replica through the registry store, and the typed view that gates and `status` read.

Counters are accumulated in memory and flushed to the store once a second (one small write,
off the request path); on a store failure they stay in memory and are retried. Every key is a
typed counter of `prompt_registry.rollout_stats` encoded by that module's codec (`encode_key`),
the one place that spells the stored keys (the format is listed there). Readers (the
controller, `status`) turn what the store returns into `RolloutStats` with
`build_rollout_stats`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Protocol

import orjson

from gateway.verdict import Verdict
from prompt_registry import MemoStore, RolloutStore, StoreUnavailable
from prompt_registry.rollout_stats import (
    ArmCount,
    ArmFlag,
    ArmLatencySketch,
    CounterKey,
    FeedbackCount,
    FeedbackOutcome,
    Flip,
    FlipVerdict,
    PairConfusion,
    PairCount,
    PairFlag,
    as_arm,
    encode_key,
    sketch_index,
)

__all__ = ["RecorderStore", "RolloutRecorder", "flips_view"]

log = logging.getLogger("modgate.rollouts")


def _label(v: Verdict) -> str:
    """The category a verdict flags, 'none' when it allows."""
    return "none" if v.decision == "allow" else (v.category or "none")


def _not_an_arm(arm: str, what: str) -> None:
    # Only stable and canary carry statistics. The callers check, but a bad arm (say from a
    # damaged verdict memo) must cost a log line, not the request or the feedback call.
    log.warning("rollout %s for arm %r not counted: not a rollout arm", what, arm)


@functools.lru_cache(maxsize=8192)
def _key(make: Callable[..., CounterKey], *args: Hashable) -> str:
    """The stored key of counter `make(*args)`. Encoded once per distinct counter: building and
    validating a counter on every increment cost ~7 us per request on the request path; the
    set of counters is small (arms x categories x sketch buckets, versions x categories^2; a
    latency sketch spans ~115 buckets per factor of 10 in latency)."""
    return encode_key(make(*args))


class RecorderStore(RolloutStore, MemoStore, Protocol):
    """What the recorder writes: rollout counters and flips, and verdict memos."""


class RolloutRecorder:
    def __init__(self, store: RecorderStore, *, flush_s: float = 1.0, keep_flips: int = 500,
                 memo_ttl_s: float = 7 * 86400) -> None:
        self._store = store
        self._flush_s = flush_s
        self._keep_flips = keep_flips
        self._memo_ttl_s = memo_ttl_s
        self._counters: dict[str, Counter[str]] = {}
        self._flips: dict[str, list[str]] = {}
        self._memos: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def _c(self, rollout_id: str) -> Counter[str]:
        return self._counters.setdefault(rollout_id, Counter())

    def primary(self, rollout_id: str, arm: str, verdict: Verdict | None, latency_ms: float) -> None:
        """A caller request served by *arm* (verdict None: the request failed)."""
        if (which := as_arm(arm)) is None:
            _not_an_arm(arm, "request")
            return
        c = self._c(rollout_id)
        c[_key(ArmCount, which, "requests")] += 1
        if verdict is None:
            c[_key(ArmCount, which, "errors")] += 1
            return
        c[_key(ArmCount, which, "verdicts")] += 1
        c[_key(ArmLatencySketch, which, sketch_index(latency_ms))] += 1
        if verdict.fail_reason:
            c[_key(ArmCount, which, "parse_failures")] += 1
        if verdict.decision != "allow":
            c[_key(ArmFlag, which, verdict.category or "none")] += 1

    def memo(self, request_id: str, rollout_id: str, arm: str, prompt: str, version: int, verdict: Verdict) -> None:
        """Remember what a request under a rollout was answered, for feedback that comes later."""
        self._memos[request_id] = orjson.dumps({
            "rollout_id": rollout_id, "arm": arm, "prompt": prompt, "version": version,
            "decision": verdict.decision, "category": verdict.category}).decode()

    def feedback(self, rollout_id: str, arm: str, predicted: Verdict, gold: Verdict, *,
                 weight: int = 1) -> None:
        """A reviewer's label for a request answered by *arm*: true/false positives per category.
        `weight=-1` retracts a label counted before (a request's newer label replaces it), so
        every request counts once, with its latest label."""
        if (which := as_arm(arm)) is None:
            _not_an_arm(arm, "feedback")
            return
        c = self._c(rollout_id)
        c[_key(FeedbackCount, which)] += weight
        p, g = _label(predicted), _label(gold)
        if p == g:
            if g != "none":
                c[_key(FeedbackOutcome, which, "tp", g)] += weight
        else:
            if p != "none":
                c[_key(FeedbackOutcome, which, "fp", p)] += weight
            if g != "none":
                c[_key(FeedbackOutcome, which, "fn", g)] += weight

    def pair(self, rollout_id: str, version: int, stable: Verdict, candidate: Verdict | None, *,
             request_id: str, item_id: str, stable_version: int) -> None:
        """A shadow evaluation of *version* next to the verdict the caller got."""
        c = self._c(rollout_id)
        if candidate is None:
            c[_key(PairCount, version, "errors")] += 1
            return
        c[_key(PairCount, version, "n")] += 1
        a, b = _label(stable), _label(candidate)
        c[_key(PairConfusion, version, a, b)] += 1
        if stable.decision == candidate.decision:
            c[_key(PairCount, version, "agree")] += 1
        if stable.decision != "allow":
            c[_key(PairFlag, version, "stable", a)] += 1
        if candidate.decision != "allow":
            c[_key(PairFlag, version, "candidate", b)] += 1
        if stable.decision != candidate.decision or a != b:
            self._flips.setdefault(rollout_id, []).append(Flip(
                at=datetime.now(UTC).isoformat(timespec="seconds"), request_id=request_id, item_id=item_id,
                stable=FlipVerdict(stable_version, stable.decision, stable.category),
                candidate=FlipVerdict(version, candidate.decision, candidate.category, candidate.fail_reason),
            ).to_json())

    def dropped(self, rollout_id: str, version: int) -> None:
        self._c(rollout_id)[_key(PairCount, version, "dropped")] += 1

    # -- flushing -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Store what was recorded so far; returns once it is stored. Flushes take turns: the
        once-a-second flush and an explicit one (a tick, an admin call) overlap, and the later
        one would otherwise find the counters already taken and return before they are
        stored, leaving its caller to read stale evidence."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        counters, flips, memos = self._counters, self._flips, self._memos
        self._counters, self._flips, self._memos = {}, {}, {}
        if memos:
            try:
                await asyncio.to_thread(self._store.remember_verdicts, memos, ttl_s=self._memo_ttl_s)
            except StoreUnavailable as exc:
                log.warning("verdict memos not stored (feedback for them will not match): %s", exc)
        for rollout_id in set(counters) | set(flips):
            data = dict(counters.get(rollout_id, {}))
            f = flips.get(rollout_id, [])
            try:
                await asyncio.to_thread(self._store.add_rollout_stats, rollout_id, data, f,
                                        keep_flips=self._keep_flips)
            except StoreUnavailable as exc:
                log.warning("rollout stats not flushed (will retry): %s", exc)
                self._c(rollout_id).update(data)
                self._flips.setdefault(rollout_id, [])[:0] = f[-self._keep_flips:]

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()


def flips_view(raw: list[str]) -> list[Flip]:
    """The stored flips, newest first as the store returns them; a damaged record is skipped
    (and logged) rather than hiding the others."""
    out = []
    for r in raw:
        flip = Flip.from_json(r)
        if flip is None:
            log.warning("unreadable rollout flip record skipped: %.200s", r)
        else:
            out.append(flip)
    return out
