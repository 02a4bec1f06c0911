"""The console's review queue page (`/console/queue`) and its read endpoints.

The page lists what `GET /v1/review/queue` lists (the same `ReviewQueue`) with the listing
content, and the reviewers' agreement. It writes nothing itself: labels go to
`POST /console/api/feedback`, the console's form of `POST /v1/feedback` (session, CSRF token,
the `feedback` scope, `FeedbackDesk`). Its routes are mounted inside the console's router and
check the session through the console's own `signed_in`, so the session, CSRF and scope rules
are the console's, not a copy of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.api.console.sessions import Session
from gateway.api.edge import json_response
from gateway.api.review import MAX_QUEUE, QUEUE_SCOPES, ReviewQueue
from gateway.auth import Authenticator
from gateway.problems import ApiError, Unauthenticated

__all__ = ["build_queue_router"]

SignedIn = Callable[..., Awaitable[tuple[Session, Any]]]


def _int(raw: str | None, default: int, lo: int, hi: int, field: str) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ApiError(422, "invalid_request", f"{field} must be a whole number from {lo} to {hi}",
                       fields=[{"field": field, "problem": "out of range"}])
    return int(raw)


def build_queue_router(signed_in: SignedIn, queue: ReviewQueue) -> APIRouter:
    """Routes under the console's prefix. *signed_in* is the console router's session check
    (`signed_in(request, scope, write=...)`)."""
    router = APIRouter()

    @router.get("/queue", name="console-queue")
    async def queue_page(request: Request) -> Response:
        try:
            await signed_in(request)
        except Unauthenticated:
            return RedirectResponse("/console/signin", status_code=303)
        from gateway.api.console.routes import render_shell  # routes imports this module

        return HTMLResponse(render_shell("queue"))

    @router.get("/api/queue")
    async def queue_items(request: Request) -> Response:
        _, principal = await signed_in(request)
        for scope in QUEUE_SCOPES:
            Authenticator.require(principal, scope)
        n = _int(request.query_params.get("n"), 20, 1, MAX_QUEUE, "n")
        days = _int(request.query_params.get("days"), 7, 1, 366, "days")
        return json_response(await queue.queue(principal.name, n=n, days=days))

    @router.get("/api/queue/agreement")
    async def queue_agreement(request: Request) -> Response:
        await signed_in(request, "feedback")
        days = _int(request.query_params.get("days"), 30, 1, 366, "days")
        return json_response(await queue.agreement(days=days))

    return router
