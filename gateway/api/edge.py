"""The HTTP edge: reading bodies under a limit, and rendering problems.

Every failure becomes a `gateway.problems.Problem` through the one table there; this module
only renders it, once per surface: ours (`{"error": {"type", "message", "retryable",
"fields"?}, "request_id"}`), OpenAI's JSON error and OpenAI's SSE error event. Only exceptions
we raise on purpose are mapped; anything else is a 500 `internal_error` with no stack trace in
the body (it is logged).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match

from gateway.ids import new_id
from gateway.problems import ApiError, ClientDisconnected, Problem, problem_for
from gateway.telemetry import Attr, Metrics, request_span

if TYPE_CHECKING:
    from gateway.moderation import Caller, ModerationService

T = TypeVar("T")

__all__ = ["ERROR_RESPONSES", "ApiError", "error_response", "header", "http_error_headers", "incoming_trace_context",
           "json_answer", "json_response", "openai_error_body", "openai_error_response", "openai_sse_error",
           "problem_of", "read_body", "read_json_object", "request_id_of", "serve",
           "unless_disconnected"]

log = logging.getLogger("modgate.gateway")

# The error statuses every authenticated route may answer, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"description": desc, "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {
            "error": {"type": "object", "required": ["type", "message"], "properties": {
                "type": {"type": "string"}, "message": {"type": "string"},
                "retryable": {"type": "boolean"}, "fields": {"type": "array"}}},
            "request_id": {"type": ["string", "null"]}}}}}}
    for code, desc in ((400, "malformed request"), (401, "missing or invalid API key"),
                       (403, "the key lacks the needed scope"), (404, "not found"),
                       (409, "conflict (compare-and-set lost, or the state does not allow it)"),
                       (413, "body too large"), (415, "unsupported media type"),
                       (429, "rate limited or overloaded"), (503, "a dependency is unavailable"))
}


_HEADERS = "modgate.headers"


def _headers(scope: MutableMapping[str, Any]) -> dict[bytes, bytes]:
    """The request's headers as a dict, made once per request (kept in its scope): the hot
    route reads six of them. A repeated header's first value wins, as in Starlette's
    `request.headers.get`."""
    found: dict[bytes, bytes] | None = scope.get(_HEADERS)
    if found is None:
        raw = scope["headers"]
        found = scope[_HEADERS] = dict(reversed(raw if isinstance(raw, list | tuple) else list(raw)))
    return found


def header(request: Request, name: bytes) -> str | None:
    """One request header, *name* in lower case: read straight from the ASGI scope, whose
    header names the server gives in lower case. The same answer as `request.headers.get`,
    which builds a header object per request and raises and catches a KeyError inside for each
    absent header (a few per request on the hot route)."""
    value = _headers(request.scope).get(name)
    return None if value is None else value.decode("latin-1")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed *limit* bytes
    (from Content-Length, or while streaming): never buffered past the limit."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    if timeout_s is None:
        return await _stream(request.receive, limit)
    # The deadline as one timer that cancels this task (what `asyncio.timeout` does, without
    # its context-manager object and state machine on every request).
    task = asyncio.current_task()
    assert task is not None
    cancelling = task.cancelling()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, expire)
    try:
        return await _stream(request.receive, limit)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
        raise
    finally:
        timer.cancel()


async def _stream(receive: Callable[[], Awaitable[Any]], limit: int) -> bytes:
    """The body's messages read from `receive` itself (Starlette's `request.stream()` is an
    async generator: its frames cost more than this loop). A disconnect while the body streams
    in is the table's 499, not Starlette's own `ClientDisconnect`, which no row names."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")  # the whole body in one message: the usual case
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        return body
    size = 0
    chunks = []
    while True:
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif kind == "http.disconnect":
            raise ClientDisconnected("the caller went away while sending the body")
        message = await receive()


_JSON_TYPES = ("application/json",)


async def read_json_object(request: Request, limit: int, timeout_s: float | None = None) -> dict[str, Any]:
    """A JSON object body: 415 for a non-JSON content type, 413 past *limit*, 400 when the body
    is not JSON or not an object."""
    given = _headers(request.scope).get(b"content-type")
    if given is not None and given != b"application/json":  # the usual value needs no parsing
        ctype = (given.decode("latin-1") or "application/json").split(";")[0].strip().lower()
        if ctype and ctype not in _JSON_TYPES and not ctype.endswith("+json"):
            raise ApiError(415, "unsupported_media_type", f"expected application/json, got {ctype}")
    raw = await read_body(request, limit, timeout_s)
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "malformed_json", "request body must be a JSON object")
    return payload


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def http_error_headers(request: Request, exc: Any) -> dict[str, str]:
    """The headers of a framework `HTTPException`, with a complete `Allow` on a 405.

    Starlette answers a 405 from the first route whose path matches and lists only that
    route's methods, but FastAPI registers one route per method (`GET /v1/prompts` and
    `POST /v1/prompts` are two routes), so `Allow` must be the union over every route of
    the app that matches the path (RFC 9110 §15.5.6)."""
    headers = dict(exc.headers or {})
    if exc.status_code != 405:
        return headers
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        route_methods = getattr(route, "methods", None)
        if not route_methods:
            continue
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(m.upper() for m in route_methods)
    if methods:
        ordered = [m for m in _METHOD_ORDER if m in methods] + sorted(methods - set(_METHOD_ORDER))
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
        headers["allow"] = ", ".join(ordered)
    return headers


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def problem_of(exc: BaseException, request_id: str | None, route: str) -> Problem:
    """The problem to answer for *exc*: its row in the one table, or a 500 that says nothing
    (the exception is logged with its stack, because an unmapped exception is our bug)."""
    problem = problem_for(exc)
    if problem is None:
        log.error("unhandled error on %s (request %s)", route, request_id, exc_info=exc)
        return Problem(500, "internal_error", "internal error; see gateway logs")
    if problem.status >= 500:
        log.warning("request %s on %s failed: %s: %s", request_id, route, problem.type, problem.message)
    return problem


class _Json(Response):
    """A JSON answer whose header list is made as bytes directly: Starlette's `init_headers`
    encodes a dict of str, lower-cases every name and scans the list for the two it adds, on
    every response. Sent exactly as a `Response` with the same headers would be."""

    media_type = "application/json"

    def __init__(self, body: bytes, status: int, request_id: str | None, retry_after: int | None = None) -> None:
        self.status_code, self.body, self.background = status, body, None
        raw = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        if retry_after is not None:
            raw.insert(0, (b"retry-after", b"%d" % retry_after))
        if request_id:
            raw.insert(0, (b"x-request-id", request_id.encode("latin-1")))
        self.raw_headers = raw


def json_answer(data: Any, request_id: str, status: int = 200) -> Response:
    """A front door's JSON answer, with the request's id in `x-request-id`."""
    return _Json(orjson.dumps(data), status, request_id)


def _retry_after(problem: Problem) -> int | None:
    return None if problem.retry_after_s is None else max(1, round(problem.retry_after_s))


def error_response(problem: Problem, request_id: str | None) -> Response:
    """Our error body: `{"error": {"type", "message", "retryable", "fields"?}, "request_id"}`."""
    detail: dict[str, object] = {"type": problem.type, "message": problem.message,
                                 "retryable": problem.retryable}
    if problem.fields is not None:
        detail["fields"] = list(problem.fields)
    body = orjson.dumps({"error": detail, "request_id": request_id})
    return _Json(body, problem.status, request_id, _retry_after(problem))


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 409:
        return "conflict_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def openai_error_body(problem: Problem) -> dict[str, Any]:
    """OpenAI's error object; `code` is our problem type, the same on every surface."""
    status = 400 if problem.status == 422 else problem.status
    param = problem.fields[0]["field"] if problem.fields else None
    return {"error": {"message": problem.message, "type": _openai_type(status), "param": param,
                      "code": problem.type}}


def openai_error_response(problem: Problem, request_id: str) -> Response:
    """OpenAI's JSON error answer (OpenAI answers validation errors with 400, not 422)."""
    status = 400 if problem.status == 422 else problem.status
    return _Json(orjson.dumps(openai_error_body(problem)), status, request_id, _retry_after(problem))


def openai_sse_error(problem: Problem) -> bytes:
    """OpenAI's in-band error event, for a failure after a stream's headers went out."""
    return b"data: " + orjson.dumps(openai_error_body(problem)) + b"\n\n"


# -- one request, whatever the front door ------------------------------------------------------

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACE_HEADERS = (b"traceparent", b"tracestate")


def request_id_of(request: Request) -> str:
    """The caller's `x-request-id` when it is a safe id, else a new one."""
    rid = header(request, b"x-request-id")
    return rid if rid and _REQUEST_ID.match(rid) else new_id()


def incoming_trace_context(request: Request) -> Any:
    """The caller's W3C trace context, from the request's header dict (the propagator API on
    Starlette's header mapping cost ~9 % of a request in profiles); None without one."""
    headers = _headers(request.scope)
    carrier = {k.decode(): headers[k].decode("latin-1") for k in _TRACE_HEADERS if k in headers}
    return propagate.extract(carrier) if carrier else None


