"""`POST /v1/feedback`: reviewers give the correct label for a request the gateway answered.

Labels are the ground truth precision is measured against, and they decide rollout gates, so
they are checked before they count:

- the decision and category must exist in the answering version's verdict schema (the
  default prompt's production version when the request was not answered under a rollout),
  and make sense together: `allow` has no category (or `none`), `block` names one;
  `needs_review` is not a label (a reviewer decides). A 422 names the field;
- the reviewer is the API key (its name); a `reviewer` in the body is only a display name;
- one label per (request, reviewer): the same label again is a no-op, a changed one replaces
  the earlier one; the rollout evidence counts each *request* once, with its latest label
  (an earlier label's counts are retracted), which is the rule `modgate feedback quality`
  applies to the feedback log too;
- an `Idempotency-Key` header makes a retry a no-op that answers what the first call did;
- a request id the gateway has no verdict memo for (answered outside a rollout, older than the
  memo TTL, or never answered) is kept in the feedback log with `matched_rollout: false`: the
  offline tools join it with the decision log, where an id that never existed matches nothing
  and is reported as unmatched.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gateway.api.edge import ERROR_RESPONSES
from gateway.auth import Authenticator, _Anonymous
from gateway.feedback import FeedbackLog, check_label
from gateway.problems import ApiError
from gateway.prompt_cache import PromptCache
from gateway.rollouts.recorder import RolloutRecorder
from gateway.verdict import Verdict
from prompt_registry import (
    MemoStore,
    PromptNotFound,
    StoreUnavailable,
    VerdictSchema,
)
from prompt_registry.keys import ApiKeyRecord

__all__ = ["FeedbackDesk", "FeedbackRequest", "build_feedback_router"]

log = logging.getLogger("modgate.feedback")
AuthHeader = Annotated[str | None, Header()]
_IDENT = r"^[a-z][a-z0-9_]{0,47}$"


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(..., pattern=r"^[A-Za-z0-9._:-]{1,128}$",
                            description="the request_id of the moderation being reviewed")
    decision: str = Field(..., pattern=_IDENT, description="the correct decision: allow or block "
                          "(as the answering prompt's verdict schema names them)")
    category: str | None = Field(None, pattern=_IDENT, description="the correct category (none, "
                                 "or omitted, with allow)")
    reviewer: str = Field("", max_length=128, description="display name only: the reviewer is "
                          "the API key")
    note: str = Field("", max_length=2000)


_IDEMPOTENCY = r"^[A-Za-z0-9._:-]{1,128}$"
_MEMO_TTL_S = 30 * 24 * 3600.0


class FeedbackDesk:
    """What `POST /v1/feedback` does once the caller is known: check the label against the
    answering version's schema and count it. The route and the console's review form both
    call this, so a label from either is checked and counted the same way."""

    def __init__(self, store: MemoStore, recorder: RolloutRecorder, feedback_log: FeedbackLog | None,
                 *, cache: PromptCache, default_prompt: str, default_label: str) -> None:
        self.store, self.recorder, self.feedback_log, self.cache = store, recorder, feedback_log, cache
        self.default_prompt, self.default_label = default_prompt, default_label

    async def _recall(self, key: str) -> dict[str, object] | None:
        raw = await asyncio.to_thread(self.store.recall_verdict, key)
        memo: dict[str, object] | None = orjson.loads(raw) if raw else None
        return memo

    async def _remember(self, memos: dict[str, str]) -> None:
        await asyncio.to_thread(self.store.remember_verdicts, memos, ttl_s=_MEMO_TTL_S)

    async def _answering_schema(self, memo: dict[str, object] | None) -> VerdictSchema:
        """The verdict schema of the version that answered (the default prompt's production
        version when the request was not answered under a rollout)."""
        cache = self.cache
        try:
            version = (await cache.get_version(str(memo["prompt"]), int(memo["version"]))  # type: ignore[call-overload]
                       if memo else await cache.resolve(self.default_prompt, self.default_label)).version
        except PromptNotFound:
            version = (await cache.resolve(self.default_prompt, self.default_label)).version
        return version.spec.verdict

    async def check(self, body: FeedbackRequest) -> str | None:
        """Validate the label without recording anything: its category as it would count, or
        a 422 naming the field (the console's "check" before submitting)."""
        memo = await self._recall(body.request_id)
        return check_label(await self._answering_schema(memo), body.decision, body.category)

    async def submit(self, principal: ApiKeyRecord | _Anonymous, body: FeedbackRequest,
                     idempotency_key: str | None = None) -> dict[str, object]:
        """Check and record one label from *principal* (already authenticated and holding the
        `feedback` scope); the answer `POST /v1/feedback` sends."""
        idem = idempotency_key
        if idem is not None and not re.match(_IDEMPOTENCY, idem):
            raise ApiError(400, "invalid_value", "Idempotency-Key must be 1-128 characters of "
                           "[A-Za-z0-9._:-]", fields=[{"field": "Idempotency-Key", "problem": "malformed"}])
        idem_key = f"feedback-idem:{principal.key_id}:{idem}" if idem else None
        try:
            if idem_key is not None and (done := await self._recall(idem_key)) is not None:
                return done
            memo = await self._recall(body.request_id)
            previous = await self._recall(f"feedback:{body.request_id}")
        except StoreUnavailable as exc:
            log.warning("feedback for %s: registry unreachable: %s", body.request_id, exc)
            raise
        category = check_label(await self._answering_schema(memo), body.decision, body.category)
        reviewer = principal.name
        same = (previous is not None and previous.get("reviewer") == reviewer
                and previous.get("decision") == body.decision and previous.get("category") == category)
        answer: dict[str, object] = {"request_id": body.request_id, "matched_rollout": bool(memo),
                                     "reviewer": reviewer, "duplicate": same,
                                     "replaced": previous is not None and not same}
        if not same:
            record: dict[str, object] = {
                "ts": datetime.now(UTC).isoformat(), "request_id": body.request_id,
                "decision": body.decision, "category": category, "reviewer": reviewer,
                "display_name": body.reviewer or None, "note": body.note,
                "rollout_id": memo.get("rollout_id") if memo else None,
                "arm": memo.get("arm") if memo else None,
                "prompt_name": memo.get("prompt") if memo else None,
                "prompt_version": memo.get("version") if memo else None,
                "matched_rollout": bool(memo),
            }
            if self.feedback_log is not None:
                await self.feedback_log.append(record)
            memos = {f"feedback:{body.request_id}": orjson.dumps(
                {"reviewer": reviewer, "decision": body.decision, "category": category}).decode()}
            await self._remember(memos)
            if memo:
                answered = Verdict(str(memo["decision"]), memo.get("category"), None)  # type: ignore[arg-type]
                rid, arm = str(memo["rollout_id"]), str(memo["arm"])
                if previous is not None:  # the request's earlier label stops counting
                    self.recorder.feedback(rid, arm, answered, Verdict(
                        str(previous["decision"]), previous.get("category"), None),  # type: ignore[arg-type]
                        weight=-1)
                self.recorder.feedback(rid, arm, answered, Verdict(body.decision, category, None))
        if idem_key is not None:
            await self._remember({idem_key: orjson.dumps(answer).decode()})
        return answer


def build_feedback_router(store: MemoStore, auth: Authenticator, recorder: RolloutRecorder,
                          feedback_log: FeedbackLog | None, *, cache: PromptCache,
                          default_prompt: str, default_label: str) -> APIRouter:
    router = APIRouter(tags=["feedback"], responses=ERROR_RESPONSES)
    desk = FeedbackDesk(store, recorder, feedback_log, cache=cache, default_prompt=default_prompt,
                        default_label=default_label)

    @router.post("/v1/feedback", status_code=202)
    async def feedback(body: FeedbackRequest, request: Request, authorization: AuthHeader = None,
                       x_api_key: AuthHeader = None) -> Response:
        """Record a reviewer's correct label for a moderated request (scope `feedback`). Send an
        `Idempotency-Key` header to make retries safe."""
        principal = await auth.authenticate(authorization, x_api_key)
        auth.require(principal, "feedback")
        answer = await desk.submit(principal, body, request.headers.get("idempotency-key"))
        return Response(orjson.dumps(answer), status_code=202, media_type="application/json")

    return router
