"""Retries, a retry budget and circuit breakers around any `InferenceBackend`.

`ResilientBackend(inner)` is itself an `InferenceBackend`:

- **Retries** only on `BackendUnavailable` (connection refused or reset, the engine gone, a 5xx
  from the server): the request never reached a working engine, and a chat completion has no
  side effects, so sending it again is safe. Never on `BackendBadRequest` (4xx: sending it again
  gives the same answer), `BackendOverloaded` (429: retrying adds load to a saturated model;
  the caller gets the 429 and its `Retry-After`), `BackendTimeout` (the deadline is spent) or
  `BackendProtocolError` (the server answered; it would answer the same). At most
  `max_retries` (2) retries, with exponential back-off and "equal jitter" (half the back-off
  fixed, half random) so replicas do not retry in lock-step.
  Below this layer the HTTP backend sends a request once more at once, by itself, when the
  server closed its pooled keep-alive connection before any byte of an answer (a close that
  crossed the request on the wire: serving/http_backend.py); that is neither a retry here nor
  a failure for the breaker. Only when that second send fails too does it arrive here.
- **One deadline**: `timeout_s` covers every attempt and every back-off. Each attempt gets what
  is left; no retry starts with less than `min_attempt_s` left (counted as
  `deadline_exhausted`), so a retry never turns a 503 into a later 504.
- **Retry budget** (Finagle/Envoy style): retries are allowed only while the retries in the
  sliding window stay below `budget_ratio` of the requests in it, with a floor of
  `budget_min_retries_per_s` so a quiet backend can still retry. When an engine dies under
  load, at most ~20% extra traffic is sent to what is left instead of tripling it.
- **Circuit breaker** per model (Ray Serve routes each model to its own deployment, so one dead
  engine must not fail another model's requests fast): closed → open after
  `consecutive_failures` failures in a row, or a failure rate of `failure_rate` over
  `window_s` (with at least `min_requests`). While open, calls fail at once with
  `CircuitOpen` (a `BackendUnavailable`: the gateway answers `503 model_unavailable` with
  `Retry-After`). After the open time one probe request is let through (half-open): success
  closes the circuit, failure opens it again for longer (`open_s` × `open_multiplier`^n,
  capped at `max_open_s`); the growth resets once the circuit has stayed closed for
  `max_open_s`. Failures are `BackendUnavailable` (and `BackendTimeout` only when
  `count_timeouts`: the deadline belongs to the caller, and a caller with a 50 ms deadline must
  not open the circuit for everyone). 429 and 4xx answers prove the server is alive and count
  as successes; protocol errors and cancellations count as neither.
- `stream_chat` is retried only before its first chunk; once text has reached the caller, a
  broken stream is the caller's error (counted as `stream_broken`).
- `with no_retries():` turns retries off for the calls made inside it (shadow evaluations,
  which the README promises are never retried); they still feed and obey the breaker.

Every decision is counted in `stats` and, given a prometheus_client `CollectorRegistry`, in
`modgate_backend_*` metrics. Log lines name an error by its class and safe fields (kind,
reference id, upstream status, body length and hash: `BackendError.log_fields`), never by
upstream text. Clock, sleep and RNG are injectable for tests. This module must
not import `gateway` or `prompt_registry` (serving is the lower layer).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.errors import (
    BackendBadRequest,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
)
from serving.protocol import ChatChunk, ChatRequest, ChatResult, InferenceBackend

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "BreakerSettings",
    "CircuitBreaker",
    "CircuitOpen",
    "ResilienceSettings",
    "ResilienceStats",
    "ResilientBackend",
    "RetryBudget",
    "RetrySettings",
    "no_retries",
]

log = logging.getLogger("modgate.serving.resilience")

State = Literal["closed", "open", "half_open"]
_NO_RETRIES: contextvars.ContextVar[bool] = contextvars.ContextVar("modgate_no_retries", default=False)


@contextmanager
def no_retries() -> Iterator[None]:
    """Calls made inside (in this task) are never retried - for traffic that must not be, like
    shadow evaluations. They still go through the circuit breaker (fail fast while open) and
    count as evidence for it."""
    token = _NO_RETRIES.set(True)
    try:
        yield
    finally:
        _NO_RETRIES.reset(token)
_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class CircuitOpen(BackendUnavailable):
    """The model's circuit is open: failed fast, the backend was not called."""

    default_kind = "circuit_open"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# -- settings -------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Strict):
    max_retries: int = Field(2, ge=0, le=2, description="retries after the first attempt")
    base_backoff_s: float = Field(0.05, gt=0, description="back-off before the first retry")
    max_backoff_s: float = Field(1.0, gt=0)
    min_attempt_s: float = Field(0.1, gt=0, description="no retry starts with less time left")
    budget_ratio: float = Field(0.2, ge=0, le=1, description="retries / requests in the window")
    budget_min_retries_per_s: float = Field(1.0, ge=0, description="retries always allowed")
    budget_window_s: float = Field(10.0, gt=0)


