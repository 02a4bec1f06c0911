"""Wire models of the caller API (`POST /v1/moderate`).

Requests are strict: an unknown field is a 422, because a misspelt `descripton` silently
ignored would moderate the wrong content.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorBody", "ErrorDetail", "ModerationRequest", "ModerationResponse", "PromptRef", "Usage"]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    item_id: str = Field(..., pattern=_ID, description="listing id")
    seller_id: str = Field(..., pattern=_ID, description="seller id (traffic stickiness key)")
    title: str = Field(..., min_length=1)
    description: str = ""
    locale: str = Field("en-US", pattern=r"^[a-z]{2,3}(-[A-Z][A-Za-z]{1,3})?$")
    prompt: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                               description="prompt name; the gateway default when omitted")
    prompt_version: int | None = Field(None, ge=1, description="pin a version (testing); bypasses "
                                       "rollouts and answers with arm 'pinned'")
    subject: str | None = Field(None, pattern=_ID, description="stickiness key for canary "
                                "assignment; default: seller_id (or item_id, per rollout)")


class PromptRef(BaseModel):
    name: str
    version: int
    label: str
    locale: str = Field(..., description="locale variant of the prompt that was used")
    stale: bool = Field(False, description="true when the registry was unreachable and the "
                        "last-known-good version served")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ModerationResponse(BaseModel):
    request_id: str
    item_id: str
    decision: str = Field(..., description="allow | block | needs_review (per the prompt's schema)")
    category: str | None
    confidence: float | None = None
    fail_reason: str | None = Field(
        None, description="set when the model's output could not be used; decision is then "
        "needs_review")
    prompt: PromptRef
    arm: str = Field("stable", description="stable | canary | pinned")
    model: str
    latency_ms: float
    usage: Usage
    trace_id: str | None = Field(None, description="W3C trace id when the request was traced")


class ErrorDetail(BaseModel):
    type: str
    message: str
    fields: list[dict[str, str]] | None = None
    retryable: bool = False


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str | None = None
