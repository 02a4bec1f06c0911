"""The console's governance pages: publish, label moves, rollouts, evaluation and decisions.

One path: every write here calls what the admin API's route for the same thing calls, with the
same scopes, and nothing else.

- publish: `check_model_served` then `PromptStore.publish` (`POST /v1/prompts`), scope
  `prompts:publish`;
- a label move: `prompt_registry.ops.set_label` (`PUT /v1/prompts/{name}/labels/{label}`):
  `labels:write`, plus `labels:protected` for a protected label; the promotion gate, the model
  check, four eyes and the audited refusals are all inside it; an override needs `admin`;
- rollouts: `gateway.rollouts.ops.start_rollout` / `apply_action` with the admin API's request
  bodies (`RolloutStart`, `RolloutAction`) and its scopes (`CHANGE_SCOPES`, `admin` for an
  override); status and history through `rollout_status` / `rollout_history` /
  `rollout_detail`; the current rollout's flipped items carry their listing content, as `GET
  /v1/review/flips` joins it (`ReviewQueue.flips`), when the key has `samples:read`;
- evaluation: the stored scorecards, `gate_report` per version (the verdict and the policy
  that judged it) and `gate_policy_view`, as `GET /v1/prompts/{name}/scorecards|gate-policy`
  and `.../versions/{v}/gate` answer them;
- decisions: the gateway's own decision log through `gateway.decision_reader` (the reader
  the offline tools use), filtered and counted, or downloaded as CSV with a byte-order mark.

Writes have fixed paths (the prompt is named in the body): the request guard lets exactly these
paths through to authenticate by session and CSRF token before a byte of the body is read
(`WRITES`, part of `CONSOLE_WRITES`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response, StreamingResponse

from gateway.api.admin import LabelMove
from gateway.api.console.common import Body, Principal, SignedIn, parse_body
from gateway.api.edge import json_response, read_json_object
from gateway.api.review import ReviewQueue
from gateway.api.rollouts import CHANGE_SCOPES, RolloutAction, RolloutStart
from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.decision_reader import DecisionFilter, csv_lines, decision_counts
from gateway.moderation import ModerationService
from gateway.problems import ApiError
from gateway.rollouts.ops import (
    apply_action,
    rollout_detail,
    rollout_history,
    rollout_status,
    start_rollout,
)
from gateway.rollouts.promotion import ADMIN_SCOPE, report_dict
from prompt_registry import ApprovalRequired, GateOverride, PromptStore
from prompt_registry.gates import gate_report
from prompt_registry.loader import parse_prompt_text
from prompt_registry.models import MAX_VERSION
from prompt_registry.ops import check_model_served, gate_policy_view, set_label, summarize

__all__ = ["WRITES", "add_operation_routes"]

WRITES = frozenset({"/console/api/publish", "/console/api/label", "/console/api/rollout/start",
                    "/console/api/rollout/action"})
_PUBLISH_MAX_BYTES = 1 << 20
_WRITE_MAX_BYTES = 64 * 1024
_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_LABEL = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SAMPLES_SCOPE = "samples:read"  # reading listing content (gateway.api.review)
FLIPS = 20  # the flips a rollout's status lists (rollout_status's default)
MAX_DECISION_DAYS = 31  # the widest window one page or download reads


class Publish(Body):
    prompt: str = Field(..., min_length=1, max_length=_PUBLISH_MAX_BYTES)
    note: str = Field("", max_length=2000)


class ConsoleLabelMove(LabelMove):
    """`PUT /v1/prompts/{name}/labels/{label}`'s body, with the prompt and label named in it."""

    prompt: str = Field(..., pattern=_NAME)
    label: str = Field(..., pattern=_LABEL)


class ConsoleRolloutStart(RolloutStart):
    """`POST /v1/prompts/{name}/rollout`'s body, with the prompt named in it."""

    prompt: str = Field(..., pattern=_NAME)


class ConsoleRolloutAction(RolloutAction):
    """`POST /v1/prompts/{name}/rollout/{action}`'s body, with prompt and action in it."""

    prompt: str = Field(..., pattern=_NAME)
    action: Literal["step", "pause", "resume", "promote", "abort"]


def _override(auth: Authenticator, p: Principal, body: Any) -> GateOverride | None:
    """The admin API's override rule: only a key with `admin` may override a gate."""
    if getattr(body, "override", None) is None:
        return None
    auth.require(p, ADMIN_SCOPE)
    return GateOverride(reason=body.override.reason, by=p.name)


