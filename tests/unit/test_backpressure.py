"""Backpressure: bounded in-flight and queue per model, fast 429s with Retry-After when full,
and engine work cancelled when the caller disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.admission import AdmissionControl
from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.problems import GatewayError, problem_for
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import ChatRequest, ChatResult
from serving.fake_backend import FakeBackend
from testsupport.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


class SlowBackend(FakeBackend):
    """Holds each call until released; records cancellations."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        self.started += 1
        try:
            await asyncio.wait_for(self.release.wait(), timeout_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().chat(request, timeout_s=timeout_s)


def test_admission_queue_then_shed() -> None:
    async def run() -> None:
        adm = AdmissionControl(max_inflight=2, max_queued=1)
        gate = asyncio.Event()

        async def hold() -> None:
            async with adm.slot("m", timeout_s=5):
                await gate.wait()

        holders = [asyncio.ensure_future(hold()) for _ in range(3)]  # 2 in flight, 1 queued
        await settle()
        assert (adm.models["m"].inflight, adm.models["m"].queued) == (2, 1)

        async def one_more() -> None:
            async with adm.slot("m", timeout_s=5):
                pass
        refused = asyncio.ensure_future(one_more())
        await settle()  # refused at once: within a few loop steps, no timer, nothing freed
        assert refused.done() and not gate.is_set()
        with pytest.raises(GatewayError) as info:
            refused.result()
        assert problem_for(info.value).status == 429 and info.value.retry_after_s == 1.0
        with pytest.raises(GatewayError) as info:  # shadow traffic never queues
            async with adm.slot("m", timeout_s=5, wait=False):
                pass
        assert problem_for(info.value).status == 429
        gate.set()
        await asyncio.gather(*holders)
        assert (adm.models["m"].inflight, adm.models["m"].queued, adm.models["m"].shed) == (0, 0, 2)
        with pytest.raises(GatewayError) as info:  # a queued request waits no longer than its deadline
            async with adm.slot("m", timeout_s=5), adm.slot("m", timeout_s=5):
                async with adm.slot("m", timeout_s=0.05):
                    pass
        assert problem_for(info.value).status == 504
    asyncio.run(run())


async def settle(steps: int = 20) -> None:
    """Let the event loop run *steps* iterations (loop steps, not wall-clock time)."""
    for _ in range(steps):
        await asyncio.sleep(0)


async def until(what: str, predicate: Callable[[], bool], within_s: float = 30.0) -> None:
    """Wait for *predicate*; *within_s* is only a guard against a hang (a loaded CI is slow)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        await asyncio.sleep(0.01)


def test_overload_gives_fast_429_and_disconnect_cancels_engine_work(tmp_path: Path) -> None:
    store = SqlitePromptStore(tmp_path / "r.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("caller", ["moderate"], created_by="t")
    store.put_key(record)
    backend = SlowBackend()
    settings = GatewaySettings(max_inflight_per_model=2, max_queued_per_model=2, request_timeout_s=30)
    app = create_app(settings, store, backend)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))

    async def run() -> None:
        serve = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            # 2 in flight + 2 queued fill the model; the 5th request is shed at once.
            busy = [asyncio.ensure_future(client.post("/v1/moderate", json=LISTING)) for _ in range(4)]
            slots = app.state.gateway.admission.models
            await until("2 in flight, 2 queued", lambda: backend.started == 2 and "tiny-llama" in slots
                        and slots["tiny-llama"].queued == 2)
            shed = await client.post("/v1/moderate", json=LISTING)
            assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
            assert shed.json()["error"]["type"] == "overloaded"
            # at once: answered while nothing was released and the four still wait (a wait
            # for a slot would have lasted until release, or ended in a 504)
            assert not any(b.done() for b in busy) and not backend.release.is_set()
            assert (slots["tiny-llama"].inflight, slots["tiny-llama"].queued) == (2, 2)
            backend.release.set()
            assert [r.status_code for r in await asyncio.gather(*busy)] == [200] * 4

            # A caller that gives up: its engine call is cancelled, not left running.
            backend.release.clear()
            cancelled_before = backend.cancelled
            with pytest.raises(httpx.ReadTimeout):  # the backend holds it: it can only time out
                await client.post("/v1/moderate", json=LISTING, timeout=0.3)
            await until("engine call cancelled", lambda: backend.cancelled > cancelled_before)
            assert backend.cancelled == cancelled_before + 1
            assert app.state.gateway.admission.models["tiny-llama"].inflight == 0
            metrics = (await client.get("/metrics")).text
            assert 'modgate_shed_requests_total{model="tiny-llama"} 1.0' in metrics
        server.should_exit = True
        await serve

    asyncio.run(run())
    store.close()


def test_queue_stays_bounded_under_churn() -> None:
    """Hundreds of callers against 16 slots and a queue of 32: an admitted request waited for
    at most (queue + slots) services to finish, counted, not timed (time depends on the machine's
    load; an unbounded queue makes the last admitted callers wait for hundreds)."""
    async def run() -> None:
        adm = AdmissionControl(max_inflight=16, max_queued=32)
        finished = 0  # services completed so far
        waited: list[int] = []  # per admitted request: services completed while it waited
        refused = 0
        most_queued = 0
        stop = time.monotonic() + 1.5

        async def worker() -> None:
            nonlocal refused, finished, most_queued
            while time.monotonic() < stop:
                before = finished
                try:
                    async with adm.slot("m", timeout_s=30):
                        waited.append(finished - before)
                        most_queued = max(most_queued, adm.models["m"].queued)
                        await asyncio.sleep(0.05)
                    finished += 1
                except GatewayError:
                    refused += 1
                    await asyncio.sleep(0.002)

        await asyncio.gather(*[worker() for _ in range(200)])
        assert refused > 0 and finished > 0 and most_queued <= 32
        assert max(waited) <= 32 + 16, max(waited)
        assert adm.models["m"].queued == 0 and adm.models["m"].inflight == 0
    asyncio.run(run())