class _DisconnectWatch:
    """Reads the caller's `receive` while the work runs and cancels the request's task when it
    says `http.disconnect`, without a task of its own: the `receive()` awaitable is driven the
    way a task drives a coroutine (step it; when it waits on a future, step it again from that
    future's done callback). A watcher task per request cost a task, two loop callbacks and a
    cancellation thrown through the server's receive on every request (~18 µs)."""

    __slots__ = ("_receive", "_task", "_loop", "_it", "_waiting", "_handle", "_wake", "armed", "gone")

    def __init__(self, receive: Callable[[], Awaitable[Any]], task: asyncio.Task[Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._receive, self._task, self._loop = receive, task, loop
        self._it: Any = None  # the running receive()'s iterator
        self._waiting: Any = None  # the future it waits on
        self._handle: asyncio.Handle | None = None
        self._wake = self._step  # one bound method: added and removed as the same callback
        self.armed = False  # cancel the task on a disconnect (not during the first, inline step)
        self.gone = False

    def _step(self, _done: object = None) -> None:
        self._waiting = self._handle = None
        if self._it is None:
            self._it = self._receive().__await__()
        try:
            waits_on = next(self._it)
        except StopIteration as done:
            self._it = None
            message = done.value
            if message is not None and message.get("type") == "http.disconnect":
                self.gone = True
                if self.armed:
                    self._task.cancel()
            else:  # another message (an empty tail of the body): read on, from the loop
                self._handle = self._loop.call_soon(self._wake)
            return
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - a receive that fails has nothing more to say
            log.debug("receive failed while watching for a disconnect", exc_info=True)
            self._it = None
            return
        if getattr(waits_on, "_asyncio_future_blocking", None):
            waits_on._asyncio_future_blocking = False
            waits_on.add_done_callback(self._wake)
            self._waiting = waits_on
        elif waits_on is None:  # a bare yield (sleep(0)): step again on the next loop pass
            self._handle = self._loop.call_soon(self._wake)
        else:  # not something an asyncio task could wait on either: stop watching
            self.stop()

    def stop(self) -> None:
        """Stop watching: the waiting read is closed (its `finally` runs now) and forgotten."""
        if self._waiting is not None:
            self._waiting.remove_done_callback(self._wake)
            self._waiting = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except RuntimeError:  # it ignored GeneratorExit: nothing more to do about it
                pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run *work*, cancelling it if the caller disconnects first, so the engine call is
    aborted (closing the backend connection makes Ray Serve and vLLM drop the request) instead
    of computing a verdict nobody will read. Call only after the body has been read. The work
    runs inline in the request's task; the caller's `receive` is read by a callback-driven
    watch (`_DisconnectWatch`), not a task."""
    me = asyncio.current_task()
    assert me is not None
    watch = _DisconnectWatch(request.receive, me, asyncio.get_running_loop())
    watch._step()  # the first read, inline: a caller already gone is known before any work
    if watch.gone:
        work.close()
        raise ClientDisconnected("the caller went away; work was aborted")
    watch.armed = True
    try:
        return await work
    except asyncio.CancelledError:
        if watch.gone:
            me.uncancel()
            raise ClientDisconnected("the caller went away; work was aborted") from None
        raise
    finally:
        watch.stop()


Work = Callable[[Request, "Caller", str, float, trace.Span], Awaitable[Response]]
ErrorRenderer = Callable[[Problem, str], Response]


async def serve(request: Request, *, route: str, service: ModerationService, tracer: trace.Tracer,
                metrics: Metrics, work: Work, render_error: ErrorRenderer = error_response) -> Response:
    """One request through a front door: the server span, the caller's admission (key, scope,
    own quota), the adapter's *work*, and the one error edge; the request counter by route and
    status. The caller's quota is given back when the answer is complete (after the last
    byte of a streamed answer)."""
    started = time.perf_counter()
    rid = request_id_of(request)
    caller: Caller | None = None
    handed_off = False
    with request_span(tracer, f"{request.method} {route}", incoming_trace_context(request),
                      {Attr.REQUEST_ID: rid}) as root:
        try:
            caller = await service.admit(header(request, b"authorization"),
                                         header(request, b"x-api-key"), request_id=rid)
            response = await work(request, caller, rid, started, root)
            if isinstance(response, StreamingResponse):
                previous, lease = response.background, caller

                async def release_then_previous() -> None:
                    await lease.release()
                    if previous is not None:
                        await previous()
                response.background = BackgroundTask(release_then_previous)
                handed_off = True
        except Exception as exc:
            problem = problem_of(exc, rid, route)
            root.set_attribute(Attr.ERROR_TYPE, problem.type)
            if problem.status >= 500:
                root.set_status(Status(StatusCode.ERROR, problem.type))
            response = render_error(problem, rid)
        finally:
            if caller is not None and not handed_off:
                await caller.release()
    metrics.count(metrics.requests, 1.0, route, str(response.status_code))
    return response
