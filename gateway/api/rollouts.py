"""Admin API for rollouts: start, status, step, pause, resume, promote, abort.

Reading needs `prompts:read`; changing a rollout needs `labels:protected`, because a rollout
can move `production` (by promotion) on its own. Promotion goes through the promotion gate:
409 `promotion_gate_failed` naming the failed criteria, unless the body carries
`{"override": {"reason": "..."}}` from a key with the `admin` scope.
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
from gateway.rollouts.ops import apply_action, rollout_status, start_rollout
from gateway.rollouts.promotion import ADMIN_SCOPE, GateOverrideBody
from prompt_registry import GateOverride, PromptStore
from prompt_registry.models import MAX_VERSION
from prompt_registry.rollouts import GateConfig, ShadowSpec

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


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000)
    override: GateOverrideBody | None = Field(
        None, description="promote: move production although the promotion gate fails (needs "
        "the admin scope; recorded in the audit log). Ignored by the other actions.")




def build_rollout_router(store: PromptStore, auth: Authenticator, *, production_label: str,
                         on_change: Callable[[str], Awaitable[None]] | None = None) -> APIRouter:
    async def changed(name: str) -> None:
        if on_change is not None:
            await on_change(name)

    router = APIRouter(prefix="/v1/prompts/{name}/rollout", tags=["rollouts"], responses=ERROR_RESPONSES)

    async def who(authorization: str | None, x_api_key: str | None, scope: str) -> str:
        return (await principal(authorization, x_api_key, scope)).name

    async def principal(authorization: str | None, x_api_key: str | None, scope: str) -> Any:
        p = await auth.authenticate(authorization, x_api_key)
        auth.require(p, scope)
        return p

    def status_of(name: str) -> dict[str, Any]:
        return rollout_status(store, name, production_label=production_label)

    @router.post("", status_code=201)
    async def start(name: str, body: RolloutStart, authorization: AuthHeader = None,
                    x_api_key: AuthHeader = None) -> Response:
        """Start a rollout: a canary version at the first weight step, and/or shadow versions."""
        actor = await who(authorization, x_api_key, "labels:protected")
        await asyncio.to_thread(
            start_rollout, store, name, canary_version=body.canary_version, steps=body.steps,
            shadows=body.shadows, step_hold_s=body.step_hold_s, gates=body.gates, auto=body.auto,
            subject_key=body.subject_key, actor=actor, production_label=production_label, note=body.note)
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
        p = await principal(authorization, x_api_key, "labels:protected")
        override = None
        if action == "promote" and body is not None and body.override is not None:
            auth.require(p, ADMIN_SCOPE)
            override = GateOverride(reason=body.override.reason, by=p.name)
        await asyncio.to_thread(apply_action, store, name, action, actor=p.name,
                                note=body.note if body else "", production_label=production_label,
                                override=override)
        await changed(name)
        return json_response(await asyncio.to_thread(status_of, name))

    return router
