"""Run prompt versions over a labelled dataset, exactly as production would, with resumption.

Each (version, row) is rendered by `ModerationPipeline.build_chat` (same templates, locale
variant, verdict regex and sampling as `/v1/moderate`), sent to `backend.chat` and parsed by
`parse_verdict` (fail closed). A backend failure (timeout, 5xx, 429, a broken answer) is
recorded as an error (`error_type` set, `decision` None): never as a verdict, never as allow.

Resumption: the model's raw answer (text, finish reason, tokens, latency) is appended to
`<cache_dir>/<spec answer_hash>.jsonl` as soon as it arrives (the content hash without the
promotion criteria and operating points, which do not change answers), keyed by the row's
`input_hash` (what the model saw), with its token log-probabilities when the engine sent them
(the calibrated probabilities are derived from them again on every run). A later run with the same version and rows only calls the
backend for what is missing; cached answers are parsed again with the current verdict code.
Errors are not cached, so they are retried on the next run. Interrupting a run (Ctrl-C) keeps
every answer already written. A torn last line (the process killed mid-write) is ignored.
The cache trusts that a model name keeps meaning the same weights: after swapping the weights
behind a name, run with `use_cache=False` (or delete the files).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from gateway.pipeline import ModerationPipeline
from gateway.quality.evaluation.dataset import DatasetRow
from gateway.verdict import Verdict, parse_verdict
from prompt_registry import PromptVersion
from serving import ChatRequest, InferenceBackend
from serving.protocol import TokenLogprob

__all__ = ["ItemResult", "cache_path", "run_eval"]

# Extra time past the backend's own deadline before the runner gives up on a call.
_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class ItemResult:
    prompt: str
    version: int
    version_hash: str
    item_id: str
    input_hash: str
    locale: str            # the row's locale
    prompt_locale: str     # the prompt's locale variant that was used
    decision: str | None   # None only when error_type is set
    category: str | None
    confidence: float | None
    fail_reason: str | None  # the model answered but not a valid verdict (-> needs_review)
    error_type: str | None   # the backend failed: no verdict at all
    error: str | None
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    # Calibrated probabilities (gateway/verdict.py); None when the answer has no log-probabilities.
    decision_probability: float | None = None
    category_probability: float | None = None
    block_probability: float | None = None
    probability_unresolved: float | None = None
    decided_by: str | None = None        # model | threshold | fail_closed (None: no verdict)
    model_decision: str | None = None    # the model's decision when not the model decided
    decision_margin: float | None = None  # Verdict.decision_margin: what a cascade's low_margin reads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the model answered (cached), or why it did not (never cached)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    error_type: str | None = None
    error: str | None = None
    cached: bool = False
    logprobs: tuple[TokenLogprob, ...] | None = None


def cache_path(cache_dir: Path, version: PromptVersion) -> Path:
    return cache_dir / f"{version.spec.answer_hash()}.jsonl"


def _logprobs_from(data: Any) -> tuple[TokenLogprob, ...] | None:
    """Cached log-probabilities (see `_CacheWriter.append`); None when absent (answers cached
    before they were asked for) or unreadable."""
    if not isinstance(data, list):
        return None
    try:
        return tuple(TokenLogprob(token=str(t), logprob=float(lp), top=tuple((str(a), float(q)) for a, q in top))
                     for t, lp, top in data)
    except (TypeError, ValueError):
        return None


def _load_cache(path: Path) -> dict[str, _Answer]:
    out: dict[str, _Answer] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            d = json.loads(line)
            out[str(d["input_hash"])] = _Answer(
                text=str(d["text"]), finish_reason=d.get("finish_reason"),
                prompt_tokens=int(d.get("prompt_tokens", 0)),
                completion_tokens=int(d.get("completion_tokens", 0)),
                latency_ms=float(d.get("latency_ms", 0.0)), cached=True,
                logprobs=_logprobs_from(d.get("logprobs")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn line from an interrupted run: that item is computed again
    return out


class _CacheWriter:
    """Appends one JSON line per answer; a line is complete or (when killed) ignored later."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = None
        self._path = path

    def append(self, input_hash: str, item_id: str, answer: _Answer) -> None:
        if self._fh is None:
            needs_newline = False
            if self._path.exists() and self._path.stat().st_size > 0:
                with self._path.open("rb") as fh:  # a torn last line must not swallow ours
                    fh.seek(-1, 2)
                    needs_newline = fh.read(1) != b"\n"
            self._fh = self._path.open("a", encoding="utf-8")
            if needs_newline:
                self._fh.write("\n")
        record: dict[str, Any] = {"input_hash": input_hash, "item_id": item_id, "text": answer.text,
                  "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                  "completion_tokens": answer.completion_tokens,
                  "latency_ms": round(answer.latency_ms, 3)}
        if answer.logprobs is not None:  # compact: [token, logprob, [[alternative, logprob], ...]]
            record["logprobs"] = [[t.token, t.logprob, [list(a) for a in t.top]] for t in answer.logprobs]
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


