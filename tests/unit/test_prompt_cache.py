"""The hot-path label cache: events, stale-while-revalidate, last-known-good, max staleness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.prompt_cache import PromptCache
from prompt_registry import PromptNotFound, PromptSpec, StoreUnavailable
from prompt_registry.sqlite_store import SqlitePromptStore


class FlakyReader:
    """A real SQLite store whose reads can be made to fail, counting calls."""

    def __init__(self, store: SqlitePromptStore) -> None:
        self.store = store
        self.down = False
        self.calls = 0

    def resolve(self, name: str, label: str):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.down:
            raise StoreUnavailable("store down")
        return self.store.resolve(name, label)

    def subscribe(self, callback: Callable[[str | None], None]):  # type: ignore[no-untyped-def]
        return self.store.subscribe(callback)

    def __getattr__(self, item: str):  # type: ignore[no-untyped-def]
        return getattr(self.store, item)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reader(tmp_path: Path, example_spec: PromptSpec) -> FlakyReader:
    store = SqlitePromptStore(tmp_path / "r.db")
    store.publish(example_spec, actor="t")
    store.publish(example_spec.model_copy(update={"description": "v2"}), actor="t")
    store.set_label(example_spec.name, "production", 1, actor="t")
    return FlakyReader(store)


async def _until(what: str, check: Callable[[], Awaitable[bool]], within_s: float = 30.0) -> None:
    """Wait until *check* holds: background reads run in a worker thread and take what a loaded
    machine gives them (half a second of sleeping was not always enough). *within_s* only
    guards against a hang."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        await asyncio.sleep(0.01)


async def _serves(cache: PromptCache, version: int) -> bool:
    try:
        got = await cache.resolve("listing-moderation", "production")
    except StoreUnavailable:
        return False
    return got.version.version == version and not got.stale


def test_hits_do_not_touch_the_store(reader: FlakyReader) -> None:
    async def run() -> None:
        cache = PromptCache(reader, refresh_s=30, clock=Clock())
        results = await asyncio.gather(*[cache.resolve("listing-moderation", "production") for _ in range(20)])
        assert {r.version.version for r in results} == {1}
        assert reader.calls == 1  # concurrent cold requests share one read
        for _ in range(100):
            await cache.resolve("listing-moderation", "production")
        assert reader.calls == 1
    asyncio.run(run())


def test_change_event_refreshes_in_background(reader: FlakyReader) -> None:
    async def run() -> None:
        cache = PromptCache(reader, refresh_s=3600)
        cache.start()
        try:
            assert (await cache.resolve("listing-moderation", "production")).version.version == 1
            reader.store.set_label("listing-moderation", "production", 2, actor="t")
            await _until("the change event's refresh", lambda: _serves(cache, 2))
        finally:
            await cache.aclose()
    asyncio.run(run())


def test_stale_while_revalidate_after_refresh_interval(reader: FlakyReader) -> None:
    async def run() -> None:
        clock = Clock()
        cache = PromptCache(reader, refresh_s=30, clock=clock)
        await cache.resolve("listing-moderation", "production")
        # A move this cache hears nothing about (no subscription) is picked up after refresh_s.
        reader.store.set_label("listing-moderation", "production", 2, actor="t")
        clock.now += 31
        first = await cache.resolve("listing-moderation", "production")
        assert first.version.version == 1  # served at once, refresh started
        await _until("the background refresh", lambda: _serves(cache, 2))
        assert reader.calls == 2  # that one refresh, no read per request
    asyncio.run(run())


def test_last_known_good_then_max_staleness(reader: FlakyReader) -> None:
    async def run() -> None:
        clock = Clock()
        cache = PromptCache(reader, refresh_s=30, max_staleness_s=120, clock=clock)
        await cache.resolve("listing-moderation", "production")
        reader.down = True
        clock.now += 31
        assert (await cache.resolve("listing-moderation", "production")).stale is False

        async def failed() -> bool:  # the background refresh fails
            return cache.stats.refresh_failures >= 1
        await _until("the failed refresh", failed)
        got = await cache.resolve("listing-moderation", "production")
        assert got.stale is True and got.version.version == 1
        assert cache.stats.stale_served >= 1
        with pytest.raises(StoreUnavailable):
            await cache.resolve("listing-moderation", "canary")  # never seen: nothing to serve
        clock.now += 200
        with pytest.raises(StoreUnavailable, match="older than"):
            await cache.resolve("listing-moderation", "production")
        reader.down = False
        clock.now += 2  # the retry interval passes; the next request triggers a refresh
        with pytest.raises(StoreUnavailable):
            await cache.resolve("listing-moderation", "production")
        await _until("the refresh after the outage", lambda: _serves(cache, 1))
    asyncio.run(run())


def test_removed_label_stops_being_served(reader: FlakyReader) -> None:
    async def run() -> None:
        cache = PromptCache(reader, refresh_s=30, clock=Clock())
        with pytest.raises(PromptNotFound):
            await cache.resolve("listing-moderation", "canary")
        preload = await cache.preload([("listing-moderation", "production"), ("nope", "production")])
        assert preload[("listing-moderation", "production")] is None
        assert "unknown prompt" in str(preload[("nope", "production")])
    asyncio.run(run())


class SlowReader(FlakyReader):
    """Reads take the old value, then wait until released: a refresh in flight across a write."""

    def __init__(self, store: SqlitePromptStore) -> None:
        super().__init__(store)
        import threading

        self.gate = threading.Event()
        self.gate.set()
        self.read = threading.Event()  # set once a read has its (old) value

    def resolve(self, name: str, label: str):  # type: ignore[no-untyped-def]
        version = super().resolve(name, label)
        self.read.set()
        self.gate.wait(30)
        return version


def test_refresh_now_rereads_when_a_read_in_flight_predates_the_write(reader: FlakyReader) -> None:
    """The admin API moves a label and calls refresh_now; a background read that started before
    the move (and so carries the old version) must not be what the next request sees."""
    slow = SlowReader(reader.store)

    async def run() -> None:
        cache = PromptCache(slow, refresh_s=3600)
        assert (await cache.resolve("listing-moderation", "production")).version.version == 1
        slow.gate.clear()
        slow.read.clear()
        cache.on_change("listing-moderation")  # e.g. an unrelated write's event: a read starts
        assert await asyncio.to_thread(slow.read.wait, 30)  # ... and has read v1 before the move below
        slow.store.set_label("listing-moderation", "production", 2, actor="t")
        asyncio.get_running_loop().call_later(0.1, slow.gate.set)
        await cache.refresh_now("listing-moderation")
        assert (await cache.resolve("listing-moderation", "production")).version.version == 2
    asyncio.run(run())
