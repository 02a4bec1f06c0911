"""The HTTP edge's request plumbing (`gateway.api.edge`, `gateway.api.guard`): the disconnect
watch around the work, the body reader, and what the hot route sends, driven through raw ASGI
so every message and every state is visible (no server, no wall-clock bounds)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.requests import Request

from gateway.api.app import create_app
from gateway.api.edge import read_body, unless_disconnected
from gateway.config import GatewaySettings
from gateway.problems import ApiError, ClientDisconnected
from prompt_registry.sqlite_store import SqlitePromptStore
from serving import ChatRequest, ChatResult
from serving.fake_backend import FakeBackend

LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}
SCOPE = {"type": "http", "method": "POST", "path": "/v1/moderate", "headers": [], "query_string": b""}


class Caller:
    """An ASGI `receive` whose caller leaves when told to; counts the reads still waiting."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.messages = list(messages)
        self.leave = asyncio.Event()
        self.waiting = 0
        self.reads = 0

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self.messages:
            return self.messages.pop(0)
        self.waiting += 1
        try:
            await self.leave.wait()
        finally:
            self.waiting -= 1
        return {"type": "http.disconnect"}


async def settle(steps: int = 5) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


def test_the_work_answers_and_no_read_is_left_waiting() -> None:
    async def run() -> None:
        caller = Caller()

        async def work() -> str:
            await settle()
            return "verdict"

        for _ in range(3):
            assert await unless_disconnected(Request(SCOPE, caller.receive), work()) == "verdict"
            await settle()
            assert caller.waiting == 0
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    asyncio.run(run())


def test_a_caller_leaving_cancels_the_work_and_is_a_client_disconnected() -> None:
    async def run() -> None:
        caller = Caller()
        started, cancelled = asyncio.Event(), []

        async def work() -> str:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return "never"

        async def leave_when_started() -> None:
            await started.wait()
            caller.leave.set()

        leaving = asyncio.ensure_future(leave_when_started())
        with pytest.raises(ClientDisconnected):
            await unless_disconnected(Request(SCOPE, caller.receive), work())
        await leaving
        assert cancelled == [True]
        me = asyncio.current_task()
        assert me is not None and me.cancelling() == 0  # the cancellation was taken back
        await asyncio.sleep(0)  # and no cancellation is left pending on this task
    asyncio.run(run())


def test_messages_other_than_a_disconnect_are_read_past() -> None:
    """A server may hand more `http.request` messages (an empty tail) before the disconnect."""
    async def run() -> None:
        caller = Caller({"type": "http.request", "body": b"", "more_body": False},
                        {"type": "http.request", "body": b"", "more_body": False})
        gate = asyncio.Event()

        async def work() -> str:
            await gate.wait()
            return "never"

        async def leave_later() -> None:
            await settle(10)
            caller.leave.set()

        leaving = asyncio.ensure_future(leave_later())
        with pytest.raises(ClientDisconnected):
            await unless_disconnected(Request(SCOPE, caller.receive), work())
        await leaving
        assert caller.reads == 3
    asyncio.run(run())


def test_a_caller_already_gone_aborts_before_any_answer() -> None:
    async def run() -> None:
        caller = Caller({"type": "http.disconnect"})
        ran = []

        async def work() -> str:
            await settle()
            ran.append(True)
            return "nobody reads this"

        with pytest.raises(ClientDisconnected):
            await unless_disconnected(Request(SCOPE, caller.receive), work())
        assert ran == []
        await settle()  # no cancellation left pending on this task
    asyncio.run(run())


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    """Server shutdown cancels the request's task: that is not the caller leaving."""
    async def run() -> None:
        caller = Caller()
        started = asyncio.Event()

        async def work() -> str:
            started.set()
            await asyncio.Event().wait()
            return "never"

        async def request() -> str:
            return await unless_disconnected(Request(SCOPE, caller.receive), work())

        task = asyncio.ensure_future(request())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle()
        assert caller.waiting == 0
    asyncio.run(run())


def _request(*messages: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError

    return Request({**SCOPE, "headers": headers or []}, receive)


def test_read_body_joins_chunks_and_cuts_at_the_limit_while_streaming() -> None:
    async def run() -> None:
        chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
                  {"type": "http.request", "body": b"cd", "more_body": True},
                  {"type": "http.request", "body": b"", "more_body": False}]
        assert await read_body(_request(*chunks), 4, 5.0) == b"abcd"
        assert await read_body(_request(chunks[-1]), 4, 5.0) == b""
        with pytest.raises(ApiError) as info:
            await read_body(_request(*chunks), 3, 5.0)
        assert info.value.status == 413
        with pytest.raises(ApiError) as info:  # refused from Content-Length, before any read
            await read_body(_request(headers=[(b"content-length", b"10")]), 4, 5.0)
        assert info.value.status == 413
        with pytest.raises(ClientDisconnected):
            await read_body(_request(chunks[0], {"type": "http.disconnect"}), 4, 5.0)
        with pytest.raises(ApiError) as info:  # a body that never ends: 408 at the deadline
            await read_body(_request(chunks[0]), 4, 0.01)
        assert info.value.status == 408
        await settle()
    asyncio.run(run())


