"""Backend for any OpenAI-compatible chat server: Ray Serve LLM's app or a plain `vllm serve`.

Uses one pooled `aiohttp` client session. Output constraints travel as vLLM's `structured_outputs`
extension (regex) or the standard `response_format` (JSON schema). `stream_chat` reads the
server-sent events of a `stream: true` completion.

Failures become `serving.errors` exceptions whose messages are our own: an upstream error body
is classified (`upstream_error`) but never quoted - it can carry the caller's regex or schema
back - and is logged only as its length and hash (its text only at DEBUG, truncated; see
serving/errors.py). Transport exceptions are not chained (`from None`); their class name is
kept as the error's `cause`.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from opentelemetry import propagate
from yarl import URL

from serving.errors import (
    BackendBadRequest,
    BackendError,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejectedInput,
    BackendTimeout,
    BackendUnavailable,
    report_upstream,
)
from serving.protocol import ChatChunk, ChatRequest, ChatResult, Timings, TokenLogprob
from serving.reasoning import HARMONY_MARKER, answer_tokens, split_harmony

__all__ = ["OpenAIHttpBackend", "build_chat_body", "error_status", "parse_completion", "parse_logprobs",
           "upstream_error"]


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
    if req.reasoning_effort is not None:
        body["reasoning_effort"] = req.reasoning_effort
    if req.top_logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = req.top_logprobs
    return body


class OpenAIHttpBackend:
    """`InferenceBackend` over HTTP/1.1 with keep-alive, on one pooled `aiohttp` session.

    aiohttp rather than httpx: against a trivial upstream at 32 concurrent requests, an httpx
    AsyncClient topped out near 570 requests/s on these machines (its connection pool scans
    every connection on each request) and aiohttp near 12,000 — see
    `benchmarks/http_clients.py` and its recorded result. The session is created lazily inside the
    running event loop.

    Pooled connections and the server's keep-alive: an idle connection is kept `keepalive_s`
    (4 s), less than uvicorn-based servers keep theirs open (`timeout_keep_alive`, 5 s: vLLM's
    own server, Ray Serve's proxy), so the client drops it before the server closes it. A
    request that still meets a connection the server closed (its close crossed our request on
    the wire; a server with a shorter keep-alive) fails before any byte of an answer arrived:
    `chat` sends it again at once, once, on a new connection (`closed_retries` counts them).
    That is safe for the same reason `serving/resilience.py` retries `BackendUnavailable` at
    all (a chat completion has no side effects), and it is not a failure of the server: it is
    not counted against the circuit breaker or the retry budget, and it happens under
    `no_retries()` too. Anything after the first byte of an answer, a connection that cannot
    be opened, or a second close is `BackendUnavailable`, for the resilience layer to judge
    (back-off, budget, breaker). `stream_chat` does not retry this way (resilience retries a
    stream before its first chunk).
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, max_connections: int = 256,
                 keepalive_s: float = 4.0, connect_timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._chat_url = URL(f"{self.base_url}/chat/completions")  # parsed once, not per request
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s  # a connection not opened by then: unavailable
        self.closed_retries = 0  # requests sent again after the server closed their connection unanswered
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300,
                                               keepalive_timeout=self.keepalive_s),
                headers=self._headers, read_bufsize=1 << 20, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar())  # a model server's cookies are not kept or sent
        return self._session

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s, connect=min(self.connect_timeout_s, timeout_s))

    def _not_connected(self, exc: aiohttp.ConnectionTimeoutError) -> BackendError:
        """aiohttp's connect timeout is a TimeoutError too, but no request was sent: the server
        cannot be reached (503, retryable, counted by the breaker), not late (504)."""
        return self._report(BackendUnavailable(
            f"cannot reach the model server (no connection within {self.connect_timeout_s:.1f}s)",
            kind="connection_failed", cause=exc))

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        body = orjson.dumps(build_chat_body(request))
        start = time.perf_counter()
        left, retried = timeout_s, False
        while True:
            answered = False
            try:
                async with self._client().post(self._chat_url, data=body, headers=trace_headers(),
                                               timeout=self._timeout(left)) as resp:
                    answered = True
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
                break
            except aiohttp.ConnectionTimeoutError as exc:
                raise self._not_connected(exc) from None
            except TimeoutError:
                raise self._report(BackendTimeout(f"no answer from the model server within {timeout_s:.1f}s",
                                                  cause="TimeoutError")) from None
            except aiohttp.ClientError as exc:
                left = timeout_s - (time.perf_counter() - start)
                if not retried and not answered and left > 0 and closed_unanswered(exc):
                    retried = True  # the class docstring: once, at once, on a new connection
                    self.closed_retries += 1
                    continue
                raise self._report(BackendUnavailable("cannot reach the model server", kind="connection_failed",
                                                      cause=exc), str(exc)) from None
        total_ms = (time.perf_counter() - start) * 1000.0
        if status != 200:
            raise self._report(_status_error(status, headers, raw, request.model), raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self._report(BackendProtocolError(
                "the model server answered HTTP 200 with a body that is not a chat completion",
                upstream_status=200, upstream_body=raw), raw) from None
        return parse_completion(data, request.model, total_ms, self.base_url)

    def _report(self, exc: BackendError, upstream_text: bytes | str | None = None) -> BackendError:
        return report_upstream(exc, upstream_text, where=self.base_url)

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
            async with self._client().post(self._chat_url, data=orjson.dumps(body),
                                           headers=trace_headers(), timeout=self._timeout(timeout_s)) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    raise self._report(_status_error(resp.status, resp.headers, raw, request.model), raw)
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
                        raise self._report(BackendTimeout(
                            f"the model server's stream did not finish within {timeout_s:.1f}s"))
                if not finished:
                    raise self._report(BackendUnavailable(
                        "the model server's stream ended before the completion finished",
                        kind="stream_incomplete"))
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._not_connected(exc) from None
        except TimeoutError:
            raise self._report(BackendTimeout(f"no answer from the model server within {timeout_s:.1f}s",
                                              cause="TimeoutError")) from None
        except UnicodeDecodeError:
            raise self._report(BackendProtocolError("the model server streamed an event that is not UTF-8",
                                                    cause="UnicodeDecodeError")) from None
        except aiohttp.ClientError as exc:
            error = (BackendUnavailable("the model server's stream broke mid-answer", kind="stream_broken",
                                        cause=exc) if started else
                     BackendUnavailable("cannot reach the model server", kind="connection_failed", cause=exc))
            raise self._report(error, str(exc)) from None

    def _parse_stream_event(self, data: str) -> ChatChunk | None:
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._report(BackendProtocolError("the model server streamed an event that is not JSON",
                                                    upstream_body=data), data) from None
        if not isinstance(event, dict):
            raise self._report(BackendProtocolError("the model server streamed an event that is not an object",
                                                    upstream_body=data), data)
        if event.get("error") is not None:
            err = event["error"]
            raise self._report(BackendUnavailable(
                "the model server failed mid-answer", kind="stream_error",
                upstream_status=error_status(err.get("code") if isinstance(err, dict) else None),
                upstream_body=data), data)
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
            raise self._report(BackendProtocolError(
                "the model server streamed an event that is not a chat completion chunk", cause=exc,
                upstream_body=data), data) from None
        if not chunk.text_delta and chunk.finish_reason is None and chunk.prompt_tokens is None:
            return None  # e.g. the first chunk, which only carries the role
        return chunk

    async def check_health(self) -> dict[str, Any]:
        """Not logged: a readiness probe reports (and repeats) its own result."""
        try:
            async with self._client().get(f"{self.base_url}/models", timeout=self._timeout(3.0)) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BackendUnavailable("cannot reach the model server", kind="connection_failed",
                                     cause=exc) from None
        if status != 200:
            raise BackendUnavailable(f"the model server's model list answered HTTP {status}",
                                     kind="server_error", upstream_status=status, upstream_body=raw)
        try:
            models = [m["id"] for m in orjson.loads(raw)["data"]]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BackendUnavailable("the model server's model list is not an OpenAI model list",
                                     kind="protocol_error", upstream_status=200, upstream_body=raw,
                                     cause=exc) from None
        return {"models": models}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def parse_completion(data: Any, model: str, total_ms: float, source: str) -> ChatResult:
    """A `ChatResult` from an OpenAI chat completion (a decoded JSON object). *source* names
    the server in the log line of a failure, never in the error's message."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        text = message["content"] or ""
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        logprobs = parse_logprobs(choice.get("logprobs"))
        harmony = reasoning is None and HARMONY_MARKER in text  # no reasoning parser on the server
        if harmony:
            answer = split_harmony(text, stopped=choice.get("finish_reason") == "stop")
            text, reasoning = answer.final or "", answer.analysis
        if logprobs is not None and (harmony or reasoning is not None):  # the answer's tokens only
            logprobs = answer_tokens(logprobs, text)
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        reasoning_tokens = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
        return ChatResult(
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            model=str(data.get("model", model)),
            timings=Timings(total_ms=total_ms),
            cached_prompt_tokens=details.get("cached_tokens"),
            reasoning=str(reasoning) if reasoning is not None else None,
            reasoning_tokens=int(reasoning_tokens) if reasoning_tokens is not None else None,
            logprobs=logprobs,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        body = _dumps(data)
        raise report_upstream(BackendProtocolError(
            "the model server answered with a body that is not a chat completion", cause=exc,
            upstream_body=body), body, where=source) from None


def parse_logprobs(data: Any) -> tuple[TokenLogprob, ...] | None:
    """The tokens of an OpenAI choice's `logprobs` object (`{"content": [{"token", "logprob",
    "top_logprobs": [...]}, ...]}`); None when absent or not in that shape. Log-probabilities
    are optional information beside the answer: a malformed block drops them (the verdict then
    has no calibrated probability), it never fails an answer that is otherwise fine. (On every
    moderation's path: one pass, no per-field helper calls.)"""
    if not isinstance(data, dict):
        return None
    content = data.get("content")
    if not isinstance(content, list) or not content:
        return None
    out = []
    try:
        for t in content:
            token, logprob = t["token"], t["logprob"]
            top = tuple((a["token"], a["logprob"]) for a in t.get("top_logprobs") or ())
            if type(token) is not str or type(logprob) not in _NUMBER or not all(
                    type(x) is str and type(y) in _NUMBER for x, y in top):
                return None
            out.append(TokenLogprob(token, logprob, top))
    except (KeyError, TypeError, AttributeError):
        return None
    return tuple(out)


_NUMBER = (float, int)  # exact types: a JSON true is not a log-probability


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


_RESET = frozenset({errno.ECONNRESET, errno.EPIPE})


def closed_unanswered(exc: aiohttp.ClientError) -> bool:
    """The server closed the connection before any byte of an answer to our request: aiohttp's
    `ServerDisconnectedError` without a partly read status line or headers, or a reset of a
    connection that was open (not one that could not be opened: `ClientConnectorError`). The
    cases aiohttp itself retries once for idempotent methods."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # else: the partial answer aiohttp had parsed
    return (isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
            and exc.errno in _RESET)


def trace_headers() -> dict[str, str]:
    """W3C `traceparent` of the current span, so the server's spans (Ray Serve, vLLM's
    `llm_request`) join the caller's trace as children of the client span."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def upstream_error(status: int, body: Any, raw: bytes | str, model: str, *,
                   retry_after_s: float | None = None) -> BackendError:
    """The `BackendError` for a model server's error answer: HTTP *status*, the decoded body
    (None when it is not JSON; an OpenAI `{"error": {...}}`, a FastAPI `{"detail": ...}` or
    vLLM's error object itself) and the *raw* body (hashed, never quoted). The body is read
    only to classify: a model the server does not serve, and the parameter at fault."""
    err = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": err} if isinstance(err, str) else {}
    fields: dict[str, Any] = {"upstream_status": status, "upstream_body": raw}
    if status == 429:
        return BackendOverloaded("the model server is overloaded (HTTP 429)", retry_after_s, **fields)
    if status >= 500:
        return BackendUnavailable(f"the model server failed (HTTP {status})", kind="server_error", **fields)
    if status < 400:
        return BackendProtocolError(f"the model server answered HTTP {status} instead of a chat completion",
                                    **fields)
    if _names_missing_model(status, err):
        return BackendModelNotFound(model, **fields)
    if status in (400, 413, 422):
        return BackendRejectedInput(param=err.get("param"), **fields)
    return BackendBadRequest(f"the model server rejected the request (HTTP {status})", **fields)


_MODEL_NOT_FOUND_TYPES = frozenset({"model_not_found", "NotFoundError", "InvalidModel"})


def _names_missing_model(status: int, err: dict[str, Any]) -> bool:
    """OpenAI's `code: model_not_found` (any 4xx), or a 404 that is about a model: vLLM's
    `NotFoundError` ("The model `x` does not exist."), Ray Serve LLM's `InvalidModel` or its
    "Could not find model ..." detail. A 404 about anything else (a wrong base URL) is not."""
    if err.get("code") == "model_not_found" or err.get("type") == "model_not_found":
        return True
    if status != 404:
        return False
    text = err.get("message") or err.get("detail")
    return err.get("type") in _MODEL_NOT_FOUND_TYPES or (isinstance(text, str) and "model" in text.lower())


def _status_error(status: int, headers: Mapping[str, str], raw: bytes, model: str) -> BackendError:
    retry_after = headers.get("retry-after")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    return upstream_error(status, body, raw, model,
                          retry_after_s=float(retry_after) if retry_after and retry_after.isdigit() else None)


def error_status(code: object) -> int | None:
    """An HTTP status from an error object's `code` (an int, or digits), else None."""
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code if 100 <= code <= 599 else None
    if isinstance(code, str) and code.isdigit() and len(code) == 3:
        return int(code)
    return None


def _dumps(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:
        return repr(data).encode("utf-8", "replace")
