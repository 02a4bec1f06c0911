"""`DirectRoute`: a FastAPI route served without FastAPI's per-request machinery.

FastAPI wraps every endpoint in dependency solving, two `AsyncExitStack`s and response-model
handling. Hot endpoints that take only the `Request` and return a `Response` need none of that:
in the overhead benchmark that wrapper cost ~8 % of the gateway's CPU per moderation. A
`DirectRoute` is still an `APIRoute` (so the OpenAPI document, tags and declared responses are
exactly as before) but its ASGI app only builds the `Request`, awaits the endpoint and sends
its `Response`. An exception it raises reaches the app's `ExceptionMiddleware`, which maps it
with the same exception handlers (`ApiError` → error envelope) as on any other route; Starlette's
per-route second copy of that wrapper is left out.

Use it only for `async def endpoint(request: Request) -> Response`; `DirectRoute` refuses any
other signature, because FastAPI would not fill other parameters in.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

__all__ = ["DirectRoute"]


class DirectRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        params = list(inspect.signature(endpoint).parameters.values())
        if not inspect.iscoroutinefunction(endpoint) or len(params) != 1 or params[0].annotation not in (
                Request, "Request"):
            raise TypeError(f"DirectRoute {path}: the endpoint must be `async def f(request: Request)`")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        self.app = app