async def _call(backend: InferenceBackend, chat: ChatRequest, timeout_s: float) -> _Answer:
    start = time.perf_counter()
    try:
        result = await asyncio.wait_for(backend.chat(chat, timeout_s=timeout_s), timeout_s + _GRACE_S)
    except TimeoutError:
        return _Answer(error_type="TimeoutError", error=f"no answer within {timeout_s:.1f}s",
                       latency_ms=(time.perf_counter() - start) * 1000.0)
    except Exception as exc:  # noqa: BLE001 - any backend failure is recorded, never a verdict
        return _Answer(error_type=type(exc).__name__, error=str(exc)[:500],
                       latency_ms=(time.perf_counter() - start) * 1000.0)
    return _Answer(text=result.text, finish_reason=result.finish_reason,
                   prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                   latency_ms=(time.perf_counter() - start) * 1000.0, logprobs=result.logprobs)


def _result(version: PromptVersion, row: DatasetRow, prompt_locale: str, answer: _Answer) -> ItemResult:
    decision: str | None = None
    category: str | None = None
    confidence: float | None = None
    fail_reason: str | None = None
    verdict: Verdict | None = None
    if answer.error_type is None:
        verdict = parse_verdict(answer.text, answer.finish_reason, version.spec.verdict,
                                logprobs=answer.logprobs, thresholds=version.spec.thresholds)
        decision, category = verdict.decision, verdict.category
        confidence, fail_reason = verdict.confidence, verdict.fail_reason
    return ItemResult(prompt=version.name, version=version.version, version_hash=version.content_hash,
                      item_id=row.item_id, input_hash=row.input_hash, locale=row.locale,
                      prompt_locale=prompt_locale, decision=decision, category=category,
                      confidence=confidence, fail_reason=fail_reason,
                      error_type=answer.error_type,
                      error=answer.error if answer.error_type is not None else None,
                      latency_ms=answer.latency_ms, prompt_tokens=answer.prompt_tokens,
                      completion_tokens=answer.completion_tokens, cached=answer.cached,
                      decision_probability=verdict.decision_probability if verdict else None,
                      category_probability=verdict.category_probability if verdict else None,
                      block_probability=verdict.block_probability if verdict else None,
                      probability_unresolved=verdict.probability_unresolved if verdict else None,
                      decided_by=verdict.decided_by if verdict else None,
                      model_decision=verdict.model_decision if verdict else None,
                      decision_margin=verdict.decision_margin if verdict else None)


def _progress_enabled(progress: bool) -> bool:
    try:
        return progress and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


async def run_eval(versions: list[PromptVersion], rows: Sequence[DatasetRow], backend: InferenceBackend,
                   *, concurrency: int = 4, cache_dir: Path, priority: int = 5, timeout_s: float,
                   progress: bool, use_cache: bool = True) -> list[ItemResult]:
    """Evaluate every version on every row; results in order (versions outer, rows inner).

    `concurrency` bounds backend calls in flight. `priority` is vLLM's priority (higher runs
    later than caller traffic, which uses 0). `use_cache=False` ignores cached answers (new
    answers are still appended and win on later runs).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    chats: dict[tuple[str, str], tuple[PromptVersion, DatasetRow, str, ChatRequest]] = {}
    answers: dict[tuple[str, str], _Answer] = {}
    locales: dict[tuple[str, str], str] = {}
    cached_by_hash: dict[str, dict[str, _Answer]] = {}
    for version in versions:
        vh = version.spec.answer_hash()  # versions that differ only in their criteria share answers
        if vh not in cached_by_hash:
            cached_by_hash[vh] = _load_cache(cache_path(cache_dir, version)) if use_cache else {}
        for row in rows:
            # Rendering first also fails fast (RenderError) on a row the prompt cannot take.
            used_locale, chat = ModerationPipeline.build_chat(
                version, row.variables(), row.locale,
                request_id=f"eval-{uuid.uuid4().hex}", priority=priority)
            key = (vh, row.input_hash)
            locales[key] = used_locale
            if key in answers or key in chats:
                continue
            hit = cached_by_hash[vh].get(row.input_hash)
            if hit is not None:
                answers[key] = hit
            else:
                chats[key] = (version, row, used_locale, chat)

    semaphore = asyncio.Semaphore(concurrency)
    writers = {vh: _CacheWriter(cache_dir / f"{vh}.jsonl") for vh in cached_by_hash}  # = cache_path
    bar = tqdm(total=len(chats), desc="eval", unit="call", file=sys.stderr,
               disable=not _progress_enabled(progress), leave=False)

    async def one(key: tuple[str, str], version: PromptVersion, row: DatasetRow, chat: ChatRequest) -> None:
        async with semaphore:
            answer = await _call(backend, chat, timeout_s)
        if answer.error_type is None:
            writers[key[0]].append(row.input_hash, row.item_id, answer)
        answers[key] = answer
        bar.update(1)

    try:
        async with asyncio.TaskGroup() as tg:
            for key, (version, row, _, chat) in chats.items():
                tg.create_task(one(key, version, row, chat))
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    return [_result(v, row, locales[(v.spec.answer_hash(), row.input_hash)],
                    answers[(v.spec.answer_hash(), row.input_hash)])
            for v in versions for row in rows]
