"""Failures inside the gateway, and the one table that says how each is answered.

Layers below the HTTP adapters (auth, caller limits, admission, the moderation service, the
registry, the serving backends) raise *domain* exceptions that carry no HTTP status. The edge
turns any exception into a `Problem` with `problem_for`, which looks the exception's class up
along its method resolution order in `PROBLEM_TABLE`, so a subclass inherits its parent's
answer unless it has a row of its own. Each surface then renders the same `Problem` in its
own wire format (`gateway.api.edge`: ours, OpenAI's JSON and OpenAI's SSE error event), so a
failure has the same `type` and status on every route. `docs/failure-semantics.md` is checked
against this table by a test, so the documented failures cannot drift from the real ones.

Anything not in the table is a bug, answered as a 500 `internal_error` whose body says
nothing more (the exception is logged). In particular `ValueError` is *not* mapped: a
`ValueError` escaping a handler is our bug, not the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.decision_log import DecisionLogUnavailable
from prompt_registry import (
    GatePolicyConflict,
    GatePolicyInvalid,
    LabelConflict,
    LifecycleConflict,
    PromptFileError,
    PromptNotFound,
    RenderError,
    StoreUnavailable,
    TemplateRejected,
    UnservedModel,
    VersionBlocked,
    VersionRetired,
)
from prompt_registry.gates import GateRefused, ScorecardMismatch
from prompt_registry.ops import NothingToRollBack
from prompt_registry.rollouts import RolloutConflict, RolloutError
from serving import (
    BackendBadRequest,
    BackendModelNotFound,
    BackendOverloaded,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)

__all__ = [
    "EDGE_PROBLEMS", "PROBLEM_TABLE", "ApiError", "CallerConcurrencyLimited", "CallerLimited", "CallerRateLimited",
    "ClientDisconnected", "Forbidden", "GatewayError", "InvalidLabel", "ModelRejectedInput", "ModelSaturated", "Problem", "ProblemSpec",
    "QueueTimeout", "Unauthenticated", "UnknownModel", "UnknownPrompt", "UnsupportedQuestion", "error_types_markdown",
    "problem_for",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """A failure as the caller sees it, whatever the wire format."""

    status: int
    type: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None
    fields: tuple[dict[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class ProblemSpec:
    status: int
    type: str
    retryable: bool
    summary: str


class GatewayError(Exception):
    """Base of the gateway's own domain exceptions (no HTTP status inside). `field` names the
    request field at fault, as the caller spelt it, when there is one."""

    retry_after_s: float | None = None

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(GatewayError):
    """No API key, a malformed or unknown one, or a revoked one."""


class Forbidden(GatewayError):
    """The key is valid but lacks the scope the operation needs."""


class CallerLimited(GatewayError):
    """The calling key is over one of its own limits."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallerRateLimited(CallerLimited):
    """The key's request rate is over its limit."""


class CallerConcurrencyLimited(CallerLimited):
    """The key has as many requests in flight as it may."""


class ModelSaturated(GatewayError):
    """Every engine slot of the model is busy and its queue is full (or the caller may not
    queue): refused at once so the caller can retry elsewhere or later."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueTimeout(GatewayError):
    """No engine slot came free within the request's deadline."""


class UnknownPrompt(GatewayError):
    """A caller named a prompt (or version, or label) the registry does not have."""


class ModelRejectedInput(GatewayError):
    """The model server refused a raw chat completion's own parameters (an upstream 400/413/422
    on the caller's messages or response_format): the caller's request is at fault, not ours."""


class UnknownModel(GatewayError):
    """A prompt (version or draft) names a model the serving layer does not run."""


class InvalidLabel(GatewayError):
    """A reviewer label outside the answering prompt's verdict schema, or contradicting itself
    (`field`: decision or category). Raised by `gateway.feedback.check_label`, which the
    feedback route, the console's review form and `modgate feedback import` share."""


class UnsupportedQuestion(GatewayError):
    """A `/v1/decisions` question the moderation prompt does not answer: the verdict answers
    its decision and its category (over exactly the values the answering version's schema
    allows) and nothing else, whatever a question's instructions say."""


class ClientDisconnected(GatewayError):
    """The caller went away before the answer; the work was aborted."""


