"""OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/moderations`.

Any OpenAI client can call the gateway (set its base URL to `http://gateway/v1` and its API key
to a modgate key with the `moderate` scope):

- `/v1/chat/completions` with `model` + `messages` is passed through to a model the gateway
  serves. With the extension field `prompt: {name, label | version, variables, locale}` the
  messages come from the registry prompt (rendered in the sandbox; the caller's messages are not
  used), the output is constrained to the prompt's verdict shape, the request goes through the
  moderation service exactly like `/v1/moderate` (rollouts, decision log, metrics), and
  `message.content` is the *validated* verdict JSON (never the model's raw text: fail closed on
  the standard field too), with the extension object `modgate: {prompt, verdict, arm,
  request_id}`. A stream sends the verdict only after validation, in one delta. In prompt mode
  the prompt version decides the model (`model` is not used) and its sampling parameters apply
  unless the caller sends `max_tokens`/`temperature`/`top_p`/`seed` (clamped like any caller's).
- `/v1/moderations` answers the OpenAI moderation shape from a registry prompt's verdict, so a
  caller using a moderation client switches by changing the base URL; each input is one
  moderation through the same service. `category_scores` are the calibrated category
  probabilities, or null with the reason (`_moderation_result`).
- `POST /v1/decisions`, OpenAI's Decisions API, is the adapter in `gateway.api.decisions`.
- Raw chat (the caller's own messages) also goes through admission, the caller's limits,
  spans and metrics, and is logged as `kind: raw_chat` without content.

Caller sampling parameters are clamped (`max_tokens` to [1, MAX_TOKENS_LIMIT], `temperature` to
[0, 2], `top_p` to (0, 1]); `n != 1`, tools and any other unknown field are rejected with a 400.
The backend is always the one the gateway was configured with: no request field can name a
backend URL. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, where
`code` is the gateway's error type (`model_unavailable`, `unauthenticated`, ...).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response, StreamingResponse

from gateway.api.edge import (
    ERROR_RESPONSES,
    openai_error_response,
    openai_sse_error,
    problem_of,
    read_json_object,
    request_id_of,
    serve,
    unless_disconnected,
)
from gateway.api.models import Locale
from gateway.api.probabilities import category_withheld, verdict_fields
from gateway.ids import new_id
from gateway.moderation import PROMPT_NAME, Caller, Moderation, ModerationCall, ModerationService
from gateway.problems import ApiError
from gateway.telemetry import Attr, Metrics
from prompt_registry import FAIL_CLOSED_DECISION
from prompt_registry.locales import LocaleError, guess_locale, normalize_locale
from serving import ChatRequest
from serving.protocol import ChatChunk

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_TOKENS_LIMIT",
    "MODERATION_CONCURRENCY",
    "build_openai_router",
    "invalid",
    "is_id",
    "locale_field",
    "prompt_of_model",
    "reject_unknown",
]

log = logging.getLogger("modgate.gateway.openai")

MAX_TOKENS_LIMIT = 1024  # caller max_tokens is clamped to [1, MAX_TOKENS_LIMIT]
DEFAULT_MAX_TOKENS = 256  # raw completions that do not say
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.01  # top_p is clamped to [TOP_P_MIN, 1]: engines reject 0
MAX_STOP_SEQUENCES = 4
MODERATION_CONCURRENCY = 8
# Model names OpenAI moderation clients send; they mean "the gateway's default prompt".
_OPENAI_MODERATION_MODELS = re.compile(r"^(omni|text)-moderation(-.*)?$")
_PINNED = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})@v(?P<version>[1-9][0-9]{0,8})$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

_CHAT_FIELDS = frozenset({
    "model", "messages", "prompt", "stream", "stream_options", "max_tokens",
    "max_completion_tokens", "temperature", "top_p", "seed", "stop", "response_format", "n",
    "user",
})
_UNSUPPORTED_HINTS = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
}
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MODERATION_FIELDS = frozenset({"input", "model", "locale"})


def _invalid(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, code, message,
                    fields=[{"field": param, "problem": message}] if param else None)


# -- request parsing ------------------------------------------------------------------------



def locale_field(payload: dict[str, Any]) -> str | None:
    """The extension field `locale`, normalised (None when absent)."""
    locale = payload.get("locale")
    if locale is None:
        return None
    try:
        normalized = normalize_locale(locale) if isinstance(locale, str) else None
    except LocaleError:
        normalized = None
    if normalized is None:
        raise _invalid("'locale' must be a locale like 'en-US', 'zh-CN' or 'zh-Hant-TW'", "locale")
    return normalized


def prompt_of_model(model: str, otherwise: str = "") -> tuple[str, int | None]:
    """The registry prompt (and pinned version) an OpenAI `model` field names: `name` or
    `name@vN`; anything else is the same 404 `unknown_prompt` as on every route."""
    pinned = _PINNED.match(model)
    if pinned:
        return pinned["name"], int(pinned["version"])
    if PROMPT_NAME.match(model):
        return model, None
    raise _invalid(f"the model {model!r} is not a registry prompt name (or name@vN){otherwise}",
                   "model", code="unknown_prompt", status=404)


def _reject_unknown(payload: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in sorted(set(payload) - allowed):
        hint = _UNSUPPORTED_HINTS.get(key)
        message = (f"unsupported parameter {key!r}: {hint}" if hint else
                   f"unknown or unsupported parameter {key!r}")
        raise _invalid(message, key, code="unsupported_parameter")


# The request checks `gateway.api.decisions` shares with these routes.
invalid = _invalid
reject_unknown = _reject_unknown


def _number(payload: dict[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"{key!r} must be a finite number", key)
    return float(value)


def _integer(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{key!r} must be an integer", key)
    return value


def _sampling(payload: dict[str, Any]) -> dict[str, Any]:
    """The caller's sampling parameters, clamped; only those the caller sent."""
    out: dict[str, Any] = {}
    max_tokens = _integer(payload, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _integer(payload, "max_tokens")
    if max_tokens is not None:
        out["max_tokens"] = min(max(max_tokens, 1), MAX_TOKENS_LIMIT)
    temperature = _number(payload, "temperature")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0.0), TEMPERATURE_MAX)
    top_p = _number(payload, "top_p")
    if top_p is not None:
        out["top_p"] = min(max(top_p, TOP_P_MIN), 1.0)
    seed = _integer(payload, "seed")
    if seed is not None:
        out["seed"] = seed
    return out


