"""Admission control: bounded concurrency and a bounded queue per model.

Each model gets `max_inflight` concurrent engine calls and at most `max_queued` requests waiting
for one. A request that finds the queue full is refused at once with 429 and `Retry-After`
(fast shedding beats timing out: the caller can retry elsewhere or later), and a queued request
waits no longer than its own deadline. Counters feed the `modgate_shed_requests` metric and
`/metrics` queue gauges.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.problems import ModelSaturated, QueueTimeout

__all__ = ["AdmissionControl", "ModelSlots"]


@dataclass
class ModelSlots:
    max_inflight: int
    max_queued: int
    inflight: int = 0
    queued: int = 0
    shed: int = 0
    _sem: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._sem = asyncio.Semaphore(self.max_inflight)


class AdmissionControl:
    def __init__(self, *, max_inflight: int, max_queued: int, retry_after_s: float = 1.0) -> None:
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.models: dict[str, ModelSlots] = {}

    def _slots(self, model: str) -> ModelSlots:
        slots = self.models.get(model)
        if slots is None:
            slots = self.models[model] = ModelSlots(self.max_inflight, self.max_queued)
        return slots

    def slot(self, model: str, *, timeout_s: float, wait: bool = True) -> _Slot:
        """Hold one engine slot for *model* (`async with admission.slot(...)`). `wait=False`
        (shadow traffic) never queues."""
        return _Slot(self, self._slots(model), model, timeout_s, wait)


class _Slot:
    """One engine slot, held inside `async with`. A class rather than an
    @asynccontextmanager generator: it is entered on every moderation, and the generator
    protocol (an async generator, `anext` on entry and exit) cost more than the bookkeeping."""

    __slots__ = ("control", "slots", "model", "timeout_s", "wait")

    def __init__(self, control: AdmissionControl, slots: ModelSlots, model: str, timeout_s: float,
                 wait: bool) -> None:
        self.control, self.slots, self.model, self.timeout_s, self.wait = control, slots, model, timeout_s, wait

    async def __aenter__(self) -> None:
        s, model = self.slots, self.model
        if s._sem.locked():
            # Decide on the queue length alone: between a release and the woken waiter taking
            # its slot, `inflight` dips below the limit while the slot is already spoken for.
            if not self.wait or s.queued >= s.max_queued:
                s.shed += 1
                raise ModelSaturated(f"model {model!r} is saturated ({s.inflight} in flight, "
                                     f"{s.queued} queued); retry later",
                                     retry_after_s=self.control.retry_after_s)
            s.queued += 1
            try:
                await asyncio.wait_for(s._sem.acquire(), timeout=max(0.001, self.timeout_s))
            except TimeoutError:
                raise QueueTimeout(f"no free slot for model {model!r} within the request "
                                   "deadline") from None
            finally:
                s.queued -= 1
        else:
            await s._sem.acquire()  # free slot: no task, no timer
        s.inflight += 1

    async def __aexit__(self, *exc: object) -> None:
        s = self.slots
        s.inflight -= 1
        s._sem.release()
