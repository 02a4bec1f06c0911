"""The console's pages and JSON endpoints (`/console`, `/console/api/...`).

Every endpoint behind sign-in finds the session (cookie), looks the API key record up again
through the gateway's `Authenticator` (a revoked key ends the session) and checks the scope the
admin API checks for the same thing: `prompts:read` to read the registry, `prompts:publish`
for the playground (it runs drafts on the model), `feedback` for the review form. Writes need
the session's CSRF token in `x-csrf-token` (the pages get it from `GET /console/api/session`)
and, when the browser sends one, an `Origin` equal to the gateway's own.

Nothing here writes to the store on its own: the playground calls
`ModerationService.try_draft` (no version published, nothing logged), the review form calls
`FeedbackDesk`, the code behind `POST /v1/feedback`. These paths authenticate before they read
a body and bound their bodies themselves (`SELF_GUARDED` in `gateway.api.app`).
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from pydantic import Field, ValidationError
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from gateway.api.console.common import Body, Principal, parse_body
from gateway.api.console.operations import WRITES as OPERATION_WRITES
from gateway.api.console.operations import add_operation_routes
from gateway.api.console.queue import build_queue_router
from gateway.api.console.sessions import Session, SessionBackend, SessionStore
from gateway.api.edge import json_response, read_json_object
from gateway.api.feedback import FeedbackDesk, FeedbackRequest
from gateway.api.probabilities import verdict_fields
from gateway.auth import ANONYMOUS, Authenticator
from gateway.config import GatewaySettings
from gateway.feedback import FeedbackLog
from gateway.ids import new_id
from gateway.moderation import Caller, ModerationService
from gateway.pipeline import Evaluation
from gateway.problems import ApiError, Forbidden, InvalidLabel, Unauthenticated, problem_for
from gateway.rollouts.recorder import RolloutRecorder
from prompt_registry import PromptFileError, PromptSpec, PromptStore
from prompt_registry.audit_text import describe, one_line
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.loader import parse_prompt_text
from prompt_registry.models import FAIL_CLOSED_DECISION, MAX_VERSION, PromptVersion
from prompt_registry.ops import diff_versions, spec_as_yaml, summarize

__all__ = ["COOKIE", "CONSOLE_WRITES", "build_console_router"]

COOKIE = "modgate_console"
STATIC = Path(__file__).resolve().parents[1] / "static" / "console"
_SHELL = (STATIC / "shell.html").read_text(encoding="utf-8")
PAGES = ("prompts", "version", "playground", "rollouts", "evaluation", "decisions", "review")
# The POST paths: they authenticate (session + CSRF) before reading and bound their bodies.
CONSOLE_WRITES = frozenset({"/console/api/session", "/console/api/signout",
                            "/console/api/playground", "/console/api/feedback", *OPERATION_WRITES})
CONSOLE_SCOPES = ("prompts:read", "prompts:publish", "labels:write", "feedback", "admin")
_SIGNIN_MAX_BYTES = 4096
_PLAYGROUND_MAX_BYTES = 1 << 20
_FEEDBACK_MAX_BYTES = 256 * 1024
_MAX_FEEDBACK_ROWS = 500
_LOCALE = r"^[a-z]{2,3}(-[A-Z][A-Za-z]{1,3})?$"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_LABEL = r"^[a-z0-9][a-z0-9._-]{0,63}$"

class SignIn(Body):
    key: str = Field("", max_length=512)


class DraftListing(Body):
    title: str = Field(..., min_length=1)
    description: str = ""
    locale: str = Field("en-US", pattern=_LOCALE)


class PlaygroundRun(Body):
    prompt: str = Field(..., min_length=1, max_length=_PLAYGROUND_MAX_BYTES)
    listings: list[DraftListing] = Field(..., min_length=1)
    against: str = Field("production", pattern=_LABEL)


class ReviewRow(Body):
    request_id: str = ""
    decision: str = ""
    category: str | None = None
    note: str = ""


class ReviewBatch(Body):
    rows: list[ReviewRow] = Field(..., min_length=1, max_length=_MAX_FEEDBACK_ROWS)
    dry_run: bool = False


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [{"field": ".".join(str(p) for p in e["loc"]) or "(row)", "problem": e["msg"]}
            for e in exc.errors()]


# -- presentation helpers (pure) ----------------------------------------------------------------

def _locales(version: PromptVersion) -> dict[str, list[dict[str, str]]]:
    spec = version.spec
    out = {spec.default_locale: [m.model_dump() for m in spec.messages]}
    for loc, variant in spec.locales.items():
        out[loc] = [m.model_dump() for m in variant.messages]
    return out


def _message_lines(messages: list[dict[str, str]]) -> list[str]:
    lines: list[str] = []
    for m in messages:
        lines.append(f"## {m['role']}")
        lines.extend(m["content"].splitlines())
    return lines


def side_by_side(left: list[str], right: list[str]) -> list[dict[str, Any]]:
    """Rows of a side-by-side diff: `op` equal/replace/delete/insert, line numbers from 1."""
    rows: list[dict[str, Any]] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(max(i2 - i1, j2 - j1)):
            li, rj = i1 + k, j1 + k
            rows.append({"op": op,
                         "ln": li + 1 if li < i2 else None, "left": left[li] if li < i2 else None,
                         "rn": rj + 1 if rj < j2 else None, "right": right[rj] if rj < j2 else None})
    return rows


def diff_by_locale(a: PromptVersion, b: PromptVersion) -> dict[str, list[dict[str, Any]]]:
    la, lb = _locales(a), _locales(b)
    return {loc: side_by_side(_message_lines(la.get(loc, [])), _message_lines(lb.get(loc, [])))
            for loc in dict.fromkeys([*la, *lb])}


def render_shell(page: str) -> str:
    """A page: the one shared shell (head, stylesheet, the shared script) with the page's own
    script; each page builds its content, in the reader's language, from the JSON API."""
    main_class = "signin" if page == "signin" else ""
    return _SHELL.replace("{page}", page).replace("{main_class}", main_class)


