"""The backend seam: finished chat messages in, generated text and usage out.

Serving never learns that prompts exist. A `ChatRequest` carries messages already rendered, the
output constraint (a regular expression or a JSON schema) and sampling parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatChunk", "ChatRequest", "ChatResult", "InferenceBackend", "Timings", "TokenLogprob"]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    request_id: str | None = None
    # Lower is more urgent (vLLM priority scheduling): callers 0, shadow/eval traffic higher.
    priority: int = 0
    # Raw OpenAI-style parameters passed through for callers that send their own messages.
    stop: list[str] | None = None
    # Sent as-is as `response_format` (e.g. {"type": "json_schema", ...}) when neither `regex`
    # nor `json_schema` is set.
    response_format: dict[str, Any] | None = None
    # Reasoning models (gpt-oss: harmony `Reasoning: low|medium|high`): sent as
    # `reasoning_effort`; None sends nothing (models that do not reason).
    reasoning_effort: str | None = None
    # Ask for each generated token's log-probability and this many alternatives at each
    # position (OpenAI `logprobs: true, top_logprobs: N`); None: no log-probabilities.
    top_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token as the engine reports it: its text, its log-probability and the
    engine's top alternatives at that position, as (token text, log-probability) pairs (the
    generated token is usually among them). Which distribution the numbers come from is the
    engine's business: vLLM 0.32 in its default `raw_logprobs` mode reports the log-softmax of
    the logits after the structured-output mask, so tokens the verdict grammar forbids are
    at -inf (sent as -9999.0)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock milliseconds measured by the backend around the engine call."""

    total_ms: float


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    timings: Timings
    cached_prompt_tokens: int | None = None
    # A reasoning model's analysis (harmony `analysis` channel; vLLM's `message.reasoning`):
    # listing-derived text, so never in repr (logs) and never in spans, metrics or the decision
    # log. `text` is the final answer only.
    reasoning: str | None = field(default=None, repr=False)
    reasoning_tokens: int | None = None  # usage.completion_tokens_details.reasoning_tokens
    # The generated tokens with their log-probabilities, when the request asked for them and
    # the server sent them; None otherwise (never an empty stand-in). For a model that reasoned
    # first, the tokens of `text` only (the final answer's, serving/reasoning.py), or None when
    # they cannot be found.
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """One piece of a streamed completion.

    `finish_reason` is set on the chunk that ends the generation. The usage fields are set on
    the chunk that carries the server's usage report (with `stream_options.include_usage`, a
    last chunk with no text after the finishing one); None when the server sent no usage.
    """

    text_delta: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class InferenceBackend(Protocol):
    """How the gateway reaches a model. Implementations raise `serving.errors.BackendError`s."""

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult: ...

    def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        """Stream the completion (implemented as an `async def` generator).

        Errors before the first chunk (connection refused, HTTP 429/5xx, ...) are raised as the
        same `BackendError`s as `chat()` by the first `__anext__`; an error event or a broken
        connection mid-stream raises BackendUnavailable/BackendProtocolError from the iterator.
        """
        ...

    async def check_health(self) -> dict[str, Any]:
        """Return details when healthy; raise BackendUnavailable when not."""
        ...

    async def aclose(self) -> None: ...
