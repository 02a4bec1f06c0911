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
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match

from gateway.ids import new_id
from gateway.problems import ApiError, ClientDisconnected, Problem, problem_for
from gateway.telemetry import Attr, Metrics, request_span

if TYPE_CHECKING:
    from gateway.moderation import Caller, ModerationService

T = TypeVar("T")

__all__ = ["ERROR_RESPONSES", "ApiError", "error_response", "header", "http_error_headers", "json_response",
           "incoming_trace_context", "openai_error_body", "openai_error_response", "openai_sse_error",
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


def header(request: Request, name: bytes) -> str | None:
    """One request header, *name* in lower case: read straight from the ASGI scope, whose
    header names the server gives in lower case. The same answer as `request.headers.get`,
    which builds a header object per request and raises and catches a KeyError inside for each
    absent header (a few per request on the hot route)."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed *limit* bytes
    (from Content-Length, or while streaming): never buffered past the limit."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    if timeout_s is None:
        return await _stream(request, limit)
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
        return await _stream(request, limit)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g}s") from None
        raise
    finally:
        timer.cancel()


async def _stream(request: Request, limit: int) -> bytes:
    size = 0
    chunks = []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # Starlette's own exception, which no row of the table names (it was a 500 logged as
        # our bug): the same event as the /v1/moderate guard's 499.
        raise ClientDisconnected("the caller went away while sending the body") from None
    return b"".join(chunks)


_JSON_TYPES = ("application/json",)


async def read_json_object(request: Request, limit: int, timeout_s: float | None = None) -> dict[str, Any]:
    """A JSON object body: 415 for a non-JSON content type, 413 past *limit*, 400 when the body
    is not JSON or not an object."""
    ctype = (header(request, b"content-type") or "application/json").split(";")[0].strip().lower()
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


def _retry_headers(problem: Problem, request_id: str | None) -> dict[str, str]:
    headers = {}
    if request_id:
        headers["x-request-id"] = request_id
    if problem.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(problem.retry_after_s)))
    return headers


def error_response(problem: Problem, request_id: str | None) -> Response:
    """Our error body: `{"error": {"type", "message", "retryable", "fields"?}, "request_id"}`."""
    detail: dict[str, object] = {"type": problem.type, "message": problem.message,
                                 "retryable": problem.retryable}
    if problem.fields is not None:
        detail["fields"] = list(problem.fields)
    body = orjson.dumps({"error": detail, "request_id": request_id})
    return Response(body, status_code=problem.status, media_type="application/json",
                    headers=_retry_headers(problem, request_id))


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
    return Response(orjson.dumps(openai_error_body(problem)), status_code=status,
                    media_type="application/json", headers=_retry_headers(problem, request_id))


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
    """The caller's W3C trace context, read in one pass over the raw headers (the propagator
    API on Starlette's header mapping cost ~9 % of a request in profiles)."""
    carrier = {k.decode(): v.decode("latin-1") for k, v in request.scope["headers"] if k in _TRACE_HEADERS}
    return propagate.extract(carrier) if carrier else None


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run *work*, cancelling it if the caller disconnects first, so the engine call is
    aborted (closing the backend connection makes Ray Serve and vLLM drop the request) instead
    of computing a verdict nobody will read. Call only after the body has been read. One
    watcher task per request; the work itself runs inline in the request's task."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                me.cancel()
                return

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            me.uncancel()
            raise ClientDisconnected("the caller went away; work was aborted") from None
        raise
    finally:
        watcher.cancel()


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
