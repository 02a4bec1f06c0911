"""`POST /v1/decisions`: OpenAI's Decisions API shape (questions in, probabilities out), as
LiteLLM (1.104.2, 1.105.0-rc.3) and the `openai` client (`client.decisions.create`) speak it,
answered by one moderation through the one service with the verdict's calibrated
probabilities (`gateway.api.probabilities`).

What fits, and what does not:

- `model` names the registry prompt (`listing-moderation`, or `listing-moderation@v2` to pin
  a version, which needs `moderate:pin`), like `/v1/moderations`; the answer's `model` is the
  version that answered (`name@vN`).
- `input` is the listing text: a string, or user messages whose content is a string or
  `input_text` parts (joined by blank lines). It is moderated like one `/v1/moderations` input
  (title, empty description); request and item id are the request id. Images, JSON parts,
  tool calls and other roles are refused (`unsupported_content`). `safety_identifier`, the
  caller's end-user id, is the stickiness key (`seller_id`) when it is an id. The extension
  field `locale` picks the prompt variant (else the text's script does).
- A decision model answers any question from its instructions; this gateway answers only what
  the prompt version's verdict says, so a question is identified by its `name` and its
  `instructions` are not sent to the model (the version's policy is the instruction):
  a `choice` named `decision` over exactly the version's decisions, a `choice` named
  `category` over exactly its categories, a `predicate` named after one decision (the
  probability that the verdict's decision is that value). Score questions, other names and
  other choice lists are refused with 400 `unsupported_question` (choice lists and decision
  names are checked against the version that answered, which a rollout may choose).
- Answers are the calibrated probabilities: a choice's `choice` is the gateway's answer, its
  `probabilities` the model's, its `confidence` the probability of the answer. Where they may
  not stand beside the answer (no log-probabilities, fail-closed output, an operating point
  overruling the model: `gateway.api.probabilities`), the question is answered with a
  `refusal`, the wire format's per-question "no answer", and `modgate.refusals` gives the
  reason; never an invented number. `modgate` also carries the verdict (`decision`,
  `decided_by`, `fail_reason`, ...) as on the other front doors.
- `usage`: the engine's token counts; cached and reasoning tokens are 0 when the engine did not
  report them. `prompt_cache_key` / `prompt_cache_options` are refused (no prompt caching
  controls here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from opentelemetry import trace
from starlette.responses import Response

from gateway.api.edge import (
    ERROR_RESPONSES,
    openai_error_response,
    read_json_object,
    serve,
    unless_disconnected,
)
from gateway.api.openai import invalid, is_id, locale_field, prompt_of_model, reject_unknown
from gateway.api.probabilities import (
    category_withheld,
    decision_withheld,
    value_probabilities,
    verdict_fields,
)
from gateway.moderation import Caller, Moderation, ModerationCall, ModerationService
from gateway.problems import UnsupportedQuestion
from gateway.telemetry import Attr, Metrics
from prompt_registry.locales import guess_locale

__all__ = ["MAX_QUESTIONS", "ROUTE", "build_decisions_router"]

ROUTE = "/v1/decisions"
# A verdict answers three kinds of question (decision, category, one predicate per decision);
# more than this is a caller's mistake, not a use.
MAX_QUESTIONS = 32
_FIELDS = frozenset({"model", "input", "questions", "safety_identifier", "locale",
                     "prompt_cache_key", "prompt_cache_options"})
_UNSUPPORTED = {"prompt_cache_key": "prompt caching controls are not supported",
                "prompt_cache_options": "prompt caching controls are not supported"}
_QUESTION_FIELDS = {"predicate": {"type", "name", "instructions"},
                    "choice": {"type", "name", "instructions", "choices"}}

Kind = Literal["decision", "category", "predicate"]


@dataclass(frozen=True, slots=True)
class Question:
    """One question as the verdict can answer it (`name` as the caller spelt it)."""

    index: int
    kind: Kind
    name: str
    choices: tuple[str, ...] = ()

    @property
    def param(self) -> str:
        return f"questions[{self.index}]"


# -- request --------------------------------------------------------------------------------

def _input_text(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, list) or not raw:
        raise invalid("'input' must be a string or a non-empty list of user messages", "input")
    texts: list[str] = []
    for i, message in enumerate(raw):
        param = f"input[{i}]"
        if not isinstance(message, dict) or message.get("type", "message") != "message" \
                or message.get("role") != "user":
            raise invalid("only user messages are supported (no other roles, tool calls or "
                          "tool outputs)", param, code="unsupported_content")
        extra = set(message) - {"type", "role", "content"}
        if extra:
            raise invalid(f"unsupported message field(s) {sorted(extra)}", param,
                          code="unsupported_parameter")
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list) or not content:
            raise invalid("message content must be a string or a non-empty list of input_text "
                          "parts", f"{param}.content")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "input_text" \
                    or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise invalid("only input_text parts are supported (no images or JSON)",
                              f"{param}.content[{j}]", code="unsupported_content")
            texts.append(part["text"])
    return "\n\n".join(texts)


def _instructions(raw: Any, param: str) -> None:
    """Present and well-formed (the wire format requires them), though not used (module doc)."""
    if isinstance(raw, str) and raw:
        return
    if isinstance(raw, list) and raw and all(
            isinstance(p, dict) and p.get("type") == "input_text" and isinstance(p.get("text"), str)
            for p in raw):
        return
    raise invalid("'instructions' must be a non-empty string or a list of input_text parts",
                  f"{param}.instructions")


def _question(i: int, raw: Any) -> Question:
    param = f"questions[{i}]"
    if not isinstance(raw, dict):
        raise invalid("each question must be an object {type, name, instructions, ...}", param)
    kind = raw.get("type")
    if kind == "score":
        raise UnsupportedQuestion("score questions are not answered: a moderation verdict has no "
                                  "ordered levels", field=f"{param}.type")
    allowed = _QUESTION_FIELDS.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise invalid("'type' must be predicate or choice (score is not answered)", f"{param}.type")
    extra = set(raw) - allowed
    if extra:
        raise invalid(f"unknown question field(s) {sorted(extra)}", param,
                      code="unsupported_parameter")
    _instructions(raw.get("instructions"), param)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise UnsupportedQuestion(
            "a question needs a 'name' saying what of the verdict it asks: a choice named "
            "'decision' or 'category', or a predicate named after a decision (its instructions "
            "are not sent to the model)", field=f"{param}.name")
    if kind == "predicate":
        return Question(i, "predicate", name)
    if name not in ("decision", "category"):
        raise UnsupportedQuestion(f"a choice question is answered for 'decision' or 'category', "
                                  f"not {name[:64]!r}", field=f"{param}.name")
    choices = raw.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise invalid("'choices' must be a list of at least two {value, description?}",
                      f"{param}.choices")
    values: list[str] = []
    for j, choice in enumerate(choices):
        value = choice.get("value") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or set(choice) - {"value", "description"} \
                or not isinstance(value, str) or not isinstance(choice.get("description", ""), str):
            raise invalid("each choice must be {value: string, description?: string} (the "
                          "verdict's values are strings)", f"{param}.choices[{j}]")
        values.append(value)
    if len(set(values)) != len(values):
        raise invalid("choice values must be unique", f"{param}.choices")
    return Question(i, "decision" if name == "decision" else "category", name, tuple(values))


def _questions(raw: Any) -> list[Question]:
    if not isinstance(raw, list) or not raw:
        raise invalid("'questions' must be a non-empty list", "questions")
    if len(raw) > MAX_QUESTIONS:
        raise invalid(f"at most {MAX_QUESTIONS} questions per request", "questions")
    return [_question(i, q) for i, q in enumerate(raw)]


def _check_against(questions: list[Question], decisions: list[str], categories: list[str],
                   version: str) -> None:
    """Every question asks for exactly what the answering version's verdict holds."""
    for q in questions:
        if q.kind == "predicate" and q.name not in decisions:
            raise UnsupportedQuestion(f"a predicate is answered for a decision of {version} "
                                      f"({', '.join(decisions)}), not {q.name[:64]!r}",
                                      field=f"{q.param}.name")
        allowed = decisions if q.kind == "decision" else categories
        if q.kind != "predicate" and sorted(q.choices) != sorted(allowed):
            raise UnsupportedQuestion(f"the {q.name!r} choices must be exactly the values "
                                      f"{version} allows: {', '.join(allowed)}",
                                      field=f"{q.param}.choices")


