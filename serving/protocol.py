"""The backend seam: finished chat messages in, generated text and usage out.

Serving never learns that prompts exist. A `ChatRequest` carries messages already rendered, the
output constraint (a regular expression or a JSON schema) and sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["ChatRequest", "ChatResult", "InferenceBackend", "Timings"]


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


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock milliseconds measured by the backend around the engine call."""

    total_ms: float
    # Server-reported engine timings when the server exposes them (None otherwise).
    queue_ms: float | None = None
    ttft_ms: float | None = None


@dataclass(frozen=True, slots=True)
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    model: str
    timings: Timings
    cached_prompt_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class InferenceBackend(Protocol):
    """How the gateway reaches a model. Implementations raise `serving.errors.BackendError`s."""

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult: ...

    async def check_health(self) -> dict[str, Any]:
        """Return details when healthy; raise BackendUnavailable when not."""
        ...

    async def aclose(self) -> None: ...