def _text_content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid("only text content parts are supported", f"{param}[{i}]",
                               code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)
    raise _invalid("message content must be a string or a list of text parts", param)


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("'messages' must be a non-empty list (or send a registry 'prompt')", "messages")
    out = []
    for i, msg in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _invalid("each message must be an object", param)
        extra = set(msg) - {"role", "content", "name"}
        if extra:
            raise _invalid(f"unsupported message field(s) {sorted(extra)}", param,
                           code="unsupported_parameter")
        role = _MESSAGE_ROLES.get(msg.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise _invalid(f"role must be one of {sorted(_MESSAGE_ROLES)} (tool messages are not "
                           "supported)", f"{param}.role")
        item = {"role": role, "content": _text_content(msg.get("content"), f"{param}.content")}
        name = msg.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _invalid("'name' must be a string", f"{param}.name")
            item["name"] = name
        out.append(item)
    return out


def _stop(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    stops = [raw] if isinstance(raw, str) else raw
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise _invalid(f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} "
                       "non-empty strings", "stop")
    return stops or None


def _response_format(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(raw.get("json_schema"), dict) \
            and isinstance(raw["json_schema"].get("schema"), dict):
        schema_format: dict[str, Any] = raw
        return schema_format
    raise _invalid("'response_format' must be {type: text | json_object | json_schema} "
                   "(json_schema with a 'schema' object)", "response_format")


class _PromptRef(BaseModel):
    """The `prompt` extension field of a chat completion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=64)
    label: str | None = Field(None, min_length=1, max_length=64)
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    variables: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    locale: Locale | None = None


def _prompt_ref(raw: Any, max_chars: int) -> _PromptRef:
    if not isinstance(raw, dict):
        raise _invalid("'prompt' must be an object {name, label | version, variables, locale}", "prompt")
    try:
        ref = _PromptRef.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in ("prompt", *err["loc"]))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise _invalid(f"{loc}: {msg}", loc) from None
    if ref.label is not None and ref.version is not None:
        raise _invalid("send either prompt.label or prompt.version, not both", "prompt.version")
    for key, value in ref.variables.items():
        if isinstance(value, str) and len(value) > max_chars:
            raise _invalid(f"variable {key!r} is longer than {max_chars} characters",
                           f"prompt.variables.{key}", code="content_too_long")
    return ref


# -- responses ------------------------------------------------------------------------------

def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _moderation_result(result: Moderation) -> dict[str, Any]:
    """One OpenAI moderation result from a prompt verdict.

    Mapping (fail closed):
    - `flagged` is true for every decision except `allow`; for the shipped verdict decisions
      that is `block` or `needs_review`, so output the gateway could not validate (which
      becomes `needs_review` with a `fail_reason`) is always flagged.
    - `categories` has one boolean per verdict category except `none`; the verdict's category
      is true when the result is flagged, every other category is false (an unparseable output
      has no category: flagged with all categories false).
    - `category_scores` has the same keys: the calibrated probability of each category from
      the engine's token log-probabilities (`gateway.api.probabilities`; given the decision the
      model generated). They are null, every one, when there is no such number to stand beside
      the answer, and `modgate.category_scores_withheld` says why: the reasons of
      `category_withheld`, and `needs_review` (a human decides; no score may read as `allow`
      beside it) or `no_category` (flagged without a violation category, so every score would
      read as clean). The model's self-reported `confidence` is not a score: it stays in
      `modgate.confidence`.
    """
    verdict = result.verdict
    schema = result.version.spec.verdict
    flagged = verdict.decision != "allow"
    names = [c for c in schema.categories if c != "none"]
    hit = verdict.category if flagged else None
    withheld: str | None = category_withheld(verdict, schema.decisions, schema.categories)
    if withheld is None and verdict.decision == FAIL_CLOSED_DECISION:
        withheld = "needs_review"
    if withheld is None and flagged and hit not in names:
        withheld = "no_category"
    scores = verdict.category_scores
    return {
        "flagged": flagged,
        "categories": {c: c == hit for c in names},
        "category_scores": {c: None if withheld is not None or scores is None else scores.probability(c)
                            for c in names},
        "category_applied_input_types": {c: ["text"] for c in names},
        "modgate": {**verdict_fields(verdict), "category_scores_withheld": withheld,
                    "prompt": result.evaluation.prompt_ref(), "arm": result.arm,
                    "request_id": result.request_id},
    }


def _modgate_extension(result: Moderation) -> dict[str, Any]:
    return {"prompt": result.evaluation.prompt_ref(), "verdict": verdict_fields(result.verdict),
            "arm": result.arm, "request_id": result.request_id}


def is_id(value: object) -> bool:
    """An id as `/v1/moderate` takes them (1-128 of `[A-Za-z0-9._:-]`, a letter or digit first)."""
    return isinstance(value, str) and _ID.match(value) is not None


def _id_variable(variables: dict[str, Any], key: str) -> str | None:
    value = variables.get(key)
    return value if isinstance(value, str) and is_id(value) else None


# -- router ---------------------------------------------------------------------------------

def build_openai_router(service: ModerationService, tracer: trace.Tracer, metrics: Metrics,
                        models: list[str]) -> APIRouter:
    """The OpenAI-compatible routes. `models` are the model names the gateway serves (from
    config); raw chat completions may only name one of them. Every route needs `moderate`;
    every route renders its errors in OpenAI's shape, from the same problem table."""
    router = APIRouter(tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)
    served = list(dict.fromkeys(models))
    created_at = int(time.time())
    settings = service.settings

    # -- GET /v1/models -------------------------------------------------------------------
    @router.get("/v1/models")
    async def list_models(request: Request) -> Response:
        """The models this gateway serves (OpenAI list shape). Needs `moderate`."""
        rid = request_id_of(request)
        try:
            await service.authenticate(request.headers.get("authorization"),
                                       request.headers.get("x-api-key"), scope="moderate")
        except Exception as exc:  # noqa: BLE001 - every error is answered in the OpenAI shape
            return openai_error_response(problem_of(exc, rid, "/v1/models"), rid)
        data = [{"id": m, "object": "model", "created": created_at, "owned_by": "modgate"}
                for m in served]
        return Response(orjson.dumps({"object": "list", "data": data}),
                        media_type="application/json", headers={"x-request-id": rid})

    # -- POST /v1/chat/completions --------------------------------------------------------
    @router.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description": "an OpenAI chat completion "
                             "request, or `prompt: {name, label | version, variables, locale}`"}}}}})
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions: raw `model` + `messages`, or a registry `prompt` (extension
        field) whose answer carries `modgate: {prompt, verdict, arm, request_id}` and whose
        `message.content` is the validated verdict. Supports `stream: true`. Needs `moderate`."""
        return await serve(request, route="/v1/chat/completions", service=service, tracer=tracer,
                           metrics=metrics, work=_chat, render_error=openai_error_response)

    async def _chat(request: Request, caller: Caller, rid: str, started: float,
                    root: trace.Span) -> Response:
        payload = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
        _reject_unknown(payload, _CHAT_FIELDS)
        n = payload.get("n")
        if n is not None and (isinstance(n, bool) or n != 1):
            raise _invalid("only n=1 is supported", "n")
        stream = payload.get("stream") or False
        if not isinstance(stream, bool):
            raise _invalid("'stream' must be a boolean", "stream")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _invalid("'stream_options' must be an object", "stream_options")
        include_usage = bool((options or {}).get("include_usage"))
        user = payload.get("user")
        if user is not None and not isinstance(user, str):
            raise _invalid("'user' must be a string", "user")
        sampling = _sampling(payload)
        completion_id = f"chatcmpl-{new_id()}"
        created = int(time.time())

        if payload.get("prompt") is not None:
            if payload.get("messages"):
                raise _invalid("with 'prompt' the messages come from the registry prompt; send "
                               "'messages': [] or leave it out", "messages")
            for key in ("stop", "response_format"):
                if payload.get(key) is not None:
                    raise _invalid(f"{key!r} cannot be combined with 'prompt': the output is "
                                   "constrained to the prompt's verdict", key)
            ref = _prompt_ref(payload["prompt"], settings.max_description_chars)
            variables: dict[str, Any] = dict(ref.variables)
            call = ModerationCall(
                front_door="chat", request_id=rid, item_id=_id_variable(variables, "item_id") or rid,
                variables=variables, locale=ref.locale, prompt=ref.name, version=ref.version,
                label=ref.label, subject=_id_variable(variables, "subject"),
                seller_id=_id_variable(variables, "seller_id"), sampling=sampling,
                caller=caller.name, may_pin=caller.may_pin, prompt_field="prompt.name",
                pin_field="prompt.version" if ref.version is not None else "prompt.label")
            # Streaming or not, the verdict is validated before any of it is sent: a stream
            # carries one content delta, the validated verdict (bounded by max_tokens anyway).
            result = await unless_disconnected(request, service.moderate(call, started=started))
            root.set_attribute(Attr.PROMPT_NAME, result.version.name)
            root.set_attribute(Attr.PROMPT_VERSION, result.version.version)
            root.set_attribute(Attr.TRAFFIC_ARM, result.arm)
            root.set_attribute(Attr.DECISION, result.verdict.decision)
            if stream:
                return _verdict_stream(result, rid, completion_id, created, include_usage)
            usage = result.evaluation.result
            body: dict[str, Any] = {
                "id": completion_id, "object": "chat.completion", "created": created,
                "model": usage.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.content()},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": _usage(usage.prompt_tokens, usage.completion_tokens),
                "modgate": _modgate_extension(result),
            }
            return Response(orjson.dumps(body), media_type="application/json",
                            headers={"x-request-id": rid})

        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("'model' is required (one of GET /v1/models), or send a "
                           "registry 'prompt'", "model")
        if model not in served:
            raise _invalid(f"the model {model!r} does not exist on this gateway; "
                           f"available: {served}", "model", code="model_not_found", status=404)
        chat = ChatRequest(
            model=model, messages=_messages(payload.get("messages")),
            max_tokens=sampling.get("max_tokens", DEFAULT_MAX_TOKENS),
            temperature=sampling.get("temperature", 1.0), top_p=sampling.get("top_p", 1.0),
            seed=sampling.get("seed"), stop=_stop(payload.get("stop")),
            response_format=_response_format(payload.get("response_format")),
            request_id=rid)
        if stream:
            return await _raw_stream(chat, rid, completion_id, created, include_usage, started,
                                     caller.name)
        result_ = await unless_disconnected(request, service.raw_chat(chat, started=started,
                                                                      caller=caller.name))
        raw_body: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": result_.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result_.text},
                         "finish_reason": result_.finish_reason or "stop", "logprobs": None}],
            "usage": _usage(result_.prompt_tokens, result_.completion_tokens),
        }
        return Response(orjson.dumps(raw_body), media_type="application/json",
                        headers={"x-request-id": rid})

    def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None, **extra: Any) -> bytes:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}], **extra})

    def _usage_chunk(completion_id: str, created: int, model: str, usage: tuple[int, int]) -> bytes:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [], "usage": _usage(*usage)})

    def _verdict_stream(result: Moderation, rid: str, completion_id: str, created: int,
                        include_usage: bool) -> Response:
        model = result.evaluation.result.model
        usage = (result.evaluation.result.prompt_tokens, result.evaluation.result.completion_tokens)

        async def events() -> AsyncIterator[bytes]:
            yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
            yield _chunk(completion_id, created, model, {"content": result.content()})
            yield _chunk(completion_id, created, model, {}, "stop", modgate=_modgate_extension(result))
            if include_usage:
                yield _usage_chunk(completion_id, created, model, usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-request-id": rid, "cache-control": "no-cache",
                                          "x-accel-buffering": "no"})

    async def _raw_stream(chat: ChatRequest, rid: str, completion_id: str, created: int,
                          include_usage: bool, started: float, caller: str) -> Response:
        chunks = service.raw_stream(chat, started=started, caller=caller)
        # Wait for the first chunk here, so errors before streaming starts get a real status.
        try:
            first: ChatChunk | None = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise

        async def events() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                try:
                    yield _chunk(completion_id, created, chat.model, {"role": "assistant", "content": ""})
                    finish: str | None = None
                    usage = (0, 0)
                    item = first
                    while item is not None:
                        if item.text_delta:
                            yield _chunk(completion_id, created, chat.model, {"content": item.text_delta})
                        finish = item.finish_reason or finish
                        if item.prompt_tokens is not None or item.completion_tokens is not None:
                            usage = (item.prompt_tokens or 0, item.completion_tokens or 0)
                        item = await anext(chunks, None)
                    yield _chunk(completion_id, created, chat.model, {}, finish or "stop")
                    if include_usage:
                        yield _usage_chunk(completion_id, created, chat.model, usage)
                except Exception as exc:  # noqa: BLE001 - reported in-band: headers are sent
                    yield openai_sse_error(problem_of(exc, rid, "/v1/chat/completions"))
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-request-id": rid, "cache-control": "no-cache",
                                          "x-accel-buffering": "no"})

    # -- POST /v1/moderations -------------------------------------------------------------
    @router.post("/v1/moderations", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["input"], "properties": {
            "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "model": {"type": ["string", "null"]}, "locale": {"type": ["string", "null"]}}}}}}})
    async def moderations(request: Request) -> Response:
        """OpenAI moderations, answered by a registry prompt (the gateway's default prompt;
        `model` may name another registry prompt, or `name@vN` for a pinned version), through
        the same rollouts, decision log and metrics as `/v1/moderate`. Each input is one
        moderation: the listing title (empty description), with request and item id
        `<request id>-<index>`; `locale` is an extension field (default en-US). See
        `_moderation_result` for the verdict mapping. Needs `moderate`."""
        return await serve(request, route="/v1/moderations", service=service, tracer=tracer,
                           metrics=metrics, work=_moderations, render_error=openai_error_response)

    async def _moderations(request: Request, caller: Caller, rid: str, started: float,
                           root: trace.Span) -> Response:
        payload = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
        _reject_unknown(payload, _MODERATION_FIELDS)
        inputs = _moderation_inputs(payload.get("input"), settings.max_description_chars,
                                    settings.max_moderation_inputs)
        locale = locale_field(payload)
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise _invalid("'model' must be a string", "model")
        name: str | None = None
        version: int | None = None
        if model and not _OPENAI_MODERATION_MODELS.match(model):
            name, version = prompt_of_model(model, ", nor an OpenAI moderation model")
        await service.charge(caller, len(inputs), request_id=rid)
        calls = [ModerationCall(
            front_door="moderations", request_id=f"{rid}-{i}", item_id=f"{rid}-{i}",
            variables={"title": text, "description": ""}, locale=locale or guess_locale(text),
            prompt=name, version=version, caller=caller.name, may_pin=caller.may_pin,
            prompt_field="model", pin_field="model")
            for i, text in enumerate(inputs)]
        results = await unless_disconnected(request, service.moderate_many(
            calls, started=started, concurrency=MODERATION_CONCURRENCY))
        first = results[0].version
        root.set_attribute(Attr.PROMPT_NAME, first.name)
        root.set_attribute(Attr.PROMPT_VERSION, first.version)
        body = {"id": f"modr-{rid}", "model": f"{first.name}@v{first.version}",
                "results": [_moderation_result(r) for r in results]}
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"x-request-id": rid})

    return router


def _moderation_inputs(raw: Any, max_chars: int, max_inputs: int) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise _invalid("'input' must be a string or a non-empty list of strings", "input")
    if len(items) > max_inputs:
        raise _invalid(f"at most {max_inputs} inputs per request", "input")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise _invalid("only text inputs are supported", f"input[{i}]",
                           code="unsupported_content")
        if len(item) > max_chars:
            raise _invalid(f"input is longer than {max_chars} characters", f"input[{i}]",
                           code="content_too_long")
        out.append(item)
    return out