# -- answer ---------------------------------------------------------------------------------

def _answers(result: Moderation, questions: list[Question]) -> tuple[list[dict[str, Any]],
                                                                     list[dict[str, Any]]]:
    verdict = result.verdict
    schema = result.version.spec.verdict
    decisions, categories = list(schema.decisions), list(schema.categories)
    _check_against(questions, decisions, categories, f"{result.version.name}@v{result.version.version}")
    why_not_decision = decision_withheld(verdict, decisions)
    why_not_category = category_withheld(verdict, decisions, categories)
    answers: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    for q in questions:
        reason = why_not_category if q.kind == "category" else why_not_decision
        scores = verdict.category_scores if q.kind == "category" else verdict.decision_scores
        probabilities = value_probabilities(scores, categories if q.kind == "category" else decisions) \
            if reason is None and scores is not None else None
        if probabilities is None:
            answers.append({"type": "refusal", "name": q.name})
            refusals.append({"index": q.index, "name": q.name, "reason": reason or "unavailable"})
        elif q.kind == "predicate":
            answers.append({"type": "predicate", "name": q.name, "probability": probabilities[q.name]})
        else:
            chosen = verdict.category if q.kind == "category" else verdict.decision
            assert chosen is not None  # a verdict with numbers has a category (category_withheld)
            answers.append({"type": "choice", "name": q.name, "choice": chosen,
                            "probabilities": [{"value": v, "probability": probabilities[v]}
                                              for v in q.choices],
                            "confidence": probabilities[chosen]})
    return answers, refusals


