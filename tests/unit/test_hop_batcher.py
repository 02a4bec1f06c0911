"""HopBatcher: no added wait when idle, batches under load, bounded wait, failures reach every
waiter, callers that gave up are not sent."""

from __future__ import annotations

import asyncio

import pytest

from serving.hop_batcher import HopBatcher


async def settle(steps: int = 20) -> None:
    """Let the event loop run *steps* iterations: enough for every callback and task these
    tests start to take its next step, counted in loop iterations rather than wall-clock time
    (a `sleep(0.01)` can end before a step on a loaded machine)."""
    for _ in range(steps):
        await asyncio.sleep(0)


def sync(fn):  # type: ignore[no-untyped-def]
    """Run an async test body on a fresh event loop (the suite has no asyncio plugin)."""
    def run() -> None:
        asyncio.run(fn())
    run.__name__ = fn.__name__
    return run


class Upstream:
    """Records each call's batch; calls block until released when `gate` is set."""

    def __init__(self, gate: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.sent_at: list[float] = []  # the event loop's clock at each call
        self.release = asyncio.Event()
        if not gate:
            self.release.set()
        self.fail: Exception | None = None
        self.short = False

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.sent_at.append(asyncio.get_running_loop().time())
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        out = [i * 10 for i in items]
        return out[:-1] if self.short else out


@sync
async def test_a_request_on_an_idle_batcher_goes_at_once_alone() -> None:
    up = Upstream()
    b = HopBatcher(up.send, max_size=8, max_wait_s=3600.0, max_hops=2)
    sent = asyncio.ensure_future(b.submit(3))
    await settle()  # a few loop steps, no timer: not the max wait
    assert sent.done() and sent.result() == 30
    assert up.batches == [[3]]


@sync
async def test_requests_queue_while_hops_are_busy_and_leave_together() -> None:
    up = Upstream(gate=True)
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=1)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 6)]
    await settle()
    assert up.batches == [[1]]  # the others wait for the one hop
    up.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50]
    assert up.batches == [[1], [2, 3, 4, 5]]
    assert b.stats() == {"calls": 2, "requests": 5, "mean_batch": 2.5, "abandoned_calls": 0}


@sync
async def test_a_full_batch_is_sent_even_when_every_hop_is_busy() -> None:
    up = Upstream(gate=True)
    b = HopBatcher(up.send, max_size=3, max_wait_s=5.0, max_hops=1)
    futs = [asyncio.ensure_future(b.submit(i)) for i in range(7)]
    await settle()
    assert up.batches == [[0], [1, 2, 3], [4, 5, 6]]
    up.release.set()
    assert await asyncio.gather(*futs) == [i * 10 for i in range(7)]


@sync
async def test_queued_requests_wait_at_most_max_wait() -> None:
    up = Upstream(gate=True)
    max_wait_s = 0.05
    b = HopBatcher(up.send, max_size=100, max_wait_s=max_wait_s, max_hops=1)
    loop = asyncio.get_running_loop()
    asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0)
    queued_at = loop.time()
    waiting = asyncio.ensure_future(b.submit(1))
    deadline = queued_at + 30  # only a guard against a hang
    while len(up.batches) < 2:
        assert loop.time() < deadline, "the queued request was never sent"
        await asyncio.sleep(0.005)
    # Sent by the timer although the first hop is still busy, and not before max_wait (timers
    # never fire early; on a loaded machine they may fire late, so no upper bound here).
    assert up.batches == [[0], [1]] and not up.release.is_set()
    assert up.sent_at[1] - queued_at >= max_wait_s - 1e-3
    up.release.set()
    assert await waiting == 10
    await b.aclose()


@sync
async def test_a_failed_call_fails_every_request_it_carried() -> None:
    up = Upstream(gate=True)
    up.fail = ConnectionError("replica died")
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=1)
    futs = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    up.release.set()
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


@sync
async def test_a_short_answer_is_an_error_not_a_misaligned_result() -> None:
    up = Upstream()
    up.short = True
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=1)
    with pytest.raises(RuntimeError, match="answered with"):
        await b.submit(1)


@sync
async def test_a_caller_that_gave_up_before_sending_is_dropped_from_the_batch() -> None:
    up = Upstream(gate=True)
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=1)
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(b.submit(2))
    kept = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    up.release.set()
    assert await first == 10 and await kept == 30
    assert up.batches == [[1], [3]]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        HopBatcher(Upstream().send, max_size=0, max_wait_s=0.0, max_hops=1)


class SlowUpstream:
    """Never answers until released; records whether a call was cancelled."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.cancelled: list[list[int]] = []
        self.release = asyncio.Event()

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(list(items))
            raise
        return [i * 10 for i in items]


@sync
async def test_a_call_whose_only_caller_gave_up_is_cancelled() -> None:
    up = SlowUpstream()
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(b.submit(1), 0.05)
    await asyncio.sleep(0)
    assert up.cancelled == [[1]] and b.stats()["abandoned_calls"] == 1
    assert b.in_flight_hops == 0  # the slot is free again
    up.release.set()
    assert await b.submit(2) == 20


@sync
async def test_a_call_is_cancelled_only_when_every_caller_in_it_gave_up() -> None:
    up = SlowUpstream()
    b = HopBatcher(up.send, max_size=8, max_wait_s=5.0, max_hops=1)
    busy = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    a, c = asyncio.ensure_future(b.submit(2)), asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0)
    busy.cancel()  # frees the hop: 2 and 3 leave together
    await settle()
    assert up.batches == [[1], [2, 3]] and up.cancelled == [[1]]
    a.cancel()
    await settle()
    assert up.cancelled == [[1]]  # 3 still waits: its call goes on
    c.cancel()
    await settle()
    assert up.cancelled == [[1], [2, 3]] and b.stats()["abandoned_calls"] == 2
