"""An ASGI layer in front of every route: what must hold before any route code runs.

- **Authentication before bodies.** Routes whose body FastAPI parses (admin, rollouts,
  feedback) would read and parse a body of any size before the route checks the key. Here
  every request that carries a body to such a route must present a valid key first (401
  without reading a byte); the route still checks the scope.
- **Bodies limited while they stream in**: a declared `Content-Length` over the limit is a
  413 at once, a body that grows past it is cut off with a 413 without reading the rest, and a
  body must arrive within `body_timeout_s` (408, slow clients). The front doors read their
  bodies through `gateway.api.edge.read_body`, which applies the same rules, so they pass
  through untouched here apart from the headers.
- **Header limits**: more than `MAX_HEADERS` headers or `MAX_HEADER_BYTES` of them is a 431.
- **Direct routes served from here**: a request for a `DirectRoute` (the hot `POST
  /v1/moderate`) goes from this layer straight to the route's own ASGI app, past FastAPI's
  exception and exit-stack middleware and the router's scan, which it does not need: the route
  renders every error itself (`gateway.api.edge.serve`); anything that still escapes it is
  answered here through the same table, as the exception middleware would.
- **Security headers on every response**: `X-Content-Type-Options: nosniff`,
  `Cache-Control: no-store`, and a CSP that forbids everything (JSON APIs need nothing;
  `/docs` is left alone). The console (`/console`) gets one that allows only its own origin:
  its scripts and styles are files the gateway serves (no inline script, no CDN), and no page
  may frame it.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from itertools import chain
from typing import Any

from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.edge import error_response, problem_of, request_id_of
from gateway.api.routing import DirectRoute
from gateway.auth import Authenticator
from gateway.problems import ApiError, ClientDisconnected, Problem, problem_for

__all__ = ["RequestGuard"]

_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_CONSOLE_CSP = (b"content-security-policy",
                b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_DOCS = ("/docs", "/redoc", "/openapi.json")
_API, _CONSOLE, _DOCS_HEADERS = [*_SECURITY_HEADERS, _CSP], [*_SECURITY_HEADERS, _CONSOLE_CSP], _SECURITY_HEADERS


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    """The security headers every response to *path* carries: a CSP that forbids everything on
    the API, the console's own, none on the API docs (they load their own assets)."""
    if path.startswith(_DOCS):
        return _DOCS_HEADERS
    return _CONSOLE if path == "/console" or path.startswith("/console/") else _API
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Headers a request may carry (the HTTP parser in front accepts far more: a 1 MB header and
# 2,000 headers got through). Refused with 431 before any route runs.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024


class RequestGuard:
    def __init__(self, app: ASGIApp, *, auth: Authenticator, routes: Sequence[BaseRoute],
                 self_guarded: frozenset[str], max_body_bytes: int, body_timeout_s: float,
                 body_limits: dict[str, int] | None = None) -> None:
        """`routes`: the app's routes (only a request some route would take is checked here;
        anything else gets the router's own 404 or 405). `self_guarded`: paths that
        authenticate before reading and limit their own bodies (the front doors).
        `body_limits`: larger limits for some paths (publishing a prompt)."""
        self.app, self.auth, self.self_guarded, self.routes = app, auth, self_guarded, routes
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.body_limits = body_limits or {}
        self._direct: dict[tuple[str, str], tuple[DirectRoute, list[tuple[bytes, bytes]]]] | None = None

    def direct_routes(self) -> dict[tuple[str, str], DirectRoute]:
        """(method, path) -> the `DirectRoute` serving it from here: routes without path
        parameters that guard themselves (`self_guarded`)."""
        return {key: route for key, (route, _) in self._direct_table().items()}

    def _direct_table(self) -> dict[tuple[str, str], tuple[DirectRoute, list[tuple[bytes, bytes]]]]:
        """(method, path) -> the direct route and the security headers of its path (made once:
        the app's routes are all added before its first request)."""
        if self._direct is None:
            self._direct = {(method, route.path): (route, security_headers(route.path)) for route in self.routes
                            if isinstance(route, DirectRoute) and not route.param_convertors
                            and route.path in self.self_guarded for method in route.methods or ()}
        return self._direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        raw_headers = scope["headers"]
        # every name and value's length summed in C (no generator frame per header)
        if len(raw_headers) > MAX_HEADERS or sum(map(len, chain.from_iterable(raw_headers))) > MAX_HEADER_BYTES:
            await self._refuse(scope, self._with_headers(send, security_headers(path)), ApiError(
                431, "headers_too_large", f"at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} "
                "bytes of headers per request"))
            return
        direct = (self._direct if self._direct is not None else self._direct_table()).get((scope["method"], path))
        if direct is not None:
            # What the route's own app does (build the `Request`, await the endpoint, send its
            # response), with the scope keys the router would have set. The endpoint's `Request`
            # has no `send`: its one response is sent from here, with the security headers added
            # to it (no wrapper around `send` per request).
            route = direct[0]
            scope["endpoint"], scope["route"], scope["path_params"] = route.endpoint, route, {}
            try:
                response = await route.endpoint(Request(scope, receive))
            except Exception as exc:  # noqa: BLE001 - nothing sent yet: answered through the one table
                rid = request_id_of(Request(scope))
                response = error_response(problem_of(exc, rid, path), rid)
            response.raw_headers = response.raw_headers + direct[1]  # a new list: a Response may be reused
            await response(scope, receive, send)
            return
        send = self._with_headers(send, security_headers(path))
        if (scope["method"] not in _BODY_METHODS or path in self.self_guarded
                or not any(route.matches(scope)[0] is Match.FULL for route in self.routes)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            await self.auth.authenticate(_text(headers.get(b"authorization")),
                                         _text(headers.get(b"x-api-key")))
            limit = self.body_limits.get(path, self.max_body_bytes)
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise ApiError(413, "body_too_large", f"request body is {int(declared)} bytes; "
                               f"the limit is {limit}")
        except Exception as exc:  # noqa: BLE001 - answered through the one table
            await self._refuse(scope, send, exc)
            return
        try:
            body = await self._read(receive, limit)
        except Exception as exc:  # noqa: BLE001 - answered through the one table
            await self._refuse(scope, send, exc)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, limit: int) -> bytes:
        """The whole body, at most *limit* bytes and within `body_timeout_s`. These routes are
        admin routes with small bodies: reading here, then replaying, keeps the limit out of
        FastAPI's body parsing (which turns any error while reading into a 400)."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected("the caller went away while sending the body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, "body_too_large",
                                       f"request body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise ApiError(408, "body_timeout", f"the request body did not arrive within "
                           f"{self.body_timeout_s:g}s") from None

    @staticmethod
    def _with_headers(send: Send, security: list[tuple[bytes, bytes]]) -> Send:
        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *security]
            await send(message)

        return sending

    @staticmethod
    async def _refuse(scope: Scope, send: Send, exc: Exception) -> None:
        problem = problem_for(exc) or Problem(500, "internal_error", "internal error; see gateway logs")

        async def no_body() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        rid = request_id_of(Request(scope))  # the caller's id when it is a safe one, else a new one
        response = error_response(problem, rid)
        await response(scope, no_body, send)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay
