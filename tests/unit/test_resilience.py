"""ResilientBackend: retries only on BackendUnavailable, within the caller's one deadline, under
a retry budget; per-model circuit breakers that open, fail fast, half-open and close with a
growing back-off; streams retried only before their first chunk. Clock, sleep and RNG are fake,
so nothing here waits."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import (
    BackendBadRequest,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ChatChunk,
    ChatRequest,
    ChatResult,
    InferenceBackend,
    Timings,
)
from serving.fake_backend import FakeBackend
from serving.resilience import (
    BreakerSettings,
    CircuitOpen,
    ResilienceSettings,
    ResilientBackend,
    RetrySettings,
    no_retries,
)

ROOT = Path(__file__).resolve().parents[2]
REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
OK = "ok"


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


class ScriptedBackend:
    """Answers each call with the next scripted outcome: OK, an exception to raise, or (for
    streams) ("break", n): n chunks, then the connection breaks. Each call costs `cost_s` of
    fake time."""

    def __init__(self, clock: FakeClock, outcomes: list[Any] | None = None, *, default: Any = OK,
                 cost_s: float = 0.0) -> None:
        self.clock = clock
        self.outcomes = list(outcomes or [])
        self.default = default
        self.cost_s = cost_s
        self.timeouts: list[float] = []
        self.streams_closed = 0
        self.gate: asyncio.Event | None = None

    def _next(self, timeout_s: float) -> Any:
        self.timeouts.append(timeout_s)
        self.clock.t += self.cost_s
        return self.outcomes.pop(0) if self.outcomes else self.default

    @property
    def calls(self) -> int:
        return len(self.timeouts)

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        outcome = self._next(timeout_s)
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return ChatResult(text="fine", finish_reason="stop", prompt_tokens=1, completion_tokens=1,
                          model=request.model, timings=Timings(total_ms=1.0))

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        outcome = self._next(timeout_s)
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            pieces = ["a", "b", "c"]
            broken_after = outcome[1] if isinstance(outcome, tuple) else None
            for i, piece in enumerate(pieces):
                if broken_after is not None and i >= broken_after:
                    raise BackendUnavailable("stream broke mid-answer")
                yield ChatChunk(text_delta=piece, finish_reason="stop" if i == len(pieces) - 1 else None)
        finally:
            self.streams_closed += 1

    async def check_health(self) -> dict[str, Any]:
        return {"models": ["m"]}

    async def aclose(self) -> None:
        return None


def _wrap(inner: ScriptedBackend, clock: FakeClock, *, retry: dict[str, Any] | None = None,
          breaker: dict[str, Any] | None = None, registry: CollectorRegistry | None = None) -> ResilientBackend:
    settings = ResilienceSettings(retry=RetrySettings(**(retry or {})),
                                  breaker=BreakerSettings(**(breaker or {})))
    return ResilientBackend(inner, settings, clock=clock, sleep=clock.sleep, rng=random.Random(7),
                            registry=registry)


# -- retries --------------------------------------------------------------------------------

def test_retries_backend_unavailable_with_jittered_exponential_backoff() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [BackendUnavailable("refused"), BackendUnavailable("503"), OK])
    rb = _wrap(inner, clock)
    result = asyncio.run(rb.chat(REQ, timeout_s=10))
    assert result.text == "fine" and inner.calls == 3
    s = rb.stats
    assert (s.requests, s.attempts, s.retries, s.retry_successes) == (1, 3, 2, 1)
    first, second = clock.sleeps
    assert 0.025 <= first <= 0.05 and 0.05 <= second <= 0.1  # base 0.05 doubling, equal jitter
    assert first != 0.05 and second != 0.1  # jittered


def test_at_most_two_retries() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("engine dead"))
    rb = _wrap(inner, clock, breaker={"enabled": False})
    with pytest.raises(BackendUnavailable, match="engine dead"):
        asyncio.run(rb.chat(REQ, timeout_s=10))
    assert inner.calls == 3 and rb.stats.retries == 2 and rb.stats.retries_exhausted == 1


@pytest.mark.parametrize("exc", [BackendBadRequest("400"), BackendOverloaded("429", retry_after_s=2),
                                 BackendTimeout("too slow"), BackendProtocolError("garbage")])
def test_never_retries_4xx_overload_timeouts_or_protocol_errors(exc: Exception) -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [exc, OK])
    rb = _wrap(inner, clock)
    with pytest.raises(type(exc)):
        asyncio.run(rb.chat(REQ, timeout_s=10))
    assert inner.calls == 1 and clock.sleeps == []
    assert (rb.stats.retries, rb.stats.not_retryable) == (0, 1)


def test_no_retries_context_for_shadow_traffic() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [BackendUnavailable("refused"), OK, BackendUnavailable("again"), OK])
    rb = _wrap(inner, clock)

    async def shadow() -> None:
        with no_retries():
            await rb.chat(REQ, timeout_s=10)

    with pytest.raises(BackendUnavailable, match="refused"):
        asyncio.run(shadow())
    assert inner.calls == 1 and rb.stats.retries == 0
    assert asyncio.run(rb.chat(REQ, timeout_s=10)).text == "fine"  # outside: retried as usual
    assert inner.calls == 2
    asyncio.run(rb.chat(REQ, timeout_s=10))
    assert inner.calls == 4 and rb.stats.retries == 1


def test_one_deadline_covers_every_attempt_and_backoff() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("reset"), cost_s=0.45)
    rb = _wrap(inner, clock, breaker={"enabled": False})
    with pytest.raises(BackendUnavailable):
        asyncio.run(rb.chat(REQ, timeout_s=1.0))
    # attempt 1 gets the whole second; attempt 2 what is left after 0.45 s and the back-off;
    # a third would start with less than min_attempt_s (0.1 s) left, so it is not made.
    assert inner.calls == 2
    assert inner.timeouts[0] == 1.0
    assert inner.timeouts[1] == pytest.approx(1.0 - 0.45 - clock.sleeps[0])
    assert clock.t <= 1.0
    assert rb.stats.deadline_exhausted == 1


def test_no_retry_when_the_deadline_is_too_close() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [BackendUnavailable("refused"), OK])
    rb = _wrap(inner, clock)
    with pytest.raises(BackendUnavailable):
        asyncio.run(rb.chat(REQ, timeout_s=0.12))
    assert inner.calls == 1 and rb.stats.deadline_exhausted == 1


def test_retry_budget_stops_a_retry_storm_and_renews_with_the_window() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("engine dead"))
    rb = _wrap(inner, clock, retry={"budget_ratio": 0.2, "budget_min_retries_per_s": 0.1,
                                    "budget_window_s": 10.0}, breaker={"enabled": False})

    async def storm(n: int) -> None:
        for _ in range(n):
            with pytest.raises(BackendUnavailable):
                await rb.chat(REQ, timeout_s=10)

    asyncio.run(storm(100))
    # Without a budget: 300 attempts (1 + 2 retries each). With it: ~20% extra.
    assert rb.stats.retries <= 21 and inner.calls <= 121
    assert rb.stats.budget_exhausted >= 79
    clock.t += 11.0  # the window has slid past the storm: retries are allowed again
    before = rb.stats.retries
    asyncio.run(storm(1))
    assert rb.stats.retries == before + 1


# -- circuit breaker ------------------------------------------------------------------------

def test_breaker_opens_fails_fast_half_opens_and_closes_with_growing_backoff() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("connection refused"))
    rb = _wrap(inner, clock, retry={"max_retries": 0},
               breaker={"consecutive_failures": 3, "open_s": 1.0, "open_multiplier": 2.0, "max_open_s": 4.0})
    breaker = rb.breaker("m")

    async def call() -> None:
        await rb.chat(REQ, timeout_s=10)

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(BackendUnavailable, match="refused"):
                await call()
        assert breaker.state == "open" and breaker.last_open_s == 1.0
        calls = inner.calls
        with pytest.raises(CircuitOpen, match="circuit open") as info:
            await call()
        assert isinstance(info.value, BackendUnavailable)  # the gateway answers 503 model_unavailable
        assert info.value.retry_after_s == pytest.approx(1.0)
        assert inner.calls == calls and rb.stats.circuit_rejected == 1  # failed fast

        # Probes fail: the circuit reopens for 2 s, 4 s, then stays capped at 4 s.
        for expected in (2.0, 4.0, 4.0):
            clock.t = breaker.open_until
            with pytest.raises(BackendUnavailable, match="refused"):
                await call()  # the probe reached the backend
            assert breaker.state == "open" and breaker.last_open_s == expected
            clock.t += expected - 0.01
            with pytest.raises(CircuitOpen):
                await call()

        # The backend recovers; one probe at a time while half open.
        clock.t = breaker.open_until
        inner.default = OK
        inner.gate = asyncio.Event()
        probe = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        assert breaker.state == "half_open"
        with pytest.raises(CircuitOpen, match="probe"):
            await call()
        inner.gate.set()
        inner.gate = None
        await probe
        assert breaker.state == "closed"
        await call()

        # Failing again soon after: the open time keeps growing (capped) ...
        inner.default = BackendUnavailable("refused again")
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await call()
        assert breaker.state == "open" and breaker.last_open_s == 4.0
        clock.t = breaker.open_until
        inner.default = OK
        await call()
        # ... but after staying closed for max_open_s it starts from open_s again.
        clock.t += 4.0
        inner.default = BackendUnavailable("refused much later")
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await call()
        assert breaker.last_open_s == 1.0

    asyncio.run(scenario())
    s = rb.stats
    assert s.circuit_opened == 6 and s.circuit_half_opened == 5 and s.circuit_closed == 2


def test_breaker_opens_on_failure_rate_over_the_window() -> None:
    clock = FakeClock()
    outcomes = [BackendUnavailable("flaky") if i % 2 else OK for i in range(40)]
    inner = ScriptedBackend(clock, outcomes)
    rb = _wrap(inner, clock, retry={"max_retries": 0},
               breaker={"consecutive_failures": 100, "failure_rate": 0.5, "min_requests": 10})

    async def run() -> int:
        for n in range(1, 41):
            try:
                await rb.chat(REQ, timeout_s=10)
            except CircuitOpen:
                return n
            except BackendUnavailable:
                pass
            clock.t += 0.1
        return 0

    assert asyncio.run(run()) == 11  # 5 failures in the first 10 calls: open; the 11th fails fast
    assert rb.breaker("m").state == "open"


@pytest.mark.parametrize("exc", [BackendBadRequest("400"), BackendOverloaded("429"),
                                 BackendTimeout("slow"), BackendProtocolError("garbage")])
def test_breaker_ignores_answers_and_caller_deadlines(exc: Exception) -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=exc)
    rb = _wrap(inner, clock, breaker={"consecutive_failures": 2, "min_requests": 2})

    async def run() -> None:
        for _ in range(20):
            with pytest.raises(type(exc)):
                await rb.chat(REQ, timeout_s=10)

    asyncio.run(run())
    assert rb.breaker("m").state == "closed" and inner.calls == 20


def test_timeouts_open_the_breaker_when_configured() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendTimeout("engine hung"))
    rb = _wrap(inner, clock, breaker={"consecutive_failures": 2, "count_timeouts": True})

    async def run() -> None:
        for _ in range(2):
            with pytest.raises(BackendTimeout):
                await rb.chat(REQ, timeout_s=10)
        with pytest.raises(CircuitOpen):
            await rb.chat(REQ, timeout_s=10)

    asyncio.run(run())
    assert inner.calls == 2


def test_retries_stop_once_the_circuit_opens_and_circuits_are_per_model() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("refused"))
    rb = _wrap(inner, clock, breaker={"consecutive_failures": 2})

    async def run() -> None:
        with pytest.raises(BackendUnavailable, match="refused") as info:
            await rb.chat(REQ, timeout_s=10)
        assert not isinstance(info.value, CircuitOpen)  # the engine's error, not "circuit open"
        assert inner.calls == 2  # the second failure opened the circuit: no third attempt
        inner.default = OK
        other = ChatRequest(model="other", messages=REQ.messages, max_tokens=8)
        assert (await rb.chat(other, timeout_s=10)).model == "other"  # another model is unaffected
        with pytest.raises(CircuitOpen):
            await rb.chat(REQ, timeout_s=10)

    asyncio.run(run())


# -- streaming ------------------------------------------------------------------------------

async def _collect(rb: ResilientBackend) -> list[str]:
    return [c.text_delta async for c in rb.stream_chat(REQ, timeout_s=10)]


def test_stream_is_retried_before_its_first_chunk() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [BackendUnavailable("refused"), OK])
    rb = _wrap(inner, clock)
    assert asyncio.run(_collect(rb)) == ["a", "b", "c"]
    assert inner.calls == 2 and rb.stats.retries == 1 and inner.streams_closed == 2


def test_stream_is_not_retried_after_its_first_chunk() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [("break", 1), OK])
    rb = _wrap(inner, clock)
    received: list[str] = []

    async def run() -> None:
        async for chunk in rb.stream_chat(REQ, timeout_s=10):
            received.append(chunk.text_delta)

    with pytest.raises(BackendUnavailable, match="mid-answer"):
        asyncio.run(run())
    assert received == ["a"] and inner.calls == 1
    assert rb.stats.retries == 0 and rb.stats.stream_broken == 1


@pytest.mark.parametrize("exc", [BackendBadRequest("400"), BackendTimeout("slow")])
def test_stream_errors_that_are_not_retried(exc: Exception) -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, [exc, OK])
    rb = _wrap(inner, clock)
    with pytest.raises(type(exc)):
        asyncio.run(_collect(rb))
    assert inner.calls == 1


def test_stream_fails_fast_while_open_and_closes_the_inner_stream_early() -> None:
    clock = FakeClock()
    inner = ScriptedBackend(clock, default=BackendUnavailable("refused"))
    rb = _wrap(inner, clock, retry={"max_retries": 0}, breaker={"consecutive_failures": 1})

    async def run() -> None:
        with pytest.raises(BackendUnavailable):
            await _collect(rb)
        with pytest.raises(CircuitOpen):
            await _collect(rb)
        clock.t = rb.breaker("m").open_until
        inner.default = OK
        stream = rb.stream_chat(REQ, timeout_s=10)
        assert (await anext(stream)).text_delta == "a"  # the probe's first chunk closes the circuit
        assert rb.breaker("m").state == "closed"
        await stream.aclose()  # the caller went away after one chunk

    asyncio.run(run())
    assert inner.streams_closed == inner.calls == 2


# -- wiring ---------------------------------------------------------------------------------

def test_metrics_protocol_and_passthrough() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    inner = ScriptedBackend(clock, [BackendUnavailable("x"), OK], default=BackendUnavailable("y"))
    rb = _wrap(inner, clock, registry=registry, retry={"max_retries": 0},
               breaker={"consecutive_failures": 2})
    assert isinstance(rb, InferenceBackend)

    async def run() -> None:
        with pytest.raises(BackendUnavailable):
            await rb.chat(REQ, timeout_s=10)
        await rb.chat(REQ, timeout_s=10)
        for _ in range(2):
            with pytest.raises(BackendUnavailable):
                await rb.chat(REQ, timeout_s=10)
        with pytest.raises(CircuitOpen):
            await rb.chat(REQ, timeout_s=10)
        assert await rb.check_health() == {"models": ["m"], "circuits_open": ["m"]}
        await rb.aclose()

    asyncio.run(run())
    value = registry.get_sample_value
    assert value("modgate_backend_attempts_total", {"model": "m"}) == 4.0
    assert value("modgate_backend_circuit_rejected_total", {"model": "m"}) == 1.0
    assert value("modgate_backend_circuit_transitions_total", {"model": "m", "state": "open"}) == 1.0
    assert value("modgate_backend_circuit_state", {"model": "m"}) == 2.0


def test_gateway_answers_503_with_retry_after_while_the_circuit_is_open(tmp_path: Path) -> None:
    """No gateway change needed: CircuitOpen is a BackendUnavailable carrying retry_after_s."""
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("caller", ["moderate"], created_by="t")
    store.put_key(record)
    fake = FakeBackend()
    fake.error = BackendUnavailable("server error HTTP 503: engine dead")
    backend = ResilientBackend(fake, ResilienceSettings(
        retry=RetrySettings(base_backoff_s=0.001, max_backoff_s=0.002),
        breaker=BreakerSettings(consecutive_failures=3, open_s=5.0)))
    listing = {"item_id": "i-1", "seller_id": "s-1", "title": "Wireless earbuds"}
    try:
        with TestClient(create_app(GatewaySettings(), store, backend),
                        headers={"authorization": f"Bearer {key}"}) as client:
            r = client.post("/v1/moderate", json=listing)
            assert r.status_code == 503 and r.json()["error"]["type"] == "model_unavailable"
            assert len(fake.requests) == 3  # first attempt + 2 retries, then the circuit opened
            r = client.post("/v1/moderate", json=listing)
            assert r.status_code == 503 and "circuit open" in r.json()["error"]["message"]
            assert r.json()["error"]["retryable"] is True and r.headers["retry-after"] == "5"
            assert len(fake.requests) == 3  # failed fast
    finally:
        store.close()
