"""Reviewer feedback: `POST /v1/feedback` takes the correct label for a request the gateway
answered.

Every label is appended to a feedback log (JSONL, one file per day and replica, under
`data_dir/feedback/`) to be joined with the decision log on `request_id` for precision and
recall per prompt version. A label for a request that was answered under a rollout is also
matched (through the verdict memo kept in the registry store) to the arm and version that
answered it, and counted as true/false positives per category for the rollout's precision and
recall gates.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES
from gateway.auth import Authenticator
from gateway.rollouts.recorder import RolloutRecorder
from gateway.verdict import Verdict
from prompt_registry import PromptStore, StoreUnavailable

__all__ = ["FeedbackLog", "FeedbackRequest", "build_feedback_router"]

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


class FeedbackLog:
    """Append-only JSONL files, written in a worker thread; one file per UTC day and replica."""

    def __init__(self, directory: Path, *, replica: str | None = None) -> None:
        self.directory = directory
        self.replica = replica or socket.gethostname()
        self._lock = threading.Lock()

    def _append(self, line: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        day = datetime.now(UTC).strftime("%Y%m%d")
        with self._lock, (self.directory / f"feedback-{day}-{self.replica}.jsonl").open("ab") as fh:
            fh.write(line + b"\n")

    async def append(self, record: dict[str, object]) -> None:
        await asyncio.to_thread(self._append, orjson.dumps(record))


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
