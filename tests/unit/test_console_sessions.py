"""Console sessions: one contract for the in-memory store and the host-shared SQLite store, and
the shared store doing what it is for: a session created by one worker process is valid in
every other (`gateway.workers: N` spreads a browser's connections over N processes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api.console.sessions import SessionBackend, SessionStore, SqliteSessionStore
from gateway.bootstrap import build_gateway
from gateway.config import load_config
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., SessionBackend]


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    def factory(**kw: object) -> SessionBackend:
        if request.param == "memory":
            return SessionStore(**kw)  # type: ignore[arg-type]
        return SqliteSessionStore(tmp_path / "sessions.db", touch_s=0, **kw)  # type: ignore[arg-type]
    return factory


def test_sessions_are_bounded_and_expire(make: Factory) -> None:
    clock = Clock()
    store = make(idle_s=60, max_sessions=3, max_per_key=2, clock=clock)
    ids = []
    for i in range(3):
        clock.now += 1
        ids.append(store.create(f"key{i}", f"k{i}")[0])
    clock.now += 1
    assert store.get(ids[0]) is not None  # key0 is now the most recently used
    clock.now += 1
    store.create("key3", "k3")
    assert len(store) == 3 and store.get(ids[1]) is None and store.get(ids[0]) is not None  # type: ignore[arg-type]
    clock.now += 1
    a, _ = store.create("key9", "k9")
    clock.now += 1
    b, _ = store.create("key9", "k9")
    clock.now += 1
    c, session = store.create("key9", "k9")
    assert store.get(a) is None and store.get(b) and store.get(c)  # at most 2 per key
    got = store.get(c)
    assert got is not None and (got.key_id, got.name, got.csrf) == ("key9", "k9", session.csrf)
    assert store.drop_key("key9") == 2 and store.get(b) is None
    d, _ = store.create("key5", "k5")
    clock.now += 61
    assert store.get(d) is None
    e, _ = store.create("key5", "k5")
    store.drop(e)
    assert store.get(e) is None
    assert store.get("x" * 500) is None and store.get(None) is None and store.get("") is None


def test_activity_restarts_the_idle_clock(make: Factory) -> None:
    clock = Clock()
    store = make(idle_s=60, clock=clock)
    sid, _ = store.create("key1", "k1")
    for _ in range(3):
        clock.now += 50
        assert store.get(sid) is not None
    clock.now += 61
    assert store.get(sid) is None


def test_the_sqlite_store_is_shared_by_processes_and_keeps_no_session_id(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    worker_a, worker_b = SqliteSessionStore(path), SqliteSessionStore(path)
    sid, session = worker_a.create("key1", "ana")
    seen = worker_b.get(sid)
    assert seen is not None and seen.csrf == session.csrf
    worker_b.drop(sid)  # sign-out on one worker ends the session on all
    assert worker_a.get(sid) is None
    sid2, _ = worker_a.create("key1", "ana")
    assert sid2 not in path.read_bytes().decode("latin-1")  # only its hash is stored


def test_the_configured_gateway_shares_console_sessions_between_workers(
        store: SqlitePromptStore, tmp_path: Path) -> None:
    """Two gateway apps built from one configuration (two workers of one host): a browser
    signed in through one is signed in on the other, and signing out on either ends it."""
    key, record = generate_key("reviewer-ana", ["prompts:read", "feedback"], created_by="test")
    store.put_key(record)
    cfg = load_config(None, {"data_dir": str(tmp_path)})
    with TestClient(build_gateway(cfg, store, backend=FakeBackend())) as one, \
            TestClient(build_gateway(cfg, store, backend=FakeBackend())) as two:
        r = one.post("/console/api/session", json={"key": key})
        assert r.status_code == 200, r.text
        csrf = r.json()["csrf"]
        two.cookies.update(one.cookies)
        r = two.get("/console/api/session")
        assert r.status_code == 200 and r.json()["csrf"] == csrf
        assert two.post("/console/api/signout", headers={"x-csrf-token": csrf}).status_code in (200, 204)
        assert one.get("/console/api/session").status_code == 401
