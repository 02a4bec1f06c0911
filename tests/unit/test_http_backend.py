"""The OpenAI-compatible HTTP backend against handler-described upstreams on real sockets."""

from __future__ import annotations

import asyncio
import logging

import httpx
import orjson
import pytest

from serving import (
    BackendBadRequest,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendRejectedInput,
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
        (httpx.Response(404, json={"error": {"message": "model not found"}}), BackendModelNotFound),
        (httpx.Response(403, json={"error": {"message": "forbidden"}}), BackendBadRequest),
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
    assert isinstance(exc, BackendUnavailable) and "EngineDeadError" not in str(exc)
    assert "failed mid-answer" in str(exc) and exc.kind == "stream_error" and exc.upstream_status == 500


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
        for _ in range(20):  # loop steps for the give-up to reach the call (not wall-clock time)
            await asyncio.sleep(0)
        await backend.aclose()
        return handle

    handle = asyncio.run(run())
    method = handle.chat_json_batch if batched else handle.chat_json
    assert [r.cancel_calls for r in method.responses] == [1]


# -- upstream text stays upstream (issue 18) ------------------------------------------------
# The model server's error text can quote what the caller sent (vLLM echoes a rejected regex or
# JSON schema) and Ray's internals (exception classes, request ids). None of it may reach
# str(exc) (the caller's message and the gateway's WARNING log), repr(exc), exc.args, a
# formatted traceback (the span's exception event) or a log record at INFO or above.

MARKER = "SECRET-MARKER-4c1d"
RAY_TEXT = (f"ray.exceptions.RayTaskError(ValueError): ray::ServeReplica:llm:LLMServer:m.chat_json() "
            f"(pid=4242, ip=10.0.0.7, actor_id=7d3c0ffee, request_id=9c1f2e7a-5b1d) {MARKER}")
RAY_BITS = ("RayTaskError", "ServeReplica", "request_id", "9c1f2e7a", "actor_id")
UPSTREAM_LOG = "modgate.serving.upstream"


def _assert_clean(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    import re
    import traceback

    from serving import BackendError

    assert isinstance(exc, BackendError)
    for text in (str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))):
        assert MARKER not in text, text
    for bit in RAY_BITS:
        assert bit not in str(exc)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)  # nothing chained
    assert re.fullmatch(r"ref-[0-9a-f]{12}", exc.reference) and exc.reference in str(exc)
    assert exc.args == (exc.message,) and len(str(exc)) < 200
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    for record in loud:
        assert MARKER not in record.getMessage()
        assert record.exc_info is None or MARKER not in "".join(traceback.format_exception(record.exc_info[1]))
    assert any(exc.reference in r.getMessage() for r in loud), "the failure is logged with its reference"


def _error_body(message: str, *, type_: str = "BadRequestError", code: object = 400,
                param: object = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _raised(handler, caplog: pytest.LogCaptureFixture, request: ChatRequest = REQ) -> BaseException:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger=UPSTREAM_LOG)
    with pytest.raises(Exception) as info:
        _run(handler, request)
    return info.value