class HeldBackend(FakeBackend):
    """Holds each call until cancelled; counts the cancellations."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.cancelled = 0

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError


async def _call(app: Any, key: str, caller: Caller, headers: list[tuple[bytes, bytes]] | None = None
                ) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    body = caller.messages[0]["body"] if caller.messages else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/moderate", "raw_path": b"/v1/moderate", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {key}".encode()), *(headers or [])]}
    await app(scope, caller.receive, send)
    return sent


def test_the_hot_route_answers_499_and_cancels_the_engine_call_when_the_caller_leaves(
        store: SqlitePromptStore, caller_key: str) -> None:
    backend = HeldBackend()
    app = create_app(GatewaySettings(), store, backend)

    async def run() -> list[dict[str, Any]]:
        async with app.router.lifespan_context(app):
            caller = Caller({"type": "http.request", "body": orjson.dumps(LISTING), "more_body": False})

            async def leave() -> None:
                await backend.started.wait()
                caller.leave.set()

            leaving = asyncio.ensure_future(leave())
            sent = await _call(app, caller_key, caller, [(b"x-request-id", b"req-gone")])
            await leaving
            return sent

    sent = asyncio.run(run())
    start, body = sent[0], sent[1]
    assert start["type"] == "http.response.start" and start["status"] == 499
    headers = dict(start["headers"])
    assert headers[b"x-request-id"] == b"req-gone" and headers[b"x-content-type-options"] == b"nosniff"
    assert orjson.loads(body["body"])["error"]["type"] == "client_disconnected"
    assert backend.cancelled == 1


def test_the_hot_route_sends_one_start_with_every_header_and_one_body(
        store: SqlitePromptStore, caller_key: str) -> None:
    app = create_app(GatewaySettings(), store, FakeBackend())

    async def run() -> list[dict[str, Any]]:
        async with app.router.lifespan_context(app):
            payload = orjson.dumps(LISTING)
            return await _call(app, caller_key, Caller(
                {"type": "http.request", "body": payload, "more_body": False}), [(b"x-request-id", b"req-7")])

    sent = asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    start, body = sent
    assert start["status"] == 200
    names = [k for k, _ in start["headers"]]
    assert len(names) == len(set(names))  # no header twice
    headers = dict(start["headers"])
    assert headers == {b"x-request-id": b"req-7", b"content-length": str(len(body["body"])).encode(),
                       b"content-type": b"application/json", b"x-content-type-options": b"nosniff",
                       b"cache-control": b"no-store",
                       b"content-security-policy": b"default-src 'none'; frame-ancestors 'none'"}
    assert orjson.loads(body["body"])["request_id"] == "req-7"
    assert not body.get("more_body", False)


def test_the_hot_route_refuses_oversized_headers_before_any_read(store: SqlitePromptStore, caller_key: str) -> None:
    app = create_app(GatewaySettings(), store, FakeBackend())

    async def run() -> tuple[list[dict[str, Any]], Caller]:
        async with app.router.lifespan_context(app):
            caller = Caller({"type": "http.request", "body": orjson.dumps(LISTING), "more_body": False})
            return await _call(app, caller_key, caller, [(b"x-big", b"a" * (32 * 1024))]), caller

    sent, caller = asyncio.run(run())
    assert sent[0]["status"] == 431 and caller.reads == 0
    assert dict(sent[0]["headers"])[b"cache-control"] == b"no-store"


@pytest.mark.parametrize(("ctype", "accepted"), [
    (None, True), (b"application/json", True), (b"Application/JSON; charset=utf-8", True),
    (b"application/problem+json", True), (b"", True), (b"text/plain", False),
    (b"application/x-www-form-urlencoded", False), (b"application/jsonx", False)])
def test_read_json_object_takes_json_content_types_only(ctype: bytes | None, accepted: bool) -> None:
    from gateway.api.edge import read_json_object

    async def run() -> None:
        headers = [] if ctype is None else [(b"content-type", ctype)]
        request = _request({"type": "http.request", "body": b'{"a": 1}', "more_body": False}, headers=headers)
        if accepted:
            assert await read_json_object(request, 100, 5.0) == {"a": 1}
        else:
            with pytest.raises(ApiError) as info:
                await read_json_object(request, 100, 5.0)
            assert info.value.status == 415
    asyncio.run(run())