def _version_view(v: PromptVersion, labels: dict[str, int], versions: list[int]) -> dict[str, Any]:
    spec = v.spec
    return {"name": v.name, "version": v.version, "created_at": v.created_at.isoformat(),
            "created_by": v.created_by, "content_hash": v.content_hash,
            "labels": sorted(k for k, n in labels.items() if n == v.version),
            "versions": versions, "description": spec.description,
            "default_locale": spec.default_locale, "locales": _locales(v),
            "variables": spec.variables, "verdict": spec.verdict.model_dump(),
            "model": spec.model, "sampling": spec.sampling.model_dump(),
            "policy": spec.policy.model_dump(),
            "evaluation": spec.evaluation.model_dump(mode="json") if spec.evaluation else None,
            "yaml": spec_as_yaml(v)}


def _evaluation_view(ev: Evaluation, messages: list[dict[str, str]] | None) -> dict[str, Any]:
    v, r = ev.verdict, ev.result
    return {**verdict_fields(v), "locale": ev.locale, "model": r.model,
            "latency_ms": round(r.timings.total_ms, 1), "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens, "messages": messages}


# -- the router ---------------------------------------------------------------------------------

def build_console_router(app: FastAPI, store: PromptStore, auth: Authenticator,
                         service: ModerationService, settings: GatewaySettings, *,
                         recorder: RolloutRecorder, feedback_log: FeedbackLog | None,
                         sessions: SessionBackend | None = None) -> APIRouter:
    """The console's routes; mounts its static files on *app*. *recorder* and *feedback_log*
    are the feedback route's (labels are counted by the same code). *sessions*: where sessions
    live (default: this process's memory; `build_gateway` passes the host's shared file)."""
    cfg = settings.console
    desk = FeedbackDesk(store, recorder, feedback_log, cache=service.cache,
                        default_prompt=settings.default_prompt, default_label=settings.default_label)
    sessions = sessions if sessions is not None else SessionStore(idle_s=cfg.idle_timeout_s,
                                                                  max_sessions=cfg.max_sessions)
    app.state.console_sessions = sessions
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    router = APIRouter(prefix="/console", include_in_schema=False)

    # -- who is calling ---------------------------------------------------------------------

    async def recheck(session: Session) -> Principal:
        """The session's key record, read again (through the authenticator's cache): revoked or
        deleted keys end the session."""
        if not auth.required:
            return ANONYMOUS
        record = await auth.record(session.key_id)  # same cache and fallback as API keys
        if record is None or record.revoked:
            sessions.drop_key(session.key_id)
            raise Unauthenticated("the API key of this console session was revoked; sign in again")
        return record

    def check_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is None:  # not sent by every browser on same-origin requests
            return
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Forbidden("cross-origin console request refused")

    async def signed_in(request: Request, scope: str | None = None, *,
                        write: bool = False) -> tuple[Session, Principal]:
        session = sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise Unauthenticated("no console session (signed out or expired); sign in")
        principal = await recheck(session)
        if write:
            check_origin(request)
            token = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(token.encode(), session.csrf.encode()):
                raise Forbidden("missing or wrong CSRF token (x-csrf-token); reload the page")
        if scope is not None:
            auth.require(principal, scope)
        return session, principal

    def session_view(session: Session, principal: Principal) -> dict[str, Any]:
        scopes = list(principal.scopes) if isinstance(principal, ApiKeyRecord) else ["admin"]
        return {"name": session.name, "key_id": session.key_id, "scopes": scopes,
                "csrf": session.csrf, "idle_timeout_s": sessions.idle_s,
                "default_prompt": settings.default_prompt, "production_label": settings.default_label,
                "max_playground_listings": cfg.max_playground_listings}

    def body_timeout() -> float:
        return settings.body_timeout_s

    # -- pages ------------------------------------------------------------------------------

    def shell(name: str) -> Response:
        return HTMLResponse(render_shell(name))

    @router.get("")
    async def console_home(request: Request) -> Response:
        if sessions.get(request.cookies.get(COOKIE)) is None:
            return RedirectResponse("/console/signin", status_code=303)
        return RedirectResponse("/console/prompts", status_code=303)

    @router.get("/signin")
    async def signin_page() -> Response:
        return shell("signin")

    def page(name: str) -> Any:
        async def serve_page(request: Request) -> Response:
            session = sessions.get(request.cookies.get(COOKIE))
            if session is None:
                return RedirectResponse("/console/signin", status_code=303)
            try:
                await recheck(session)
            except Unauthenticated:
                return RedirectResponse("/console/signin", status_code=303)
            return shell(name)
        return serve_page

    for name in PAGES:
        router.add_api_route(f"/{name}", page(name), methods=["GET"], name=f"console-{name}")

    # -- session ----------------------------------------------------------------------------

    @router.get("/api/session")
    async def whoami(request: Request) -> Response:
        session, principal = await signed_in(request)
        return json_response(session_view(session, principal))

    @router.post("/api/session")
    async def sign_in(request: Request) -> Response:
        """Sign in with an API key: a session cookie (HttpOnly, SameSite=Strict, Secure on
        https) and the CSRF token for later writes."""
        check_origin(request)
        body: SignIn = parse_body(SignIn, await read_json_object(request, _SIGNIN_MAX_BYTES,
                                                             body_timeout()))
        principal = await auth.authenticate(None, body.key or None)
        if not any(principal.allows(s) for s in CONSOLE_SCOPES):
            raise Forbidden(f"API key {principal.name!r} has none of the console's scopes "
                            f"({', '.join(CONSOLE_SCOPES)})")
        sessions.drop(request.cookies.get(COOKIE))
        session_id, session = sessions.create(principal.key_id, principal.name)
        response = json_response(session_view(session, principal))
        secure = cfg.secure_cookie == "always" or request.url.scheme == "https"
        response.set_cookie(COOKIE, session_id, httponly=True, samesite="strict", secure=secure,
                            path="/console")
        return response

    @router.post("/api/signout")
    async def sign_out(request: Request) -> Response:
        await signed_in(request, write=True)
        sessions.drop(request.cookies.get(COOKIE))
        response = json_response({"signed_out": True})
        response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
        return response

    # -- prompts ----------------------------------------------------------------------------

    @router.get("/api/prompts")
    async def prompts(request: Request) -> Response:
        await signed_in(request, "prompts:read")

        def work() -> list[dict[str, Any]]:
            out = []
            for name in store.list_prompts():
                summary = summarize(store, name)
                latest = summary.latest or max(summary.versions)
                spec = store.get_version(name, latest).spec
                rollout = store.get_rollout(name)
                cards = store.list_scorecards(name)
                last = max(cards, key=lambda c: c.created_at).as_dict() if cards else None
                out.append({
                    **summary.as_dict(), "model": spec.model, "description": spec.description,
                    "scorecard": None if last is None else {
                        k: last[k] for k in ("version", "accuracy", "accuracy_ci", "items",
                                             "dataset_sha256", "created_at")},
                    "rollout": None if rollout is None or not rollout.active else {
                        "state": rollout.state, "stable_version": rollout.stable_version,
                        "canary_version": rollout.canary_version, "weight": rollout.weight,
                        "shadows": [s.model_dump() for s in rollout.shadows]}})
            return out
        return json_response({"prompts": await asyncio.to_thread(work)})

    def known_name(name: str) -> str:
        if not _NAME.match(name):
            raise ApiError(404, "not_found", "no such prompt")
        return name

    def version_number(raw: str | None, field: str) -> int:
        if raw is None or not raw.isdigit() or not 1 <= int(raw) <= MAX_VERSION:
            raise ApiError(422, "invalid_request", f"{field} must be a version number",
                           fields=[{"field": field, "problem": "not a version number"}])
        return int(raw)

    @router.get("/api/prompts/{name}/versions/{version}")
    async def version_page(name: str, version: str, request: Request) -> Response:
        await signed_in(request, "prompts:read")
        number = version_number(version, "version")

        def work() -> dict[str, Any]:
            summary = summarize(store, known_name(name))
            return _version_view(store.get_version(name, number), summary.labels, summary.versions)
        return json_response(await asyncio.to_thread(work))

    @router.get("/api/prompts/{name}/diff")
    async def diff(name: str, request: Request) -> Response:
        await signed_in(request, "prompts:read")
        a_no = version_number(request.query_params.get("from"), "from")
        b_no = version_number(request.query_params.get("to"), "to")

        def work() -> dict[str, Any]:
            a = store.get_version(known_name(name), a_no)
            b = store.get_version(name, b_no)
            return {"name": name, "from": a_no, "to": b_no, "locales": diff_by_locale(a, b),
                    "spec_diff": diff_versions(a, b)}
        return json_response(await asyncio.to_thread(work))

    @router.get("/api/prompts/{name}/audit")
    async def audit(name: str, request: Request) -> Response:
        await signed_in(request, "prompts:read")

        def work() -> list[dict[str, Any]]:
            summarize(store, known_name(name))  # 404 for an unknown prompt
            return [{"at": e.at.isoformat(), "actor": e.actor, "action": e.action,
                     "label": e.label, "from_version": e.from_version, "to_version": e.to_version,
                     "note": describe(e).why, "line": one_line(e)} for e in store.audit(name)]
        return json_response({"name": name, "entries": await asyncio.to_thread(work)})

    # -- playground -------------------------------------------------------------------------

    async def production_of(spec: PromptSpec, label: str) -> PromptVersion | None:
        labels = await asyncio.to_thread(store.labels, spec.name)
        if label not in labels:
            return None
        return (await service.cache.get_version(spec.name, labels[label])).version

    def listing_variables(spec: PromptSpec, listing: DraftListing, i: int) -> dict[str, object]:
        available = {"title": listing.title, "description": listing.description,
                     "item_id": f"playground-{i}", "seller_id": "playground"}
        return {k: v for k, v in available.items() if k in spec.variables}

    async def evaluate(spec: PromptSpec, listings: list[DraftListing], rid: str, started: float,
                       caller: str) -> list[Evaluation]:
        """try_draft per locale group, answers in the listings' order."""
        out: list[Evaluation | None] = [None] * len(listings)
        for loc in dict.fromkeys(item.locale for item in listings):
            idx = [i for i, item in enumerate(listings) if item.locale == loc]
            evs = await service.try_draft(spec, [listing_variables(spec, listings[i], i) for i in idx],
                                          locale=loc, started=started, request_id=f"{rid}-{loc}",
                                          caller=caller)
            for i, ev in zip(idx, evs, strict=True):
                out[i] = ev
        return [ev for ev in out if ev is not None]

    def rendered(version: PromptVersion, listing: DraftListing, i: int) -> list[dict[str, str]]:
        _, chat = service.pipeline.build_chat(version, {**listing_variables(version.spec, listing, i),
                                                        "locale": listing.locale},
                                              listing.locale, request_id="render")
        return chat.messages

    @router.post("/api/playground")
    async def playground(request: Request) -> Response:
        """Run a draft prompt (YAML, as `modgate prompts publish` takes) on a few listings,
        side by side with the production version: through `ModerationService.try_draft`, so
        nothing is published or logged. Needs `prompts:publish`; one unit of the caller's
        quota per listing."""
        session, principal = await signed_in(request, "prompts:publish", write=True)
        body: PlaygroundRun = parse_body(PlaygroundRun, await read_json_object(
            request, _PLAYGROUND_MAX_BYTES + 64 * 1024, body_timeout()))
        if len(body.listings) > cfg.max_playground_listings:
            raise ApiError(422, "invalid_request", f"at most {cfg.max_playground_listings} listings "
                           "per run", fields=[{"field": "listings", "problem": "too many"}])
        for i, item in enumerate(body.listings):
            for field, limit in (("title", settings.max_title_chars),
                                 ("description", settings.max_description_chars)):
                if len(getattr(item, field)) > limit:
                    raise ApiError(422, "content_too_long", f"listing {i + 1}: {field} is over "
                                   f"{limit} characters",
                                   fields=[{"field": f"listings.{i}.{field}", "problem": "too long"}])
        try:
            spec = parse_prompt_text(body.prompt, source="draft")
        except PromptFileError as exc:
            lines = str(exc).splitlines()
            fields = [{"field": m.group(1), "problem": m.group(2)}
                      for m in (re.match(r"^\s+- ([^:]+): (.*)$", ln) for ln in lines[1:]) if m]
            raise ApiError(422, "invalid_prompt", str(exc), fields=fields or None) from None
        production = await production_of(spec, body.against)
        rid = new_id()
        lease = await service.limiter.acquire(principal.key_id, rid, name=principal.name)
        caller = Caller(principal.key_id, principal.name, [lease])
        try:
            await service.charge(caller, len(body.listings), request_id=rid)
            started = time.perf_counter()
            drafts = await evaluate(spec, body.listings, f"{rid}-draft", started, session.name)
            current = (await evaluate(production.spec, body.listings, f"{rid}-prod", started,
                                      session.name) if production is not None else None)
        finally:
            await caller.release()
        draft_version = PromptVersion.model_construct(spec=spec, version=0, content_hash="",
                                                      created_at=datetime.now(UTC),
                                                      created_by=session.name)
        results = []
        for i, item in enumerate(body.listings):
            results.append({
                "listing": item.model_dump(),
                "draft": _evaluation_view(drafts[i], rendered(draft_version, item, i)),
                "production": None if current is None or production is None else
                _evaluation_view(current[i], rendered(production, item, i))})
        return json_response({
            "request_id": rid, "draft": {"name": spec.name, "model": spec.model,
                                         "content_hash": spec.content_hash()},
            "production": None if production is None else {
                "name": production.name, "version": production.version, "label": body.against},
            "results": results})

    # -- review -----------------------------------------------------------------------------

    @router.get("/api/review/schema")
    async def review_schema(request: Request) -> Response:
        """The labels a reviewer can give (the default prompt's production verdict schema)."""
        await signed_in(request, "feedback")
        resolved = await service.cache.resolve(settings.default_prompt, settings.default_label)
        schema = resolved.version.spec.verdict
        return json_response({
            "prompt": resolved.version.name, "version": resolved.version.version,
            "decisions": [d for d in schema.decisions if d != FAIL_CLOSED_DECISION],
            "categories": [c for c in schema.categories if c != "none"]})

    @router.post("/api/feedback")
    async def review(request: Request) -> Response:
        """Labels for several requests at once, each checked and recorded exactly as
        `POST /v1/feedback` does it (`FeedbackDesk`); errors per row. `dry_run`: only check."""
        _, principal = await signed_in(request, "feedback", write=True)
        batch: ReviewBatch = parse_body(ReviewBatch, await read_json_object(
            request, _FEEDBACK_MAX_BYTES, body_timeout()))
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, row in enumerate(batch.rows):
            out: dict[str, Any] = {"row": i + 1, "request_id": row.request_id}
            try:
                label = FeedbackRequest(request_id=row.request_id, decision=row.decision,
                                        category=row.category or None, note=row.note,
                                        reviewer=principal.name)
            except ValidationError as exc:
                results.append({**out, "ok": False, "errors": _field_errors(exc)})
                continue
            if label.request_id in seen:
                results.append({**out, "ok": False, "errors": [
                    {"field": "request_id", "problem": "listed twice in this batch"}]})
                continue
            seen.add(label.request_id)
            try:
                if batch.dry_run:
                    await desk.check(label)
                    results.append({**out, "ok": True, "answer": None})
                else:
                    results.append({**out, "ok": True,
                                    "answer": await desk.submit(principal, label)})
            except (ApiError, InvalidLabel) as exc:
                problem = problem_for(exc)
                assert problem is not None  # both are ours
                results.append({**out, "ok": False, "errors": list(problem.fields or [
                    {"field": "(row)", "problem": problem.message}])})
        ok = sum(1 for r in results if r["ok"])
        return JSONResponse({"dry_run": batch.dry_run, "ok": ok, "failed": len(results) - ok,
                             "results": results})

    router.include_router(build_queue_router(signed_in, app.state.review_queue))  # /console/queue
    add_operation_routes(router, signed_in, store, auth, service, settings,
                         queue=app.state.review_queue)
    return router