@dataclass
class ApiError(Exception):
    """An error that already is a `Problem`: raised by the HTTP adapters for what only they
    can judge (a malformed body, an unknown field, a wrong content type)."""

    status: int
    type: str
    message: str
    fields: list[dict[str, str]] | None = None
    retryable: bool = False
    retry_after_s: float | None = None


# The one table. Order does not matter: the most specific class on the exception's MRO wins.
PROBLEM_TABLE: dict[type[BaseException], ProblemSpec] = {
    Unauthenticated: ProblemSpec(401, "unauthenticated", False, "missing, malformed, unknown or revoked API key"),
    Forbidden: ProblemSpec(403, "forbidden", False, "the key lacks the scope the route needs"),
    UnknownPrompt: ProblemSpec(404, "unknown_prompt", False, "the named prompt, version or label does not exist"),
    UnknownModel: ProblemSpec(422, "unknown_model", False, "a prompt names a model the serving layer does not run (the message lists the served ones)"),
    PromptNotFound: ProblemSpec(404, "not_found", False, "a registry object does not exist (admin API)"),
    LabelConflict: ProblemSpec(409, "label_conflict", False, "a label moved since it was read (compare-and-set lost)"),
    GatePolicyConflict: ProblemSpec(409, "gate_policy_conflict", False, "the prompt's gate policy changed since it was read (compare-and-set lost)"),
    GateRefused: ProblemSpec(409, "promotion_gate_failed", False, "the promotion gate refused a production move"),
    NothingToRollBack: ProblemSpec(409, "nothing_to_roll_back", False, "the label has no earlier version"),
    LifecycleConflict: ProblemSpec(409, "lifecycle_conflict", False, "the prompt's version states changed since they were read (compare-and-set lost)"),
    VersionRetired: ProblemSpec(409, "version_retired", False, "a label, rollout or approval names a deprecated or blocked version, or a version cannot be blocked while something points at it"),
    VersionBlocked: ProblemSpec(410, "version_blocked", False, "a request pinned a version an operator blocked"),
    RolloutConflict: ProblemSpec(409, "rollout_conflict", False, "another rollout of the prompt is active"),
    RolloutError: ProblemSpec(409, "rollout_state", False, "the rollout's state does not allow the action"),
    PromptFileError: ProblemSpec(422, "invalid_prompt", False, "a published prompt fails validation"),
    UnservedModel: ProblemSpec(422, "unknown_model", False, "a prompt names a model the serving layer does not run (the message lists the served ones)"),
    GatePolicyInvalid: ProblemSpec(422, "invalid_gate_policy", False, "a gate policy fails validation"),
    ScorecardMismatch: ProblemSpec(422, "scorecard_mismatch", False, "an uploaded scorecard was computed for other content than the version it names"),
    TemplateRejected: ProblemSpec(422, "template_rejected", False, "a template uses what the sandbox forbids"),
    UnsupportedQuestion: ProblemSpec(400, "unsupported_question", False, "a /v1/decisions question the moderation prompt does not answer (only its decision and category, over the values its verdict schema allows)"),
    InvalidLabel: ProblemSpec(422, "invalid_label", False, "a reviewer label outside the answering prompt's verdict schema, or contradicting itself"),
    RenderError: ProblemSpec(422, "render_error", False, "the prompt could not be rendered with these variables"),
    CallerRateLimited: ProblemSpec(429, "rate_limited", True, "the key's request rate is over its limit"),
    CallerConcurrencyLimited: ProblemSpec(429, "concurrency_limited", True, "the key has its maximum of requests in flight"),
    ModelSaturated: ProblemSpec(429, "overloaded", True, "the model's gateway queue is full"),
    BackendOverloaded: ProblemSpec(429, "model_overloaded", True, "the model server refused the request as overloaded"),
    ClientDisconnected: ProblemSpec(499, "client_disconnected", False, "the caller went away; the work was aborted"),
    ModelRejectedInput: ProblemSpec(400, "model_rejected_input", False, "the model server refused a raw chat completion's parameters (e.g. its response_format schema)"),
    BackendModelNotFound: ProblemSpec(502, "model_not_served", False, "the model server does not serve the model a prompt version names (a configuration error)"),
    BackendBadRequest: ProblemSpec(502, "model_rejected_request", False, "the model server rejected the request"),
    BackendProtocolError: ProblemSpec(502, "model_protocol_error", True, "the model server's answer broke the protocol"),
    StoreUnavailable: ProblemSpec(503, "registry_unavailable", True, "the registry is unreachable and nothing is cached"),
    BackendUnavailable: ProblemSpec(503, "model_unavailable", True, "the model server is unreachable or its breaker is open"),
    DecisionLogUnavailable: ProblemSpec(503, "decision_log_unavailable", True, "durable mode: the verdict's record could not be written, so no verdict is answered"),
    QueueTimeout: ProblemSpec(504, "queue_timeout", True, "no engine slot came free within the deadline"),
    BackendTimeout: ProblemSpec(504, "model_timeout", True, "the model did not answer within the deadline"),
}


