"""API-key authentication and scope checks. Deny by default.

Keys arrive as `Authorization: Bearer mgk_...` or `x-api-key: mgk_...`. Key records are read
from the registry store and kept in memory for `cache_s` (so revoking a key takes effect on
every replica within that time); unknown ids are cached too, so a flood of bad keys does not
become a flood of store reads. When the store is unreachable, keys already seen keep working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.problems import Forbidden, Unauthenticated
from prompt_registry import KeyReader, StoreUnavailable
from prompt_registry.keys import ApiKeyRecord, lacks_scope, parse_key, verify_secret

__all__ = ["ANONYMOUS", "Authenticator"]


class _Anonymous:
    """The caller when auth is disabled: allowed everything, named in the audit log."""

    name = "anonymous"
    key_id = "-"

    def allows(self, scope: str) -> bool:
        return True


ANONYMOUS = _Anonymous()


class Authenticator:
    """Checks presented keys against the store's key records. It gets only a `KeyReader`:
    authenticating must never be able to create or revoke a key."""

    def __init__(self, keys: KeyReader, *, required: bool = True, cache_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, failure_delay_s: float = 0.1) -> None:
        self._keys = keys
        self.failure_delay_s = failure_delay_s
        self.required = required
        self._cache_s = cache_s
        self._clock = clock
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        # presented key -> its record and when that record was read: a key that passed the
        # check is not parsed and hashed again on each request. Only keys that passed are kept
        # (a flood of wrong keys adds nothing), each only while its record is fresh.
        self._verified: dict[str, tuple[ApiKeyRecord, float]] = {}

    async def authenticate(self, authorization: str | None, x_api_key: str | None) -> ApiKeyRecord | _Anonymous:
        if not self.required:
            return ANONYMOUS
        # One key, from either header; an empty header counts as absent (an empty x-api-key
        # must not mask a valid bearer token), two different keys are refused (which one
        # speaks for the caller would be a guess).
        bearer = None
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        header = x_api_key.strip() if x_api_key else None
        if bearer and header and bearer != header:
            raise Unauthenticated("two different API keys sent ('Authorization' and 'x-api-key'); "
                                  "send one")
        presented = header or bearer
        if not presented:
            raise Unauthenticated(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'")
        verified = self._verified.get(presented)
        if verified is not None and self._clock() - verified[1] < self._cache_s:
            return verified[0]
        parsed = parse_key(presented)
        if parsed is None:
            await self._slow_down()
            raise Unauthenticated("malformed API key")
        key_id, secret = parsed
        record, read_at = await self._read(key_id)
        if record is None or not verify_secret(record, secret):
            await self._slow_down()
            raise Unauthenticated("invalid API key")
        if record.revoked:
            raise Unauthenticated("API key revoked")
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[presented] = (record, read_at)
        return record

    async def _slow_down(self) -> None:
        """A wrong key costs its sender `failure_delay_s` before the answer: a flood of guessed
        keys proceeds at the pace of its connections, not of the CPU."""
        if self.failure_delay_s > 0:
            await asyncio.sleep(self.failure_delay_s)

    async def record(self, key_id: str) -> ApiKeyRecord | None:
        """The key record by id, through the same cache as `authenticate` (a session re-checks
        its key with it, so revoking the key ends the session within `cache_s`)."""
        return await self._record(key_id)

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        return (await self._read(key_id))[0]

    async def _read(self, key_id: str) -> tuple[ApiKeyRecord | None, float]:
        """The key record and when it was read from the store (a stale one while the store is
        unreachable)."""
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[1] < self._cache_s:
            return cached
        try:
            record = await asyncio.to_thread(self._keys.get_key, key_id)
        except StoreUnavailable:
            if cached is not None:
                return cached
            raise
        if len(self._cache) > 10_000:
            self._cache.clear()
        entry = self._cache[key_id] = (record, now)
        return entry

    @staticmethod
    def require(principal: ApiKeyRecord | _Anonymous, scope: str, purpose: str = "") -> None:
        """Raise Forbidden unless *principal* holds *scope* (or admin); *purpose* (e.g. "for
        changing a gate policy") ends the message, as the command line words its refusals."""
        if not principal.allows(scope):
            raise Forbidden(lacks_scope(principal.name, scope, purpose))
