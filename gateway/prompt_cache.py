"""In-memory label resolution for the hot path.

A resolved (prompt, label) is reused for `ttl_s`; after that the next request refreshes it with
one store read per key in flight (concurrent requests share it). If the store is unreachable
the last-known-good version is served and `stale_served` counts it. The store is read in a
worker thread because the embedded store is synchronous SQLite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from prompt_registry import PromptReader, PromptVersion, StoreUnavailable

__all__ = ["PromptCache"]


@dataclass(slots=True)
class _Entry:
    version: PromptVersion
    fetched_at: float


class PromptCache:
    def __init__(self, reader: PromptReader, *, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reader = reader
        self._ttl = ttl_s
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[PromptVersion]] = {}
        self.stale_served = 0

    async def resolve(self, name: str, label: str) -> PromptVersion:
        key = (name, label)
        entry = self._entries.get(key)
        if entry is not None and self._clock() - entry.fetched_at < self._ttl:
            return entry.version
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        try:
            return await asyncio.shield(fut)
        except StoreUnavailable:
            if entry is not None:
                self.stale_served += 1
                return entry.version
            raise

    async def _fetch(self, key: tuple[str, str]) -> PromptVersion:
        try:
            version = await asyncio.to_thread(self._reader.resolve, *key)
        except StoreUnavailable:
            raise
        except OSError as exc:  # sqlite3 errors are wrapped by the store; OS errors may not be
            raise StoreUnavailable(str(exc)) from exc
        self._entries[key] = _Entry(version, self._clock())
        return version

    def invalidate(self, name: str | None = None) -> None:
        for key in [k for k in self._entries if name is None or k[0] == name]:
            del self._entries[key]
