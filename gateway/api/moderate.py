"""`POST /v1/moderate`: our own front door. Parses the listing, calls the moderation service,
renders the verdict. Served as a `DirectRoute` matched first (no per-request dependency
solving: it is the hot route)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from opentelemetry import trace
from pydantic import ValidationError
from starlette.responses import Response

from gateway.api.edge import json_answer, read_json_object, serve, unless_disconnected
from gateway.api.models import ErrorBody, ModerationRequest, ModerationResponse
from gateway.api.probabilities import verdict_fields
from gateway.api.routing import DirectRoute
from gateway.moderation import Caller, Moderation, ModerationCall, ModerationService
from gateway.problems import ApiError
from gateway.telemetry import Attr, Metrics

__all__ = ["add_moderate_route", "validation_fields"]

ROUTE = "/v1/moderate"


def validation_fields(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        out.append({"field": loc, "problem": msg})
    return out


def _body(result: Moderation) -> dict[str, Any]:
    ev = result.evaluation
    return {
        "request_id": result.request_id,
        "item_id": result.item_id,
        **verdict_fields(result.verdict),
        "prompt": ev.prompt_ref(),
        "arm": result.arm,
        "model": ev.result.model,
        "latency_ms": round(result.latency_ms, 3),
        "usage": {"prompt_tokens": ev.result.prompt_tokens,
                  "completion_tokens": ev.result.completion_tokens},
        "trace_id": result.trace_id,
    }


def add_moderate_route(app: FastAPI, service: ModerationService, tracer: trace.Tracer,
                       metrics: Metrics) -> None:
    settings = service.settings

    async def work(request: Request, caller: Caller, rid: str, started: float,
                   root: trace.Span) -> Response:
        payload = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
        try:
            req = ModerationRequest.model_validate(payload)
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", "request body failed validation",
                           fields=validation_fields(exc)) from None
        if len(req.title) > settings.max_title_chars or len(req.description) > settings.max_description_chars:
            raise ApiError(422, "content_too_long", "listing content exceeds the size limit", fields=[
                {"field": f, "problem": f"longer than {limit} characters"}
                for f, value, limit in (("title", req.title, settings.max_title_chars),
                                        ("description", req.description, settings.max_description_chars))
                if len(value) > limit])
        call = ModerationCall(
            front_door="moderate", request_id=rid, item_id=req.item_id, variables=req.model_dump(),
            locale=req.locale, prompt=req.prompt, version=req.prompt_version, subject=req.subject,
            seller_id=req.seller_id, caller=caller.name, may_pin=caller.may_pin)
        result = await unless_disconnected(request, service.moderate(call, started=started))
        if root.is_recording():  # 9 requests in 10 are not sampled: no calls that do nothing
            root.set_attribute(Attr.PROMPT_NAME, result.version.name)
            root.set_attribute(Attr.PROMPT_VERSION, result.version.version)
            root.set_attribute(Attr.TRAFFIC_ARM, result.arm)
            root.set_attribute(Attr.DECISION, result.verdict.decision)
        return json_answer(_body(result), rid)

    async def moderate(request: Request) -> Response:
        """Moderate one listing with the prompt's `production` version (or its rollout's
        assignment). Needs the `moderate` scope."""
        return await serve(request, route=ROUTE, service=service, tracer=tracer, metrics=metrics,
                           work=work)

    app.router.add_api_route(
        ROUTE, moderate, methods=["POST"], route_class_override=DirectRoute,
        response_model=ModerationResponse,
        responses={code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 429, 502, 503, 504)},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": ModerationRequest.model_json_schema()}}}},
    )
    app.router.routes.insert(0, app.router.routes.pop())
