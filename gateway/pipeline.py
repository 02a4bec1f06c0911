"""The moderation pipeline, shared by every API that evaluates a prompt (`/v1/moderate`, the
OpenAI-compatible routes, shadow evaluation): resolve a prompt version, pick the locale
variant, render it in the sandbox, call the model under a deadline with the verdict's exact
output constraint, and validate the verdict (fail closed)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.prompt_cache import PromptCache, Resolved
from gateway.verdict import Verdict, parse_verdict
from prompt_registry import PromptVersion, render_messages
from serving import ChatRequest, ChatResult, InferenceBackend

__all__ = ["Evaluation", "ModerationPipeline"]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One prompt version evaluated on one input."""

    version: PromptVersion
    label: str | None
    locale: str
    stale: bool
    verdict: Verdict
    result: ChatResult
    latency_ms: float

    def prompt_ref(self) -> dict[str, object]:
        return {"name": self.version.name, "version": self.version.version, "label": self.label,
                "locale": self.locale, "stale": self.stale}


class ModerationPipeline:
    def __init__(self, cache: PromptCache, backend: InferenceBackend) -> None:
        self.cache = cache
        self.backend = backend

    async def resolve(self, name: str, *, label: str | None = None, version: int | None = None) -> Resolved:
        """A label (from the hot cache) or a pinned version (immutable, cached for good)."""
        if version is not None:
            return await self.cache.get_version(name, version)
        if label is None:
            raise ValueError("resolve needs a label or a version")
        return await self.cache.resolve(name, label)

    @staticmethod
    def build_chat(version: PromptVersion, variables: Mapping[str, object], locale: str | None, *,
                   request_id: str, priority: int = 0) -> tuple[str, ChatRequest]:
        spec = version.spec
        used_locale, templates = spec.select_locale(locale)
        messages = render_messages(templates, spec.variables, variables)
        return used_locale, ChatRequest(
            model=spec.model, messages=messages, max_tokens=spec.sampling.max_tokens,
            temperature=spec.sampling.temperature, top_p=spec.sampling.top_p,
            seed=spec.sampling.seed, regex=spec.verdict.regex(), request_id=request_id,
            priority=priority)

    async def evaluate(self, resolved: Resolved, variables: Mapping[str, object], locale: str | None, *,
                       request_id: str, timeout_s: float, label: str | None,
                       priority: int = 0) -> Evaluation:
        start = time.perf_counter()
        version = resolved.version
        used_locale, chat = self.build_chat(version, variables, locale, request_id=request_id,
                                            priority=priority)
        result = await self.backend.chat(chat, timeout_s=max(0.001, timeout_s))
        verdict = parse_verdict(result.text, result.finish_reason, version.spec.verdict)
        return Evaluation(version=version, label=label, locale=used_locale, stale=resolved.stale,
                          verdict=verdict, result=result,
                          latency_ms=(time.perf_counter() - start) * 1000.0)
