"""A deterministic in-process backend for unit tests and gateway-overhead benchmarks.

It honours the request's regex constraint the way a constrained engine would: it answers with a
verdict built from the first alternative lists of the regex, chosen by a stable hash of the
messages, so the same input always gets the same answer. When the request asks for
log-probabilities it reports them as a greedy engine under the constraint would: the text split
into tokens (each verdict value one token), every fixed token certain, and at each value the
allowed alternatives with a hashed distribution whose largest mass is the value it wrote (text
from a `responder` gets certain tokens). Failure modes are injectable:
`error` fails any call before it starts, `stream_error` fails a stream after
`stream_error_after` chunks.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.errors import BackendUnavailable
from serving.protocol import ChatChunk, ChatRequest, ChatResult, Timings, TokenLogprob

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
        if self.responder:
            text = self.responder(request)
            tokens = _certain_tokens(text)
        else:
            text, tokens = self._verdict(request)
        prompt_tokens = sum(len(m["content"].split()) for m in request.messages)
        logprobs = None
        if request.top_logprobs is not None:
            k = request.top_logprobs
            logprobs = tuple(TokenLogprob(token=t.token, logprob=t.logprob, top=t.top[:k]) for t in tokens)
        return ChatResult(text=text, finish_reason=self.finish_reason, prompt_tokens=prompt_tokens,
                          completion_tokens=max(1, len(text) // 4), model=request.model,
                          timings=Timings(total_ms=self.delay_s * 1000.0), logprobs=logprobs)

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
    def _verdict(request: ChatRequest) -> tuple[str, list[TokenLogprob]]:
        if not request.regex:
            text = '{"decision":"needs_review","category":"none"}'
            return text, _certain_tokens(text)
        digest = hashlib.blake2b(repr(request.messages).encode(), digest_size=8).digest()
        groups = _ALTERNATIVES.findall(request.regex)
        decisions = groups[0].split("|")
        categories = groups[1].split("|")
        decision = decisions[digest[0] % len(decisions)]
        category = "none" if decision == "allow" else categories[digest[1] % len(categories)]
        tokens = [*_certain_tokens('{"decision":"'), _choice(decision, decisions, digest[3]),
                  *_certain_tokens('","category":"'), _choice(category, categories, digest[4])]
        tail = ""
        if '"confidence"' in request.regex:
            tail = f'","confidence":0.{digest[2] % 100:02d}'[1:]
        tokens += _certain_tokens('"' + tail + "}")
        return "".join(t.token for t in tokens), tokens

    async def check_health(self) -> dict[str, Any]:
        if not self.healthy:
            raise BackendUnavailable("fake backend set unhealthy")
        return {"models": ["fake"]}

    async def aclose(self) -> None:
        return None


def _certain_tokens(text: str) -> list[TokenLogprob]:
    """*text* as tokens of at most four characters, each certain (log-probability 0)."""
    return [TokenLogprob(token=text[i:i + 4], logprob=0.0, top=((text[i:i + 4], 0.0),))
            for i in range(0, len(text), 4)]


def _choice(chosen: str, allowed: list[str], seed: int) -> TokenLogprob:
    """The token for *chosen* among *allowed*: it gets the largest share, 0.50 to 0.99 (from
    *seed*); the others split the rest evenly. Alternatives sorted by probability, as an
    engine's top-k."""
    others = [a for a in allowed if a != chosen]
    p = 0.5 + (seed % 50) / 100.0 if others else 1.0
    rest = (1.0 - p) / len(others) if others else 0.0
    top = sorted([(chosen, math.log(p)), *((a, math.log(rest)) for a in others)],
                 key=lambda a: -a[1])
    return TokenLogprob(token=chosen, logprob=math.log(p), top=tuple(top))
