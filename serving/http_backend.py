"""Backend for any OpenAI-compatible chat server: Ray Serve LLM's app or a plain `vllm serve`.

Uses one pooled `aiohttp` client session. Output constraints travel as vLLM's `structured_outputs`
extension (regex) or the standard `response_format` (JSON schema). `stream_chat` reads the
server-sent events of a `stream: true` completion.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from opentelemetry import propagate

from serving.errors import (
    BackendBadRequest,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from serving.protocol import ChatChunk, ChatRequest, ChatResult, Timings

__all__ = ["OpenAIHttpBackend", "build_chat_body", "parse_completion"]


def build_chat_body(req: ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": req.model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": False,
    }
    if req.seed is not None:
        body["seed"] = req.seed
    if req.regex is not None:
        body["structured_outputs"] = {"regex": req.regex}
    elif req.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": req.json_schema, "strict": True},
        }
    elif req.response_format is not None:
        body["response_format"] = req.response_format
    if req.stop:
        body["stop"] = list(req.stop)
    if req.priority:
        body["priority"] = req.priority
    if req.request_id:
        body["request_id"] = req.request_id
    return body


class OpenAIHttpBackend:
    """`InferenceBackend` over HTTP/1.1 with keep-alive, on one pooled `aiohttp` session.

    aiohttp rather than httpx: against a trivial upstream at 32 concurrent requests, an httpx
    AsyncClient topped out near 570 requests/s on these machines (its connection pool scans
    every connection on each request) and aiohttp near 12,000 — see
    `benchmarks/http_clients.py` and its recorded result. The session is created lazily inside the
    running event loop.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, max_connections: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300,
                                               keepalive_timeout=30),
                headers=self._headers, read_bufsize=1 << 20, auto_decompress=False)
        return self._session

    @staticmethod
    def _timeout(timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        body = orjson.dumps(build_chat_body(request))
        start = time.perf_counter()
        try:
            async with self._client().post(f"{self.base_url}/chat/completions", data=body,
                                           headers=trace_headers(), timeout=self._timeout(timeout_s)) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except TimeoutError as exc:
            raise BackendTimeout(f"no answer from {self.base_url} within {timeout_s:.1f}s") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(f"cannot reach {self.base_url}: {type(exc).__name__}") from exc
        total_ms = (time.perf_counter() - start) * 1000.0
        if status != 200:
            _raise_for_status(status, headers, raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackendProtocolError(
                f"{self.base_url} answered 200 with a body that is not a chat completion") from exc
        return parse_completion(data, request.model, total_ms, self.base_url)

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        """Stream a completion. `timeout_s` bounds the whole stream, not only each read.

        Errors before the first event raise the same BackendErrors as `chat()`; an error event,
        a malformed event or a connection that breaks (or ends before `[DONE]` and before a
        finish reason) raise BackendUnavailable / BackendProtocolError from the iterator.
        """
        body = build_chat_body(request)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        deadline = time.perf_counter() + timeout_s
        started = False
        try:
            async with self._client().post(f"{self.base_url}/chat/completions", data=orjson.dumps(body),
                                           headers=trace_headers(), timeout=self._timeout(timeout_s)) as resp:
                if resp.status != 200:
                    _raise_for_status(resp.status, resp.headers, await resp.read())
                started = True
                finished = False
                async for data in _sse_data(resp.content):
                    if data == "[DONE]":
                        return
                    chunk = self._parse_stream_event(data)
                    if chunk is not None:
                        finished = finished or chunk.finish_reason is not None
                        yield chunk
                    if time.perf_counter() > deadline:
                        raise BackendTimeout(
                            f"stream from {self.base_url} not finished within {timeout_s:.1f}s")
                if not finished:
                    raise BackendUnavailable(
                        f"stream from {self.base_url} ended before the completion finished")
        except TimeoutError as exc:
            raise BackendTimeout(f"no answer from {self.base_url} within {timeout_s:.1f}s") from exc
        except aiohttp.ClientError as exc:
            where = "stream broke mid-answer from" if started else "cannot reach"
            raise BackendUnavailable(f"{where} {self.base_url}: {type(exc).__name__}") from exc

    def _parse_stream_event(self, data: str) -> ChatChunk | None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise BackendProtocolError(f"{self.base_url} streamed an event that is not JSON") from exc
        if not isinstance(event, dict):
            raise BackendProtocolError(f"{self.base_url} streamed an event that is not an object")
        if event.get("error") is not None:
            err = event["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise BackendUnavailable(f"{self.base_url} failed mid-stream: {str(msg)[:500]}")
        try:
            choices = event.get("choices") or []
            text, finish = "", None
            if choices:
                choice = choices[0]
                text = (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason")
                if not isinstance(text, str):
                    raise TypeError("delta.content is not a string")
            usage = event.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
            chunk = ChatChunk(
                text_delta=text,
                finish_reason=str(finish) if finish is not None else None,
                prompt_tokens=int(prompt_tokens) if prompt_tokens is not None else None,
                completion_tokens=int(completion_tokens) if completion_tokens is not None else None,
            )
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise BackendProtocolError(
                f"{self.base_url} streamed an event that is not a chat completion chunk") from exc
        if not chunk.text_delta and chunk.finish_reason is None and chunk.prompt_tokens is None:
            return None  # e.g. the first chunk, which only carries the role
        return chunk

    async def check_health(self) -> dict[str, Any]:
        try:
            async with self._client().get(f"{self.base_url}/models", timeout=self._timeout(3.0)) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BackendUnavailable(f"cannot reach {self.base_url}: {type(exc).__name__}") from exc
        if status != 200:
            raise BackendUnavailable(f"{self.base_url}/models answered HTTP {status}")
        try:
            models = [m["id"] for m in orjson.loads(raw)["data"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendUnavailable(f"{self.base_url}/models answered an unexpected body") from exc
        return {"models": models}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_completion(data: Any, model: str, total_ms: float, source: str) -> ChatResult:
    """A `ChatResult` from an OpenAI chat completion (a decoded JSON object)."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return ChatResult(
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            model=str(data.get("model", model)),
            timings=Timings(total_ms=total_ms),
            cached_prompt_tokens=details.get("cached_tokens"),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise BackendProtocolError(f"{source} answered with a body that is not a chat completion") from exc


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines); comments and
    other fields are skipped."""
    lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def trace_headers() -> dict[str, str]:
    """W3C `traceparent` of the current span, so the server's spans (Ray Serve, vLLM's
    `llm_request`) join the caller's trace as children of the client span."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def _raise_for_status(code: int, headers: Mapping[str, str], raw: bytes) -> None:
    message = _error_message(raw)
    if code == 429:
        retry_after = headers.get("retry-after")
        raise BackendOverloaded(f"model overloaded: {message}",
                                float(retry_after) if retry_after and retry_after.isdigit() else None)
    if code >= 500:
        raise BackendUnavailable(f"server error HTTP {code}: {message}")
    raise BackendBadRequest(f"server rejected the request with HTTP {code}: {message}")


def _error_message(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else str(err)
        return str(msg)[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:200].decode("utf-8", "replace")