@pytest.mark.parametrize(
    ("response", "exc", "kind"),
    [
        (httpx.Response(400, json=_error_body(f"Invalid regex {MARKER}(a|b")), BackendRejectedInput,
         "rejected_input"),
        (httpx.Response(400, json=_error_body(f"json_schema invalid: {{'title': '{MARKER}'}}",
                                              param="response_format")), BackendRejectedInput, "rejected_input"),
        (httpx.Response(422, json={"detail": [{"msg": MARKER, "loc": ["body", "messages"]}]}),
         BackendRejectedInput, "rejected_input"),
        (httpx.Response(401, json=_error_body(f"bad key {MARKER}", code=401)), BackendBadRequest, "rejected"),
        (httpx.Response(404, json={"detail": f"Not Found {MARKER}"}), BackendBadRequest, "rejected"),
        (httpx.Response(500, json=_error_body(RAY_TEXT, type_="InternalServerError", code=500)),
         BackendUnavailable, "server_error"),
        (httpx.Response(503, text=f"upstream connect error {MARKER}"), BackendUnavailable, "server_error"),
        (httpx.Response(429, json=_error_body(f"queue full {MARKER}", code=429)), BackendOverloaded,
         "overloaded"),
        (httpx.Response(200, text=f"<html>{MARKER}</html>"), BackendProtocolError, "protocol_error"),
        (httpx.Response(200, json={"choices": [{"message": MARKER}], "model": MARKER}), BackendProtocolError,
         "protocol_error"),
        (httpx.Response(200, json={"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": MARKER}}),
         BackendProtocolError, "protocol_error"),
    ],
)
def test_upstream_error_text_never_leaves_the_backend(response: httpx.Response, exc: type[Exception], kind: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    raised = _raised(lambda _req: response, caplog)
    assert type(raised) is exc and raised.kind == kind  # type: ignore[attr-defined]
    _assert_clean(raised, caplog)
    if response.status_code != 200 or kind == "protocol_error" and response.text.startswith("<"):
        assert raised.upstream_length == len(response.content)  # type: ignore[attr-defined]
        assert raised.upstream_sha256 == hashlib.sha256(response.content).hexdigest()[:16]  # type: ignore[attr-defined]
    if response.status_code != 200:
        assert raised.upstream_status == response.status_code  # type: ignore[attr-defined]
        assert f"HTTP {response.status_code}" in str(raised)


def test_rejected_input_names_a_known_parameter_only(caplog: pytest.LogCaptureFixture) -> None:
    known = _raised(lambda _req: httpx.Response(400, json=_error_body(f"bad schema {MARKER}",
                                                                       param="response_format")), caplog)
    assert isinstance(known, BackendRejectedInput) and known.param == "response_format"
    assert str(known).startswith("the model server rejected the request's 'response_format' (HTTP 400)")
    unknown = _raised(lambda _req: httpx.Response(400, json=_error_body("bad", param=MARKER)), caplog)
    assert isinstance(unknown, BackendRejectedInput) and unknown.param is None
    assert str(unknown).startswith("the model server rejected the request (HTTP 400)")
    _assert_clean(unknown, caplog)


MODEL_REQ = ChatRequest(model="moderation-small", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


@pytest.mark.parametrize(
    "response",
    [
        # vLLM's OpenAI server
        httpx.Response(404, json=_error_body(f"The model `{MARKER}` does not exist.", type_="NotFoundError",
                                             code=404)),
        # OpenAI's own shape
        httpx.Response(404, json={"error": {"message": f"The model {MARKER} does not exist",
                                            "type": "invalid_request_error", "code": "model_not_found"}}),
        # Ray Serve LLM's ingress
        httpx.Response(404, json={"detail": f'Could not find model with id "{MARKER}".'}),
        httpx.Response(404, json=_error_body(f"Unable to find {MARKER}.", type_="InvalidModel", code=404)),
    ],
)
def test_model_not_found_is_its_own_error_naming_only_our_model(response: httpx.Response,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    raised = _raised(lambda _req: response, caplog, MODEL_REQ)
    assert isinstance(raised, BackendModelNotFound) and isinstance(raised, BackendBadRequest)
    assert not isinstance(raised, BackendRejectedInput)
    assert raised.model == "moderation-small" and raised.kind == "model_not_found"
    assert str(raised).startswith("the model server does not serve model 'moderation-small' [ref-")
    _assert_clean(raised, caplog)
    assert any(r.levelno == logging.WARNING and raised.reference in r.getMessage() for r in caplog.records)


def test_upstream_text_is_logged_only_at_debug_and_truncated(caplog: pytest.LogCaptureFixture) -> None:
    from serving.errors import DEBUG_EXCERPT_CHARS

    early = f"vLLM says: {MARKER} "
    body = early + "x" * 400 + f" LATE-{MARKER}"
    raised = _raised(lambda _req: httpx.Response(500, text=body), caplog)
    _assert_clean(raised, caplog)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == UPSTREAM_LOG]
    assert len(debug) == 1 and raised.reference in debug[0]  # type: ignore[attr-defined]
    assert MARKER in debug[0] and f"LATE-{MARKER}" not in debug[0]
    assert len(debug[0]) < DEBUG_EXCERPT_CHARS + 200


def test_upstream_text_is_not_even_formatted_without_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=UPSTREAM_LOG)
    with pytest.raises(BackendUnavailable):
        _run(lambda _req: httpx.Response(500, text=MARKER))
    assert caplog.records and all(MARKER not in r.getMessage() for r in caplog.records)


def test_transport_errors_keep_only_the_cause_class(caplog: pytest.LogCaptureFixture) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    raised = _raised(handler, caplog)
    assert isinstance(raised, BackendUnavailable) and raised.kind == "connection_failed"
    assert raised.cause is not None and "cannot reach the model server" in str(raised)
    assert "127.0.0.1" not in str(raised)  # the server's address is for our logs, not the caller
    _assert_clean(raised, caplog)


@pytest.mark.parametrize(
    ("body", "exc", "kind"),
    [
        (_sse(_chunk("{"), _error_body(RAY_TEXT, type_="InternalServerError", code=500)), BackendUnavailable,
         "stream_error"),
        (_sse(_chunk("{"), f"<html>{MARKER}".encode()), BackendProtocolError, "protocol_error"),
        (_sse(_chunk("{"), [MARKER]), BackendProtocolError, "protocol_error"),
        (_sse(_chunk("{"), {"choices": [{"delta": {"content": [MARKER]}}]}), BackendProtocolError,
         "protocol_error"),
    ],
)
def test_stream_failures_keep_upstream_text_out(body: bytes, exc: type[Exception], kind: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=UPSTREAM_LOG)
    chunks, raised = _stream(lambda _req: httpx.Response(200, content=body))
    assert [c.text_delta for c in chunks] == ["{"]
    assert type(raised) is exc and raised.kind == kind  # type: ignore[union-attr]
    assert raised is not None
    _assert_clean(raised, caplog)


def test_stream_rejection_before_the_first_event_is_typed_and_clean(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=UPSTREAM_LOG)
    response = httpx.Response(404, json=_error_body(f"The model `{MARKER}` does not exist.",
                                                    type_="NotFoundError", code=404))
    chunks, raised = _stream(lambda _req: response, MODEL_REQ)
    assert chunks == [] and isinstance(raised, BackendModelNotFound) and raised.model == "moderation-small"
    _assert_clean(raised, caplog)


def test_resilience_logs_retries_without_upstream_text(caplog: pytest.LogCaptureFixture) -> None:
    from serving.resilience import ResilienceSettings, ResilientBackend, RetrySettings

    caplog.set_level(logging.DEBUG, logger=UPSTREAM_LOG)
    caplog.set_level(logging.INFO, logger="modgate.serving.resilience")
    calls: list[int] = []

    def handler(_req: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500, json=_error_body(RAY_TEXT, type_="InternalServerError", code=500))

    async def go() -> BaseException:
        async with HandlerServer(handler) as server:
            backend = ResilientBackend(OpenAIHttpBackend(server.base_url),
                                       ResilienceSettings(retry=RetrySettings(base_backoff_s=0.001,
                                                                              max_backoff_s=0.002)))
            try:
                await backend.chat(REQ, timeout_s=5)
            except BackendUnavailable as exc:
                return exc
            finally:
                await backend.aclose()
        raise AssertionError("no error")

    raised = asyncio.run(go())
    assert len(calls) == 3
    _assert_clean(raised, caplog)
    retries = [r.getMessage() for r in caplog.records if r.name == "modgate.serving.resilience"]
    assert len(retries) == 2 and all("kind=server_error" in m and "ref-" in m and "status=500" in m
                                     for m in retries)


# -- pooled connections the server closed ---------------------------------------------------

class _KeepAliveUpstream:
    """A raw HTTP/1.1 keep-alive server on a real socket that answers the first *answered*
    requests of each connection with a chat completion, then closes that connection on reading
    the next request without sending a byte: what a uvicorn-based server (vLLM's, the stub)
    does when its idle keep-alive timer (5 s) fires as a request on the pooled connection
    arrives. `head` bytes (a partial status line) are sent before closing when given."""

    def __init__(self, answered: int = 1, head: bytes = b"") -> None:
        self.answered, self.head = answered, head
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _KeepAliveUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                if served >= self.answered:
                    writer.write(self.head)
                    break
                served += 1
                body = orjson.dumps(_completion())
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def test_a_pooled_connection_the_server_closed_is_retried_once_on_a_new_one() -> None:
    """The second request goes out on the pooled connection, which the server closes without
    answering: the backend sends it again at once on a new connection (before any byte of an
    answer nothing was done that a second send could repeat wrongly), instead of failing a
    caller with 'cannot reach the model server' and counting a failure against the circuit."""
    async def go() -> tuple[int, int, str]:
        async with _KeepAliveUpstream(answered=1) as upstream:
            backend = OpenAIHttpBackend(upstream.base_url)
            try:
                await backend.chat(REQ, timeout_s=5)
                result = await backend.chat(REQ, timeout_s=5)
            finally:
                await backend.aclose()
            return upstream.connections, upstream.requests, result.text

    assert asyncio.run(go()) == (2, 3, '{"a":1}')


async def _chats_until_unavailable(upstream: _KeepAliveUpstream, calls: int) -> tuple[int, BaseException | None]:
    """Up to *calls* chats through a new backend: the requests the upstream read, and the
    `BackendUnavailable` that ended them (None if none did)."""
    async with upstream:
        backend = OpenAIHttpBackend(upstream.base_url)
        try:
            for _ in range(calls):
                await backend.chat(REQ, timeout_s=5)
        except BackendUnavailable as exc:
            return upstream.requests, exc
        finally:
            await backend.aclose()
        return upstream.requests, None


def test_the_retry_on_a_closed_connection_happens_once_only() -> None:
    """A server that closes every connection unanswered is unavailable: two sends (the first
    and the one retry), then `BackendUnavailable` for the resilience layer to judge."""
    requests, exc = asyncio.run(_chats_until_unavailable(_KeepAliveUpstream(answered=0), 1))
    assert requests == 2 and isinstance(exc, BackendUnavailable) and exc.kind == "connection_failed"


def test_no_retry_once_the_server_started_answering() -> None:
    """Bytes of an answer arrived before the connection closed: the server was working on the
    request, so the backend does not send it again itself (the resilience layer decides)."""
    upstream = _KeepAliveUpstream(answered=1, head=b"HTTP/1.1 200 OK\r\ncontent-le")
    requests, exc = asyncio.run(_chats_until_unavailable(upstream, 2))
    assert requests == 2 and isinstance(exc, BackendUnavailable)


def test_pooled_connections_are_dropped_before_the_servers_keep_alive_ends() -> None:
    """The pool keeps an idle connection for less time than uvicorn-based servers (vLLM's own
    server, Ray Serve's proxy, the benchmark stub) keep it open (`timeout_keep_alive`, 5 s),
    so the client drops it first rather than racing the server's close; and past its
    keep-alive the next request opens a new connection."""
    import uvicorn

    assert OpenAIHttpBackend("http://x/v1").keepalive_s < uvicorn.Config(app=None).timeout_keep_alive

    async def go() -> int:
        async with _KeepAliveUpstream(answered=10) as upstream:
            backend = OpenAIHttpBackend(upstream.base_url, keepalive_s=0.05)
            try:
                await backend.chat(REQ, timeout_s=5)
                await backend.chat(REQ, timeout_s=5)  # reuses the connection
                await asyncio.sleep(0.3)
                await backend.chat(REQ, timeout_s=5)  # idle past keepalive_s: a new one
            finally:
                await backend.aclose()
            return upstream.connections

    assert asyncio.run(go()) == 2


class _FullBacklog:
    """A listening socket that accepts nothing, its accept queue filled by one connection: the
    kernel leaves a further connection attempt unanswered (as a server too busy to accept)."""

    def __enter__(self) -> str:
        import socket

        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(0)
        self._filler = socket.create_connection(self._server.getsockname())
        return f"http://127.0.0.1:{self._server.getsockname()[1]}/v1"

    def __exit__(self, *exc: object) -> None:
        self._filler.close()
        self._server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_connection_that_cannot_be_opened_in_time_is_unavailable_not_a_late_answer(stream: bool) -> None:
    """aiohttp's connect timeout is a TimeoutError too; it used to be reported as 'no answer
    from the model server within <the whole deadline>' (504, never retried, not seen by the
    breaker) although no request was sent: it is 'cannot reach the model server' (503), which
    the resilience layer may retry and the breaker counts."""
    async def go(base_url: str) -> BaseException:
        backend = OpenAIHttpBackend(base_url, connect_timeout_s=0.2)
        try:
            if stream:
                async for _ in backend.stream_chat(REQ, timeout_s=20):
                    pass
            else:
                await backend.chat(REQ, timeout_s=20)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
        finally:
            await backend.aclose()
        raise AssertionError("no error")

    with _FullBacklog() as base_url:
        raised = asyncio.run(go(base_url))
    assert isinstance(raised, BackendUnavailable) and raised.kind == "connection_failed", repr(raised)
    assert "cannot reach the model server" in str(raised)
