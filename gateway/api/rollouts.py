"""Admin API for rollouts: start, status, step, pause, resume, promote, abort, and the
history (`GET /v1/prompts/{name}/rollouts`, `GET /v1/prompts/{name}/rollouts/{id}`).

Reading needs `prompts:read`; starting or changing a rollout needs what moving `production`
needs (`labels:write` and `labels:protected`), because a rollout puts a version in front of
production traffic and can move `production` (by promotion) on its own. The promotion gate
guards the traffic as well as the label: starting a rollout of a canary version whose gate
fails answers 409 `promotion_gate_failed` unless the body carries `{"override": {"reason":
"..."}}` from a key with the `admin` scope (recorded in the audit log), and a canary that has
not passed its gate never gets more than `max_unproven_weight` % of traffic (409
`rollout_state` for steps past it). Promotion goes through the gate the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES, json_response
from gateway.auth import Authenticator
from gateway.rollouts.ops import (
    apply_action,
    rollout_detail,
    rollout_history,
    rollout_status,
    start_rollout,
)
from gateway.rollouts.promotion import ADMIN_SCOPE, OVERRIDE_PURPOSE, GateOverrideBody
from prompt_registry import GateOverride, PromptStore
from prompt_registry.models import MAX_VERSION
from prompt_registry.rollouts import UNPROVEN_MAX_WEIGHT, GateConfig, ShadowSpec

# What a rollout change needs: what moving the production label needs (gateway.api.admin).
CHANGE_SCOPES = ("labels:write", "labels:protected")

__all__ = ["RolloutStart", "build_rollout_router"]

AuthHeader = Annotated[str | None, Header()]


class RolloutStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    canary_version: int | None = Field(None, ge=1, le=MAX_VERSION)
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100], description="canary weights in %")
    shadows: list[ShadowSpec] = Field(default_factory=list)
    step_hold_s: float = Field(3600.0, ge=0)
    gates: GateConfig = Field(default_factory=GateConfig)
    auto: bool = True
    subject_key: Literal["seller_id", "item_id", "subject"] = "seller_id"
    note: str = Field("", max_length=2000)
    max_unproven_weight: int = Field(
        UNPROVEN_MAX_WEIGHT, ge=0, le=99, description="the most traffic (%) the canary gets while it has "
        "not passed its promotion gate; past it, the next step is the promotion itself")
    on_promotion_refused: Literal["last_safe", "zero"] = Field(
        "last_safe", description="where the canary weight goes when the gate refuses its promotion")
    override: GateOverrideBody | None = Field(
        None, description="start although the canary version fails its promotion gate (needs the "
        "admin scope; recorded in the audit log). It still gets at most max_unproven_weight %.")


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000)
    override: GateOverrideBody | None = Field(
        None, description="promote: move production although the promotion gate fails (needs "
        "the admin scope; recorded in the audit log). Ignored by the other actions.")




def build_rollout_router(store: PromptStore, auth: Authenticator, *, production_label: str,
                         on_change: Callable[[str], Awaitable[None]] | None = None,
                         served_models: list[str] | None = None) -> APIRouter:
    """*served_models*: a rollout whose canary or shadow names another model is refused
    (422 `unknown_model`). None: no check."""
    async def changed(name: str) -> None:
        if on_change is not None:
            await on_change(name)

    router = APIRouter(prefix="/v1/prompts/{name}/rollout", tags=["rollouts"], responses=ERROR_RESPONSES)

    async def who(authorization: str | None, x_api_key: str | None, scope: str) -> str:
        return str((await principal(authorization, x_api_key, scope)).name)

    async def principal(authorization: str | None, x_api_key: str | None, *scopes: str) -> Any:
        p = await auth.authenticate(authorization, x_api_key)
        for scope in scopes:
            auth.require(p, scope)
        return p

    def status_of(name: str) -> dict[str, Any]:
        return rollout_status(store, name, production_label=production_label)

    @router.post("", status_code=201)
    async def start(name: str, body: RolloutStart, authorization: AuthHeader = None,
                    x_api_key: AuthHeader = None) -> Response:
        """Start a rollout: a canary version at the first weight step, and/or shadow versions."""
        p = await principal(authorization, x_api_key, *CHANGE_SCOPES)
        override = None
        if body.override is not None:
            auth.require(p, ADMIN_SCOPE, OVERRIDE_PURPOSE)
            override = GateOverride(reason=body.override.reason, by=p.name)
        await asyncio.to_thread(
            start_rollout, store, name, canary_version=body.canary_version, steps=body.steps,
            shadows=body.shadows, step_hold_s=body.step_hold_s, gates=body.gates, auto=body.auto,
            subject_key=body.subject_key, actor=p.name, production_label=production_label, note=body.note,
            override=override, unproven_max_weight=body.max_unproven_weight,
            on_promotion_refused=body.on_promotion_refused, served_models=served_models)
        await changed(name)
        return json_response(await asyncio.to_thread(status_of, name), 201)

    @router.get("")
    async def status(name: str, authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Weights, sample counts, gate values with their intervals, next step, flipped items."""
        await who(authorization, x_api_key, "prompts:read")
        return json_response(await asyncio.to_thread(status_of, name))

    @router.post("/{action}")
    async def act(name: str, action: Annotated[Literal["step", "pause", "resume", "promote", "abort"], Path()],
                  body: RolloutAction | None = None, authorization: AuthHeader = None,
                  x_api_key: AuthHeader = None) -> Response:
        """Apply a transition. `promote` moves production through the promotion gate (409
        `promotion_gate_failed` when it fails, unless an admin overrides it)."""
        p = await principal(authorization, x_api_key, *CHANGE_SCOPES)
        override = None
        if action == "promote" and body is not None and body.override is not None:
            auth.require(p, ADMIN_SCOPE, OVERRIDE_PURPOSE)
            override = GateOverride(reason=body.override.reason, by=p.name)
        await asyncio.to_thread(apply_action, store, name, action, actor=p.name,
                                note=body.note if body else "", production_label=production_label,
                                override=override)
        await changed(name)
        return json_response(await asyncio.to_thread(status_of, name))

    history = APIRouter(prefix="/v1/prompts/{name}/rollouts", tags=["rollouts"], responses=ERROR_RESPONSES)

    @history.get("")
    async def list_rollouts(name: str, authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """Every rollout of the prompt, finished ones included, newest first."""
        await who(authorization, x_api_key, "prompts:read")
        items = await asyncio.to_thread(rollout_history, store, name, production_label=production_label)
        return json_response({"name": name, "rollouts": items})

    @history.get("/{rollout_id}")
    async def show_rollout(name: str, rollout_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
                           authorization: AuthHeader = None, x_api_key: AuthHeader = None) -> Response:
        """One rollout by id: what happened, what serves now, every transition with its evidence."""
        await who(authorization, x_api_key, "prompts:read")
        return json_response(await asyncio.to_thread(rollout_detail, store, name, rollout_id,
                                                     production_label=production_label))

    outer = APIRouter()
    outer.include_router(router)
    outer.include_router(history)
    return outer