def _time(raw: str | None, field: str, default: datetime) -> datetime:
    if raw is None or raw == "":
        return default
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{field} is not an ISO 8601 time",
                       fields=[{"field": field, "problem": "not an ISO 8601 time"}]) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def decision_filter(params: dict[str, str], now: datetime) -> DecisionFilter:
    """The Decisions page's query: `since`/`until` (ISO 8601, default the last 24 hours, at most
    `MAX_DECISION_DAYS` apart), `prompt`, `version`, `arm`, `category`, `locale`."""
    until = _time(params.get("until"), "until", now)
    since = _time(params.get("since"), "since", until - timedelta(hours=24))
    if since >= until:
        raise ApiError(422, "invalid_request", "since must be before until",
                       fields=[{"field": "since", "problem": "not before until"}])
    if until - since > timedelta(days=MAX_DECISION_DAYS):
        raise ApiError(422, "invalid_request", f"at most {MAX_DECISION_DAYS} days at a time",
                       fields=[{"field": "since", "problem": "window too wide"}])
    version = params.get("version") or None
    if version is not None and (not version.isdigit() or not 1 <= int(version) <= MAX_VERSION):
        raise ApiError(422, "invalid_request", "version must be a version number",
                       fields=[{"field": "version", "problem": "not a version number"}])
    text: dict[str, str | None] = {}
    for field in ("prompt", "arm", "category", "locale"):
        value = params.get(field) or None
        if value is not None and (len(value) > 64 or not value.replace("-", "").replace("_", "")
                                  .replace(".", "").isalnum()):
            raise ApiError(422, "invalid_request", f"{field} has characters it cannot have",
                           fields=[{"field": field, "problem": "not a name"}])
        text[field] = value
    return DecisionFilter(since=since, until=until, prompt=text["prompt"],
                          version=int(version) if version else None, arm=text["arm"],
                          category=text["category"], locale=text["locale"])


