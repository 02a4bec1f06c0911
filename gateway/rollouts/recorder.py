"""Evidence for rollouts: counters per arm and per (stable, candidate) pair, shared by every
gateway replica through the registry store, and the view that gates and `status` read.

Counters are accumulated in memory and flushed to the store once a second (one small write,
off the request path); on a store failure they stay in memory and are retried. Flat keys:

    <arm>:requests | errors | verdicts | parse_failures      arm = stable | canary
    <arm>:flag:<category>                                    decisions other than allow
    <arm>:lat:<bucket_ms>                                    latency histogram
    pair:<v>:n | agree | errors | dropped                    shadow comparisons of version v
    pair:<v>:cm:<stable_category>:<candidate_category>       confusion matrix (category, 'none' when allowed)
    pair:<v>:sflag:<category> | cflag:<category>            flags on each side of the pair
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.verdict import Verdict
from prompt_registry import PromptStore, StoreUnavailable

__all__ = ["LATENCY_BUCKETS_MS", "RolloutRecorder", "cohen_kappa", "flips_view", "stats_view"]

log = logging.getLogger("modgate.rollouts")
LATENCY_BUCKETS_MS = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)


def _label(v: Verdict) -> str:
    """The category a verdict flags, 'none' when it allows."""
    return "none" if v.decision == "allow" else (v.category or "none")


def _lat_bucket(ms: float) -> str:
    for b in LATENCY_BUCKETS_MS:
        if ms <= b:
            return str(b)
    return "inf"


class RolloutRecorder:
    def __init__(self, store: PromptStore, *, flush_s: float = 1.0, keep_flips: int = 500,
                 memo_ttl_s: float = 7 * 86400) -> None:
        self._store = store
        self._flush_s = flush_s
        self._keep_flips = keep_flips
        self._memo_ttl_s = memo_ttl_s
        self._counters: dict[str, Counter[str]] = {}
        self._flips: dict[str, list[str]] = {}
        self._memos: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def _c(self, rollout_id: str) -> Counter[str]:
        return self._counters.setdefault(rollout_id, Counter())

    def primary(self, rollout_id: str, arm: str, verdict: Verdict | None, latency_ms: float) -> None:
        """A caller request served by *arm* (verdict None: the request failed)."""
        c = self._c(rollout_id)
        c[f"{arm}:requests"] += 1
        if verdict is None:
            c[f"{arm}:errors"] += 1
            return
        c[f"{arm}:verdicts"] += 1
        c[f"{arm}:lat:{_lat_bucket(latency_ms)}"] += 1
        if verdict.fail_reason:
            c[f"{arm}:parse_failures"] += 1
        if verdict.decision != "allow":
            c[f"{arm}:flag:{verdict.category or 'none'}"] += 1

    def memo(self, request_id: str, rollout_id: str, arm: str, prompt: str, version: int, verdict: Verdict) -> None:
        """Remember what a request under a rollout was answered, for feedback that comes later."""
        self._memos[request_id] = orjson.dumps({
            "rollout_id": rollout_id, "arm": arm, "prompt": prompt, "version": version,
            "decision": verdict.decision, "category": verdict.category}).decode()

    def feedback(self, rollout_id: str, arm: str, predicted: Verdict, gold: Verdict) -> None:
        """A reviewer's label for a request answered by *arm*: true/false positives per category."""
        c = self._c(rollout_id)
        c[f"fb:{arm}:n"] += 1
        p, g = _label(predicted), _label(gold)
        if p == g:
            if g != "none":
                c[f"fb:{arm}:tp:{g}"] += 1
        else:
            if p != "none":
                c[f"fb:{arm}:fp:{p}"] += 1
            if g != "none":
                c[f"fb:{arm}:fn:{g}"] += 1

    def pair(self, rollout_id: str, version: int, stable: Verdict, candidate: Verdict | None, *,
             request_id: str, item_id: str, stable_version: int) -> None:
        """A shadow evaluation of *version* next to the verdict the caller got."""
        c = self._c(rollout_id)
        p = f"pair:{version}"
        if candidate is None:
            c[f"{p}:errors"] += 1
            return
        c[f"{p}:n"] += 1
        a, b = _label(stable), _label(candidate)
        c[f"{p}:cm:{a}:{b}"] += 1
        if stable.decision == candidate.decision:
            c[f"{p}:agree"] += 1
        if stable.decision != "allow":
            c[f"{p}:sflag:{a}"] += 1
        if candidate.decision != "allow":
            c[f"{p}:cflag:{b}"] += 1
        if stable.decision != candidate.decision or a != b:
            self._flips.setdefault(rollout_id, []).append(orjson.dumps({
                "at": datetime.now(UTC).isoformat(timespec="seconds"), "request_id": request_id,
                "item_id": item_id, "stable": {"version": stable_version, "decision": stable.decision,
                                               "category": stable.category},
                "candidate": {"version": version, "decision": candidate.decision,
                              "category": candidate.category, "fail_reason": candidate.fail_reason},
            }).decode())

    def dropped(self, rollout_id: str, version: int) -> None:
        self._c(rollout_id)[f"pair:{version}:dropped"] += 1

    # -- flushing -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
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


def cohen_kappa(matrix: Mapping[str, Mapping[str, int]]) -> float | None:
    labels = set(matrix) | {b for row in matrix.values() for b in row}
    n = sum(v for row in matrix.values() for v in row.values())
    if n == 0:
        return None
    po = sum(matrix.get(k, {}).get(k, 0) for k in labels) / n
    pe = sum((sum(matrix.get(k, {}).values()) / n) * (sum(row.get(k, 0) for row in matrix.values()) / n)
             for k in labels)
    if pe >= 1.0:
        return 1.0 if po >= 1.0 else 0.0
    return (po - pe) / (1 - pe)


def _p95(hist: Mapping[str, int]) -> float | None:
    total = sum(hist.values())
    if total == 0:
        return None
    need = 0.95 * total
    seen = 0
    for b in [*map(str, LATENCY_BUCKETS_MS), "inf"]:
        seen += hist.get(b, 0)
        if seen >= need:
            return float("inf") if b == "inf" else float(b)
    return None


def _arm() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "verdicts": 0, "parse_failures": 0, "flags": {},
            "latency_ms_hist": {}, "feedback": {"n": 0, "categories": {}}}


def stats_view(flat: Mapping[str, int]) -> dict[str, Any]:
    """Nested view of the flat counters: per arm, per pair (agreement, kappa, confusion)."""
    arms: dict[str, dict[str, Any]] = {}
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        parts = key.split(":")
        if parts[0] == "fb":
            a = arms.setdefault(parts[1], _arm())
            fb = a["feedback"]
            if parts[2] == "n":
                fb["n"] = value
            else:
                fb["categories"].setdefault(parts[3], {"tp": 0, "fp": 0, "fn": 0})[parts[2]] = value
            continue
        if parts[0] == "pair":
            p = pairs.setdefault(parts[1], {"n": 0, "agree": 0, "errors": 0, "dropped": 0, "confusion": {},
                                             "stable_flags": {}, "candidate_flags": {}})
            if parts[2] == "cm":
                p["confusion"].setdefault(parts[3], {})[parts[4]] = value
            elif parts[2] == "sflag":
                p["stable_flags"][parts[3]] = value
            elif parts[2] == "cflag":
                p["candidate_flags"][parts[3]] = value
            else:
                p[parts[2]] = value
        else:
            a = arms.setdefault(parts[0], _arm())
            if parts[1] == "flag":
                a["flags"][parts[2]] = value
            elif parts[1] == "lat":
                a["latency_ms_hist"][parts[2]] = value
            else:
                a[parts[1]] = value
    for a in arms.values():
        for cat in a["feedback"]["categories"].values():
            cat["precision"] = cat["tp"] / (cat["tp"] + cat["fp"]) if cat["tp"] + cat["fp"] else None
            cat["recall"] = cat["tp"] / (cat["tp"] + cat["fn"]) if cat["tp"] + cat["fn"] else None
        a["p95_ms"] = _p95(a["latency_ms_hist"])
        n = a["verdicts"]
        a["flag_rates"] = {k: v / n for k, v in a["flags"].items()} if n else {}
    for p in pairs.values():
        p["agreement"] = p["agree"] / p["n"] if p["n"] else None
        p["kappa"] = cohen_kappa(p["confusion"])
    return {"stable": arms.get("stable", {}), "canary": arms.get("canary", {}), "pairs": pairs}


def flips_view(raw: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(r) for r in raw]


