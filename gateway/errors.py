"""The one table that turns exceptions into HTTP answers.

Every error body has the same shape: `{"error": {"type", "message", "retryable", "fields"?},
"request_id"}`. Only exceptions we raise on purpose are mapped; anything else is a 500
`internal_error` with no stack trace in the body (it is logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from prompt_registry import (
    LabelConflict,
    PromptFileError,
    PromptNotFound,
    RenderError,
    StoreUnavailable,
    TemplateRejected,
)
from prompt_registry.gates import GateRefused
from prompt_registry.ops import NothingToRollBack
from prompt_registry.rollouts import RolloutConflict, RolloutError
from serving import (
    BackendBadRequest,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)

__all__ = ["ERROR_RESPONSES", "ApiError", "error_response", "http_error_headers", "json_response",
           "map_exception", "read_body", "read_json_object"]

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


@dataclass
class ApiError(Exception):
    """An error answered to the caller as-is."""

    status: int
    type: str
    message: str
    fields: list[dict[str, str]] | None = None
    retryable: bool = False
    retry_after_s: float | None = None


# (exception class, status, type, retryable)
_TABLE: list[tuple[type[Exception], int, str, bool]] = [
    (PromptNotFound, 404, "not_found", False),
    (LabelConflict, 409, "label_conflict", False),
    (GateRefused, 409, "promotion_gate_failed", False),
    (NothingToRollBack, 409, "nothing_to_roll_back", False),
    (RolloutConflict, 409, "rollout_conflict", False),
    (RolloutError, 409, "rollout_state", False),
    (PromptFileError, 422, "invalid_prompt", False),
    (TemplateRejected, 422, "template_rejected", False),
    (RenderError, 422, "render_error", False),
    (StoreUnavailable, 503, "registry_unavailable", True),
    (BackendOverloaded, 429, "model_overloaded", True),
    (BackendTimeout, 504, "model_timeout", True),
    (BackendUnavailable, 503, "model_unavailable", True),
    (BackendBadRequest, 502, "model_rejected_request", False),
    (BackendProtocolError, 502, "model_protocol_error", True),
]


def map_exception(exc: Exception) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    for cls, status, kind, retryable in _TABLE:
        if isinstance(exc, cls):
            retry_after = getattr(exc, "retry_after_s", None)
            if status == 429 and retry_after is None:
                retry_after = 1.0
            return ApiError(status, kind, str(exc), retryable=retryable, retry_after_s=retry_after)
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed *limit* bytes
    (from Content-Length, or while streaming): never buffered past the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


_JSON_TYPES = ("application/json",)


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """A JSON object body: 415 for a non-JSON content type, 413 past *limit*, 400 when the body
    is not JSON or not an object."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"expected application/json, got {ctype}")
    raw = await read_body(request, limit)
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


def error_response(err: ApiError, request_id: str | None) -> Response:
    detail: dict[str, object] = {"type": err.type, "message": err.message, "retryable": err.retryable}
    if err.fields is not None:
        detail["fields"] = err.fields
    headers = {}
    if request_id:
        headers["x-request-id"] = request_id
    if err.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(err.retry_after_s)))
    body = orjson.dumps({"error": detail, "request_id": request_id})
    return Response(body, status_code=err.status, media_type="application/json", headers=headers)