class BreakerSettings(_Strict):
    enabled: bool = True
    consecutive_failures: int = Field(5, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    min_requests: int = Field(20, ge=1, description="the failure rate is judged from this many")
    window_s: float = Field(10.0, gt=0)
    open_s: float = Field(1.0, gt=0, description="first open time")
    open_multiplier: float = Field(2.0, ge=1)
    max_open_s: float = Field(30.0, gt=0)
    half_open_probes: int = Field(1, ge=1, description="requests let through at once when half open")
    count_timeouts: bool = False


class ResilienceSettings(_Strict):
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)


# -- counters -------------------------------------------------------------------------------

@dataclass
class ResilienceStats:
    requests: int = 0  # calls of chat() / stream_chat()
    attempts: int = 0  # calls of the inner backend
    retries: int = 0
    retry_successes: int = 0  # requests that succeeded on a retry
    not_retryable: int = 0  # errors never retried (4xx, 429, timeout, protocol)
    budget_exhausted: int = 0  # retries refused by the retry budget
    deadline_exhausted: int = 0  # retries refused because the deadline was too close
    retries_exhausted: int = 0  # BackendUnavailable after max_retries retries (or circuit opened)
    circuit_rejected: int = 0  # calls failed fast while a circuit was open
    circuit_opened: int = 0
    circuit_half_opened: int = 0
    circuit_closed: int = 0
    stream_broken: int = 0  # streams that failed after their first chunk