def _usage(result: Moderation) -> dict[str, Any]:
    r = result.evaluation.result
    return {"input_tokens": r.prompt_tokens,
            "input_tokens_details": {"cached_tokens": r.cached_prompt_tokens or 0,
                                     "cache_write_tokens": 0},
            "output_tokens": r.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens or 0},
            "total_tokens": r.prompt_tokens + r.completion_tokens}


# -- route ----------------------------------------------------------------------------------

_REQUEST_SCHEMA = {
    "type": "object", "required": ["model", "input", "questions"],
    "description": "OpenAI's Decisions API request; `model` names a registry prompt (name or "
                   "name@vN); questions are answered by name: a choice `decision` or `category`, "
                   "or a predicate named after a decision",
    "properties": {
        "model": {"type": "string"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "questions": {"type": "array", "minItems": 1, "maxItems": MAX_QUESTIONS,
                      "items": {"type": "object"}},
        "safety_identifier": {"type": ["string", "null"]},
        "locale": {"type": ["string", "null"]},
    },
}


def build_decisions_router(service: ModerationService, tracer: trace.Tracer,
                           metrics: Metrics) -> APIRouter:
    """`POST /v1/decisions`. Needs `moderate`, like every front door; errors in OpenAI's shape
    from the one problem table."""
    router = APIRouter(tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)
    settings = service.settings

    @router.post(ROUTE, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": _REQUEST_SCHEMA}}}})
    async def decisions(request: Request) -> Response:
        """OpenAI Decisions: the listing as `input`, questions about its verdict in, calibrated
        probabilities out (a refusal where there are none), with `modgate: {prompt, verdict,
        arm, request_id, refusals}`. Needs `moderate`."""
        return await serve(request, route=ROUTE, service=service, tracer=tracer, metrics=metrics,
                           work=_decide, render_error=openai_error_response)

    async def _decide(request: Request, caller: Caller, rid: str, started: float,
                      root: trace.Span) -> Response:
        payload = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
        for key in _UNSUPPORTED:
            if payload.get(key) is not None:
                raise invalid(f"unsupported parameter {key!r}: {_UNSUPPORTED[key]}", key,
                              code="unsupported_parameter")
        reject_unknown(payload, _FIELDS)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise invalid("'model' is required: a registry prompt name (or name@vN)", "model")
        name, version = prompt_of_model(model)
        text = _input_text(payload.get("input"))
        if len(text) > settings.max_description_chars:
            raise invalid(f"input is longer than {settings.max_description_chars} characters",
                          "input", code="content_too_long")
        questions = _questions(payload.get("questions"))
        end_user = payload.get("safety_identifier")
        if end_user is not None and not is_id(end_user):
            raise invalid("'safety_identifier' must be an id: 1-128 of [A-Za-z0-9._:-], starting "
                          "with a letter or digit", "safety_identifier")
        locale = locale_field(payload)
        call = ModerationCall(
            front_door="decisions", request_id=rid, item_id=rid,
            variables={"title": text, "description": ""}, locale=locale or guess_locale(text),
            prompt=name, version=version, seller_id=end_user, caller=caller.name,
            may_pin=caller.may_pin, prompt_field="model", pin_field="model")
        result = await unless_disconnected(request, service.moderate(call, started=started))
        root.set_attribute(Attr.PROMPT_NAME, result.version.name)
        root.set_attribute(Attr.PROMPT_VERSION, result.version.version)
        root.set_attribute(Attr.TRAFFIC_ARM, result.arm)
        root.set_attribute(Attr.DECISION, result.verdict.decision)
        answers, refusals = _answers(result, questions)
        body = {"model": f"{result.version.name}@v{result.version.version}", "answers": answers,
                "usage": _usage(result),
                "modgate": {"prompt": result.evaluation.prompt_ref(),
                            "verdict": verdict_fields(result.verdict), "arm": result.arm,
                            "request_id": rid, "refusals": refusals}}
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"x-request-id": rid})

    return router
