"""API-key checks (`gateway.auth.Authenticator`) against a real SQLite store, on an injected
clock: what a key that passed once still has to pass on later requests."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth import Authenticator
from gateway.problems import Unauthenticated
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """The store's key reader, counting reads."""

    def __init__(self, store: SqlitePromptStore) -> None:
        self.store, self.reads = store, 0

    def get_key(self, key_id: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return self.store.get_key(key_id)


def test_a_revoked_key_is_refused_once_its_record_is_read_again(store: SqlitePromptStore) -> None:
    key, record = generate_key("svc", ["moderate"], created_by="t")
    store.put_key(record)
    clock, reader = Clock(), CountingStore(store)
    auth = Authenticator(reader, cache_s=10, clock=clock, failure_delay_s=0)  # type: ignore[arg-type]

    async def run() -> None:
        assert (await auth.authenticate(f"Bearer {key}", None)).name == "svc"
        assert (await auth.authenticate(None, key)).name == "svc"
        assert reader.reads == 1
        store.put_key(record.model_copy(update={"revoked": True}))
        clock.now += 9.9  # within cache_s: the record read a moment ago still speaks
        assert (await auth.authenticate(f"Bearer {key}", None)).name == "svc"
        clock.now += 0.2  # cache_s after the read: read again, and refused
        with pytest.raises(Unauthenticated, match="revoked"):
            await auth.authenticate(f"Bearer {key}", None)
        assert reader.reads == 2
        with pytest.raises(Unauthenticated, match="revoked"):
            await auth.authenticate(f"Bearer {key}", None)
    asyncio.run(run())


def test_a_key_that_passed_does_not_let_a_wrong_secret_for_its_id_pass(store: SqlitePromptStore) -> None:
    key, record = generate_key("svc", ["moderate"], created_by="t")
    store.put_key(record)
    auth = Authenticator(store, cache_s=10, clock=Clock(), failure_delay_s=0)

    async def run() -> None:
        await auth.authenticate(f"Bearer {key}", None)
        for forged in (key[:-1] + ("A" if key[-1] != "A" else "B"), key + "x", key[:-1], " " + key + "x"):
            with pytest.raises(Unauthenticated, match="invalid API key"):
                await auth.authenticate(f"Bearer {forged}", None)
        with pytest.raises(Unauthenticated, match="two different"):
            await auth.authenticate(f"Bearer {key}", key + "x")
        assert (await auth.authenticate(f"bearer  {key} ", None)).name == "svc"
    asyncio.run(run())


def test_with_no_key_cache_every_request_reads_the_record(store: SqlitePromptStore) -> None:
    key, record = generate_key("svc", ["moderate"], created_by="t")
    store.put_key(record)
    reader = CountingStore(store)
    auth = Authenticator(reader, cache_s=0, clock=Clock(), failure_delay_s=0)  # type: ignore[arg-type]

    async def run() -> None:
        for _ in range(3):
            await auth.authenticate(None, key)
        assert reader.reads == 3
        store.put_key(record.model_copy(update={"revoked": True}))
        with pytest.raises(Unauthenticated, match="revoked"):
            await auth.authenticate(None, key)
    asyncio.run(run())