class _Metrics:
    def __init__(self) -> None:
        self.registry: CollectorRegistry | None = None
        self._children: dict[tuple[str, ...], Any] = {}
        self._attempts: dict[str, Any] = {}

    def bind(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge

        self.registry = registry
        self._children.clear()
        self._attempts.clear()
        self.attempts = Counter("modgate_backend_attempts", "Calls of the model server, retries "
                                "included", ["model"], registry=registry)
        self.retries = Counter("modgate_backend_retries", "Retries after BackendUnavailable",
                               ["model"], registry=registry)
        self.denied = Counter("modgate_backend_retries_denied", "Retries not made (budget "
                              "exhausted, deadline too close)", ["model", "reason"], registry=registry)
        self.transitions = Counter("modgate_backend_circuit_transitions", "Circuit breaker state "
                                   "changes", ["model", "state"], registry=registry)
        self.rejected = Counter("modgate_backend_circuit_rejected", "Calls failed fast while the "
                                "circuit was open", ["model"], registry=registry)
        self.state = Gauge("modgate_backend_circuit_state", "Circuit state: 0 closed, 1 half "
                           "open, 2 open", ["model"], registry=registry)

    def attempt(self, model: str) -> None:
        """`inc("attempts", model=model)`, which every backend call makes, by the model alone."""
        if self.registry is not None:
            child = self._attempts.get(model)
            if child is None:
                child = self._attempts[model] = self.attempts.labels(model=model)
            child.inc()

    def inc(self, name: str, **labels: str) -> None:
        if self.registry is not None:
            # The labelled child memoised: `labels()` takes a lock and builds its key on every
            # call, and `attempts` is counted on every backend call.
            key = (name, *labels.values())
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = getattr(self, name).labels(**labels)
            child.inc()

    def set_state(self, model: str, state: State) -> None:
        if self.registry is not None:
            self.state.labels(model=model).set(_STATE_VALUE[state])


class _Window:
    """Event counts over a sliding time window, in `buckets` time slices (O(buckets) memory)."""

    def __init__(self, window_s: float, clock: Callable[[], float], buckets: int = 10) -> None:
        self._width = window_s / buckets
        self._buckets = buckets
        self._clock = clock
        self._slices: deque[list[int]] = deque()  # [slice index, count]

    def _trim(self) -> int:
        now = int(self._clock() // self._width)
        while self._slices and self._slices[0][0] <= now - self._buckets:
            self._slices.popleft()
        return now

    def add(self, n: int = 1) -> None:
        now = int(self._clock() // self._width)
        slices = self._slices
        if slices and slices[-1][0] == now:  # the common case: nothing has aged out since
            slices[-1][1] += n
            return
        while slices and slices[0][0] <= now - self._buckets:
            slices.popleft()
        slices.append([now, n])

    def total(self) -> int:
        self._trim()
        return sum(c for _, c in self._slices)

    def clear(self) -> None:
        self._slices.clear()


class RetryBudget:
    """Retries allowed while retries < max(ratio × requests, min_per_s × window) in the window."""

    def __init__(self, ratio: float, min_per_s: float, window_s: float, clock: Callable[[], float]) -> None:
        self.ratio = ratio
        self.min_retries = min_per_s * window_s
        self._requests = _Window(window_s, clock)
        self._retries = _Window(window_s, clock)

    def note_request(self) -> None:
        self._requests.add()

    def try_spend(self) -> bool:
        if self._retries.total() + 1 > max(self.ratio * self._requests.total(), self.min_retries):
            return False
        self._retries.add()
        return True


class CircuitBreaker:
    """One model's circuit. `allow()` before a call (raises `CircuitOpen`), then exactly one of
    `success`, `failure`, `neutral` with the token it returned."""

    def __init__(self, name: str, settings: BreakerSettings, clock: Callable[[], float],
                 on_transition: Callable[[str, State], None] | None = None) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._on_transition = on_transition
        self.state: State = "closed"
        self.consecutive_failures = 0
        self.opened_count = 0  # opens in a row (sets the open time); reset after a stable close
        self.open_until = 0.0
        self.last_open_s = 0.0
        self._closed_at: float | None = None
        self._probes = 0
        self._calls = _Window(settings.window_s, clock)
        self._failures = _Window(settings.window_s, clock)

    def allow(self) -> bool:
        """Admit a call; True when it is a half-open probe."""
        if not self.settings.enabled:
            return False
        if self.state == "open":
            now = self._clock()
            if now < self.open_until:
                raise CircuitOpen(f"circuit open for model {self.name!r} after repeated failures; "
                                  f"next probe in {self.open_until - now:.1f}s",
                                  retry_after_s=self.open_until - now)
            self._move("half_open")
        if self.state == "half_open":
            if self._probes >= self.settings.half_open_probes:
                raise CircuitOpen(f"circuit half open for model {self.name!r}: a probe request is "
                                  "in flight", retry_after_s=max(0.5, self.settings.open_s))
            self._probes += 1
            return True
        return False

    def success(self, probe: bool) -> None:
        if not self.settings.enabled:
            return
        if probe:
            self._probes -= 1
            if self.state == "half_open":
                self._close()
            return
        self.consecutive_failures = 0
        if self.state == "closed":
            self._calls.add()

    def failure(self, probe: bool) -> None:
        if not self.settings.enabled:
            return
        if probe:
            self._probes -= 1
            if self.state == "half_open":
                self._open()
            return
        if self.state != "closed":
            return  # a call admitted before the circuit opened
        self.consecutive_failures += 1
        self._calls.add()
        self._failures.add()
        s = self.settings
        calls = self._calls.total()
        if self.consecutive_failures >= s.consecutive_failures or (
                calls >= s.min_requests and self._failures.total() >= s.failure_rate * calls):
            self._open()

    def neutral(self, probe: bool) -> None:
        if probe and self.settings.enabled:
            self._probes -= 1

    def _open(self) -> None:
        now = self._clock()
        s = self.settings
        if self.state == "closed" and self._closed_at is not None and now - self._closed_at >= s.max_open_s:
            self.opened_count = 0  # stayed closed long enough: back to the shortest open time
        self.last_open_s = min(s.max_open_s, s.open_s * s.open_multiplier ** self.opened_count)
        self.opened_count += 1
        self.open_until = now + self.last_open_s
        self._move("open")
        log.warning("circuit for model %r opened for %.1fs (%d consecutive failures)", self.name,
                    self.last_open_s, self.consecutive_failures)

    def _close(self) -> None:
        self.consecutive_failures = 0
        self._calls.clear()
        self._failures.clear()
        self._closed_at = self._clock()
        self._move("closed")
        log.warning("circuit for model %r closed: the probe request succeeded", self.name)

    def _move(self, state: State) -> None:
        self.state = state
        if self._on_transition is not None:
            self._on_transition(self.name, state)


# -- the wrapper ----------------------------------------------------------------------------

class ResilientBackend:
    """An `InferenceBackend` adding retries, a retry budget and per-model circuit breakers to
    *inner* (see the module docstring)."""

    def __init__(
        self,
        inner: InferenceBackend,
        settings: ResilienceSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings or ResilienceSettings()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.stats = ResilienceStats()
        r = self.settings.retry
        self.budget = RetryBudget(r.budget_ratio, r.budget_min_retries_per_s, r.budget_window_s, clock)
        self.breakers: dict[str, CircuitBreaker] = {}
        self._metrics = _Metrics()
        if registry is not None:
            self.bind_metrics(registry)

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        """Register the `modgate_backend_*` metrics on *registry* (e.g. the gateway's)."""
        self._metrics.bind(registry)

    def breaker(self, model: str) -> CircuitBreaker:
        b = self.breakers.get(model)
        if b is None:
            b = self.breakers[model] = CircuitBreaker(model, self.settings.breaker, self._clock,
                                                      self._transition)
            self._metrics.set_state(model, "closed")
        return b

    def _transition(self, model: str, state: State) -> None:
        if state == "open":
            self.stats.circuit_opened += 1
        elif state == "half_open":
            self.stats.circuit_half_opened += 1
        else:
            self.stats.circuit_closed += 1
        self._metrics.inc("transitions", model=model, state=state)
        self._metrics.set_state(model, state)

    def _admit(self, breaker: CircuitBreaker, model: str) -> bool:
        try:
            probe = breaker.allow()
        except CircuitOpen:
            self.stats.circuit_rejected += 1
            self._metrics.inc("rejected", model=model)
            raise
        self.stats.attempts += 1
        self._metrics.attempt(model)
        return probe

    def _record(self, breaker: CircuitBreaker, probe: bool, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, BackendBadRequest | BackendOverloaded):
            breaker.success(probe)  # the server answered
        elif isinstance(exc, BackendUnavailable) or (
                isinstance(exc, BackendTimeout) and self.settings.breaker.count_timeouts):
            breaker.failure(probe)
        else:
            breaker.neutral(probe)

    async def _retry(self, exc: BaseException, attempt: int, deadline: float, breaker: CircuitBreaker,
                     model: str) -> bool:
        """Decide whether to retry after *exc* on attempt number *attempt*; sleeps the back-off."""
        if not isinstance(exc, BackendUnavailable) or isinstance(exc, CircuitOpen):
            if isinstance(exc, Exception):
                self.stats.not_retryable += 1
            return False
        r = self.settings.retry
        if attempt > r.max_retries or breaker.state != "closed" or _NO_RETRIES.get():
            self.stats.retries_exhausted += 1
            return False
        backoff_cap = min(r.max_backoff_s, r.base_backoff_s * 2 ** (attempt - 1))
        backoff = backoff_cap / 2 + self._rng.uniform(0, backoff_cap / 2)
        if deadline - self._clock() - backoff < r.min_attempt_s:
            self.stats.deadline_exhausted += 1
            self._metrics.inc("denied", model=model, reason="deadline")
            return False
        if not self.budget.try_spend():
            self.stats.budget_exhausted += 1
            self._metrics.inc("denied", model=model, reason="budget")
            return False
        self.stats.retries += 1
        self._metrics.inc("retries", model=model)
        log.info("retrying model %r in %.3fs after %s %s", model, backoff, type(exc).__name__, exc.log_fields())
        await self._sleep(backoff)
        return True

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        deadline = self._clock() + timeout_s
        self.stats.requests += 1
        self.budget.note_request()
        model = request.model
        breaker = self.breakers.get(model) or self.breaker(model)
        attempt = 0
        while True:
            attempt += 1
            probe = self._admit(breaker, model)
            try:
                result = await self.inner.chat(request, timeout_s=max(0.001, deadline - self._clock()))
            except BaseException as exc:
                self._record(breaker, probe, exc)
                if await self._retry(exc, attempt, deadline, breaker, model):
                    continue
                raise
            breaker.success(probe)  # `_record` without an error: the server answered
            if attempt > 1:
                self.stats.retry_successes += 1
            return result

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        deadline = self._clock() + timeout_s
        self.stats.requests += 1
        self.budget.note_request()
        breaker = self.breaker(request.model)
        attempt = 0
        while True:
            attempt += 1
            probe = self._admit(breaker, request.model)
            stream = self.inner.stream_chat(request, timeout_s=max(0.001, deadline - self._clock()))
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                self._record(breaker, probe, None)
                return
            except BaseException as exc:
                await _close(stream)
                self._record(breaker, probe, exc)
                if await self._retry(exc, attempt, deadline, breaker, request.model):
                    continue
                raise
            self._record(breaker, probe, None)
            if attempt > 1:
                self.stats.retry_successes += 1
            break
        try:
            yield first
            async for chunk in stream:
                yield chunk
        except Exception:
            self.stats.stream_broken += 1
            raise
        finally:
            await _close(stream)

    async def check_health(self) -> dict[str, Any]:
        health = await self.inner.check_health()
        open_ = [m for m, b in self.breakers.items() if b.state != "closed"]
        return {**health, "circuits_open": open_} if open_ else health

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _close(stream: AsyncIterator[ChatChunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
