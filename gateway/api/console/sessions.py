"""Console sessions: a signed-in browser, held server-side, in this process's memory.

A session is created by signing in with an API key and keeps only the key's *id* and name
(never the key itself) plus a CSRF token. Every request through the console looks the key
record up again (through the gateway's `Authenticator`, so with the same cache and the same
revocation delay as the API), so revoking the key ends its sessions and scope changes apply.

The browser holds a random session id in an HttpOnly, SameSite=Strict cookie; this store keys
sessions by the id's SHA-256, so the ids are not kept in memory in the clear. Sessions expire
after `idle_s` without a request. The store is bounded: at most `max_sessions` in all (the
least recently used one is dropped to make room) and `max_per_key` per API key.

**Per replica.** Each gateway process has its own store: a session exists only on the replica
that created it, and a restart signs everyone out. That is right for one gateway process. A
deployment with several replicas behind a load balancer needs either sticky sessions (by the
session cookie) or a shared store (the registry's Redis, with the idle expiry as the key's TTL)
behind the same three operations (`create`, `get`, `drop`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Session", "SessionStore"]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass
class Session:
    key_id: str
    name: str
    csrf: str
    created: float
    last_seen: float


class SessionStore:
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
