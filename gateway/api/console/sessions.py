"""Console sessions: a signed-in browser, held server-side, in this process's memory.

A session is created by signing in with an API key and keeps only the key's *id* and name
(never the key itself) plus a CSRF token. Every request through the console looks the key
record up again (through the gateway's `Authenticator`, so with the same cache and the same
revocation delay as the API), so revoking the key ends its sessions and scope changes apply.

The browser holds a random session id in an HttpOnly, SameSite=Strict cookie; this store keys
sessions by the id's SHA-256, so the ids are not kept in memory in the clear. Sessions expire
after `idle_s` without a request. The store is bounded: at most `max_sessions` in all (the
least recently used one is dropped to make room) and `max_per_key` per API key.

**Where sessions live.** `SessionStore` keeps them in this process's memory (tests, a bare
`create_app`). A gateway started from its configuration (`gateway.bootstrap.build_gateway`)
keeps them in `SqliteSessionStore`, a small SQLite file in `data_dir` that every worker process
of the host shares (`gateway.workers: N` puts N processes behind one port, and the kernel
spreads a browser's connections over them), and that survives a restart. Several *pods* each
have their own data directory: put cookie affinity on the ingress (by the `modgate_console`
cookie), or keep one console replica.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Session", "SessionBackend", "SessionStore", "SqliteSessionStore"]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Session:
    key_id: str
    name: str
    csrf: str
    created: float
    last_seen: float


class SessionBackend(Protocol):
    """What the console needs of a session store (both implementations below)."""

    idle_s: float

    def create(self, key_id: str, name: str) -> tuple[str, Session]: ...

    def get(self, session_id: str | None) -> Session | None: ...

    def drop(self, session_id: str | None) -> None: ...

    def drop_key(self, key_id: str) -> int: ...


class SessionStore:
    """Sessions in this process's memory."""

    def __init__(self, *, idle_s: float = 1800.0, max_sessions: int = 1000, max_per_key: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_per_key = max_per_key
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently seen first

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, key_id: str, name: str) -> tuple[str, Session]:
        """A new session for the key: (the id for the cookie, the session)."""
        now = self.clock()
        self._expire(now)
        mine = [k for k, s in self._sessions.items() if s.key_id == key_id]
        for k in mine[:max(0, len(mine) - self.max_per_key + 1)]:
            del self._sessions[k]
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        session = Session(key_id=key_id, name=name, csrf=secrets.token_urlsafe(32), created=now,
                          last_seen=now)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session for this id (its idle clock restarts), or None."""
        if not session_id or len(session_id) > 128:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_s:
            del self._sessions[key]
            return None
        session.last_seen = now
        self._sessions.move_to_end(key)
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def drop_key(self, key_id: str) -> int:
        """End every session of one API key (it was revoked); how many there were."""
        gone = [k for k, s in self._sessions.items() if s.key_id == key_id]
        for k in gone:
            del self._sessions[k]
        return len(gone)

    def _expire(self, now: float) -> None:
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if now - oldest.last_seen <= self.idle_s:
                return
            del self._sessions[key]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_sessions (
    digest TEXT PRIMARY KEY, key_id TEXT NOT NULL, name TEXT NOT NULL, csrf TEXT NOT NULL,
    created REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS console_sessions_seen ON console_sessions (last_seen);
CREATE INDEX IF NOT EXISTS console_sessions_key ON console_sessions (key_id, last_seen);
"""


class SqliteSessionStore:
    """Sessions in a SQLite file shared by every gateway process on the host (WAL mode; each
    operation is one short transaction). Same rules as `SessionStore`: ids kept only as their
    SHA-256, idle expiry, at most `max_sessions` in all and `max_per_key` per key (the least
    recently seen go first). Times are wall-clock seconds (`clock`), comparable across
    processes. A session's `last_seen` is written at most every `touch_s`, so a console page
    polling every second does not write every second; the idle limit is honoured to within
    `touch_s`."""

    def __init__(self, path: Path, *, idle_s: float = 1800.0, max_sessions: int = 1000,
                 max_per_key: int = 16, touch_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_per_key = max_per_key
        self.touch_s = touch_s
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._lock = threading.Lock()  # one connection per store; the console calls it from the loop
        with self._lock:
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.executescript(_SCHEMA)

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._con.execute("SELECT count(*) FROM console_sessions WHERE last_seen >= ?",
                                     (self.clock() - self.idle_s,)).fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def create(self, key_id: str, name: str) -> tuple[str, Session]:
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(key_id=key_id, name=name, csrf=secrets.token_urlsafe(32), created=now,
                          last_seen=now)
        with self._lock:
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM console_sessions WHERE last_seen < ?", (now - self.idle_s,))
                con.execute(
                    "DELETE FROM console_sessions WHERE digest IN (SELECT digest FROM console_sessions "
                    "WHERE key_id = ? ORDER BY last_seen DESC LIMIT -1 OFFSET ?)",
                    (key_id, self.max_per_key - 1))
                con.execute(
                    "DELETE FROM console_sessions WHERE digest IN (SELECT digest FROM console_sessions "
                    "ORDER BY last_seen DESC LIMIT -1 OFFSET ?)", (self.max_sessions - 1,))
                con.execute("INSERT INTO console_sessions VALUES (?,?,?,?,?,?)",
                            (_digest(session_id), key_id, name, session.csrf, now, now))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        key = _digest(session_id)
        now = self.clock()
        with self._lock:
            row = self._con.execute("SELECT key_id, name, csrf, created, last_seen FROM "
                                    "console_sessions WHERE digest = ?", (key,)).fetchone()
            if row is None:
                return None
            if now - row[4] > self.idle_s:
                self._con.execute("DELETE FROM console_sessions WHERE digest = ?", (key,))
                return None
            if now - row[4] >= self.touch_s:
                self._con.execute("UPDATE console_sessions SET last_seen = ? WHERE digest = ?", (now, key))
        return Session(key_id=row[0], name=row[1], csrf=row[2], created=row[3], last_seen=now)

    def drop(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._con.execute("DELETE FROM console_sessions WHERE digest = ?", (_digest(session_id),))

    def drop_key(self, key_id: str) -> int:
        with self._lock:
            return self._con.execute("DELETE FROM console_sessions WHERE key_id = ?", (key_id,)).rowcount
