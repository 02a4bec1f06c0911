"""OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/moderations`.

Any OpenAI client can call the gateway (set its base URL to `http://gateway/v1` and its API key
to a modgate key with the `moderate` scope):

- `/v1/chat/completions` with `model` + `messages` is passed through to a model the gateway
  serves. With the extension field `prompt: {name, label | version, variables, locale}` the
  messages come from the registry prompt (rendered in the sandbox; the caller's messages are not
  used), the output is constrained to the prompt's verdict shape, and the answer carries an
  extension object `modgate: {prompt, verdict}` (verdict validated, fail closed). In prompt mode
  the prompt version decides the model (`model` is not used) and its sampling parameters apply
  unless the caller sends `max_tokens`/`temperature`/`top_p`/`seed` (clamped like any caller's).
- `/v1/moderations` answers the OpenAI moderation shape from a registry prompt's verdict, so a
  caller using a moderation client switches by changing the base URL.

Caller sampling parameters are clamped (`max_tokens` to [1, MAX_TOKENS_LIMIT], `temperature` to
[0, 2], `top_p` to (0, 1]); `n != 1`, tools and any other unknown field are rejected with a 400.
The backend is always the one the gateway was configured with: no request field can name a
backend URL. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, where
`code` is the gateway's error type (`model_unavailable`, `unauthenticated`, ...).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from gateway.auth import Authenticator
from gateway.config import GatewaySettings
from gateway.errors import ERROR_RESPONSES, ApiError, map_exception, read_json_object
from gateway.ids import new_id
from gateway.limits import CallerLimiter
from gateway.pipeline import Evaluation, ModerationPipeline
from gateway.prompt_cache import Resolved
from gateway.verdict import Verdict, parse_verdict
from prompt_registry import PromptNotFound, PromptVersion
from serving import BackendTimeout, ChatRequest
from serving.protocol import ChatChunk

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_MODERATION_INPUTS",
    "MAX_TOKENS_LIMIT",
    "MODERATION_CONCURRENCY",
    "build_openai_router",
]

log = logging.getLogger("modgate.gateway.openai")

MAX_TOKENS_LIMIT = 1024  # caller max_tokens is clamped to [1, MAX_TOKENS_LIMIT]
DEFAULT_MAX_TOKENS = 256  # raw completions that do not say
TEMPERATURE_MAX = 2.0
TOP_P_MIN = 0.01  # top_p is clamped to [TOP_P_MIN, 1]: engines reject 0
MAX_STOP_SEQUENCES = 4
MAX_MODERATION_INPUTS = 32
MODERATION_CONCURRENCY = 8
DEFAULT_MODERATION_LOCALE = "en-US"
# Model names OpenAI moderation clients send; they mean "the gateway's default prompt".
_OPENAI_MODERATION_MODELS = re.compile(r"^(omni|text)-moderation(-.*)?$")
_PINNED = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})@v(?P<version>[1-9][0-9]{0,8})$")
_LOCALE = r"^[a-z]{2,3}(-[A-Z][A-Za-z]{1,3})?$"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

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


# -- errors ---------------------------------------------------------------------------------

def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 409:
        return "conflict_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"


def _invalid(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, code, message,
                    fields=[{"field": param, "problem": message}] if param else None)


def _error_response(err: ApiError, rid: str) -> Response:
    status = 400 if err.status == 422 else err.status  # OpenAI answers validation errors with 400
    param = err.fields[0]["field"] if err.fields else None
    headers = {"x-request-id": rid}
    if err.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(err.retry_after_s)))
    body = {"error": {"message": err.message, "type": _openai_type(status), "param": param,
                      "code": err.type}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def _as_api_error(exc: Exception, rid: str) -> ApiError:
    err = map_exception(exc)
    if err is None:
        log.error("unhandled error on OpenAI route (request %s)", rid, exc_info=exc)
        return ApiError(500, "internal_error", "internal error; see gateway logs")
    if err.status >= 500:
        log.warning("request %s failed: %s: %s", rid, err.type, err.message)
    return err


async def _guard(rid: str, handler: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await handler()
    except Exception as exc:  # noqa: BLE001 - every error is answered in the OpenAI shape
        return _error_response(_as_api_error(exc, rid), rid)


# -- request parsing ------------------------------------------------------------------------

def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id")
    return rid if rid and _REQUEST_ID.match(rid) else new_id()




def _reject_unknown(payload: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in sorted(set(payload) - allowed):
        hint = _UNSUPPORTED_HINTS.get(key)
        message = (f"unsupported parameter {key!r}: {hint}" if hint else
                   f"unknown or unsupported parameter {key!r}")
        raise _invalid(message, key, code="unsupported_parameter")


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
        return raw
    raise _invalid("'response_format' must be {type: text | json_object | json_schema} "
                   "(json_schema with a 'schema' object)", "response_format")


class _PromptRef(BaseModel):
    """The `prompt` extension field of a chat completion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=64)
    label: str | None = Field(None, min_length=1, max_length=64)
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    variables: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    locale: str | None = Field(None, pattern=_LOCALE)


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


