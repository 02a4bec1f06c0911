"""A deterministic in-process backend for unit tests and gateway-overhead benchmarks.

It honours the request's regex constraint the way a constrained engine would: it answers with a
verdict built from the first alternative lists of the regex, chosen by a stable hash of the
messages, so the same input always gets the same answer. Failure modes are injectable:
`error` fails any call before it starts, `stream_error` fails a stream after
`stream_error_after` chunks.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.errors import BackendUnavailable
from serving.protocol import ChatChunk, ChatRequest, ChatResult, Timings

__all__ = ["FakeBackend"]

_ALTERNATIVES = re.compile(r"\(([^()]*\|[^()]*)\)")


class FakeBackend:
    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        responder: Callable[[ChatRequest], str] | None = None,
        finish_reason: str = "stop",
        healthy: bool = True,
    ) -> None:
        self.delay_s = delay_s
        self.responder = responder
        self.finish_reason = finish_reason
        self.healthy = healthy
        self.requests: list[ChatRequest] = []
        self.error: Exception | None = None
        self.stream_error: Exception | None = None
        self.stream_error_after = 1

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.responder(request) if self.responder else self._verdict(request)
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        return ChatResult(text=text, finish_reason=self.finish_reason, prompt_tokens=prompt_tokens,
                          completion_tokens=max(1, len(text) // 4), model=request.model,
                          timings=Timings(total_ms=self.delay_s * 1000.0))

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        """The same text as `chat()`, in (at most) three pieces, then a usage chunk."""
        result = await self.chat(request, timeout_s=timeout_s)
        text = result.text
        step = max(1, -(-len(text) // 3))
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        for i, piece in enumerate(pieces):
            if self.stream_error is not None and i >= self.stream_error_after:
                raise self.stream_error
            last = i == len(pieces) - 1
            yield ChatChunk(text_delta=piece, finish_reason=result.finish_reason if last else None)
            await asyncio.sleep(0)
        yield ChatChunk(text_delta="", prompt_tokens=result.prompt_tokens,
                        completion_tokens=result.completion_tokens)

    @staticmethod
    def _verdict(request: ChatRequest) -> str:
        if not request.regex:
            return '{"decision":"needs_review","category":"none"}'
        digest = hashlib.blake2b(repr(request.messages).encode(), digest_size=8).digest()
        groups = _ALTERNATIVES.findall(request.regex)
        decisions = groups[0].split("|")
        categories = groups[1].split("|")
        decision = decisions[digest[0] % len(decisions)]
        category = "none" if decision == "allow" else categories[digest[1] % len(categories)]
        out = f'{{"decision":"{decision}","category":"{category}"'
        if '"confidence"' in request.regex:
            out += f',"confidence":0.{digest[2] % 100:02d}'
        return out + "}"

    async def check_health(self) -> dict[str, Any]:
        if not self.healthy:
            raise BackendUnavailable("fake backend set unhealthy")
        return {"models": ["fake"]}

    async def aclose(self) -> None:
        return None
