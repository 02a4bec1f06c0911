"""Per-caller limits: a request rate (GCRA: requests/s with a burst) and a concurrent-request
quota, per API key, with defaults and per-caller overrides.

Two implementations behind one protocol (`CallerLimiter`):

- `LocalCallerLimiter`: in-process, for the embedded (single gateway, SQLite) default. Limits
  hold per gateway process.
- `SharedCallerLimiter`: the same, shared by the worker processes of one gateway
  (`gateway.workers` above 1) through a memory-mapped table (`SharedCallerTable`), so a
  caller's quota is the gateway's whichever worker the kernel hands its connection to.
- `RedisCallerLimiter`: shared by every gateway replica through Redis, so a caller's quota is
  the same whether it talks to one replica or twenty.

Usage (one lease per request; release on success, error and cancellation alike)::

    lease = await limiter.acquire(principal.key_id, request_id, name=principal.name)
    try:
        ...                        # the work
    finally:
        await lease.release()

`acquire` raises `CallerRateLimited` or `CallerConcurrencyLimited` (with `retry_after_s`); the
gateway's one error table turns them into a 429 `rate_limited` / `concurrency_limited` with
`Retry-After`.

Keys and overrides. Counters are keyed by the API key id (`ApiKeyRecord.key_id`; `-` is the
anonymous caller when auth is disabled, so all anonymous traffic shares one bucket). Overrides
in the configuration are by key *name* (`callers: {listing-pipeline: {rate_per_s: 200}}`),
the name operators see in `modgate keys list`: every key with that name gets the override, each
with its own counters (so while a key is rotated, old and new key each have the full quota).

Rate: GCRA (generic cell rate algorithm, the "virtual scheduling" form of a token bucket).
One value per caller, its theoretical arrival time `tat`; with emission interval `T = 1/rate`
a request at `now` is allowed when `max(tat, now) + T - burst * T <= now`, and then `tat`
advances by `T`. `burst` requests may arrive at once, after which they are admitted at `rate`;
a refused request is told exactly when the next one would pass (`Retry-After`). On Redis it is
one string key per caller with a TTL of the time until the bucket is full again, updated by
one Lua script, so replicas cannot race. The script uses the Redis server's clock (`TIME`),
so replicas with skewed clocks still agree; tests pass `now` in instead.

Concurrency on Redis: a sorted set per caller, member = one in-flight request (request id plus
a random suffix, because request ids can be chosen by the caller and must not collide), score =
the lease's expiry time. Acquire drops expired members, counts, and adds, in the same Lua
script as the rate check (one round trip; a request refused for concurrency does not spend
rate). Release is `ZREM` of that member. Why not a counter (`INCR`/`DECR` with a TTL)? A
gateway that crashes (or loses Redis at the wrong moment) between `INCR` and `DECR` leaks its
increments, and a TTL on the counter key only clears them once the caller goes completely idle
for the whole TTL: under steady traffic the leaked slots are lost for good and the caller is
throttled below its quota forever. In the sorted set every lease expires on its own after
`lease_ttl_s` (set it above the longest request: `gateway.request_timeout_s` plus a margin), a
double release is harmless (`ZREM` of a missing member), and `ZCARD` is an exact count.

Several workers on one host without Redis (`SharedCallerTable`): one file the supervisor
creates per run (under /dev/shm when there is one), mapped by every worker, and one `flock` on
it around each decision (a few microseconds; the request never waits on I/O). Per caller one
slot: a digest of the key id, the GCRA `tat`, and one in-flight count per worker. A worker only
changes its own count, so when a worker dies the supervisor zeroes that worker's counts before
starting its replacement: no slot leaks, unlike a shared counter would. The clock is
`time.monotonic`, which on Linux is the same for every process of the host. A caller whose
slot cannot be found or made (table full) is decided by a per-process limiter, counted like a
Redis fallback. Why not SQLite, the embedded registry's store? Every acquire and release would
be a write transaction, and a busy SQLite lock sleeps in milliseconds.

When Redis is unreachable (connection refused, timeout): the limiter does not fail open and
does not fail requests. It falls back to a `LocalCallerLimiter` in this process with the same
limits, so each replica enforces the caller's quota on its own traffic: the caller's effective
limit across N replicas becomes up to N times the configured one for the outage, but stays
bounded. Every decision taken locally is counted (`fallbacks`, metric
`modgate_caller_limits_fallback_total`), the outage is logged once (and its end once), and
Redis is not asked again for `redis_retry_s`, so an outage does not add a Redis timeout to
every request. Leases taken during the outage are released locally; leases taken on Redis whose
release fails expire after `lease_ttl_s`.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import redis
from pydantic import BaseModel, ConfigDict, Field

from gateway.ids import new_id
from gateway.problems import CallerConcurrencyLimited, CallerRateLimited

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

__all__ = [
    "CallerLimit",
    "CallerLimitOverride",
    "CallerLimiter",
    "CallerLimitsSettings",
    "Lease",
    "LimiterStats",
    "LocalCallerLimiter",
    "NoCallerLimits",
    "RedisCallerLimiter",
    "SharedCallerLimiter",
    "SharedCallerTable",
    "build_caller_limiter",
    "caller_slot",
]

log = logging.getLogger("modgate.gateway.limits")


# Float slack when comparing times: burst x interval summed up in floats must not refuse the
# last request of a burst by 1e-16 s.
_EPSILON_S = 1e-6


# -- configuration --------------------------------------------------------------------------

class CallerLimitOverride(BaseModel):
    """Per-caller values; the ones left out come from the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate_per_s: float | None = Field(None, gt=0, description="sustained requests per second")
    burst: int | None = Field(None, ge=1, description="requests that may arrive at once")
    max_concurrent: int | None = Field(None, ge=1, description="requests in progress at once")


