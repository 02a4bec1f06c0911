"""Per-caller limits: one contract for the in-process and the Redis limiter (rate with burst and
refill, concurrency quota released on success, error and cancellation, per-caller overrides),
then what only Redis does: replicas share the quota, a crashed gateway's leases expire, and a
Redis outage falls back to per-replica limits (counted, logged once) and recovers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from gateway.api.edge import error_response
from gateway.limits import (
    CallerLimiter,
    CallerLimitsSettings,
    LocalCallerLimiter,
    NoCallerLimits,
    RedisCallerLimiter,
    SharedCallerLimiter,
    SharedCallerTable,
    build_caller_limiter,
    caller_slot,
)
from gateway.problems import CallerLimited, Problem, problem_for
from testsupport.redis_server import RedisServer


class FakeClock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


Make = Callable[..., CallerLimiter]


def _settings(**kwargs: Any) -> CallerLimitsSettings:
    # redis_timeout_s: the limiter gives up on Redis after 0.25 s by default and decides locally;
    # on a loaded CI machine the tests' redis-server can be slower than that, and a shared-quota
    # test would then see a fallback. Here it only guards against a hang; the outage test sets its own.
    base: dict[str, Any] = {"enabled": True, "rate_per_s": 10.0, "burst": 3, "max_concurrent": 100,
                            "redis_timeout_s": 10.0}
    return CallerLimitsSettings(**{**base, **kwargs})


@pytest.fixture(params=["memory", "shared", "redis"])
def make_limiter(request: pytest.FixtureRequest, redis_prefix: str, tmp_path: Path) -> Make:
    """Builds a limiter of the parametrized kind. Call it inside the test's event loop."""
    if request.param == "memory":
        def make_local(settings: CallerLimitsSettings, clock: FakeClock, **kw: Any) -> CallerLimiter:
            return LocalCallerLimiter(settings, clock=clock, **kw)
        return make_local
    if request.param == "shared":  # worker 1 of a 2-worker gateway's table
        def make_shared(settings: CallerLimitsSettings, clock: FakeClock, **kw: Any) -> CallerLimiter:
            table = SharedCallerTable.create(tmp_path / "limits.bin", workers=2, slots=128)
            return SharedCallerLimiter(table, 1, settings, clock=clock, **kw)
        return make_shared
    server: RedisServer = request.getfixturevalue("redis_server")

    def make_redis(settings: CallerLimitsSettings, clock: FakeClock, **kw: Any) -> CallerLimiter:
        client = aioredis.Redis.from_url(server.url, socket_timeout=10.0)  # a guard, as above
        return RedisCallerLimiter(client, settings, prefix=redis_prefix, clock=clock,
                                  redis_now=clock, owns_client=True, **kw)
    return make_redis


def _run(limiter_factory: Callable[[], CallerLimiter],
         body: Callable[[CallerLimiter], Awaitable[None]]) -> None:
    async def main() -> None:
        limiter = limiter_factory()
        try:
            await body(limiter)
        finally:
            await limiter.aclose()
    asyncio.run(main())


async def _admit(limiter: CallerLimiter, n: int, caller: str = "k1", name: str | None = None) -> None:
    for i in range(n):
        lease = await limiter.acquire(caller, f"r{i}", name=name)
        await lease.release()


async def _refused(limiter: CallerLimiter, caller: str = "k1", name: str | None = None) -> Problem:
    """The refusal as a caller gets it: the limiter's domain exception through the one table."""
    with pytest.raises(CallerLimited) as info:
        await limiter.acquire(caller, "refused", name=name)
    problem = problem_for(info.value)
    assert problem is not None
    return problem


# -- the contract, for both implementations ---------------------------------------------------

def test_burst_then_429_with_retry_after(make_limiter: Make) -> None:
    clock = FakeClock()

    async def body(limiter: CallerLimiter) -> None:
        await _admit(limiter, 3)  # the whole burst at one instant
        err = await _refused(limiter)
        assert (err.status, err.type, err.retryable) == (429, "rate_limited", True)
        assert err.retry_after_s == pytest.approx(0.1, abs=1e-3)  # one emission interval
        assert "10 requests/s" in err.message
        response = error_response(err, "req-1")
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        await _admit(limiter, 3, caller="k2")  # another key has its own bucket
    _run(lambda: make_limiter(_settings(), clock), body)


def test_bucket_refills_over_time(make_limiter: Make) -> None:
    clock = FakeClock()

    async def body(limiter: CallerLimiter) -> None:
        await _admit(limiter, 3)
        clock.advance(0.05)
        err = await _refused(limiter)
        assert err.retry_after_s == pytest.approx(0.05, abs=1e-3)
        clock.advance(0.05)
        await _admit(limiter, 1)  # one interval later: exactly one more
        await _refused(limiter)
        clock.advance(10.0)  # idle long enough: the full burst again, never more
        await _admit(limiter, 3)
        await _refused(limiter)
        for _ in range(20):  # sustained traffic at the configured rate is admitted
            clock.advance(0.1)
            await _admit(limiter, 1)
    _run(lambda: make_limiter(_settings(), clock), body)


def test_refused_requests_do_not_spend_rate(make_limiter: Make) -> None:
    clock = FakeClock()

    async def body(limiter: CallerLimiter) -> None:
        held = [await limiter.acquire("k1", f"h{i}") for i in range(2)]
        for _ in range(5):
            assert (await _refused(limiter)).type == "concurrency_limited"
        await held[0].release()
        await limiter.acquire("k1", "third")  # the burst of 3 is intact: only 2 were admitted
        await held[1].release()
    _run(lambda: make_limiter(_settings(max_concurrent=2), clock), body)


def test_concurrency_quota_released_on_success_error_and_cancel(make_limiter: Make) -> None:
    clock = FakeClock()
    settings = _settings(rate_per_s=1000.0, burst=1000, max_concurrent=2, concurrency_retry_after_s=2.0)

    async def body(limiter: CallerLimiter) -> None:
        async def fill_and_check() -> None:
            async with caller_slot(limiter, "k1", "a"), caller_slot(limiter, "k1", "b"):
                err = await _refused(limiter)
                assert (err.status, err.type, err.retry_after_s) == (429, "concurrency_limited", 2.0)
                assert "2 requests in progress" in err.message

        await fill_and_check()  # success: both released on exit
        await fill_and_check()

        with pytest.raises(RuntimeError):  # error inside the block
            async with caller_slot(limiter, "k1", "c"):
                raise RuntimeError("boom")
        await fill_and_check()

        started = asyncio.Event()

        async def hold() -> None:
            async with caller_slot(limiter, "k1", "d"), caller_slot(limiter, "k1", "e"):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(hold())
        await started.wait()
        await _refused(limiter)
        task.cancel()  # the caller went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await fill_and_check()

        lease = await limiter.acquire("k1", "f")  # releasing twice is harmless
        await lease.release()
        await lease.release()
        await fill_and_check()
    _run(lambda: make_limiter(settings, clock), body)


def test_reused_request_ids_still_count_separately(make_limiter: Make) -> None:
    clock = FakeClock()

    async def body(limiter: CallerLimiter) -> None:
        first = await limiter.acquire("k1", "same-id")
        second = await limiter.acquire("k1", "same-id")  # a caller-chosen x-request-id, reused
        assert (await _refused(limiter)).type == "concurrency_limited"
        await first.release()
        await second.release()
        await _admit(limiter, 2)
    _run(lambda: make_limiter(_settings(rate_per_s=1000.0, burst=100, max_concurrent=2), clock), body)


def test_per_caller_overrides_by_key_name(make_limiter: Make) -> None:
    clock = FakeClock()
    settings = _settings(burst=2, max_concurrent=1,
                         callers={"listing-pipeline": {"burst": 5, "max_concurrent": 3}})

    async def body(limiter: CallerLimiter) -> None:
        await _admit(limiter, 5, caller="k-pipe", name="listing-pipeline")
        err = await _refused(limiter, caller="k-pipe", name="listing-pipeline")
        assert "listing-pipeline" in err.message and "burst 5" in err.message
        assert err.retry_after_s == pytest.approx(0.1, abs=1e-3)  # rate inherited from the default
        await _admit(limiter, 2, caller="k-other", name="someone-else")
        await _refused(limiter, caller="k-other", name="someone-else")
        # A second key with the same name (key rotation) has its own counters.
        await _admit(limiter, 5, caller="k-pipe-new", name="listing-pipeline")
        clock.advance(10)
        leases = [await limiter.acquire("k-pipe", f"c{i}", name="listing-pipeline") for i in range(3)]
        assert (await _refused(limiter, caller="k-pipe", name="listing-pipeline")).type == "concurrency_limited"
        for lease in leases:
            await lease.release()
    _run(lambda: make_limiter(settings, clock), body)


