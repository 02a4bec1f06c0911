"""The OpenAI-compatible HTTP backend against handler-described upstreams on real sockets."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from serving import (
    BackendBadRequest,
    BackendOverloaded,
    BackendProtocolError,
    BackendUnavailable,
    ChatRequest,
)
from serving.http_backend import OpenAIHttpBackend
from tests.handler_server import HandlerServer

REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                  regex=r'\{"a":(1|2)\}', request_id="r1")


def _completion(text: str = '{"a":1}', finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _run(handler, request: ChatRequest = REQ):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with HandlerServer(handler) as server:
            backend = OpenAIHttpBackend(server.base_url, api_key="k")
            try:
                return await backend.chat(request, timeout_s=5)
            finally:
                await backend.aclose()
    return asyncio.run(go())


def test_request_carries_constraint_and_auth() -> None:
    seen: dict = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["url"] = str(req.url)
        seen["auth"] = req.headers["authorization"]
        seen["body"] = orjson.loads(req.content)
        return httpx.Response(200, json=_completion())

    result = _run(handler)
    assert seen["url"] == "http://test/v1/chat/completions"
    assert seen["auth"] == "Bearer k"
    assert seen["body"]["structured_outputs"] == {"regex": REQ.regex}
    assert seen["body"]["max_tokens"] == 16 and seen["body"]["stream"] is False
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        '{"a":1}', "stop", 7, 3)


@pytest.mark.parametrize(
    ("response", "exc"),
    [
        (httpx.Response(429, json={"error": {"message": "busy"}}, headers={"retry-after": "2"}), BackendOverloaded),
        (httpx.Response(503, text="down"), BackendUnavailable),
        (httpx.Response(500, json={"error": {"message": "EngineDeadError"}}), BackendUnavailable),
        (httpx.Response(400, json={"error": {"message": "bad regex"}}), BackendBadRequest),
        (httpx.Response(404, json={"error": {"message": "model not found"}}), BackendBadRequest),
        (httpx.Response(200, text="<html>"), BackendProtocolError),
        (httpx.Response(200, json={"choices": []}), BackendProtocolError),
    ],
)
def test_status_mapping(response: httpx.Response, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        _run(lambda _req: response)
    if exc is BackendOverloaded:
        assert info.value.retry_after_s == 2.0  # type: ignore[attr-defined]


def test_connection_refused_is_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(BackendUnavailable, match="cannot reach"):
        _run(handler)


# -- streaming ------------------------------------------------------------------------------

def _sse(*events: object) -> bytes:
    out = b": keep-alive comment\n\n"
    for event in events:
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        out += b"data: " + data + b"\n\n"
    return out


def _chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE_CHUNK = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [],
               "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _stream(handler, request: ChatRequest = REQ):  # type: ignore[no-untyped-def]
    """Run stream_chat; return (chunks received, exception raised or None)."""
    async def go():  # type: ignore[no-untyped-def]
        async with HandlerServer(handler) as server:
            backend = OpenAIHttpBackend(server.base_url, api_key="k")
            chunks = []
            try:
                async for chunk in backend.stream_chat(request, timeout_s=5):
                    chunks.append(chunk)
            except Exception as exc:  # noqa: BLE001 - returned to the test
                return chunks, exc
            finally:
                await backend.aclose()
            return chunks, None
    return asyncio.run(go())


def test_stream_parses_sse_deltas_finish_and_usage() -> None:
    seen: dict = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["url"] = str(req.url)
        seen["body"] = orjson.loads(req.content)
        body = _sse(_chunk("", role="assistant"), _chunk('{"a"'), _chunk(":1}"), _chunk(finish="stop"),
                    USAGE_CHUNK, b"[DONE]")
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    chunks, exc = _stream(handler)
    assert exc is None
    assert seen["url"] == "http://test/v1/chat/completions"
    assert seen["body"]["stream"] is True
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert seen["body"]["structured_outputs"] == {"regex": REQ.regex}
    assert "".join(c.text_delta for c in chunks) == '{"a":1}'
    assert [c.finish_reason for c in chunks] == [None, None, "stop", None]
    assert (chunks[-1].prompt_tokens, chunks[-1].completion_tokens) == (7, 3)
    assert all(c.prompt_tokens is None for c in chunks[:-1])


def test_stream_without_usage_report_still_completes() -> None:
    body = _sse(_chunk("x", finish="stop"), b"[DONE]")
    chunks, exc = _stream(lambda _req: httpx.Response(200, content=body))
    assert exc is None
    assert [(c.text_delta, c.finish_reason, c.prompt_tokens) for c in chunks] == [("x", "stop", None)]


def test_stream_error_event_mid_stream_raises_unavailable() -> None:
    body = _sse(_chunk("{"), {"error": {"message": "EngineDeadError", "type": "InternalServerError",
                                        "code": 500}}, b"[DONE]")
    chunks, exc = _stream(lambda _req: httpx.Response(200, content=body))
    assert [c.text_delta for c in chunks] == ["{"]
    assert isinstance(exc, BackendUnavailable) and "EngineDeadError" in str(exc)


def test_stream_broken_connection_mid_stream_raises_unavailable() -> None:
    async def body():  # type: ignore[no-untyped-def]
        yield _sse(_chunk("{"))
        raise httpx.ReadError("connection reset")

    chunks, exc = _stream(lambda _req: httpx.Response(200, content=body()))
    assert [c.text_delta for c in chunks] == ["{"]
    assert isinstance(exc, BackendUnavailable) and "mid-answer" in str(exc)


def test_stream_that_ends_before_finishing_is_unavailable() -> None:
    chunks, exc = _stream(lambda _req: httpx.Response(200, content=_sse(_chunk("{"))))
    assert [c.text_delta for c in chunks] == ["{"]
    assert isinstance(exc, BackendUnavailable)


def test_stream_malformed_event_is_a_protocol_error() -> None:
    chunks, exc = _stream(lambda _req: httpx.Response(200, content=_sse(b"<html>")))
    assert chunks == [] and isinstance(exc, BackendProtocolError)


@pytest.mark.parametrize(
    ("response", "exc"),
    [
        (httpx.Response(503, text="down"), BackendUnavailable),
        (httpx.Response(429, json={"error": {"message": "busy"}}, headers={"retry-after": "2"}), BackendOverloaded),
        (httpx.Response(400, json={"error": {"message": "bad regex"}}), BackendBadRequest),
    ],
)
def test_stream_http_errors_before_streaming_are_typed(response: httpx.Response, exc: type[Exception]) -> None:
    chunks, raised = _stream(lambda _req: response)
    assert chunks == [] and isinstance(raised, exc)


def test_stream_connection_refused_is_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    chunks, exc = _stream(handler)
    assert chunks == [] and isinstance(exc, BackendUnavailable) and "cannot reach" in str(exc)


def test_stop_and_response_format_pass_through() -> None:
    from serving.http_backend import build_chat_body

    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    raw = ChatRequest(model="m", messages=[], max_tokens=4, stop=["\n"], response_format=schema)
    body = build_chat_body(raw)
    assert body["stop"] == ["\n"] and body["response_format"] == schema
    assert "stop" not in build_chat_body(REQ) and "response_format" not in build_chat_body(REQ)
    # the prompt's constraint wins over a raw response_format
    assert "response_format" not in build_chat_body(
        ChatRequest(model="m", messages=[], max_tokens=4, regex="a", response_format=schema))


def test_traceparent_of_the_current_span_is_sent() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    seen: dict = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["traceparent"] = req.headers.get("traceparent")
        return httpx.Response(200, json=_completion())

    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("client") as span:
        _run(handler)
        ctx = span.get_span_context()
    assert seen["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    _run(handler)  # no current span: no header
    assert seen["traceparent"] is None


class _Response:
    """Stands in for a Ray Serve `DeploymentResponse`: awaitable, never answers, cancellable."""

    def __init__(self) -> None:
        self.cancel_calls = 0

    def __await__(self):  # type: ignore[no-untyped-def]
        return asyncio.sleep(3600).__await__()

    def cancel(self) -> None:
        self.cancel_calls += 1


class _Method:
    def __init__(self) -> None:
        self.responses: list[_Response] = []

    def remote(self, *args: object) -> _Response:
        self.responses.append(_Response())
        return self.responses[-1]


class _Handle:
    def __init__(self) -> None:
        self.chat_json = _Method()
        self.chat_json_batch = _Method()


@pytest.mark.parametrize("batched", [False, True])
def test_ray_handle_backend_cancels_the_serve_request_its_caller_gave_up(batched: bool) -> None:
    """Ray 2.60's DeploymentResponse does not cancel the remote call when its awaiter is
    cancelled; the backend must call `cancel()` so the replica (and vLLM) drop the work."""
    from serving.config import HandleBatchConfig
    from serving.errors import BackendTimeout
    from serving.protocol import ChatRequest
    from serving.ray_handle_backend import RayHandleBackend

    async def run() -> _Handle:
        backend = RayHandleBackend("llm", stream_fallback=OpenAIHttpBackend("http://127.0.0.1:9/v1"),
                                   batch=HandleBatchConfig(max_size=16 if batched else 1))
        handle = _Handle()
        backend._handles["m"] = handle
        with pytest.raises(BackendTimeout):
            await backend.chat(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=4), timeout_s=0.05)
        await asyncio.sleep(0.01)
        await backend.aclose()
        return handle

    handle = asyncio.run(run())
    method = handle.chat_json_batch if batched else handle.chat_json
    assert [r.cancel_calls for r in method.responses] == [1]