class CallerLimitsSettings(BaseModel):
    """`gateway.caller_limits` in the configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="enforce per-caller rate and concurrency limits")
    backend: Literal["auto", "memory", "redis"] = Field(
        "auto", description="where the counters live: 'memory' (this gateway: its process, or "
        "shared memory of its gateway.workers), 'redis' (shared by replicas), 'auto' = redis when "
        "the registry is on Redis, else memory")
    rate_per_s: float = Field(50.0, gt=0, description="default sustained requests per second per key")
    burst: int = Field(100, ge=1, description="default requests a key may send at once")
    max_concurrent: int = Field(32, ge=1, description="default requests per key in progress at once")
    callers: dict[str, CallerLimitOverride] = Field(
        default_factory=dict, description="overrides by API key name, e.g. "
        "{listing-pipeline: {rate_per_s: 200, burst: 400, max_concurrent: 64}}")
    lease_ttl_s: float = Field(300.0, gt=0, description="an in-flight lease not released within "
                               "this time (crashed gateway) stops counting; keep it above "
                               "gateway.request_timeout_s")
    concurrency_retry_after_s: float = Field(1.0, gt=0, description="Retry-After for "
                                             "concurrency_limited answers")
    redis_timeout_s: float = Field(0.25, gt=0, description="Redis call timeout; beyond it the "
                                   "decision is taken locally")
    redis_retry_s: float = Field(5.0, gt=0, description="after a Redis failure, decide locally "
                                 "this long before asking Redis again")

    def limit_for(self, name: str | None) -> CallerLimit:
        base = CallerLimit(self.rate_per_s, self.burst, self.max_concurrent)
        override = self.callers.get(name) if name is not None else None
        if override is None:
            return base
        return CallerLimit(
            override.rate_per_s if override.rate_per_s is not None else base.rate_per_s,
            override.burst if override.burst is not None else base.burst,
            override.max_concurrent if override.max_concurrent is not None else base.max_concurrent)


@dataclass(frozen=True, slots=True)
class CallerLimit:
    rate_per_s: float
    burst: int
    max_concurrent: int


# -- protocol -------------------------------------------------------------------------------

@runtime_checkable
class Lease(Protocol):
    caller_id: str
    request_id: str

    async def release(self) -> None:
        """Give the concurrency slot back. Idempotent; never raises."""
        ...


@runtime_checkable
class CallerLimiter(Protocol):
    async def acquire(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        """Admit one request of *caller_id* (an API key id) or raise `CallerLimited` (429 at the edge).
        *name* (the key's name) selects the per-caller override."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class LimiterStats:
    admitted: int = 0
    rate_limited: int = 0
    concurrency_limited: int = 0
    fallbacks: int = 0  # decisions taken locally because Redis was unreachable
    redis_errors: int = 0
    release_errors: int = 0


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.enabled = registry is not None
        if registry is None:
            return
        from prometheus_client import Counter

        self.limited = Counter("modgate_caller_limited", "Requests refused with 429 by per-caller "
                               "limits", ["caller", "kind"], registry=registry)
        self.fallback = Counter("modgate_caller_limits_fallback", "Per-caller limit decisions taken "
                                "in this process because Redis was unreachable", registry=registry)

    def refused(self, caller: str, kind: str) -> None:
        if self.enabled:
            self.limited.labels(caller=caller, kind=kind).inc()

    def fell_back(self) -> None:
        if self.enabled:
            self.fallback.inc()


def _rate_limited(caller: str, limit: CallerLimit, retry_after_s: float) -> CallerRateLimited:
    return CallerRateLimited(
        f"API key {caller!r} exceeded its rate limit of {limit.rate_per_s:g} requests/s "
        f"(burst {limit.burst}); retry after {retry_after_s:.2f}s", retry_after_s=retry_after_s)


def _concurrency_limited(caller: str, limit: CallerLimit,
                         retry_after_s: float) -> CallerConcurrencyLimited:
    return CallerConcurrencyLimited(
        f"API key {caller!r} already has {limit.max_concurrent} requests in progress "
        "(its concurrency quota); retry when one finishes", retry_after_s=retry_after_s)


# -- no limits ------------------------------------------------------------------------------

@dataclass
class _NullLease:
    caller_id: str
    request_id: str

    async def release(self) -> None:
        return None


class NoCallerLimits:
    """What `build_caller_limiter` returns when limits are disabled: admits everything."""

    def __init__(self) -> None:
        self.stats = LimiterStats()

    async def acquire(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        self.stats.admitted += 1
        return _NullLease(caller_id, request_id)

    async def aclose(self) -> None:
        return None


# -- in-process -----------------------------------------------------------------------------

@dataclass
class _LocalState:
    tat: float = 0.0
    inflight: set[str] = field(default_factory=set)


@dataclass
class _SyncLease:
    """A lease given back by a synchronous call (the in-process and shared-memory limiters)."""

    caller_id: str
    request_id: str
    _give_back: Callable[[], None]
    _released: bool = False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back()


class LocalCallerLimiter:
    """Per-caller GCRA rate limit and concurrency quota in this process (no I/O, no await)."""

    _PRUNE_AT = 10_000

    def __init__(self, settings: CallerLimitsSettings, *, clock: Callable[[], float] = time.monotonic,
                 registry: CollectorRegistry | None = None, stats: LimiterStats | None = None,
                 metrics: _Metrics | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._callers: dict[str, _LocalState] = {}
        self.stats = stats or LimiterStats()
        self._metrics = metrics or _Metrics(registry)

    def inflight(self, caller_id: str) -> int:
        state = self._callers.get(caller_id)
        return len(state.inflight) if state else 0

    async def acquire(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        return self.acquire_now(caller_id, request_id, name=name)

    def acquire_now(self, caller_id: str, request_id: str, *, name: str | None = None) -> _SyncLease:
        limit = self.settings.limit_for(name)
        now = self._clock()
        state = self._callers.get(caller_id)
        if state is None:
            if len(self._callers) >= self._PRUNE_AT:
                self._prune(now)
            state = self._callers[caller_id] = _LocalState(tat=now)
        interval = 1.0 / limit.rate_per_s
        new_tat = max(state.tat, now) + interval
        allow_at = new_tat - limit.burst * interval
        label = name or caller_id
        if allow_at - now > _EPSILON_S:
            self.stats.rate_limited += 1
            self._metrics.refused(label, "rate")
            raise _rate_limited(label, limit, allow_at - now)
        if len(state.inflight) >= limit.max_concurrent:
            self.stats.concurrency_limited += 1
            self._metrics.refused(label, "concurrency")
            raise _concurrency_limited(label, limit, self.settings.concurrency_retry_after_s)
        state.tat = new_tat
        token = f"{request_id}/{new_id()[:12]}"
        state.inflight.add(token)
        self.stats.admitted += 1
        return _SyncLease(caller_id, request_id, functools.partial(self._release, caller_id, token))

    def _release(self, caller_id: str, token: str) -> None:
        state = self._callers.get(caller_id)
        if state is not None:
            state.inflight.discard(token)

    def _prune(self, now: float) -> None:
        """Forget idle callers whose bucket is full again (equivalent to a fresh entry)."""
        for cid in [c for c, s in self._callers.items() if not s.inflight and s.tat <= now]:
            del self._callers[cid]

    async def aclose(self) -> None:
        return None


# -- shared by the workers of one host ---------------------------------------------------------

class SharedCallerTable:
    """The caller table the worker processes of one gateway share (module docstring): a file of
    fixed-size slots, memory-mapped by each worker, guarded by an exclusive `flock`.

    Layout: header (magic, slots, workers), then per slot the 16-byte blake2b digest of the
    caller id (all zero: never used), `tat` (float64) and one uint32 in-flight count per worker.
    Lookup is open addressing over a window of `_WINDOW` slots from the digest's home slot;
    slots are never zeroed, only taken over (by a new caller) when they are equivalent to a
    fresh entry (bucket full again, nothing in flight), so a scan may stop at the first unused
    slot."""

    _MAGIC = b"MGLIMIT1"
    _HEADER = struct.Struct("<8sII")
    _WINDOW = 64

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, size)
        except (OSError, ValueError):
            os.close(self._fd)
            raise
        magic, slots, workers = self._HEADER.unpack_from(self._mm, 0)
        self.slots, self.workers = int(slots), int(workers)
        if magic != self._MAGIC or size != self._size(self.slots, self.workers):
            self.close()
            raise ValueError(f"{self.path} is not a caller-limits table")
        self._slot = struct.Struct(f"<16sd{self.workers}I")
        self._counts = struct.Struct(f"<{self.workers}I")

    @classmethod
    def _size(cls, slots: int, workers: int) -> int:
        return cls._HEADER.size + slots * (24 + 4 * workers)

    @classmethod
    def create(cls, path: Path | str, *, workers: int, slots: int = 16_384) -> SharedCallerTable:
        """A new, empty table for *workers* processes (replaces any file at *path*)."""
        if workers < 1 or slots < cls._WINDOW:
            raise ValueError("a caller-limits table needs at least one worker and 64 slots")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(cls._HEADER.pack(cls._MAGIC, slots, workers))
            fh.truncate(cls._size(slots, workers))
        os.replace(tmp, path)
        return cls(path)

    def _offset(self, slot: int) -> int:
        return self._HEADER.size + slot * self._slot.size

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def find(self, digest: bytes, now: float, *, create: bool = True) -> int | None:
        """The slot of *digest* (under the lock); with *create*, a new one when it has none.
        None when it has none and none can be made (its window is full of busy callers)."""
        mm, home = self._mm, int.from_bytes(digest[:8], "little") % self.slots
        free: int | None = None
        for i in range(self._WINDOW):
            slot = (home + i) % self.slots
            off = self._offset(slot)
            key = mm[off:off + 16]
            if key == digest:
                return slot
            unused = key == bytes(16)
            if free is None and (unused or self._idle(off, now)):
                free = slot
            if unused:
                break
        if free is None or not create:
            return None
        self._slot.pack_into(mm, self._offset(free), digest, 0.0, *([0] * self.workers))
        return free

    def _idle(self, off: int, now: float) -> bool:
        _, tat, *counts = self._slot.unpack_from(self._mm, off)
        return bool(tat <= now and not any(counts))

    def read(self, slot: int) -> tuple[float, int]:
        """(tat, requests in flight over all workers) of *slot*."""
        _, tat, *counts = self._slot.unpack_from(self._mm, self._offset(slot))
        return float(tat), int(sum(counts))

    def admit(self, slot: int, worker: int, tat: float) -> None:
        off = self._offset(slot)
        struct.pack_into("<d", self._mm, off + 16, tat)
        at = off + 24 + 4 * worker
        (n,) = struct.unpack_from("<I", self._mm, at)
        struct.pack_into("<I", self._mm, at, n + 1)

    def release(self, slot: int, digest: bytes, worker: int) -> None:
        off = self._offset(slot)
        if self._mm[off:off + 16] != digest:
            return
        at = off + 24 + 4 * worker
        (n,) = struct.unpack_from("<I", self._mm, at)
        if n:
            struct.pack_into("<I", self._mm, at, n - 1)

    def reset_worker(self, worker: int) -> None:
        """Forget the in-flight requests of *worker* (it died; its replacement starts at zero)."""
        zero = struct.pack("<I", 0)
        with self.locked():
            for slot in range(self.slots):
                at = self._offset(slot) + 24 + 4 * worker
                self._mm[at:at + 4] = zero

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
        os.close(self._fd)


class SharedCallerLimiter:
    """Per-caller GCRA rate limit and concurrency quota shared by the worker processes of one
    gateway through a `SharedCallerTable` (module docstring). No await, no I/O but the lock."""

    def __init__(self, table: SharedCallerTable, worker: int, settings: CallerLimitsSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 registry: CollectorRegistry | None = None) -> None:
        if not 0 <= worker < table.workers:
            raise ValueError(f"worker {worker} is not in a table for {table.workers} workers")
        self.settings = settings
        self.table = table
        self.worker = worker
        self._clock = clock
        self.stats = LimiterStats()
        self._metrics = _Metrics(registry)
        self.fallback = LocalCallerLimiter(settings, clock=clock, stats=self.stats, metrics=self._metrics)
        self._warned_full = False

    async def acquire(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        return self.acquire_now(caller_id, request_id, name=name)

    def acquire_now(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        limit = self.settings.limit_for(name)
        digest = hashlib.blake2b(caller_id.encode(), digest_size=16).digest()
        label = name or caller_id
        interval = 1.0 / limit.rate_per_s
        table = self.table
        with table.locked():
            now = self._clock()
            slot = table.find(digest, now)
            if slot is not None:
                tat, inflight = table.read(slot)
                new_tat = max(tat, now) + interval
                allow_at = new_tat - limit.burst * interval
                if allow_at - now <= _EPSILON_S and inflight < limit.max_concurrent:
                    table.admit(slot, self.worker, new_tat)
                    self.stats.admitted += 1
                    return _SyncLease(caller_id, request_id,
                                      functools.partial(self._release, slot, digest))
        if slot is None:
            return self._local(caller_id, request_id, name)
        if allow_at - now > _EPSILON_S:
            self.stats.rate_limited += 1
            self._metrics.refused(label, "rate")
            raise _rate_limited(label, limit, allow_at - now)
        self.stats.concurrency_limited += 1
        self._metrics.refused(label, "concurrency")
        raise _concurrency_limited(label, limit, self.settings.concurrency_retry_after_s)

    def inflight(self, caller_id: str) -> int:
        """Requests of *caller_id* in flight in every worker."""
        digest = hashlib.blake2b(caller_id.encode(), digest_size=16).digest()
        with self.table.locked():
            slot = self.table.find(digest, self._clock(), create=False)
            return 0 if slot is None else self.table.read(slot)[1]

    def _local(self, caller_id: str, request_id: str, name: str | None) -> Lease:
        if not self._warned_full:
            self._warned_full = True
            log.error("per-caller limits: the shared caller table %s is full; callers without "
                      "a slot are limited per worker process", self.table.path)
        self.stats.fallbacks += 1
        self._metrics.fell_back()
        return self.fallback.acquire_now(caller_id, request_id, name=name)

    def _release(self, slot: int, digest: bytes) -> None:
        with self.table.locked():
            self.table.release(slot, digest, self.worker)

    async def aclose(self) -> None:
        self.table.close()


# -- Redis ----------------------------------------------------------------------------------

# KEYS[1] rate key (GCRA tat, seconds as a string), KEYS[2] in-flight sorted set.
# ARGV: now ('' = the server's clock), interval = 1/rate, burst, max_concurrent, lease ttl (s),
#       member.
# Returns {1, in_flight} admitted | {0, retry_after} rate limited | {-1, in_flight} too many
# in flight. Numbers travel as strings (Redis truncates Lua numbers to integers).
_ACQUIRE = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_concurrent = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at - now > 0.000001 then
  return {0, tostring(allow_at - now)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local inflight = redis.call('ZCARD', KEYS[2])
if inflight >= max_concurrent then
  return {-1, tostring(inflight)}
end
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
redis.call('ZADD', KEYS[2], now + ttl, ARGV[6])
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 1000) + 1000)
return {1, tostring(inflight + 1)}
"""


# The asyncio client of redis-py 8 skips its check of pooled connections (closed by the server,
# or holding unread data) while "maintenance notifications" are on, and they are on ("auto")
# by default: after a Redis restart every pooled connection then fails its next command once,
# so releases fail and their leases stay counted for lease_ttl_s. Found by
# tests/drills/test_redis_kill.py. Maintenance notifications are a managed-Redis feature this
# limiter does not use.
try:
    from redis.maint_notifications import MaintNotificationsConfig

    _CHECK_POOLED_CONNECTIONS: dict[str, Any] = {
        "maint_notifications_config": MaintNotificationsConfig(enabled=False)}
except ImportError:  # older redis-py always checks them
    _CHECK_POOLED_CONNECTIONS = {}


@dataclass
class _RedisLease:
    caller_id: str
    request_id: str
    _limiter: RedisCallerLimiter
    _key: str
    _member: str
    _released: bool = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        # Shielded: a request cancelled while releasing still gives its slot back.
        await asyncio.shield(self._limiter._release(self._key, self._member))


class RedisCallerLimiter:
    """Per-caller limits shared by every gateway replica through Redis; falls back to a
    `LocalCallerLimiter` while Redis is unreachable (see the module docstring)."""

    def __init__(self, client: aioredis.Redis, settings: CallerLimitsSettings, *,
                 prefix: str = "modgate", registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 redis_now: Callable[[], float] | None = None, owns_client: bool = False) -> None:
        """*clock* times the fallback window and the local fallback limiter; *redis_now* (tests)
        supplies the time the Lua script judges by instead of the Redis server's clock."""
        self.settings = settings
        self._r = client
        self._prefix = prefix
        self._script = client.register_script(_ACQUIRE)
        self._clock = clock
        self._redis_now = redis_now
        self._owns_client = owns_client
        self.stats = LimiterStats()
        self._metrics = _Metrics(registry)
        self.fallback = LocalCallerLimiter(settings, clock=clock, stats=self.stats, metrics=self._metrics)
        self._down_until: float | None = None  # set while Redis is considered unreachable

    @classmethod
    def from_url(cls, url: str, settings: CallerLimitsSettings, **kwargs: Any) -> RedisCallerLimiter:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=settings.redis_timeout_s,
                                         socket_connect_timeout=settings.redis_timeout_s,
                                         decode_responses=False, **_CHECK_POOLED_CONNECTIONS)
        return cls(client, settings, owns_client=True, **kwargs)

    @property
    def degraded(self) -> bool:
        """True while decisions are taken locally because Redis was unreachable."""
        return self._down_until is not None

    def _keys(self, caller_id: str) -> tuple[str, str]:
        base = f"{self._prefix}:limits:{{{caller_id}}}"
        return f"{base}:rate", f"{base}:inflight"

    async def acquire(self, caller_id: str, request_id: str, *, name: str | None = None) -> Lease:
        if self._down_until is not None and self._clock() < self._down_until:
            return self._local(caller_id, request_id, name)
        limit = self.settings.limit_for(name)
        rate_key, inflight_key = self._keys(caller_id)
        member = f"{request_id}/{new_id()[:12]}"
        now = "" if self._redis_now is None else repr(self._redis_now())
        try:
            result = await asyncio.wait_for(self._script(
                keys=[rate_key, inflight_key],
                args=[now, repr(1.0 / limit.rate_per_s), limit.burst, limit.max_concurrent,
                      repr(self.settings.lease_ttl_s), member]), self.settings.redis_timeout_s)
        except (redis.RedisError, TimeoutError, OSError) as exc:
            # Unreachable, timed out, or unusable (READONLY replica after a failover, OOM, ...).
            self._went_down(exc)
            return self._local(caller_id, request_id, name)
        if self._down_until is not None:
            self._down_until = None
            log.warning("per-caller limits: Redis reachable again; limits are shared again")
        status, value = int(result[0]), float(result[1])
        label = name or caller_id
        if status == 0:
            self.stats.rate_limited += 1
            self._metrics.refused(label, "rate")
            raise _rate_limited(label, limit, value)
        if status == -1:
            self.stats.concurrency_limited += 1
            self._metrics.refused(label, "concurrency")
            raise _concurrency_limited(label, limit, self.settings.concurrency_retry_after_s)
        self.stats.admitted += 1
        return _RedisLease(caller_id, request_id, self, inflight_key, member)

    def _local(self, caller_id: str, request_id: str, name: str | None) -> Lease:
        self.stats.fallbacks += 1
        self._metrics.fell_back()
        return self.fallback.acquire_now(caller_id, request_id, name=name)

    def _went_down(self, exc: BaseException) -> None:
        self.stats.redis_errors += 1
        if self._down_until is None:
            log.error("per-caller limits: Redis unreachable (%s: %s); enforcing limits per gateway "
                      "replica until it is back", type(exc).__name__, exc)
        self._down_until = self._clock() + self.settings.redis_retry_s

    async def _release(self, key: str, member: str) -> None:
        try:
            await asyncio.wait_for(self._r.zrem(key, member), self.settings.redis_timeout_s)
        except (redis.RedisError, TimeoutError, OSError):
            self.stats.release_errors += 1  # the lease expires after lease_ttl_s

    async def aclose(self) -> None:
        if self._owns_client:
            await self._r.aclose()


def build_caller_limiter(settings: CallerLimitsSettings, *, redis_url: str | None = None,
                         key_prefix: str = "modgate",
                         registry: CollectorRegistry | None = None,
                         shared: tuple[Path, int] | None = None) -> CallerLimiter:
    """The limiter a configuration asks for. *redis_url* is the registry's Redis (None when the
    registry is SQLite): `backend: auto` uses it when given. *shared* (the table's path and this
    worker's index) is set when several worker processes serve one gateway: the in-memory
    limits then live in that table, so they hold for the gateway and not per process."""
    if not settings.enabled:
        return NoCallerLimits()
    use_redis = settings.backend == "redis" or (settings.backend == "auto" and redis_url is not None)
    if use_redis:
        if redis_url is None:
            raise ValueError("gateway.caller_limits.backend is redis but no Redis URL is configured")
        return RedisCallerLimiter.from_url(redis_url, settings, prefix=key_prefix, registry=registry)
    if shared is not None:
        return SharedCallerLimiter(SharedCallerTable(shared[0]), shared[1], settings, registry=registry)
    return LocalCallerLimiter(settings, registry=registry)


@asynccontextmanager
async def caller_slot(limiter: CallerLimiter, caller_id: str, request_id: str, *,
                      name: str | None = None) -> AsyncIterator[Lease]:
    """`acquire` … `release` around a block: the slot is given back on success, error and
    cancellation alike."""
    lease = await limiter.acquire(caller_id, request_id, name=name)
    try:
        yield lease
    finally:
        await lease.release()