def problem_for(exc: BaseException) -> Problem | None:
    """The caller-facing problem for *exc*, or None when it is not an error we raise on
    purpose (then it is a bug: answer 500 and log it)."""
    if isinstance(exc, ApiError):
        return Problem(exc.status, exc.type, exc.message, exc.retryable, exc.retry_after_s,
                       tuple(exc.fields) if exc.fields is not None else None)
    for cls in type(exc).__mro__:
        spec = PROBLEM_TABLE.get(cls)
        if spec is not None:
            retry_after = getattr(exc, "retry_after_s", None)
            if spec.status == 429 and retry_after is None:
                retry_after = 1.0
            field = getattr(exc, "field", None)
            message = str(exc) or spec.summary
            fields = ({"field": field, "problem": message},) if field else None
            return Problem(spec.status, spec.type, message, spec.retryable, retry_after, fields)
    return None


# Problems only an HTTP adapter can judge (raised there as `ApiError`), with the statuses they
# may have: OpenAI's surface answers validation errors with 400 where ours says 422.
EDGE_PROBLEMS: dict[str, tuple[frozenset[int], str]] = {
    "malformed_json": (frozenset({400}), "the body is not JSON, or not a JSON object"),
    "malformed_body": (frozenset({400}), "a prompt file body is not UTF-8"),
    "malformed_request": (frozenset({400}), "the framework could not read the request"),
    "invalid_request": (frozenset({400, 422}), "missing, wrong-typed or unknown fields (`fields` names them)"),
    "invalid_value": (frozenset({400}), "an OpenAI-route parameter has a value the gateway does not take"),
    "unsupported_parameter": (frozenset({400}), "an OpenAI parameter the gateway does not support (tools, n > 1, ...)"),
    "unsupported_content": (frozenset({400}), "non-text content parts or inputs"),
    "content_too_long": (frozenset({400, 422}), "listing text over `max_title_chars` / `max_description_chars`"),
    "model_not_found": (frozenset({404}), "a raw chat completion names a model the gateway does not serve"),
    "not_found": (frozenset({404}), "no such route, or a registry object that does not exist"),
    "method_not_allowed": (frozenset({405}), "the route exists with other methods (`Allow` lists them)"),
    "body_timeout": (frozenset({408}), "the body did not arrive within `body_timeout_s` (slow client)"),
    "headers_too_large": (frozenset({431}), "more than 100 headers or 32 KiB of them"),
    "body_too_large": (frozenset({413}), "the body is over its limit (checked before parsing)"),
    "unsupported_media_type": (frozenset({415}), "a content type other than JSON"),
    "internal_error": (frozenset({500}), "a bug in the gateway (logged; the body says nothing more)"),
}


def error_types_markdown() -> str:
    """The table of every error `type` the gateway answers, for docs/failure-semantics.md
    (generated, and checked by a test: `python -m gateway.problems` prints it)."""
    by_type = {spec.type: (spec.status, spec.type, "yes" if spec.retryable else "no", spec.summary,
                           "raised inside") for spec in reversed(PROBLEM_TABLE.values())}
    rows = list(by_type.values())
    rows += [(min(statuses), kind, "no", summary,
              "HTTP adapter" + (f" ({' or '.join(str(s) for s in sorted(statuses))})" if len(statuses) > 1 else ""))
             for kind, (statuses, summary) in EDGE_PROBLEMS.items() if kind not in {r[1] for r in rows}]
    lines = ["| status | type | retryable | when | decided by |", "|---|---|---|---|---|"]
    lines += [f"| {status} | `{kind}` | {retry} | {summary} | {where} |"
              for status, kind, retry, summary, where in sorted(rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(error_types_markdown(), end="")
