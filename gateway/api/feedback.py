"""`POST /v1/feedback`: reviewers give the correct label for a request the gateway answered.

The label goes to the feedback log (`gateway.feedback`) and, for a request answered under a
rollout, to the rollout's evidence through the verdict memo (see `gateway.rollouts.recorder`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES
from gateway.auth import Authenticator
from gateway.feedback import FeedbackLog
from gateway.rollouts.recorder import RolloutRecorder
from gateway.verdict import Verdict
from prompt_registry import PromptStore, StoreUnavailable

__all__ = ["FeedbackRequest", "build_feedback_router"]

log = logging.getLogger("modgate.feedback")
AuthHeader = Annotated[str | None, Header()]
_IDENT = r"^[a-z][a-z0-9_]{0,47}$"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(..., pattern=r"^[A-Za-z0-9._:-]{1,128}$",
                            description="the request_id of the moderation being reviewed")
    decision: str = Field(..., pattern=_IDENT, description="the correct decision")
    category: str | None = Field(None, pattern=_IDENT, description="the correct category")
    reviewer: str = Field("", max_length=128)
    note: str = Field("", max_length=2000)


def build_feedback_router(store: PromptStore, auth: Authenticator, recorder: RolloutRecorder,
                          feedback_log: FeedbackLog | None) -> APIRouter:
    router = APIRouter(tags=["feedback"], responses=ERROR_RESPONSES)

    @router.post("/v1/feedback", status_code=202)
    async def feedback(body: FeedbackRequest, authorization: AuthHeader = None,
                       x_api_key: AuthHeader = None) -> Response:
        """Record a reviewer's correct label for a moderated request (scope `feedback`)."""
        principal = await auth.authenticate(authorization, x_api_key)
        auth.require(principal, "feedback")
        memo = None
        try:
            raw = await asyncio.to_thread(store.recall_verdict, body.request_id)
            memo = orjson.loads(raw) if raw else None
        except StoreUnavailable as exc:
            log.warning("feedback for %s not matched to a rollout: %s", body.request_id, exc)
        record: dict[str, object] = {
            "ts": datetime.now(UTC).isoformat(), "request_id": body.request_id,
            "decision": body.decision, "category": body.category,
            "reviewer": body.reviewer or principal.name, "note": body.note,
            "rollout_id": memo.get("rollout_id") if memo else None,
            "arm": memo.get("arm") if memo else None,
            "prompt_name": memo.get("prompt") if memo else None,
            "prompt_version": memo.get("version") if memo else None,
        }
        if feedback_log is not None:
            await feedback_log.append(record)
        if memo:
            recorder.feedback(memo["rollout_id"], memo["arm"],
                              Verdict(memo["decision"], memo["category"], None),
                              Verdict(body.decision, body.category, None))
        return Response(orjson.dumps({"request_id": body.request_id, "matched_rollout": bool(memo)}),
                        status_code=202, media_type="application/json")

    return router
