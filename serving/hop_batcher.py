"""`HopBatcher`: send several requests per Ray actor call when calls are the bottleneck.

Every Ray deployment-handle call costs the same fixed CPU in the calling process and in the
replica's Serve machinery, whatever it carries; on small machines that fixed cost caps one
gateway process at a few hundred calls per second (issue #4 measured ~365/s at 32 in flight).
The engine itself batches continuously, so what the hop carries can be grouped for free.

Policy (no added wait when idle):
- a request that arrives while fewer than `max_hops` calls are in flight is sent at once, with
  whatever else is queued (up to `max_size`);
- otherwise it queues; the queue is sent as soon as a call finishes, or when it reaches
  `max_size`, or when its oldest entry has waited `max_wait_s` — whichever is first.

So at low load every request travels alone and immediately; under load the number of calls in
flight stays near `max_hops` and each carries up to `max_size` requests.

Cancellation: a caller that gives up before its batch is sent is dropped from the batch. Once
sent, a call is cancelled (the sender's task is cancelled, so `send` can cancel the remote
work: the Ray handle backend cancels the Serve request, and the engine aborts) as soon as every
request it carries has been given up. A request given up while others in its call still wait
finishes on the engine and its result is discarded: one actor call cannot be partly cancelled.
At low load every call carries one request, so a caller that goes away (deadline, disconnect)
always stops its engine work there. The per-request deadline bounds what the caller waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["HopBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")


class HopBatcher(Generic[In, Out]):
    def __init__(self, send: Callable[[list[In]], Awaitable[list[Out]]], *, max_size: int,
                 max_wait_s: float, max_hops: int) -> None:
        if max_size < 1 or max_hops < 1 or max_wait_s < 0:
            raise ValueError("max_size and max_hops must be >= 1 and max_wait_s >= 0")
        self._send = send
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_hops = max_hops
        self._queue: list[tuple[In, asyncio.Future[Out]]] = []
        self._hops = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._call_of: dict[asyncio.Future[Out], tuple[asyncio.Task[None], list[asyncio.Future[Out]]]] = {}
        self.calls = 0  # actor calls made
        self.sent = 0  # requests carried by them
        self.abandoned_calls = 0  # calls cancelled because every request in them was given up

    @property
    def in_flight_hops(self) -> int:
        return self._hops

    async def submit(self, item: In) -> Out:
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._pump(force=False)
        try:
            return await fut
        except asyncio.CancelledError:
            self._abandon(fut)
            raise

    def _abandon(self, fut: asyncio.Future[Out]) -> None:
        """The caller waiting on `fut` gave up: cancel its call if nobody else waits on it."""
        call = self._call_of.get(fut)
        if call is None:  # not sent yet (dropped at dispatch) or already answered
            return
        task, futures = call
        if not task.done() and all(f.done() for f in futures):
            self.abandoned_calls += 1
            task.cancel()

    def _pump(self, *, force: bool) -> None:
        while self._queue and (force or self._hops < self.max_hops or len(self._queue) >= self.max_size):
            batch = [(i, f) for i, f in self._queue[:self.max_size] if not f.done()]
            del self._queue[:self.max_size]
            if batch:
                self._dispatch(batch)
            force = False
        if self._queue and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_wait_s, self._expire)
        elif not self._queue and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._pump(force=True)

    def _dispatch(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        self._hops += 1
        self.calls += 1
        self.sent += len(batch)
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        futures = [f for _, f in batch]
        for f in futures:
            self._call_of[f] = (task, futures)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            for f in futures:
                self._call_of.pop(f, None)

        task.add_done_callback(finished)

    async def _run(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} answered with {len(results)} results")
        except BaseException as exc:  # noqa: BLE001 - every waiter learns of the failure
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._hops -= 1
            self._pump(force=False)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(RuntimeError("batcher closed"))
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "requests": self.sent,
                "mean_batch": round(self.sent / self.calls, 2) if self.calls else 0.0,
                "abandoned_calls": self.abandoned_calls}
