"""The OpenAI-compatible HTTP backend against a mock transport."""

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

REQ = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                  regex=r'\{"a":(1|2)\}', request_id="r1")


def _completion(text: str = '{"a":1}', finish: str = "stop") -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _run(handler, request: ChatRequest = REQ):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        backend = OpenAIHttpBackend("http://test/v1", api_key="k", transport=httpx.MockTransport(handler))
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