def add_operation_routes(router: APIRouter, signed_in: SignedIn, store: PromptStore,
                         auth: Authenticator, service: ModerationService,
                         settings: GatewaySettings, *, queue: ReviewQueue | None = None) -> None:
    """*queue*: the review queue (its sample store joins listing content onto flips)."""
    production = settings.default_label
    served = list(service.served_models) or None

    async def changed(name: str) -> None:
        await service.cache.refresh_now(name)

    async def body_of(request: Request, model: type[BaseModel], limit: int = _WRITE_MAX_BYTES) -> Any:
        return parse_body(model, await read_json_object(request, limit, settings.body_timeout_s))

    # -- publish ------------------------------------------------------------------------------

    @router.post("/api/publish")
    async def publish(request: Request) -> Response:
        """Publish a draft (the playground's YAML) as `POST /v1/prompts` does: the model check,
        then the store; identical content answers the existing version (`created` false)."""
        _, p = await signed_in(request, "prompts:publish", write=True)
        body: Publish = await body_of(request, Publish, _PUBLISH_MAX_BYTES + 4096)
        spec = parse_prompt_text(body.prompt, source="draft")
        check_model_served(spec, served)
        result = await asyncio.to_thread(store.publish, spec, actor=p.name, note=body.note)
        await changed(spec.name)
        v = result.version
        return json_response({"created": result.created, "name": v.name, "version": v.version,
                              "content_hash": v.content_hash}, 201 if result.created else 200)

    # -- label moves --------------------------------------------------------------------------

    @router.post("/api/label")
    async def move(request: Request) -> Response:
        """Point a label at a version through `set_label`, with the admin API's scopes. A gate
        refusal is a 409 naming each failed criterion; under four eyes the answer is 202 with
        the pending request."""
        session, p = await signed_in(request, "labels:write", write=True)
        body: ConsoleLabelMove = await body_of(request, ConsoleLabelMove)
        if body.label in settings.protected_labels:
            auth.require(p, "labels:protected")
        override = _override(auth, p, body)
        try:
            previous, report = await asyncio.to_thread(
                set_label, store, body.prompt, body.label, body.version,
                expected=body.expected_version, actor=p.name, note=body.note, override=override,
                production_label=production, served_models=served, holder=p.name)
        except ApprovalRequired as exc:
            return json_response({"name": body.prompt, "label": body.label,
                                  "status": "approval_required", "message": str(exc),
                                  "approval": exc.request.as_dict()}, 202)
        await changed(body.prompt)
        return json_response({"name": body.prompt, "label": body.label, "status": "moved",
                              "from_version": previous, "to_version": body.version,
                              "gate": report_dict(report)})

    # -- rollouts -----------------------------------------------------------------------------

    def status_or_none(name: str) -> dict[str, Any] | None:
        if store.get_rollout(name) is None:
            return None
        return rollout_status(store, name, flips=FLIPS, production_label=production)

    @router.get("/api/rollouts/{name}")
    async def rollouts(name: str, request: Request) -> Response:
        """The prompt's current (or last) rollout with its live evidence, and every rollout."""
        _, p = await signed_in(request, "prompts:read")

        def work() -> dict[str, Any]:
            summary = summarize(store, name)  # 404 for an unknown prompt
            return {"name": name, "versions": summary.versions, "labels": summary.labels,
                    "production_label": production, "status": status_or_none(name),
                    "history": rollout_history(store, name, production_label=production)}
        data = await asyncio.to_thread(work)
        status = data["status"]
        if status is not None:
            # flips_content: "shown", "no_scope" (the store may hold some; the key may not
            # read it) or "off" (no sample store)
            if queue is None or queue.samples is None:
                status["flips_content"] = "off"
            elif not p.allows(SAMPLES_SCOPE):
                status["flips_content"] = "no_scope"
            else:
                joined = await queue.flips(store, name, n=FLIPS)
                status["flips"], status["flips_content"] = joined["flips"], "shown"
        return json_response(data)

    @router.get("/api/rollouts/{name}/{rollout_id}")
    async def rollout(name: str, rollout_id: str, request: Request) -> Response:
        await signed_in(request, "prompts:read")
        if not _ID.match(rollout_id):
            raise ApiError(404, "not_found", "no such rollout")
        return json_response(await asyncio.to_thread(rollout_detail, store, name, rollout_id,
                                                     production_label=production))

    async def change_principal(request: Request) -> Principal:
        _, p = await signed_in(request, CHANGE_SCOPES[0], write=True)
        for scope in CHANGE_SCOPES[1:]:
            auth.require(p, scope)
        return p

    @router.post("/api/rollout/start")
    async def start(request: Request) -> Response:
        """`start_rollout` with `POST /v1/prompts/{name}/rollout`'s body and scopes."""
        p = await change_principal(request)
        body: ConsoleRolloutStart = await body_of(request, ConsoleRolloutStart)
        override = _override(auth, p, body)
        await asyncio.to_thread(
            start_rollout, store, body.prompt, canary_version=body.canary_version, steps=body.steps,
            shadows=body.shadows, step_hold_s=body.step_hold_s, gates=body.gates, auto=body.auto,
            subject_key=body.subject_key, actor=p.name, production_label=production, note=body.note,
            override=override, unproven_max_weight=body.max_unproven_weight,
            on_promotion_refused=body.on_promotion_refused, served_models=served)
        await changed(body.prompt)
        return json_response(await asyncio.to_thread(rollout_status, store, body.prompt,
                                                     production_label=production), 201)

    @router.post("/api/rollout/action")
    async def act(request: Request) -> Response:
        """`apply_action` as `POST /v1/prompts/{name}/rollout/{action}` calls it."""
        p = await change_principal(request)
        body: ConsoleRolloutAction = await body_of(request, ConsoleRolloutAction)
        override = _override(auth, p, body) if body.action == "promote" else None
        await asyncio.to_thread(apply_action, store, body.prompt, body.action, actor=p.name,
                                note=body.note, production_label=production, override=override)
        await changed(body.prompt)
        return json_response(await asyncio.to_thread(rollout_status, store, body.prompt,
                                                     production_label=production))

    # -- evaluation ---------------------------------------------------------------------------

    @router.get("/api/evaluation/{name}")
    async def evaluation(name: str, request: Request) -> Response:
        """Every stored scorecard of the prompt, the policy in force, and the promotion gate's
        verdict for each version that has a scorecard (and the latest), with the policy that
        judged it."""
        await signed_in(request, "prompts:read")

        def work() -> dict[str, Any]:
            summary = summarize(store, name)
            cards = [r.as_dict() for r in store.list_scorecards(name)]
            judged = sorted({*(c["version"] for c in cards), summary.versions[-1]})
            return {"name": name, "versions": summary.versions, "labels": summary.labels,
                    "production_label": production, "scorecards": cards,
                    "policy": gate_policy_view(store, name, production_label=production),
                    "gates": {str(v): gate_report(store, name, v, production_label=production).as_dict()
                              for v in judged}}
        return json_response(await asyncio.to_thread(work))

    # -- decisions ----------------------------------------------------------------------------

    def log_root() -> Path:
        if service.decision_log is None:
            raise ApiError(404, "not_found", "the decision log is switched off on this gateway "
                           "(decision_log.enabled in the configuration)")
        return service.decision_log.root

    @router.get("/api/decisions")
    async def decisions(request: Request) -> Response:
        """Counts and flag rates of the decisions in a window, filtered by prompt, version, arm,
        category and locale, and the newest of them (ids and verdicts; no content is logged).
        The totals count what callers were answered; shadow evaluations have their own rows
        (and are the totals when the filter asks for the shadow arm)."""
        await signed_in(request, "prompts:read")
        query = decision_filter(dict(request.query_params), datetime.now(UTC))
        root = log_root()

        def work() -> dict[str, Any]:
            return decision_counts(query.read(root), served_only=query.arm != "shadow")
        counts = await asyncio.to_thread(work)
        return json_response({"since": query.since.isoformat(), "until": query.until.isoformat(),
                              **counts})

    @router.get("/api/decisions.csv")
    async def decisions_csv(request: Request) -> Response:
        """The same selection as spreadsheet CSV (UTF-8 with a byte-order mark, so Chinese
        reads right; the columns of `modgate decisions export --format csv`), every arm,
        shadows included; moderations only (the export also writes raw chat records)."""
        await signed_in(request, "prompts:read")
        query = decision_filter(dict(request.query_params), datetime.now(UTC))
        root = log_root()

        def lines() -> Iterator[bytes]:
            for line in csv_lines(query.read(root)):
                yield line.encode("utf-8")
        name = f"decisions-{query.since:%Y%m%dT%H%M%S}-{query.until:%Y%m%dT%H%M%S}.csv"
        return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                                 headers={"content-disposition": f'attachment; filename="{name}"'})

