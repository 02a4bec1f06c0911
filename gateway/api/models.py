"""Wire models of the caller API (`POST /v1/moderate`).

Requests are strict: an unknown field is a 422, because a misspelt `descripton` silently
ignored would moderate the wrong content.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gateway.api.probabilities import ProbabilitySource
from prompt_registry.locales import normalize_locale
from prompt_registry.models import MAX_VERSION

__all__ = ["ErrorBody", "ErrorDetail", "ModerationRequest", "ModerationResponse", "PromptRef", "Usage"]

_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


def _json_integer(value: object) -> object:
    """JSON Schema's integer: an int, or a number with no fraction (1.0); never a bool or a
    string (pydantic's lax mode would take `true` and `"1"`)."""
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


VersionNumber = Annotated[int, Field(ge=1, le=MAX_VERSION), BeforeValidator(_json_integer)]


def _locale(value: object) -> object:
    return normalize_locale(value) if isinstance(value, str) else value


# The pattern documents (and lets schema-driven clients generate) what normalize_locale takes.
Locale = Annotated[str, Field(pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z]{4})?([-_]([A-Za-z]{2}|[0-9]{3}))?$"),
                   BeforeValidator(_locale)]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    item_id: str = Field(..., pattern=_ID, description="listing id")
    seller_id: str | None = Field(None, pattern=_ID, description="seller id (traffic stickiness "
                                  "key); optional: without it the item id is the stickiness key")
    title: str = Field(..., min_length=1)
    description: str = ""
    locale: Locale | None = Field(None, description="BCP 47 (`zh-CN`, `zh_CN`, `zh-Hant-TW`, "
                                  "`es-419` ...): picks the prompt's locale variant; omitted: the "
                                  "prompt's default locale")
    prompt: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                               description="prompt name; the gateway default when omitted")
    prompt_version: VersionNumber | None = Field(None,
                                       description="pin a version (testing); bypasses rollouts and "
                                       "answers with arm 'pinned'")
    subject: str | None = Field(None, pattern=_ID, description="stickiness key for canary "
                                "assignment; default: seller_id (or item_id, per rollout)")


class PromptRef(BaseModel):
    name: str
    version: int
    label: str | None = Field(..., description="the label that resolved the version; null for the "
                              "canary and pinned arms")
    locale: str = Field(..., description="locale variant of the prompt that was used")
    stale: bool = Field(False, description="true when the registry was unreachable and the "
                        "last-known-good version served")
    deprecated: bool = Field(False, description="true when a pinned version was deprecated by an "
                             "operator: still answered, but move off it (a blocked version is "
                             "refused with 410 version_blocked)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class ModerationResponse(BaseModel):
    request_id: str
    item_id: str
    decision: str = Field(..., description="allow | block | needs_review (per the prompt's schema)")
    category: str | None
    confidence: float | None = Field(None, description="the confidence the model wrote in its "
                                     "answer (not a probability)")
    decision_probability: float | None = Field(
        None, description="calibrated probability of the decision the model generated, from the "
        "engine's token log-probabilities renormalised over the allowed decisions; null when the "
        "engine reported none")
    category_probability: float | None = Field(None, description="calibrated probability of the "
                                               "category, given the decision; null as above")
    probability_source: ProbabilitySource = Field(
        "unavailable", description="where the probabilities come from: logprobs (the engine's "
        "token log-probabilities); unavailable (the model answered without usable "
        "log-probabilities: both are null); fail_closed (no usable answer: both are null)")
    probability_unresolved: float | None = Field(
        None, description="mass the engine's top alternatives left unattributed (0: exact); each "
        "probability lies between its estimate's attributed mass and that plus this")
    model_decision: str | None = Field(
        None, description="the decision the model generated, whose probability "
        "decision_probability is; differs from decision only when decided_by is not model; null "
        "when the output was unusable, and null (with both probabilities) when an operating point "
        "overruled a model allow: an answer never shows allow beside needs_review or block; the "
        "decision log keeps it")
    decided_by: Literal["model", "threshold", "fail_closed"] = Field(
        "model", description="model: its decision stands; threshold: the prompt version's "
        "operating point for the category decided from the calibrated block probability; "
        "fail_closed: no usable answer (or no probability where an operating point applies)")
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
