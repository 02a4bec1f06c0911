"""Replay recorded traffic through a candidate version offline: the offline counterpart of a
shadow, over a week of traffic instead of a day.

Input is either the sample store (`gateway.samples`: listings with the request id production
answered them under) or a dataset file (`datasets/` format). What production answered comes
from the decision log: by request id for sampled rows (falling back to the verdict the sample
store kept with the row, the same decision, when the log no longer has it), by item id (the
newest primary decision) for dataset rows; a dataset row production never answered is listed
as unmatched and left out of the agreement.

The candidate runs through the evaluation runner (`run_eval`: the same rendering, locale
variant, verdict constraint, fail-closed parsing and answer cache as `modgate eval run`), behind
`RateLimitedBackend`, which spaces calls to at most `rate` per second, and at a vLLM priority
(`REPLAY_PRIORITY`) above that of evaluations and shadows, so the engine serves live traffic,
shadows and evaluations first.

The report gives agreement and Cohen's kappa overall, per production class (`allow`,
`block:<category>`, `needs_review`) and per locale, and lists every flipped item, with its
listing content when the sample store has it.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from gateway.quality.evaluation.dataset import DatasetRow
from gateway.quality.evaluation.runner import ItemResult, run_eval
from gateway.quality.reporting import MISSING
from gateway.samples import Sample
from prompt_registry import PromptVersion
from prompt_registry.rollout_stats import cohen_kappa
from serving import ChatRequest, ChatResult, InferenceBackend
from serving.protocol import ChatChunk

__all__ = ["REPLAY_PRIORITY", "Flip", "RateLimitedBackend", "ReplayItem", "ReplayReport",
           "production_answers", "replay", "replay_markdown", "rows_from_dataset",
           "rows_from_samples", "write_report"]

# vLLM priority (higher runs later): live traffic 0, shadows `gateway.shadow.priority`,
# evaluations 5 (`modgate eval run`); a replay of a week of traffic yields to all of them.
REPLAY_PRIORITY = 10
_PRIMARY_ARMS = frozenset({"stable", "canary", "pinned"})


class RateLimitedBackend:
    """An `InferenceBackend` that starts at most `rate` calls per second (evenly spaced), so a
    replay of a week of traffic cannot crowd the engine, whatever its concurrency."""

    def __init__(self, inner: InferenceBackend, rate: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.inner, self.interval = inner, 1.0 / rate
        self._clock, self._sleep = clock, sleep
        self._next = float("-inf")
        self._lock = asyncio.Lock()

    async def _slot(self) -> None:
        async with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            await self._sleep(start - now)

    async def chat(self, request: ChatRequest, *, timeout_s: float) -> ChatResult:
        await self._slot()
        return await self.inner.chat(request, timeout_s=timeout_s)

    async def stream_chat(self, request: ChatRequest, *, timeout_s: float) -> AsyncIterator[ChatChunk]:
        await self._slot()
        async for chunk in self.inner.stream_chat(request, timeout_s=timeout_s):
            yield chunk

    async def check_health(self) -> dict[str, Any]:
        return await self.inner.check_health()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True, slots=True)
class Answer:
    decision: str
    category: str | None
    source: Literal["decision_log", "sample_store"]
    request_id: str | None = None


def label_key(decision: str | None, category: str | None) -> str:
    """One class per verdict: `allow`, `needs_review`, `block:<category>`, or `error`."""
    if decision is None:
        return "error"
    if decision in ("allow", "needs_review"):
        return decision
    return f"{decision}:{category or 'none'}"


def production_answers(records: Iterable[Any]) -> tuple[dict[str, Answer], dict[str, Answer]]:
    """Primary decisions of the decision log (oldest first): (by request id, newest by item
    id). Shadows and failures are not what production answered."""
    by_request: dict[str, Answer] = {}
    by_item: dict[str, Answer] = {}
    for rec in records:
        if rec.arm not in _PRIMARY_ARMS or rec.decision is None:
            continue
        answer = Answer(rec.decision, rec.category, "decision_log", rec.request_id)
        by_request[rec.request_id] = answer
        by_item[rec.item_id] = answer
    return by_request, by_item


@dataclass(frozen=True, slots=True)
class Replayed:
    """One recorded listing to replay, with what production answered (None: unknown)."""

    row: DatasetRow
    production: Answer | None
    request_id: str | None = None
    content: Mapping[str, str] | None = None


def rows_from_samples(samples: Sequence[Sample], by_request: Mapping[str, Answer]) -> list[Replayed]:
    """Sampled traffic as replay rows; production's answer from the decision log by request
    id, else the verdict the sample store kept with the row. Rows without a title (a prompt
    whose template takes none) cannot be rendered as a listing and are left out."""
    out = []
    for s in samples:
        if not s.content.get("title"):
            continue
        answer = by_request.get(s.request_id) or Answer(s.decision, s.category, "sample_store",
                                                        s.request_id)
        row = DatasetRow(item_id=s.item_id, title=s.content.get("title", ""),
                         description=s.content.get("description", ""), locale=s.locale,
                         gold_decision=answer.decision, gold_category=answer.category or "none",
                         seller_id=s.content.get("seller_id"))
        out.append(Replayed(row, answer, s.request_id, s.content))
    return out


def rows_from_dataset(rows: Sequence[DatasetRow], by_item: Mapping[str, Answer]) -> list[Replayed]:
    """Dataset rows, each with production's newest answer for its item id (None when the
    decision log has none); content from the rows themselves."""
    out = []
    for r in rows:
        answer = by_item.get(r.item_id)
        out.append(Replayed(r, answer, answer.request_id if answer else None,
                            {"title": r.title, "description": r.description}))
    return out


@dataclass(frozen=True, slots=True)
class ReplayItem:
    item_id: str
    request_id: str | None
    locale: str
    production: str  # label_key
    production_source: str
    candidate: str  # label_key ("error" when the backend failed)
    fail_reason: str | None
    error: str | None

    @property
    def agrees(self) -> bool:
        return self.production == self.candidate


@dataclass(frozen=True, slots=True)
class Flip:
    item: ReplayItem
    content: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class Agreement:
    n: int
    agree: int
    kappa: float | None

    @property
    def rate(self) -> float | None:
        return self.agree / self.n if self.n else None


def _agreement(items: Sequence[ReplayItem], *, kappa: bool = True) -> Agreement:
    """Agreement of the candidate with production; kappa only where production's answers vary
    (within one production class it says nothing the agreement does not)."""
    matrix: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for it in items:
        matrix[it.production][it.candidate] += 1
    agree = sum(1 for it in items if it.agrees)
    return Agreement(len(items), agree, cohen_kappa(matrix) if kappa else None)


@dataclass(frozen=True)
class ReplayReport:
    prompt: str
    version: int
    source: str
    window: tuple[str | None, str | None]
    rate: float
    items: tuple[ReplayItem, ...]
    flips: tuple[Flip, ...]
    unmatched: tuple[str, ...]  # item ids production never answered (dataset input)
    errors: int
    overall: Agreement
    by_class: dict[str, Agreement] = field(default_factory=dict)
    by_locale: dict[str, Agreement] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def ag(a: Agreement) -> dict[str, Any]:
            return {"n": a.n, "agree": a.agree, "agreement": a.rate,
                    "kappa": None if a.kappa is None else round(a.kappa, 4)}
        return {
            "prompt": self.prompt, "version": self.version, "source": self.source,
            "window": {"since": self.window[0], "until": self.window[1]}, "rate": self.rate,
            "replayed": len(self.items), "errors": self.errors, "unmatched": list(self.unmatched),
            "overall": ag(self.overall),
            "by_production_class": {k: ag(v) for k, v in self.by_class.items()},
            "by_locale": {k: ag(v) for k, v in self.by_locale.items()},
            "flips": [{**asdict(f.item), "content": dict(f.content) if f.content else None}
                      for f in self.flips],
        }


def _compare(replayed: Sequence[Replayed], results: Sequence[ItemResult]) -> list[ReplayItem]:
    out = []
    for rep, res in zip(replayed, results, strict=True):
        assert rep.production is not None
        out.append(ReplayItem(
            item_id=rep.row.item_id, request_id=rep.request_id, locale=rep.row.locale,
            production=label_key(rep.production.decision, rep.production.category),
            production_source=rep.production.source,
            candidate=label_key(res.decision, res.category), fail_reason=res.fail_reason,
            error=res.error))
    return out


async def replay(candidate: PromptVersion, replayed: Sequence[Replayed], backend: InferenceBackend, *,
                 rate: float, concurrency: int, cache_dir: Path, timeout_s: float, progress: bool,
                 source: str, window: tuple[datetime | None, datetime | None] = (None, None),
                 content: Callable[[Sequence[ReplayItem]], Mapping[str, Mapping[str, str]]] | None = None,
                 use_cache: bool = True) -> ReplayReport:
    """Run *candidate* over the rows production answered and compare. *content* looks up
    listing content for the flipped items (by request id or item id) when the rows carry
    none."""
    matched = [r for r in replayed if r.production is not None]
    unmatched = tuple(r.row.item_id for r in replayed if r.production is None)
    limited = RateLimitedBackend(backend, rate)
    results = await run_eval([candidate], [r.row for r in matched], limited, concurrency=concurrency,
                             cache_dir=cache_dir, priority=REPLAY_PRIORITY, timeout_s=timeout_s,
                             progress=progress, use_cache=use_cache)
    items = _compare(matched, results)
    flipped = [(it, rep) for it, rep in zip(items, matched, strict=True) if not it.agrees]
    looked_up = content([it for it, _ in flipped]) if content is not None else {}
    flips = tuple(Flip(it, rep.content or looked_up.get(it.request_id or "") or looked_up.get(it.item_id))
                  for it, rep in flipped)
    by_class: dict[str, list[ReplayItem]] = defaultdict(list)
    by_locale: dict[str, list[ReplayItem]] = defaultdict(list)
    for it in items:
        by_class[it.production].append(it)
        by_locale[it.locale].append(it)
    return ReplayReport(
        prompt=candidate.name, version=candidate.version, source=source,
        window=(window[0].isoformat() if window[0] else None, window[1].isoformat() if window[1] else None),
        rate=rate, items=tuple(items), flips=flips, unmatched=unmatched,
        errors=sum(1 for it in items if it.candidate == "error"), overall=_agreement(items),
        by_class={k: _agreement(v, kappa=False) for k, v in sorted(by_class.items())},
        by_locale={k: _agreement(v) for k, v in sorted(by_locale.items())})


# -- report -----------------------------------------------------------------------------------

def _cell(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _kappa(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def replay_markdown(report: ReplayReport, *, max_flips: int = 200) -> str:
    o = report.overall
    since, until = report.window
    lines = [f"# Replay of {report.prompt} v{report.version}", "",
             f"Source: {report.source}" + (f", {since or '…'} to {until or 'now'}" if since or until else "")
             + f"; at most {report.rate:g} calls/s.", "",
             f"**{_pct(o.rate)} agreement** with what production answered on {o.n} items "
             f"(kappa {_kappa(o.kappa)}); {len(report.flips)} flipped, {report.errors} backend "
             f"errors, {len(report.unmatched)} without a production answer.", "",
             "## By production answer", "",
             *_table(["production", "items", "agree", "agreement"],
                     [[k, a.n, a.agree, _pct(a.rate)] for k, a in report.by_class.items()]),
             "", "## By locale", "",
             *_table(["locale", "items", "agree", "agreement", "kappa"],
                     [[k, a.n, a.agree, _pct(a.rate), _kappa(a.kappa)] for k, a in report.by_locale.items()]),
             "", "## Flipped items", ""]
    if not report.flips:
        lines.append("None.")
    else:
        rows = [[f.item.item_id, f.item.locale, f.item.production, f.item.candidate,
                 (f.content or {}).get("title", "(no content stored)"),
                 (f.content or {}).get("description", "")[:300]]
                for f in report.flips[:max_flips]]
        lines += _table(["item", "locale", "production", "candidate", "title", "description"], rows)
        if len(report.flips) > max_flips:
            lines += ["", f"… and {len(report.flips) - max_flips} more (see the JSON report)."]
    if report.unmatched:
        lines += ["", f"{len(report.unmatched)} item(s) had no production answer in the decision "
                  f"log: {', '.join(report.unmatched[:20])}" + (" …" if len(report.unmatched) > 20 else "")]
    return "\n".join(lines) + "\n"


def write_report(report: ReplayReport, out_dir: Path) -> dict[str, Path]:
    """`replay-v<N>.json`, `.md` and a self-contained `.html` in *out_dir*."""
    import json

    from gateway.quality.reporting import html_page, markdown_html

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"replay-v{report.version}"
    md = replay_markdown(report)
    paths = {"json": stem.with_suffix(".json"), "markdown": stem.with_suffix(".md"),
             "html": stem.with_suffix(".html")}
    paths["json"].write_text(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n",
                             encoding="utf-8")
    paths["markdown"].write_text(md, encoding="utf-8")
    body = markdown_html(md.split("\n", 1)[1], shift_headings=0)
    paths["html"].write_text(html_page(f"Replay of {report.prompt} v{report.version}", body),
                             encoding="utf-8")
    return paths