def _verdict_dict(verdict: Verdict) -> dict[str, Any]:
    return {"decision": verdict.decision, "category": verdict.category,
            "confidence": verdict.confidence, "fail_reason": verdict.fail_reason}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _moderation_result(ev: Evaluation) -> dict[str, Any]:
    """One OpenAI moderation result from a prompt verdict.

    Mapping (fail closed):
    - `flagged` is true for every decision except `allow`; for the shipped verdict decisions
      that is `block` or `needs_review`, so output the gateway could not validate (which
      becomes `needs_review` with a `fail_reason`) is always flagged.
    - `categories` has one boolean per verdict category except `none`; the verdict's category
      is true when the result is flagged, every other category is false (an unparseable output
      has no category: flagged with all categories false).
    - `category_scores` has the same keys: the verdict's confidence for the verdict's category
      when the result is flagged (1.0 when the prompt does not ask for a confidence), 0.0 for
      every other category. It is the model's confidence in its decision, not a calibrated
      probability.
    """
    verdict = ev.verdict
    flagged = verdict.decision != "allow"
    names = [c for c in ev.version.spec.verdict.categories if c != "none"]
    hit = verdict.category if flagged else None
    score = verdict.confidence if verdict.confidence is not None else 1.0
    return {
        "flagged": flagged,
        "categories": {c: c == hit for c in names},
        "category_scores": {c: score if c == hit else 0.0 for c in names},
        "category_applied_input_types": {c: ["text"] for c in names},
        "modgate": {**_verdict_dict(verdict), "prompt": ev.prompt_ref()},
    }


# -- router ---------------------------------------------------------------------------------

