"""`DirectRoute`: a FastAPI route served without FastAPI's per-request machinery.

FastAPI wraps every endpoint in dependency solving, two `AsyncExitStack`s and response-model
handling. Hot endpoints that take only the `Request` and return a `Response` need none of that:
in the overhead benchmark that wrapper cost ~8 % of the gateway's CPU per moderation. A
`DirectRoute` is still an `APIRoute` (so the OpenAPI document, tags and declared responses are
exactly as before) but its ASGI app is Starlette's plain `request_response(endpoint)`, which
keeps the app's exception handlers (`ApiError` → error envelope) and nothing else.

Use it only for `async def endpoint(request: Request) -> Response`; `DirectRoute` refuses any
other signature, because FastAPI would not fill other parameters in.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import request_response

__all__ = ["DirectRoute"]


class DirectRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        params = list(inspect.signature(endpoint).parameters.values())
        if not inspect.iscoroutinefunction(endpoint) or len(params) != 1 or params[0].annotation not in (
                Request, "Request"):
            raise TypeError(f"DirectRoute {path}: the endpoint must be `async def f(request: Request)`")
        self.app = request_response(endpoint)
