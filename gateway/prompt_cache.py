"""In-memory prompt label resolution for the hot path (no store round trip per request).

- A resolved (prompt, label) is served from memory. Change events from the store (Redis
  pub/sub, or SQLite's data_version) trigger an immediate background refresh of the affected
  entries, so a label move is visible on every replica within milliseconds; `refresh_s`
  re-reads entries anyway in case an event was lost (stale-while-revalidate: the request that
  notices never waits for it).
- One refresh per key is in flight at a time; concurrent cold requests share it.
- When the store is unreachable the last-known-good version is served and flagged `stale`,
  up to `max_staleness_s` after the last successful read; after that requests fail with
  StoreUnavailable rather than serve an arbitrarily old prompt.
- The store is synchronous (SQLite or redis-py); reads run in worker threads.
- It gets read-only facets of the store (`PromptCacheSource`): the hot path never writes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from prompt_registry import PromptNotFound, PromptVersion, StoreUnavailable
from prompt_registry.lifecycle import LifecycleRecord, VersionBlocked, state_in
from prompt_registry.rollouts import Rollout
from prompt_registry.store import LifecycleReader, PromptReader, RolloutReader, Subscription

__all__ = ["CacheStats", "PromptCache", "PromptCacheSource", "Resolved"]

log = logging.getLogger("modgate.prompt_cache")


class PromptCacheSource(PromptReader, RolloutReader, LifecycleReader, Protocol):
    """What the cache reads: labels and pinned versions, each prompt's rollout (the traffic
    split is decided per request, so it is cached like a label), version states (a blocked
    version is refused to pins), and change events. Every facet is read-only, so the hot path
    cannot write to the registry."""


@dataclass(frozen=True, slots=True)
class Resolved:
    version: PromptVersion
    stale: bool  # served from last-known-good because the store could not be read
    deprecated: bool = False  # a pinned version an operator deprecated (still served, flagged)


@dataclass(slots=True)
class _Entry:
    version: PromptVersion
    fetched_at: float  # last successful read
    checked_at: float  # last read attempt
    dirty: bool = False
    failing: bool = False
    # What a hit answers, made once per read rather than once per request (it is immutable).
    fresh: Resolved = field(init=False)
    stale: Resolved = field(init=False)

    def __post_init__(self) -> None:
        self.fresh, self.stale = Resolved(self.version, stale=False), Resolved(self.version, stale=True)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    stale_served: int = 0
    events: int = 0


class CacheEntryInfo(TypedDict):
    """One cached prompt label as `PromptCache.snapshot` reports it (/v1/ops/prompt-cache)."""
    prompt: str
    label: str
    version: int
    age_s: float
    stale: bool


class PromptCache:
    def __init__(
        self,
        reader: PromptCacheSource,
        *,
        refresh_s: float = 30.0,
        retry_s: float = 1.0,
        max_staleness_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._max_staleness_s = max_staleness_s
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[PromptVersion]] = {}
        self._pinned: dict[tuple[str, int], PromptVersion] = {}
        self._rollouts: dict[str, tuple[Rollout | None, float]] = {}  # rollout, when read
        self._rollout_inflight: dict[str, asyncio.Future[Rollout | None]] = {}
        # Change events seen per prompt. A read that started before the latest event may hold
        # the old value: its result is kept but marked dirty, and refresh_now reads again.
        self._events_seen: dict[str, int] = {}
        self._rollout_dirty: set[str] = set()
        # Version states per prompt (read for pins only), with when they were read; dropped on
        # a change event of the prompt. `_event_count` tells a read that raced an event.
        self._lifecycles: dict[str, tuple[LifecycleRecord | None, float]] = {}
        self._event_count = 0
        self._subscription: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = CacheStats()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe to store change events (call from the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._subscription = self._reader.subscribe(self._on_change_threadsafe)

    async def aclose(self) -> None:
        if self._subscription is not None:
            await asyncio.to_thread(self._subscription.close)
            self._subscription = None
        for fut in list(self._inflight.values()):
            fut.cancel()

    async def preload(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        """Resolve every key now; return key -> error message (None when it resolved)."""
        out: dict[tuple[str, str], str | None] = {}
        for key in keys:
            try:
                await self.resolve(*key)
                out[key] = None
            except (PromptNotFound, StoreUnavailable) as exc:
                out[key] = str(exc)
        return out

    # -- hot path -------------------------------------------------------------------------
    async def resolve(self, name: str, label: str) -> Resolved:
        key = (name, label)
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            version = await asyncio.shield(self._refresh(key))
            return Resolved(version, stale=False)
        self.stats.hits += 1
        now = self._clock()
        due = self._retry_s if entry.failing else self._refresh_s
        if entry.dirty or now - entry.checked_at >= due:
            self._refresh(key)
        if entry.failing:
            if now - entry.fetched_at > self._max_staleness_s:
                raise StoreUnavailable(
                    f"prompt store unreachable and the cached {name}:{label} is older than "
                    f"{self._max_staleness_s:.0f}s")
            self.stats.stale_served += 1
            return entry.stale
        return entry.fresh

    async def get_version(self, name: str, version: int) -> Resolved:
        """A pinned version. Versions are immutable, so once read they are kept for good; their
        state is not: a blocked version raises VersionBlocked, a deprecated one is flagged."""
        key = (name, version)
        cached = self._pinned.get(key)
        if cached is None:
            cached = await asyncio.to_thread(self._reader.get_version, name, version)
            if len(self._pinned) > 4096:
                self._pinned.clear()
            self._pinned[key] = cached
        state = state_in(await self._lifecycle(name), version)
        if state == "blocked":
            raise VersionBlocked(f"{name} v{version} is blocked by an operator and answers no request; "
                                 "use the production label or another version",
                                 prompt=name, version=version, state=state)
        return Resolved(cached, stale=False, deprecated=state == "deprecated")

    async def _lifecycle(self, name: str) -> LifecycleRecord | None:
        """The prompt's version states from memory (dropped by change events, re-read after
        `refresh_s`). With the store unreachable the last-known states are used; with none
        known the read's StoreUnavailable propagates (a pin is not served on a guess)."""
        entry = self._lifecycles.get(name)
        started = self._clock()
        if entry is not None and started - entry[1] < self._refresh_s:
            return entry[0]
        events = self._event_count
        try:
            record = await asyncio.to_thread(self._reader.get_lifecycle, name)
        except StoreUnavailable:
            if entry is None:
                raise
            return entry[0]
        if self._event_count == events:  # else an event raced the read: do not keep it
            self._lifecycles[name] = (record, started)
        return record

    async def rollout(self, name: str) -> Rollout | None:
        """The prompt's rollout from memory, refreshed like labels (events + refresh_s). While
        the store is unreachable the last-known rollout is used; with none known, no rollout."""
        entry = self._rollouts.get(name)
        if entry is None:
            try:
                return await asyncio.shield(self._refresh_rollout(name))
            except StoreUnavailable:
                return None
        rollout, fetched_at = entry
        if self._clock() - fetched_at >= self._refresh_s:
            self._refresh_rollout(name)
        return rollout

    def _refresh_rollout(self, name: str) -> asyncio.Future[Rollout | None]:
        fut = self._rollout_inflight.get(name)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch_rollout(name))
            self._rollout_inflight[name] = fut
            fut.add_done_callback(functools.partial(self._rollout_done, name))
        return fut

    def _rollout_done(self, name: str, fut: asyncio.Future[Rollout | None]) -> None:
        self._rollout_inflight.pop(name, None)
        if not fut.cancelled():
            fut.exception()

    async def _fetch_rollout(self, name: str) -> Rollout | None:
        started = self._clock()
        seen = self._events_seen.get(name, 0)
        self._rollout_dirty.discard(name)
        try:
            rollout = await asyncio.to_thread(self._reader.get_rollout, name)
        except StoreUnavailable:
            old = self._rollouts.get(name)
            if old is not None:
                self._rollouts[name] = (old[0], started - self._refresh_s + self._retry_s)
            raise
        self._rollouts[name] = (rollout, started)
        if self._events_seen.get(name, 0) != seen:
            self._rollout_dirty.add(name)
        return rollout

    def _refresh(self, key: tuple[str, str]) -> asyncio.Future[PromptVersion]:
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = fut
            fut.add_done_callback(functools.partial(self._done, key))
        return fut

    def _done(self, key: tuple[str, str], fut: asyncio.Future[PromptVersion]) -> None:
        self._inflight.pop(key, None)
        if not fut.cancelled():
            fut.exception()  # mark retrieved: background refresh failures are handled in _fetch

    async def _fetch(self, key: tuple[str, str]) -> PromptVersion:
        self.stats.refreshes += 1
        started = self._clock()
        seen = self._events_seen.get(key[0], 0)
        try:
            version = await asyncio.to_thread(self._reader.resolve, *key)
        except StoreUnavailable:
            self.stats.refresh_failures += 1
            entry = self._entries.get(key)
            if entry is not None:
                if not entry.failing:
                    log.warning("prompt store unreachable; serving last-known-good %s:%s v%d",
                                key[0], key[1], entry.version.version)
                entry.failing = True
                entry.checked_at = started
            raise
        except PromptNotFound:
            self._entries.pop(key, None)  # the label was removed: stop serving it
            raise
        entry = self._entries.get(key)
        if entry is not None and entry.failing:
            log.warning("prompt store reachable again; %s:%s refreshed", *key)
        self._entries[key] = _Entry(version, fetched_at=started, checked_at=started,
                                    dirty=self._events_seen.get(key[0], 0) != seen)
        return version

    # -- change events --------------------------------------------------------------------
    def _on_change_threadsafe(self, name: str | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_change, name)

    def on_change(self, name: str | None) -> None:
        """Mark entries of *name* (or all, for None) dirty and refresh them in the background."""
        self.stats.events += 1
        self._event_count += 1
        if name is None:
            self._lifecycles.clear()
        else:
            self._lifecycles.pop(name, None)
        for prompt in {k[0] for k in self._entries} | set(self._rollouts):
            if name is None or prompt == name:
                self._events_seen[prompt] = self._events_seen.get(prompt, 0) + 1
        for key, entry in list(self._entries.items()):
            if name is None or key[0] == name:
                entry.dirty = True
                self._refresh(key)
        for prompt in list(self._rollouts):
            if name is None or prompt == name:
                self._refresh_rollout(prompt)

    async def refresh_now(self, name: str) -> None:
        """Re-read every cached entry of *name* and wait for it: after a write made by this
        process (admin API), its next request must already see the change."""
        self.on_change(name)
        for _ in range(5):  # a read already in flight when the write landed is read again
            futures: list[Awaitable[object]] = [
                f for k, f in self._inflight.items() if k[0] == name]
            if name in self._rollout_inflight:
                futures.append(self._rollout_inflight[name])
            if not futures:
                return
            await asyncio.gather(*futures, return_exceptions=True)
            for key, entry in list(self._entries.items()):
                if key[0] == name and entry.dirty:
                    self._refresh(key)
            if name in self._rollout_dirty:
                self._refresh_rollout(name)

    def snapshot(self) -> list[CacheEntryInfo]:
        now = self._clock()
        return [{"prompt": k[0], "label": k[1], "version": e.version.version,
                 "age_s": round(now - e.fetched_at, 3), "stale": e.failing}
                for k, e in sorted(self._entries.items())]