def build_openai_router(pipeline: ModerationPipeline, auth: Authenticator,
                        settings: GatewaySettings, models: list[str],
                        limiter: CallerLimiter | None = None) -> APIRouter:
    """The OpenAI-compatible routes. `models` are the model names the gateway serves (from
    config); raw chat completions may only name one of them. Every route needs `moderate`."""
    router = APIRouter(tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)
    served = list(dict.fromkeys(models))
    created_at = int(time.time())

    async def authorize(request: Request, *, limited: bool = False) -> None:
        principal = await auth.authenticate(request.headers.get("authorization"),
                                            request.headers.get("x-api-key"))
        auth.require(principal, "moderate")
        if limited and limiter is not None:
            # the caller's rate and concurrency quota, released by _release_after
            request.state.lease = await limiter.acquire(principal.key_id, _request_id(request),
                                                        name=principal.name)

    async def _release_after(request: Request, response: Response) -> Response:
        lease = getattr(request.state, "lease", None)
        if lease is None:
            return response
        if isinstance(response, StreamingResponse):
            previous = response.background

            async def release_then_previous() -> None:
                await lease.release()
                if previous is not None:
                    await previous()
            response.background = BackgroundTask(release_then_previous)
        else:
            await lease.release()
        return response

    def remaining(start: float) -> float:
        left = settings.request_timeout_s - (time.perf_counter() - start)
        if left <= 0:
            raise BackendTimeout(f"request deadline of {settings.request_timeout_s:.1f}s exceeded")
        return left

    async def resolve(name: str, *, label: str | None, version: int | None) -> Resolved:
        try:
            return await pipeline.resolve(name, label=label, version=version)
        except PromptNotFound as exc:
            raise ApiError(404, "unknown_prompt", str(exc)) from None

    # -- GET /v1/models -------------------------------------------------------------------
    @router.get("/v1/models")
    async def list_models(request: Request) -> Response:
        """The models this gateway serves (OpenAI list shape). Needs `moderate`."""
        rid = _request_id(request)

        async def handle() -> Response:
            await authorize(request)
            data = [{"id": m, "object": "model", "created": created_at, "owned_by": "modgate"}
                    for m in served]
            return Response(orjson.dumps({"object": "list", "data": data}),
                            media_type="application/json", headers={"x-request-id": rid})

        return await _guard(rid, handle)

    # -- POST /v1/chat/completions --------------------------------------------------------
    @router.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description": "an OpenAI chat completion "
                             "request, or `prompt: {name, label | version, variables, locale}`"}}}}})
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions: raw `model` + `messages`, or a registry `prompt` (extension
        field) whose answer carries `modgate: {prompt, verdict}`. Supports `stream: true`.
        Needs `moderate`."""
        rid = _request_id(request)
        try:
            response = await _guard(rid, lambda: _chat(request, rid))
        except BaseException:
            if getattr(request.state, "lease", None) is not None:
                await request.state.lease.release()
            raise
        return await _release_after(request, response)

    async def _chat(request: Request, rid: str) -> Response:
        start = time.perf_counter()
        await authorize(request, limited=True)
        payload = await read_json_object(request, settings.max_body_bytes)
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

        version: PromptVersion | None = None
        prompt_info: dict[str, Any] | None = None
        if payload.get("prompt") is not None:
            if payload.get("messages"):
                raise _invalid("with 'prompt' the messages come from the registry prompt; send "
                               "'messages': [] or leave it out", "messages")
            for key in ("stop", "response_format"):
                if payload.get(key) is not None:
                    raise _invalid(f"{key!r} cannot be combined with 'prompt': the output is "
                                   "constrained to the prompt's verdict", key)
            ref = _prompt_ref(payload["prompt"], settings.max_description_chars)
            label = None if ref.version is not None else (ref.label or settings.default_label)
            resolved = await resolve(ref.name, label=label, version=ref.version)
            version = resolved.version
            variables: dict[str, object] = dict(ref.variables)
            variables.setdefault("locale", ref.locale or version.spec.default_locale)
            used_locale, chat = ModerationPipeline.build_chat(version, variables, ref.locale,
                                                              request_id=rid)
            chat = replace(chat, **sampling)
            prompt_info = {"name": version.name, "version": version.version, "label": label,
                           "locale": used_locale, "stale": resolved.stale}
        else:
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

        completion_id = f"chatcmpl-{new_id()}"
        created = int(time.time())
        if stream:
            return await _stream(chat, version, prompt_info, rid, completion_id, created,
                                 include_usage, remaining(start))
        result = await pipeline.backend.chat(chat, timeout_s=remaining(start))
        body: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": result.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason or "stop", "logprobs": None}],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }
        if version is not None and prompt_info is not None:
            verdict = parse_verdict(result.text, result.finish_reason, version.spec.verdict)
            _log_verdict(rid, verdict)
            body["modgate"] = {"prompt": prompt_info, "verdict": _verdict_dict(verdict)}
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"x-request-id": rid})

    async def _stream(chat: ChatRequest, version: PromptVersion | None,
                      prompt_info: dict[str, Any] | None, rid: str, completion_id: str,
                      created: int, include_usage: bool, timeout_s: float) -> Response:
        chunks = pipeline.backend.stream_chat(chat, timeout_s=timeout_s)
        # Wait for the first chunk here, so errors before streaming starts get a real status.
        try:
            first: ChatChunk | None = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                         "model": chat.model, "choices": [{"index": 0, "delta": delta,
                                                            "finish_reason": finish,
                                                            "logprobs": None}], **extra})

        async def events() -> AsyncIterator[bytes]:
            async with aclosing(chunks):
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    text: list[str] = []
                    finish: str | None = None
                    usage = (0, 0)
                    item = first
                    while item is not None:
                        if item.text_delta:
                            text.append(item.text_delta)
                            yield chunk({"content": item.text_delta})
                        finish = item.finish_reason or finish
                        if item.prompt_tokens is not None or item.completion_tokens is not None:
                            usage = (item.prompt_tokens or 0, item.completion_tokens or 0)
                        item = await anext(chunks, None)
                    extra: dict[str, Any] = {}
                    if version is not None and prompt_info is not None:
                        verdict = parse_verdict("".join(text), finish, version.spec.verdict)
                        _log_verdict(rid, verdict)
                        extra["modgate"] = {"prompt": prompt_info, "verdict": _verdict_dict(verdict)}
                    yield chunk({}, finish or "stop", **extra)
                    if include_usage:
                        yield _sse({"id": completion_id, "object": "chat.completion.chunk",
                                    "created": created, "model": chat.model, "choices": [],
                                    "usage": _usage(*usage)})
                except Exception as exc:  # noqa: BLE001 - reported in-band: headers are sent
                    err = _as_api_error(exc, rid)
                    yield _sse({"error": {"message": err.message, "type": _openai_type(err.status),
                                          "param": None, "code": err.type}})
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
        """OpenAI moderations, answered by a registry prompt's `production` version (the
        gateway's default prompt; `model` may name another registry prompt, or `name@vN` for a
        pinned version). Each input is the listing title (empty description); `locale` is an
        extension field (default en-US). See `_moderation_result` for the verdict mapping.
        Needs `moderate`."""
        rid = _request_id(request)
        try:
            response = await _guard(rid, lambda: _moderate(request, rid))
        except BaseException:
            if getattr(request.state, "lease", None) is not None:
                await request.state.lease.release()
            raise
        return await _release_after(request, response)

    async def _moderate(request: Request, rid: str) -> Response:
        start = time.perf_counter()
        await authorize(request, limited=True)
        payload = await read_json_object(request, settings.max_body_bytes)
        _reject_unknown(payload, _MODERATION_FIELDS)
        inputs = _moderation_inputs(payload.get("input"), settings.max_description_chars)
        locale = payload.get("locale")
        if locale is None:
            locale = DEFAULT_MODERATION_LOCALE
        elif not isinstance(locale, str) or not re.match(_LOCALE, locale):
            raise _invalid("'locale' must be a locale like 'en-US' or 'zh-CN'", "locale")
        model = payload.get("model")
        if model is not None and not isinstance(model, str):
            raise _invalid("'model' must be a string", "model")

        label: str | None = settings.default_label
        pinned = _PINNED.match(model or "")
        if not model or _OPENAI_MODERATION_MODELS.match(model):
            resolved = await resolve(settings.default_prompt, label=label, version=None)
        else:
            name, version = (pinned["name"], int(pinned["version"])) if pinned else (model, None)
            label = None if version is not None else label
            try:
                resolved = await pipeline.resolve(name, label=label, version=version)
            except PromptNotFound:
                raise _invalid(f"the model {model!r} is neither a registry prompt (with a "
                               f"{settings.default_label!r} label) nor an OpenAI moderation model",
                               "model", code="model_not_found", status=404) from None

        semaphore = asyncio.Semaphore(MODERATION_CONCURRENCY)

        async def one(i: int, text: str) -> Evaluation:
            async with semaphore:
                return await pipeline.evaluate(
                    resolved, {"title": text, "description": "", "locale": locale}, locale,
                    request_id=f"{rid}-{i}", timeout_s=remaining(start), label=label)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, text)) for i, text in enumerate(inputs)]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None  # the first failure decides the answer
        evaluations = [t.result() for t in tasks]
        for ev in evaluations:
            _log_verdict(rid, ev.verdict)
        version = resolved.version
        body = {"id": f"modr-{new_id()}", "model": f"{version.name}@v{version.version}",
                "results": [_moderation_result(ev) for ev in evaluations]}
        return Response(orjson.dumps(body), media_type="application/json",
                        headers={"x-request-id": rid})

    return router


def _moderation_inputs(raw: Any, max_chars: int) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise _invalid("'input' must be a string or a non-empty list of strings", "input")
    if len(items) > MAX_MODERATION_INPUTS:
        raise _invalid(f"at most {MAX_MODERATION_INPUTS} inputs per request", "input")
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


def _log_verdict(rid: str, verdict: Verdict) -> None:
    if verdict.fail_reason:
        log.warning("request %s: model output rejected (%s); answering %s", rid,
                    verdict.fail_reason, verdict.decision)