def test_refusals_are_counted_in_stats_and_metrics(make_limiter: Make) -> None:
    clock = FakeClock()
    registry = CollectorRegistry()

    async def body(limiter: CallerLimiter) -> None:
        await _admit(limiter, 3, name="svc")
        await _refused(limiter, name="svc")
        stats = limiter.stats  # type: ignore[attr-defined]
        assert (stats.admitted, stats.rate_limited, stats.concurrency_limited) == (3, 1, 0)
        assert registry.get_sample_value("modgate_caller_limited_total",
                                         {"caller": "svc", "kind": "rate"}) == 1.0
    _run(lambda: make_limiter(_settings(), clock, registry=registry), body)


# -- settings and factory -------------------------------------------------------------------

def test_settings_are_strict_and_overrides_merge_with_defaults() -> None:
    with pytest.raises(ValidationError):
        CallerLimitsSettings(rate=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CallerLimitsSettings(callers={"x": {"rate_per_s": 0}})
    with pytest.raises(ValidationError):
        CallerLimitsSettings(callers={"x": {"burst": 3, "typo": 1}})
    s = CallerLimitsSettings(rate_per_s=5, burst=10, max_concurrent=4,
                             callers={"listing-pipeline": {"rate_per_s": 200, "burst": 400, "max_concurrent": 64},
                                      "partial": {"burst": 50}})
    assert s.limit_for("listing-pipeline") == (limit := s.limit_for("listing-pipeline"))
    assert (limit.rate_per_s, limit.burst, limit.max_concurrent) == (200, 400, 64)
    partial = s.limit_for("partial")
    assert (partial.rate_per_s, partial.burst, partial.max_concurrent) == (5, 50, 4)
    default = s.limit_for(None)
    assert (default.rate_per_s, default.burst, default.max_concurrent) == (5, 10, 4)


def test_build_caller_limiter_picks_the_implementation() -> None:
    async def main() -> None:
        disabled = build_caller_limiter(CallerLimitsSettings())
        assert isinstance(disabled, NoCallerLimits)
        for _ in range(1000):
            await (await disabled.acquire("k", "r")).release()
        assert isinstance(build_caller_limiter(_settings()), LocalCallerLimiter)
        shared = build_caller_limiter(_settings(), redis_url="redis://127.0.0.1:1/0", key_prefix="x")
        assert isinstance(shared, RedisCallerLimiter)
        await shared.aclose()
        assert isinstance(build_caller_limiter(_settings(backend="memory"), redis_url="redis://h/0"),
                          LocalCallerLimiter)
        with pytest.raises(ValueError, match="no Redis URL"):
            build_caller_limiter(_settings(backend="redis"))
    asyncio.run(main())


# -- shared by the workers of one gateway ------------------------------------------------------

def _workers(path: Path, settings: CallerLimitsSettings, clock: FakeClock,
             n: int = 2, slots: int = 128) -> list[SharedCallerLimiter]:
    SharedCallerTable.create(path, workers=n, slots=slots)
    # Each worker maps the file itself, as the worker processes do.
    return [SharedCallerLimiter(SharedCallerTable(path), i, settings, clock=clock) for i in range(n)]


def test_workers_share_rate_and_concurrency(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = _workers(tmp_path / "t.bin", _settings(rate_per_s=10.0, burst=4, max_concurrent=2), clock)

    async def main() -> None:
        await _admit(a, 2)
        await _admit(b, 2)
        assert (await _refused(a)).type == "rate_limited"
        assert (await _refused(b)).type == "rate_limited"
        clock.advance(10)
        held_a = await a.acquire("k1", "on-a")
        held_b = await b.acquire("k1", "on-b")
        assert (a.inflight("k1"), b.inflight("k1")) == (2, 2)
        assert (await _refused(a)).type == "concurrency_limited"
        await held_b.release()  # released in the other worker frees the slot for this one
        await held_b.release()  # twice is harmless
        await (await a.acquire("k1", "again")).release()
        await held_a.release()
        assert a.inflight("k1") == 0
        assert (a.stats.fallbacks, b.stats.fallbacks) == (0, 0)
        for w in (a, b):
            await w.aclose()
    asyncio.run(main())


def test_a_dead_workers_slots_are_given_back(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "t.bin"
    a, b = _workers(path, _settings(burst=100, max_concurrent=3), clock)

    async def main() -> None:
        held = [await b.acquire("k1", f"b{i}") for i in range(2)]  # worker 1 dies holding these
        await a.acquire("k1", "a0")
        assert (await _refused(a)).type == "concurrency_limited"
        SharedCallerTable(path).reset_worker(1)  # what the supervisor does before the restart
        assert a.inflight("k1") == 1
        await a.acquire("k1", "a1")
        await held[0].release()  # a late release of the dead worker cannot go below zero
        assert a.inflight("k1") == 2
    asyncio.run(main())


def test_idle_callers_give_their_slot_to_new_ones_and_a_full_table_falls_back(tmp_path: Path) -> None:
    clock = FakeClock()
    (a,) = _workers(tmp_path / "t.bin", _settings(rate_per_s=10.0, burst=1, max_concurrent=1), clock,
                    n=1, slots=64)

    async def main() -> None:
        held = [await a.acquire(f"caller-{i}", "r") for i in range(64)]  # every slot busy
        assert a.stats.fallbacks == 0
        extra = await a.acquire("one-too-many", "r")  # decided in this process, counted
        assert a.stats.fallbacks == 1
        await extra.release()
        for lease in held:
            await lease.release()
        clock.advance(1.0)  # all idle and full again: their slots are free for new callers
        for i in range(64):
            await (await a.acquire(f"new-{i}", "r")).release()
        assert a.stats.fallbacks == 1
        # A caller that kept its slot still has its state: the burst of 1 is spent.
        assert (await _refused(a, caller="new-3")).type == "rate_limited"
    asyncio.run(main())


def test_shared_table_refuses_a_foreign_file_and_build_picks_it(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a caller-limits table"):
        SharedCallerTable(bogus)
    SharedCallerTable.create(tmp_path / "t.bin", workers=2)
    limiter = build_caller_limiter(_settings(), shared=(tmp_path / "t.bin", 1))
    assert isinstance(limiter, SharedCallerLimiter) and limiter.worker == 1
    with pytest.raises(ValueError, match="worker 2"):
        SharedCallerLimiter(SharedCallerTable(tmp_path / "t.bin"), 2, _settings())
    # Redis, when configured, is shared by replicas and so by workers too.
    redis_limiter = build_caller_limiter(_settings(), redis_url="redis://127.0.0.1:1/0",
                                         shared=(tmp_path / "t.bin", 0))
    assert isinstance(redis_limiter, RedisCallerLimiter)
    asyncio.run(redis_limiter.aclose())
    asyncio.run(limiter.aclose())


# -- Redis only -----------------------------------------------------------------------------

def test_two_gateways_sharing_redis_share_the_quota(redis_server: RedisServer, redis_prefix: str) -> None:
    clock = FakeClock()
    settings = _settings(rate_per_s=10.0, burst=4, max_concurrent=2)

    async def main() -> None:
        a = RedisCallerLimiter(aioredis.Redis.from_url(redis_server.url), settings, prefix=redis_prefix,
                               clock=clock, redis_now=clock, owns_client=True)
        b = RedisCallerLimiter(aioredis.Redis.from_url(redis_server.url), settings, prefix=redis_prefix,
                               clock=clock, redis_now=clock, owns_client=True)
        try:
            await _admit(a, 2)
            await _admit(b, 2)
            assert (await _refused(a)).type == "rate_limited"
            assert (await _refused(b)).type == "rate_limited"
            clock.advance(10)
            held_a = await a.acquire("k1", "on-a")
            held_b = await b.acquire("k1", "on-b")
            assert (await _refused(a)).type == "concurrency_limited"
            await held_b.release()  # released on the other replica frees the slot for this one
            await (await a.acquire("k1", "again")).release()
            await held_a.release()
            assert (a.stats.fallbacks, b.stats.fallbacks) == (0, 0)
        finally:
            await a.aclose()
            await b.aclose()
    asyncio.run(main())


def test_leases_of_a_crashed_gateway_expire(redis_server: RedisServer, redis_prefix: str) -> None:
    clock = FakeClock()
    settings = _settings(rate_per_s=1000.0, burst=100, max_concurrent=2, lease_ttl_s=30.0)

    async def main() -> None:
        crashed = RedisCallerLimiter(aioredis.Redis.from_url(redis_server.url), settings,
                                     prefix=redis_prefix, clock=clock, redis_now=clock, owns_client=True)
        await crashed.acquire("k1", "lost-1")
        await crashed.acquire("k1", "lost-2")
        await crashed.aclose()  # never released: the process died
        survivor = RedisCallerLimiter(aioredis.Redis.from_url(redis_server.url), settings,
                                      prefix=redis_prefix, clock=clock, redis_now=clock, owns_client=True)
        try:
            assert (await _refused(survivor)).type == "concurrency_limited"
            clock.advance(29.0)
            assert (await _refused(survivor)).type == "concurrency_limited"
            clock.advance(2.0)  # past the lease TTL
            leases = [await survivor.acquire("k1", f"new-{i}") for i in range(2)]
            for lease in leases:
                await lease.release()
        finally:
            await survivor.aclose()
    asyncio.run(main())


def test_redis_outage_falls_back_to_local_limits_and_recovers(
        tmp_path: Path, redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    clock = FakeClock()
    registry = CollectorRegistry()
    settings = _settings(rate_per_s=10.0, burst=5, max_concurrent=3, redis_retry_s=5.0,
                         redis_timeout_s=0.5)
    caplog.set_level(logging.WARNING, logger="modgate.gateway.limits")

    async def main() -> None:
        limiter = RedisCallerLimiter(aioredis.Redis.from_url(server.url, socket_timeout=0.5,
                                                             socket_connect_timeout=0.5),
                                     settings, prefix=redis_prefix, registry=registry, clock=clock,
                                     redis_now=clock, owns_client=True)
        try:
            before = await limiter.acquire("k1", "before-outage")
            assert not limiter.degraded

            server.stop()
            # Requests keep being served, limited per replica with the same limits (not open).
            await _admit(limiter, 5)
            assert (await _refused(limiter)).type == "rate_limited"
            assert limiter.degraded
            assert limiter.stats.redis_errors == 1  # Redis is not asked again for redis_retry_s
            assert limiter.stats.fallbacks == 6
            assert registry.get_sample_value("modgate_caller_limits_fallback_total") == 6.0
            await before.release()  # the lease from before the outage: fails quietly, expires later
            assert limiter.stats.release_errors == 1

            clock.advance(1.0)
            held = [await limiter.acquire("k1", f"held-{i}") for i in range(3)]
            assert (await _refused(limiter)).type == "concurrency_limited"
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "unreachable" in errors[0].getMessage()  # logged once

            server.start()
            clock.advance(settings.redis_retry_s)  # time to ask Redis again
            for lease in held:  # leases from the outage are given back locally
                await lease.release()
            await _admit(limiter, 1, caller="k2")
            assert not limiter.degraded
            assert any("reachable again" in r.getMessage() for r in caplog.records)
            assert limiter.stats.fallbacks == 10
        finally:
            await limiter.aclose()
            server.stop()
    asyncio.run(main())


def test_redis_limiter_uses_the_server_clock_by_default(redis_server: RedisServer, redis_prefix: str) -> None:
    """Without an injected `now`, the Lua script judges by Redis' own TIME (real time here).
    One token a second: the refusal right after the burst holds unless a whole second passes
    between two calls (it was one token per 50 ms, within reach of a loaded machine)."""
    settings = _settings(rate_per_s=1.0, burst=1)

    async def main() -> None:
        limiter = RedisCallerLimiter(aioredis.Redis.from_url(redis_server.url), settings,
                                     prefix=redis_prefix, owns_client=True)
        try:
            await _admit(limiter, 1)
            err = await _refused(limiter)
            assert 0 < (err.retry_after_s or 0) <= 1.0 + 1e-3
            await asyncio.sleep((err.retry_after_s or 0) + 0.05)  # the token is back by Redis' clock
            await _admit(limiter, 1)
        finally:
            await limiter.aclose()
    asyncio.run(main())
