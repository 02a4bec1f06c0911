"""The operational report: what the gateway decided over a time window, and how well.

Sources: the decision log (every verdict, primary and shadow), the reviewer-feedback log (joined
on request id, gateway/quality/live_quality.py) and the registry (audit log and rollouts). It
opens with the point and then gives the detail:

- **headline**: per prompt, for all locales and each locale (en-US, zh-CN, ...), what callers got
  (stable, canary and pinned arms): decisions, review rate and precision of the reviewed
  decisions, each against the previous period of the same length;
- **rollouts of the window**, each with its outcome (promoted, aborted, still running...), and
  the registry events, one readable line each (what moved, why, by whom; the evidence one click
  away in the HTML, or in `--json`);

then, per prompt version and arm (`stable`, `canary`, `pinned`, `shadow`):

- **volume**, and per locale, and per day of the report's time zone (`--tz`: days split at its
  midnight);
- **verdict mix**: the share of each outcome label (`none` = allowed, a violation category,
  `needs_review` = flagged without a category, `error` = no verdict), as a table and over time;
- **review rate**: the share of verdicts that are `needs_review` (with 95% Wilson interval),
  which includes unusable model output (the gateway fails closed), and the parse-failure rate;
- **precision and recall from reviewer feedback**, per category, with 95% Wilson intervals;
- **shadow pairs**: for each shadowed version, what the caller got against what the shadow said
  on the same request, per category (a v1 x v2 table);
- **tokens and cost**: prompt tokens (of which served from the prefix cache) and completion
  tokens, and their cost at the prices of `reporting.prices`;
- **latency**: p50/p95/p99 of the answered requests (`prompt_registry.rollout_stats.quantile_of`,
  the quantile the rollout gates and `modgate rollouts status` read from their sketch).

`build_report` computes everything (pure, testable); `write_ops_report` writes `ops-report.md`
with PNG plots next to it and `ops-report.html`, the same report with the plots embedded (one
self-contained file, gateway/quality/reporting.py).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.report import _ci, _f, _pct, _table, pr_plot
from gateway.quality.evaluation.scorecard import outcome_label, wilson
from gateway.quality.live_quality import (
    PRIMARY_ARMS,
    FeedbackLabel,
    HeadlineAccumulator,
    LiveQuality,
    LiveQualityAccumulator,
    TrafficHeadline,
    locale_of,
)
from gateway.quality.reporting import (
    MISSING,
    change_count,
    change_points,
    change_value,
    figure,
    html_page,
    local_time,
    markdown_html,
    png_data_uri,
    tz_name,
)
from gateway.quality.whatif import VersionWhatIf, WhatIfAccumulator
from prompt_registry.audit_text import describe
from prompt_registry.rollout_stats import quantile_of
from prompt_registry.store import AuditEntry, PromptReader, RolloutReader

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from gateway.config import ModelPrice

__all__ = ["OpsReport", "build_report", "choose_bucket", "headline_table", "ops_html",
           "ops_markdown", "registry_events", "write_ops_report"]

_BUCKETS: tuple[tuple[str, timedelta], ...] = (
    ("1min", timedelta(minutes=1)), ("5min", timedelta(minutes=5)),
    ("15min", timedelta(minutes=15)), ("30min", timedelta(minutes=30)),
    ("1h", timedelta(hours=1)), ("3h", timedelta(hours=3)), ("6h", timedelta(hours=6)),
    ("12h", timedelta(hours=12)), ("1D", timedelta(days=1)), ("7D", timedelta(days=7)))
_ARM_ORDER = {a: i for i, a in enumerate([*PRIMARY_ARMS, "shadow"])}
_COLUMNS = ("ts", "prompt", "version", "arm", "outcome", "decision", "fail_reason", "error_type",
            "latency_ms", "locale", "model", "prompt_tokens", "cached_prompt_tokens",
            "completion_tokens")
MAX_BUCKETS = 60


def choose_bucket(start: datetime, end: datetime) -> tuple[str, timedelta]:
    """The smallest of 1 min, 5 min, ... 7 days that cuts the window into at most 60 buckets."""
    span = end - start
    for name, size in _BUCKETS:
        if span / size <= MAX_BUCKETS:
            return name, size
    return _BUCKETS[-1]


@dataclass
class OpsReport:
    start: datetime
    end: datetime
    generated_at: datetime
    records: int
    bucket: str
    volume: list[dict[str, Any]]
    verdict_mix: list[dict[str, Any]]
    outcomes: list[str]                   # columns of the verdict mix, in display order
    review: list[dict[str, Any]]
    latency: list[dict[str, Any]]
    errors: dict[str, int]
    fail_reasons: dict[str, int]
    live: list[LiveQuality]
    feedback_labels: int                  # labels read
    feedback_matched: int                 # of which for a request in the window
    tz: tzinfo = UTC                      # the zone days split in and times are shown in
    headline: list[TrafficHeadline] = field(default_factory=list)
    previous_start: datetime | None = None            # the previous period: [previous_start, start)
    headline_before: list[TrafficHeadline] | None = None
    live_by_locale: list[LiveQuality] = field(default_factory=list)
    by_locale: list[dict[str, Any]] = field(default_factory=list)
    per_day: list[tuple[str, TrafficHeadline]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    currency: str = "USD"
    shadow_pairs: list[dict[str, Any]] = field(default_factory=list)
    events: list[RegistryEvent] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the reader must know (skipped lines...)
    what_if: list[VersionWhatIf] = field(default_factory=list)   # threshold what-if (whatif.py)
    frame: Any = None                     # pandas DataFrame of the decisions (for the plots)

    @property
    def prompts(self) -> list[str]:
        return sorted({r["prompt"] for r in self.volume})

    def to_dict(self) -> dict[str, Any]:
        def stats(s: Any) -> dict[str, Any]:
            return {"support": s.support, "predicted": s.predicted, "tp": s.tp, "fp": s.fp,
                    "fn": s.fn, "precision": s.precision, "precision_ci": s.precision_ci,
                    "recall": s.recall, "recall_ci": s.recall_ci}

        def live(q: LiveQuality) -> dict[str, Any]:
            return {"prompt": q.prompt, "version": q.version, "arm": q.arm,
                    **({"locale": q.locale} if q.locale is not None else {}),
                    "decisions": q.decisions, "reviewed": q.reviewed,
                    "micro": stats(q.quality.micro), "flagged": stats(q.quality.flagged),
                    "categories": {s.category: stats(s) for s in q.quality.categories}}
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "tz": tz_name(self.tz),
                "generated_at": self.generated_at.isoformat(timespec="seconds"),
                "records": self.records, "bucket": self.bucket,
                "headline": [h.to_dict() for h in self.headline],
                "previous": None if self.previous_start is None else {
                    "start": self.previous_start.isoformat(), "end": self.start.isoformat(),
                    "headline": [h.to_dict() for h in self.headline_before or []]},
                "volume": self.volume, "by_locale": self.by_locale,
                "per_day": [{"day": day, **h.to_dict()} for day, h in self.per_day],
                "verdict_mix": self.verdict_mix, "review": self.review, "latency": self.latency,
                "tokens": self.tokens, "currency": self.currency,
                "shadow_pairs": self.shadow_pairs,
                "errors": self.errors, "fail_reasons": self.fail_reasons,
                "feedback": {"labels": self.feedback_labels, "matched": self.feedback_matched,
                             "quality": [live(q) for q in self.live],
                             "by_locale": [live(q) for q in self.live_by_locale]},
                "events": self.events, "rollouts": self.rollouts, "notes": self.notes,
                "what_if": [w.to_dict() for w in self.what_if]}


def _key(r: dict[str, Any]) -> tuple[str, int, int]:
    return (r["prompt"], r["version"], _ARM_ORDER.get(r["arm"], 9))


def _label(outcome: str) -> str:
    return "allow" if outcome == "none" else outcome


def _cost(price: ModelPrice | None, prompt: int, cached: int, completion: int) -> float | None:
    """What the tokens cost at *price*; None without a price."""
    if price is None:
        return None
    cached_rate = price.cached_prompt_per_1k if price.cached_prompt_per_1k is not None \
        else price.prompt_per_1k
    return ((prompt - cached) * price.prompt_per_1k + cached * cached_rate
            + completion * price.completion_per_1k) / 1000.0


class _ShadowPairs:
    """What the caller got against what each shadow said on the same request."""

    def __init__(self) -> None:
        self.primary: dict[str, tuple[str, int, str]] = {}           # request -> prompt, v, outcome
        self.shadows: list[tuple[str, str, int, str]] = []            # shadow_of, prompt, v, outcome

    def add(self, rec: DecisionRecord, outcome: str) -> None:
        if rec.prompt_name is None or rec.prompt_version is None:
            return
        if rec.arm == "shadow" and rec.shadow_of:
            self.shadows.append((rec.shadow_of, rec.prompt_name, rec.prompt_version, outcome))
        elif rec.arm in PRIMARY_ARMS:
            self.primary[rec.request_id] = (rec.prompt_name, rec.prompt_version, outcome)

    def results(self) -> list[dict[str, Any]]:
        cells: dict[tuple[str, int, int], Counter[tuple[str, str]]] = {}
        for rid, prompt, version, shadow_outcome in self.shadows:
            p = self.primary.get(rid)
            if p is None or p[0] != prompt:
                continue  # the caller's decision is outside the window (or of another prompt)
            cells.setdefault((prompt, p[1], version), Counter())[(p[2], shadow_outcome)] += 1
        out = []
        for (prompt, primary_v, shadow_v), counts in sorted(cells.items()):
            n = sum(counts.values())
            same = sum(c for (a, b), c in counts.items() if a == b)
            out.append({"prompt": prompt, "primary_version": primary_v,
                        "shadow_version": shadow_v, "pairs": n, "agreement": same / n,
                        "agreement_ci": wilson(same, n),
                        "counts": [{"primary": a, "shadow": b, "n": c}
                                   for (a, b), c in sorted(counts.items())]})
        return out


def build_report(records: Iterable[DecisionRecord], labels: dict[str, FeedbackLabel], *,
                 start: datetime, end: datetime, prompt: str | None = None,
                 now: datetime | None = None, tz: tzinfo = UTC,
                 previous_start: datetime | None = None,
                 prices: Mapping[str, ModelPrice] | None = None,
                 currency: str = "USD", whatif: WhatIfAccumulator | None = None) -> OpsReport:
    """Every number of the report from the decision records and reviewer labels.

    Records of [start, end) make the report; records of [previous_start, start), when
    *previous_start* is given, only the previous period of the headline. Days split at the
    midnight of *tz*. *prices* (model -> price) turn tokens into cost. *whatif* is given the
    records of the window too (its results need the registry: the caller sets `what_if`)."""
    import pandas as pd

    acc = LiveQualityAccumulator(labels)
    acc_locale = LiveQualityAccumulator(labels, by_locale=True)
    head, head_before = HeadlineAccumulator(labels), HeadlineAccumulator(labels)
    days: dict[str, HeadlineAccumulator] = {}
    pairs = _ShadowPairs()
    rows: list[tuple[Any, ...]] = []
    calls: list[tuple[Any, ...]] = []   # one per model call: a cascade's decision has two
    for rec in records:
        if prompt is not None and rec.prompt_name != prompt:
            continue
        if rec.ts < start:
            if previous_start is not None and rec.ts >= previous_start:
                head_before.add(rec)
            continue
        if rec.ts >= end:
            continue
        acc.add(rec)
        acc_locale.add(rec)
        head.add(rec)
        if whatif is not None:
            whatif.add(rec)
        day = rec.ts.astimezone(tz).strftime("%Y-%m-%d")
        days.setdefault(day, HeadlineAccumulator(labels)).add(rec)
        out = outcome_label(rec.decision, rec.category, error=rec.error_type is not None)
        pairs.add(rec, out)
        rows.append((rec.ts, rec.prompt_name, rec.prompt_version, rec.arm, out,
                     rec.decision, rec.fail_reason, rec.error_type, rec.latency_ms,
                     locale_of(rec), rec.model, rec.prompt_tokens, rec.cached_prompt_tokens,
                     rec.completion_tokens))
        who = (rec.prompt_name, rec.prompt_version, rec.arm)
        calls.append((*who, rec.model, rec.prompt_tokens, rec.cached_prompt_tokens,
                      rec.completion_tokens))
        if rec.first_model is not None:  # a cascade: the first model answered too, and is paid
            calls.append((*who, rec.first_model, rec.first_prompt_tokens, None,
                          rec.first_completion_tokens))
    df = pd.DataFrame.from_records(rows, columns=list(_COLUMNS))
    bucket, _ = choose_bucket(start, end)
    volume: list[dict[str, Any]] = []
    mix: list[dict[str, Any]] = []
    review: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    by_locale: list[dict[str, Any]] = []
    outcomes: list[str] = []
    if len(df):
        df["ts"] = pd.to_datetime(df["ts"], utc=True)
        caller = df[df["arm"] != "shadow"].groupby("prompt").size().to_dict()
        for key, g in df.groupby(["prompt", "version", "arm"], sort=False):
            p, v, arm = cast(tuple[str, int, str], key)  # the values of the grouping columns
            n = len(g)
            answered = g[g["decision"].notna()]
            errors = n - len(answered)
            volume.append({"prompt": p, "version": int(v), "arm": arm, "decisions": n,
                           "errors": errors,
                           "traffic_share": n / caller[p] if arm != "shadow" and caller.get(p) else None})
            counts = Counter(g["outcome"])
            mix.append({"prompt": p, "version": int(v), "arm": arm, "n": n,
                        "counts": dict(counts), "shares": {k: c / n for k, c in counts.items()}})
            nr = int((answered["decision"] == "needs_review").sum())
            pf = int(answered["fail_reason"].notna().sum())
            a = len(answered)
            review.append({"prompt": p, "version": int(v), "arm": arm, "answered": a,
                           "needs_review": nr, "rate": nr / a if a else None, "ci": wilson(nr, a),
                           "parse_failures": pf, "parse_failure_rate": pf / a if a else None})
            lat = answered["latency_ms"].to_numpy(dtype=float).tolist()
            latency.append({"prompt": p, "version": int(v), "arm": arm, "n": len(lat),
                            "p50_ms": quantile_of(lat, 0.5), "p95_ms": quantile_of(lat, 0.95),
                            "p99_ms": quantile_of(lat, 0.99)})
            for loc, lg in g.groupby("locale", sort=True):
                la = lg[lg["decision"].notna()]
                lnr = int((la["decision"] == "needs_review").sum())
                by_locale.append({"prompt": p, "version": int(v), "arm": arm,
                                  "locale": str(loc), "decisions": len(lg),
                                  "answered": len(la), "needs_review": lnr,
                                  "rate": lnr / len(la) if len(la) else None,
                                  "ci": wilson(lnr, len(la))})
        usage = pd.DataFrame.from_records(calls, columns=[
            "prompt", "version", "arm", "model", "prompt_tokens", "cached_prompt_tokens",
            "completion_tokens"])
        for key, mg in usage.groupby(["prompt", "version", "arm", "model"], sort=False):
            p, v, arm, model = cast(tuple[str, int, str, str], key)
            used = mg[mg["prompt_tokens"].notna()]
            pt = int(used["prompt_tokens"].sum())
            ct = int(used["completion_tokens"].fillna(0).sum())
            cached = int(used["cached_prompt_tokens"].fillna(0).sum())
            cost = _cost((prices or {}).get(str(model)), pt, cached, ct)
            tokens.append({"prompt": p, "version": int(v), "arm": arm, "model": str(model),
                           "calls": len(mg), "with_usage": len(used),
                           "cache_reported": int(used["cached_prompt_tokens"].notna().sum()),
                           "prompt_tokens": pt, "cached_prompt_tokens": cached,
                           "completion_tokens": ct, "cost": cost,
                           "cost_per_1k_calls": cost / len(used) * 1000.0
                           if cost is not None and len(used) else None})
        for table in (volume, mix, review, latency, by_locale):
            table.sort(key=_key)
        tokens.sort(key=lambda t: (*_key(t), t["model"]))
        seen = set(df["outcome"])
        cats = sorted(seen - {"none", "needs_review", "error"})
        outcomes = [o for o in ["none", *cats, "needs_review", "error"] if o in seen]
    return OpsReport(
        start=start, end=end, generated_at=now or datetime.now(UTC), records=len(df),
        bucket=bucket, volume=volume, verdict_mix=mix, outcomes=outcomes, review=review,
        latency=latency,
        errors=dict(Counter(df["error_type"].dropna())) if len(df) else {},
        fail_reasons=dict(Counter(df["fail_reason"].dropna())) if len(df) else {},
        live=acc.results(), feedback_labels=len(labels), feedback_matched=len(acc.matched),
        tz=tz, headline=head.results(), previous_start=previous_start,
        headline_before=head_before.results() if previous_start is not None else None,
        live_by_locale=acc_locale.results(), by_locale=by_locale,
        per_day=[(day, h) for day in sorted(days) for h in days[day].results()],
        tokens=tokens, currency=currency, shadow_pairs=pairs.results(), frame=df)


# -- the headline --------------------------------------------------------------------------------


def headline_table(current: Sequence[TrafficHeadline], previous: Sequence[TrafficHeadline] | None,
                   *, many: bool) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the headline: per prompt (all locales, then each locale) the caller
    decisions, review rate and precision, each with its change against *previous* (the period
    of equal length before; None: no comparison, no change columns)."""
    before = {(h.prompt, h.locale): h for h in previous or ()}
    header = [*(["prompt"] if many else []), "locale", "decisions", "review rate (95% CI)",
              "reviewed", "precision (95% CI)"]
    if previous is not None:
        header = [*header[:-3], "change", header[-3], "change", header[-2], header[-1], "change"]
    rows = []
    for h in current:
        b = before.get((h.prompt, h.locale))
        rate = (f"{_pct(h.review_rate)} ({_pct(h.review_ci[0])}–{_pct(h.review_ci[1])})"
                if h.review_ci else MISSING)
        cells = [*([h.prompt] if many else []), h.locale, str(h.decisions)]
        if previous is not None:
            cells.append(change_count(h.decisions, b.decisions if b else 0))
        cells.append(rate)
        if previous is not None:
            cells.append(change_points(h.review_rate, b.review_rate if b else None))
        cells += [str(h.reviewed), _ci(h.precision, h.precision_ci)]
        if previous is not None:
            cells.append(change_value(h.precision, b.precision if b else None))
        rows.append(cells)
    return header, rows


# -- rollouts and registry events (from the registry) -------------------------------------------


class RegistryEvent(TypedDict):
    """One audit entry of the window as the report shows it (see `registry_events`): one
    readable line (what, why, by) and the entry as stored (`note` is the full evidence)."""
    at: datetime  # always timezone-aware
    prompt: str
    action: str
    label: str | None
    from_version: int | None
    to_version: int | None
    actor: str
    what: str
    why: str
    note: str


class RegistryHistory(PromptReader, RolloutReader, Protocol):
    """What the report reads from the registry (audit log, rollouts): read facets only, since
    an offline report must not be able to change what it reports on."""


def registry_events(store: RegistryHistory, prompts: Sequence[str], start: datetime,
                    end: datetime) -> tuple[list[RegistryEvent], list[dict[str, Any]]]:
    """Audit entries of *prompts* inside [start, end), oldest first, and every rollout that ran
    during the window (started before its end, last changed after its start, or still
    active), oldest first, each with its outcome."""
    from gateway.rollouts.ops import rollout_history
    from prompt_registry import RegistryError

    events: list[RegistryEvent] = []
    rollouts: list[dict[str, Any]] = []
    for name in prompts:
        last: dict[str, AuditEntry] = {}   # rollout id -> its newest transition
        for e in store.audit(name):
            rid = _rollout_id(e)
            if rid is not None:
                last[rid] = e
            at = e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)
            if start <= at < end:
                line = describe(e)
                events.append({"at": at, "prompt": name, "action": e.action, "label": e.label,
                               "from_version": e.from_version, "to_version": e.to_version,
                               "actor": e.actor, "what": line.what, "why": line.why,
                               "note": e.note})
        try:
            history = rollout_history(store, name)  # type: ignore[arg-type]  # reads only
        except RegistryError:
            continue
        for r in reversed(history):
            started = datetime.fromisoformat(r["started_at"])
            updated = datetime.fromisoformat(r["updated_at"])
            active = r["state"] in ("running", "paused")
            if started < end and (updated >= start or active):
                rollouts.append({**r, "prompt": name, "started_at": started,
                                 "updated_at": updated,
                                 "outcome": _rollout_outcome(r, last.get(r["id"]))})
    events.sort(key=lambda e: e["at"])
    rollouts.sort(key=lambda r: r["started_at"])
    return events, rollouts


def _rollout_id(e: AuditEntry) -> str | None:
    if e.action != "rollout" or not e.note.startswith("{"):
        return None
    try:
        snap = json.loads(e.note).get("rollout")
    except (ValueError, AttributeError):
        return None
    rid = snap.get("id") if isinstance(snap, dict) else None
    return rid if isinstance(rid, str) else None


def _rollout_outcome(r: Mapping[str, Any], last: AuditEntry | None) -> str:
    """What became of the rollout, and the why and who of its last transition."""
    state = str(r.get("state") or "unknown")
    canary = f"v{r['canary_version']}" if r.get("canary_version") else "no canary"
    if state == "promoted":
        text = f"promoted: {canary} became production"
    elif state == "aborted":
        text = f"aborted: v{r['stable_version']} kept"
    elif state in ("running", "paused"):
        text = (f"{state}: {canary} at {r.get('weight', 0)}%" if r.get("canary_version")
                else f"{state}: shadows only")
    else:
        text = state
    decision = str(r.get("last_decision") or "")
    text = f"{text} ({decision})" if decision and decision not in text else text
    if last is not None and r.get("transitions", 0) > 1:
        line = describe(last)
        text += f" — {line.why or line.what} ({line.by})"
    return text


def _event_text(e: RegistryEvent) -> str:
    return e["what"]


def _evidence(e: RegistryEvent) -> str:
    line = describe(AuditEntry(at=e["at"], actor=e["actor"], action=e["action"], prompt=e["prompt"],
                               label=e["label"], from_version=e["from_version"],
                               to_version=e["to_version"], note=e["note"]))
    if isinstance(line.evidence, dict):
        return json.dumps(line.evidence, indent=2, ensure_ascii=False, default=str)
    return line.evidence


# -- Markdown and HTML ---------------------------------------------------------------------------


def _ts(rep: OpsReport, ts: datetime) -> str:
    return local_time(ts, rep.tz)


def _who(r: dict[str, Any], many: bool) -> str:
    return (f"{r['prompt']} " if many else "") + f"v{r['version']} {r['arm']}"


def _live_who(q: LiveQuality, many: bool) -> str:
    return _who({"prompt": q.prompt, "version": q.version, "arm": q.arm}, many)


def _span(d: timedelta) -> str:
    minutes = int(d.total_seconds() // 60)
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{mins}m" if mins else ""]
    return " ".join(p for p in parts if p) or "0m"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


IMAGES = {"volume": "ops-volume.png", "mix": "ops-verdict-mix.png",
          "review": "ops-review-rate.png", "feedback": "ops-feedback.png",
          "latency": "ops-latency.png"}
MAX_WHATIF_PLOTS = 8


def _whatif_key(w: VersionWhatIf) -> str:
    return f"whatif-{w.prompt}-v{w.version}"


def _image(key: str) -> str:
    """The file name of a plot: IMAGES's, or ops-<key>.png (one per version of the what-if)."""
    return IMAGES.get(key) or f"ops-{key}.png"


def _title(rep: OpsReport) -> str:
    return f"Operations report: {_ts(rep, rep.start)} → {_ts(rep, rep.end)} {tz_name(rep.tz)}"


def _lead(rep: OpsReport) -> list[str]:
    """The first screen: the window, the headline, the rollouts of the window."""
    many = len(rep.prompts) > 1
    zone = tz_name(rep.tz)
    lines = [f"Window {rep.start.isoformat(timespec='seconds')} (inclusive) to "
             f"{rep.end.isoformat(timespec='seconds')} (exclusive); times in {zone}. "
             f"{rep.records} decision(s) (primary and shadow) for "
             f"{', '.join(f'`{p}`' for p in rep.prompts) or 'no prompt'}; reviewer labels: "
             f"{rep.feedback_matched} for requests in the window ({rep.feedback_labels} read); "
             f"generated {rep.generated_at.isoformat(timespec='seconds')}."]
    lines += ["", *(f"- **note:** {n}" for n in rep.notes)] if rep.notes else []
    lines += ["", "## Headline", ""]
    if rep.headline:
        cmp = (f"change against the previous {_span(rep.start - rep.previous_start)} "
               f"({_ts(rep, rep.previous_start)} → {_ts(rep, rep.start)})"
               if rep.previous_start is not None else "no previous period")
        lines += [(f"What callers got (stable, canary and pinned arms; shadows are not served), "
                   f"for all locales and each locale; {cmp}. Review rate: share of verdicts "
                   f"that are `needs_review`; precision: of the reviewed decisions flagged with "
                   f"a category, the share whose category the reviewer confirmed (95% Wilson "
                   f"intervals)."), ""]
        header, rows = headline_table(rep.headline, rep.headline_before, many=many)
        lines += _table(header, rows, "l" * (1 + many) + "r" * (len(header) - 1 - many))
    else:
        lines.append("No caller decisions in the window.")
    lines += ["", "## Rollouts in the window", ""]
    if rep.rollouts:
        lines += _table(["prompt", "rollout", "versions", "started", "by", "last change",
                         "outcome"],
                        [[r["prompt"], f"`{r['id']}`",
                          f"stable v{r['stable_version']}, "
                          + (f"canary v{r['canary_version']}" if r["canary_version"] else "no canary")
                          + (f", shadows {', '.join(f'v{s}' for s in r['shadows'])}"
                             if r.get("shadows") else ""),
                          _ts(rep, r["started_at"]), r["started_by"] or MISSING,
                          _ts(rep, r["updated_at"]), _cell(r["outcome"])] for r in rep.rollouts])
    else:
        lines.append("No rollout ran in the window.")
    return lines


def _events_intro(rep: OpsReport) -> list[str]:
    lines = ["", "## Registry events", ""]
    if not rep.events:
        return [*lines, "No publish, label move or rollout transition in the window."]
    names = " ".join(dict.fromkeys(e["prompt"] for e in rep.events))
    return [*lines, (f"One line per event: what moved, why, by whom. The full evidence (gate "
                     f"reports, rollout snapshots): `modgate prompts audit {names} --json`, or "
                     f"a click on the reason in ops-report.html. Events are marked on the time "
                     f"plots (dashed lines)."), ""]


def _events_markdown(rep: OpsReport) -> list[str]:
    if not rep.events:
        return []
    return _table(["time", "prompt", "what", "why", "by"],
                  [[_ts(rep, e["at"]), e["prompt"], _cell(e["what"]), _cell(e["why"]) or MISSING,
                    e["actor"]] for e in rep.events])


def _events_html(rep: OpsReport) -> str:
    if not rep.events:
        return ""
    esc = html.escape
    rows = []
    for e in rep.events:
        why = esc(e["why"]) or MISSING
        rows.append(f"<tr><td>{esc(_ts(rep, e['at']))}</td><td>{esc(e['prompt'])}</td>"
                    f"<td>{esc(e['what'])}</td><td><details><summary>{why}</summary>"
                    f"<pre>{esc(_evidence(e))}</pre></details></td><td>{esc(e['actor'])}</td></tr>")
    return ("<table>\n<thead><tr><th>time</th><th>prompt</th><th>what</th><th>why (click for "
            "the evidence)</th><th>by</th></tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody>\n</table>\n")


def _detail(rep: OpsReport, images: Sequence[str]) -> list[str]:
    """Everything after the lead and the events: the detail per version and arm."""
    many = len(rep.prompts) > 1

    def img(key: str, alt: str) -> list[str]:
        return ["", f"![{alt}]({_image(key)})"] if key in images else []

    if not rep.records:
        return ["", "## Decisions", "", "No decisions in the window."]
    lines = ["", "## Volume per prompt version and arm", "",
             ("`traffic share` is the share of the prompt's caller traffic (stable, canary and "
              "pinned; shadows are extra evaluations of sampled stable requests).")]
    lines += ["", *_table(["prompt version / arm", "decisions", "backend errors", "traffic share"],
                          [[_who(r, many), r["decisions"], r["errors"],
                            "not served" if r["arm"] == "shadow" else _pct(r["traffic_share"])]
                           for r in rep.volume], "lrrr")]
    lines += img("volume", "decisions over time per version and arm")

    live = {(q.prompt, q.version, q.arm, q.locale): q for q in rep.live_by_locale}
    lines += ["", "## Per locale", "",
              ("Each version and arm per locale of the listing: decisions, review rate and, "
               "from reviewer labels, precision and recall (any category, 95% Wilson "
               "intervals).")]
    rows = []
    for r in rep.by_locale:
        q = live.get((r["prompt"], r["version"], r["arm"], r["locale"]))
        rows.append([_who(r, many), r["locale"], r["decisions"],
                     f"{_pct(r['rate'])} ({_pct(r['ci'][0])}–{_pct(r['ci'][1])})" if r["ci"]
                     else MISSING, q.reviewed if q else 0,
                     _ci(q.quality.micro.precision, q.quality.micro.precision_ci) if q else MISSING,
                     _ci(q.quality.micro.recall, q.quality.micro.recall_ci) if q else MISSING])
    lines += ["", *_table(["prompt version / arm", "locale", "decisions", "review rate (95% CI)",
                           "reviewed", "precision (95% CI)", "recall (95% CI)"], rows, "llrrrrr")]

    lines += ["", f"## Per day ({tz_name(rep.tz)})", "",
              (f"Caller decisions per day of {tz_name(rep.tz)} (days split at its midnight), "
               "for all locales and each locale.")]
    lines += ["", *_table([*(["prompt"] if many else []), "day", "locale", "decisions",
                           "review rate", "reviewed", "precision (95% CI)"],
                          [[*([h.prompt] if many else []), day, h.locale, h.decisions,
                            _pct(h.review_rate), h.reviewed, _ci(h.precision, h.precision_ci)]
                           for day, h in rep.per_day],
                          "l" * (2 + many) + "rrrr")]

    lines += ["", "## Verdict mix per category", "",
              ("Share of each outcome: `allow`, a violation category (block or needs_review with "
               "that category), `needs_review` without a category, or `error` (no verdict).")]
    lines += ["", *_table(["prompt version / arm", "n", *(_label(o) for o in rep.outcomes)],
                          [[_who(r, many), r["n"], *(
                              f"{_pct(r['shares'].get(o, 0.0))} ({r['counts'].get(o, 0)})"
                              for o in rep.outcomes)] for r in rep.verdict_mix],
                          "lr" + "r" * len(rep.outcomes))]
    lines += img("mix", "verdict mix over time")

    lines += ["", "## Review rate", "",
              ("Share of verdicts that are `needs_review` (sent to human review), with 95% Wilson "
               "intervals; it includes model output the gateway could not use (parse failures), "
               "which are also counted on their own.")]
    lines += ["", *_table(["prompt version / arm", "verdicts", "needs_review", "review rate (95% CI)",
                           "parse failures", "parse-failure rate"],
                          [[_who(r, many), r["answered"], r["needs_review"],
                            f"{_pct(r['rate'])} ({_pct(r['ci'][0])}–{_pct(r['ci'][1])})"
                            if r["ci"] else MISSING, r["parse_failures"],
                            _pct(r["parse_failure_rate"])] for r in rep.review], "lrrrrr")]
    lines += img("review", "review rate over time")

    lines += ["", "## Precision and recall from reviewer feedback", ""]
    if rep.live:
        lines += [("Reviewer labels (`POST /v1/feedback`) joined with the decision log on the "
                   "request id; a label also scores the shadow evaluations of its request. "
                   "Intervals are 95% Wilson intervals. Recall is only meaningful if reviewers "
                   "also see a fair sample of allowed listings."), ""]
        lines += _table(["prompt version / arm", "decisions", "reviewed", "precision (any category)",
                         "recall (any category)", "flagged precision", "flagged recall"],
                        [[_live_who(q, many), q.decisions, q.reviewed,
                          _ci(q.quality.micro.precision, q.quality.micro.precision_ci),
                          _ci(q.quality.micro.recall, q.quality.micro.recall_ci),
                          _ci(q.quality.flagged.precision, q.quality.flagged.precision_ci),
                          _ci(q.quality.flagged.recall, q.quality.flagged.recall_ci)]
                         for q in rep.live], "lrrrrrr")
        lines += ["", "Per category (TP/FP/FN from reviewed decisions):", ""]
        rows = []
        for q in rep.live:
            for s in q.quality.categories:
                if s.support or s.predicted:
                    rows.append([_live_who(q, many), s.category, s.support, s.tp, s.fp, s.fn,
                                 _ci(s.precision, s.precision_ci), _ci(s.recall, s.recall_ci)])
        lines += _table(["prompt version / arm", "category", "support", "TP", "FP", "FN",
                         "precision (95% CI)", "recall (95% CI)"], rows, "llrrrrrr")
        lines += img("feedback", "precision and recall from reviewer feedback")
    else:
        lines.append("No reviewer label matches a decision of the window.")

    lines += _whatif_lines(rep, img)
    lines += _shadow_lines(rep, many)
    lines += _token_lines(rep, many)

    lines += ["", "## Latency", "",
              ("Percentiles of `latency_ms` over answered requests (callers: the whole request in "
               "the gateway; shadows: the shadow evaluation).")]
    lines += ["", *_table(["prompt version / arm", "answered", "p50 ms", "p95 ms", "p99 ms"],
                          [[_who(r, many), r["n"], _f(r["p50_ms"], 1), _f(r["p95_ms"], 1),
                            _f(r["p99_ms"], 1)] for r in rep.latency], "lrrrr")]
    lines += img("latency", "latency percentiles over time")
    if rep.errors or rep.fail_reasons:
        lines += ["", "## Failures", ""]
        if rep.errors:
            lines.append("Backend errors: " + ", ".join(f"`{k}` ×{v}" for k, v in
                                                        sorted(rep.errors.items())))
        if rep.fail_reasons:
            lines.append("")
            lines.append("Unusable model output: " + ", ".join(
                f"`{k}` ×{v}" for k, v in sorted(rep.fail_reasons.items())))
    return lines


def _whatif_lines(rep: OpsReport, img: Any) -> list[str]:
    from gateway.quality import whatif

    if not rep.what_if:
        return []
    lines = ["", "## Threshold what-if on reviewer labels", "",
             (f"Every verdict of the window decided again, by the function the gateway serves "
              f"with, at other operating points of its category: `block` at or above the first "
              f"number, `needs_review` from the second up, `allow` below. Per version, "
              f"category and locale: block and review rate over the category's decisions; "
              f"precision (of the labelled decisions the point blocks, the share the reviewer "
              f"confirmed as the category) and recall (of the labelled decisions the reviewer "
              f"put in the category, the share the point blocks), 95% Wilson intervals. "
              f"Points: the version's current ones, the one `modgate eval thresholds` proposes "
              f"from these labels (95% Wilson lower bound of precision at least "
              f"{rep.what_if[0].target:g}), and those asked for (`--what-if`). Decisions without "
              f"a calibrated probability are counted (`no probability`) and decided as the "
              f"gateway decides them. The plot: the precision-coverage curve of the labelled "
              f"decisions with a probability, per category (dotted: Wilson lower bound), with "
              f"the current (circle), proposed (star) and asked-for (diamond) points.")]
    many = len({w.prompt for w in rep.what_if}) > 1
    for w in rep.what_if:
        lines += ["", f"### {whatif.title(w, many)}", ""]
        lines += [f"- **note:** {n}" for n in whatif.notes(w)]
        lines += ["", *_table(whatif.HEADER, [[_cell(c) for c in row] for row in whatif.table(w)],
                              "lll" + "r" * (len(whatif.HEADER) - 3))]
        lines += img(_whatif_key(w), f"v{w.version}: precision against coverage, operating "
                                     "points marked")
    return lines


def _shadow_lines(rep: OpsReport, many: bool) -> list[str]:
    if not rep.shadow_pairs:
        return []
    lines = ["", "## Shadow pairs: the caller's verdict against the shadow's", "",
             ("For each shadowed version, every request of the window that has both the caller's "
              "verdict and the shadow's, counted by the outcome of each: rows are what the caller "
              "got, columns what the shadow said (`allow`, a category, `needs_review` without "
              "one, `error`). The diagonal is agreement.")]
    for sp in rep.shadow_pairs:
        who = (f"{sp['prompt']} " if many else "")
        ci = sp["agreement_ci"]
        lines += ["", f"### {who}v{sp['primary_version']} (caller) × v{sp['shadow_version']} (shadow)",
                  "", f"{sp['pairs']} pair(s); agreement {_pct(sp['agreement'])}"
                  + (f" ({_pct(ci[0])}–{_pct(ci[1])})" if ci else "") + ".", ""]
        counts = {(c["primary"], c["shadow"]): c["n"] for c in sp["counts"]}
        order = [o for o in rep.outcomes if any(o in k for k in counts)]
        lines += _table([f"v{sp['primary_version']} \\ v{sp['shadow_version']}",
                         *(_label(o) for o in order), "total"],
                        [[_label(a), *(counts.get((a, b), 0) for b in order),
                          sum(counts.get((a, b), 0) for b in order)] for a in order],
                        "l" + "r" * (len(order) + 1))
    return lines


def _token_lines(rep: OpsReport, many: bool) -> list[str]:
    if not rep.tokens:
        return []
    cur = rep.currency
    lines = ["", "## Tokens and cost per version", "",
             (f"Token counts as the model server reported them (decision log); `cached` is the "
              f"part of the prompt tokens served from its prefix cache. Cost in {cur} at the "
              f"prices of `reporting.prices` in the configuration (cached prompt tokens at "
              f"their own price when one is set); a model without a price has no cost. A "
              f"cascade's escalated decision calls two models: each has its row.")]
    rows = []
    for t in rep.tokens:
        per = t["with_usage"]
        rows.append([_who(t, many), f"`{t['model']}`", t["with_usage"], f"{t['prompt_tokens']:,}",
                     f"{t['cached_prompt_tokens']:,}" + ("" if t["cache_reported"] == t["with_usage"]
                                                        else f" ({t['cache_reported']} reported)"),
                     f"{t['completion_tokens']:,}",
                     f"{(t['prompt_tokens'] + t['completion_tokens']) / per:,.0f}" if per else MISSING,
                     MISSING if t["cost"] is None else f"{t['cost']:,.4f}",
                     MISSING if t["cost_per_1k_calls"] is None
                     else f"{t['cost_per_1k_calls']:,.4f}"])
    lines += ["", *_table(["prompt version / arm", "model", "calls with usage", "prompt tokens",
                           "of which cached", "completion tokens", "tokens per call",
                           f"cost ({cur})", f"cost per 1,000 calls ({cur})"], rows,
                          "llrrrrrrr")]
    unpriced = sorted({t["model"] for t in rep.tokens if t["cost"] is None})
    if unpriced:
        lines += ["", "No price in `reporting.prices` for " + ", ".join(f"`{m}`" for m in unpriced)
                  + ": its cost is undefined."]
    return lines


def ops_markdown(rep: OpsReport, images: Sequence[str] = ()) -> str:
    """The report as Markdown; *images* are the keys of IMAGES that were drawn."""
    lines = [f"# {_title(rep)}", "", *_lead(rep), *_events_intro(rep), *_events_markdown(rep),
             *_detail(rep, images)]
    return "\n".join(lines) + "\n"


def ops_html(rep: OpsReport, images: Sequence[str] = ()) -> str:
    """The report as one HTML page (plots still referenced by file name; `write_ops_report`
    embeds them): the Markdown's text, with each registry event's evidence in a <details>."""
    body = (markdown_html("\n".join([*_lead(rep), *_events_intro(rep)]))
            + _events_html(rep) + markdown_html("\n".join(_detail(rep, images))))
    return html_page(_title(rep), body)


# -- plots -------------------------------------------------------------------------------------


def _series_name(prompt: str, version: int, arm: str, many: bool) -> str:
    return (f"{prompt} " if many else "") + f"v{version} {arm}"


def _wall(rep: OpsReport, ts: datetime) -> datetime:
    """*ts* as a naive wall-clock time of the report's zone: the plots' x axis (buckets then
    split at local midnight, and a DST change never makes a bucket ambiguous)."""
    return ts.astimezone(rep.tz).replace(tzinfo=None)


def _event_marks(rep: OpsReport) -> list[tuple[datetime, str]]:
    """Events to mark, those closer than 1/80 of the window merged into one mark."""
    close = (rep.end - rep.start) / 80
    marks: list[tuple[datetime, list[str]]] = []
    for e in rep.events:
        if marks and e["at"] - marks[-1][0] < close:
            marks[-1][1].append(_event_text(e))
        else:
            marks.append((e["at"], [_event_text(e)]))
    return [(_wall(rep, at), texts[0] if len(texts) == 1 else f"{len(texts)} events")
            for at, texts in marks]


def _time_axis(ax: Any, rep: OpsReport) -> None:
    import matplotlib.dates as mdates

    ax.set_xlim(_wall(rep, rep.start), _wall(rep, rep.end))
    ax.set_xlabel(tz_name(rep.tz))
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    for at, text in _event_marks(rep):
        ax.axvline(at, color="#555", linestyle="--", linewidth=0.8)
        ax.annotate(text, (at, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                    fontsize=7, va="top", ha="right", color="#555")
    ax.grid(alpha=0.3)


def _grouped(rep: OpsReport) -> Any:
    df = rep.frame.copy()
    df["bucket"] = df["ts"].dt.tz_convert(rep.tz).dt.tz_localize(None).dt.floor(rep.bucket)
    return df


def _all_buckets(rep: OpsReport) -> Any:
    """Every bucket of the window, so that empty ones show as 0 (counts) or gaps (rates)."""
    import pandas as pd

    first = pd.Timestamp(_wall(rep, rep.start)).floor(rep.bucket)
    return pd.date_range(first, pd.Timestamp(_wall(rep, rep.end)), freq=rep.bucket,
                         inclusive="left")


def _plot_volume(rep: OpsReport) -> Figure:
    df = _grouped(rep)
    many = len(rep.prompts) > 1
    fig = figure(10, 4)
    ax = fig.subplots()
    for (p, v, arm), g in sorted(df.groupby(["prompt", "version", "arm"]),
                                 key=lambda kv: (kv[0][0], kv[0][1], _ARM_ORDER.get(kv[0][2], 9))):
        counts = g.groupby("bucket").size().reindex(_all_buckets(rep), fill_value=0)
        ax.plot(counts.index, counts.to_numpy(), marker="o", markersize=3,
                label=_series_name(p, v, arm, many), linestyle=":" if arm == "shadow" else "-")
    ax.set_ylabel(f"decisions per {rep.bucket}")
    ax.set_title("Decisions per prompt version and arm")
    ax.legend(fontsize=8)
    _time_axis(ax, rep)
    return fig


def _plot_mix(rep: OpsReport) -> Figure:
    df = _grouped(rep)
    df = df[df["arm"] != "shadow"]
    prompts = sorted(set(df["prompt"]))
    fig = figure(10, 3.6 * max(1, len(prompts)))
    axes = fig.subplots(max(1, len(prompts)), 1, squeeze=False)[:, 0]
    palette = {"none": "#8fbc8f", "needs_review": "#f0a030", "error": "#c44e52"}
    others = [o for o in rep.outcomes if o not in palette]
    cmap = ["#4c72b0", "#8172b2", "#937860", "#da8bc3", "#64b5cd", "#ccb974", "#55a868", "#8c8c8c"]
    colors = {o: palette.get(o) or cmap[others.index(o) % len(cmap)] for o in rep.outcomes}
    for ax, p in zip(axes, prompts, strict=False):
        g = df[df["prompt"] == p]
        table = g.groupby(["bucket", "outcome"]).size().unstack(fill_value=0)
        table = table.reindex(columns=[o for o in rep.outcomes if o in table.columns])
        shares = table.div(table.sum(axis=1), axis=0).reindex(_all_buckets(rep), fill_value=0.0)
        ax.stackplot(shares.index, *[shares[c].to_numpy() for c in shares.columns],
                     labels=["allow" if c == "none" else c for c in shares.columns],
                     colors=[colors[c] for c in shares.columns], step="post")
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of caller verdicts")
        ax.set_title(f"{p}: verdict mix (what callers got)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _time_axis(ax, rep)
    return fig


def _plot_review(rep: OpsReport) -> Figure:
    df = _grouped(rep)
    df = df[df["decision"].notna()]
    many = len(rep.prompts) > 1
    fig = figure(10, 4)
    ax = fig.subplots()
    for (p, v, arm), g in sorted(df.groupby(["prompt", "version", "arm"]),
                                 key=lambda kv: (kv[0][0], kv[0][1], _ARM_ORDER.get(kv[0][2], 9))):
        rate = g.groupby("bucket")["decision"].apply(
            lambda s: float((s == "needs_review").mean())).reindex(_all_buckets(rep))
        ax.plot(rate.index, rate.to_numpy(), marker="o", markersize=3,
                label=_series_name(p, v, arm, many), linestyle=":" if arm == "shadow" else "-")
    ax.set_ylim(0, 1)
    ax.set_ylabel("needs_review share")
    ax.set_title("Review rate per prompt version and arm")
    ax.legend(fontsize=8)
    _time_axis(ax, rep)
    return fig


def _plot_latency(rep: OpsReport) -> Figure:
    df = _grouped(rep)
    df = df[df["decision"].notna()]
    many = len(rep.prompts) > 1
    fig = figure(10, 4.5)
    ax = fig.subplots()
    for (p, v, arm), g in sorted(df.groupby(["prompt", "version", "arm"]),
                                 key=lambda kv: (kv[0][0], kv[0][1], _ARM_ORDER.get(kv[0][2], 9))):
        by = g.groupby("bucket")["latency_ms"]
        name = _series_name(p, v, arm, many)
        p50 = by.agg(lambda x: quantile_of(x.tolist(), 0.5)).reindex(_all_buckets(rep))
        p95 = by.agg(lambda x: quantile_of(x.tolist(), 0.95)).reindex(_all_buckets(rep))
        line, = ax.plot(p50.index, p50.to_numpy(), marker="o", markersize=3, label=f"{name} p50")
        ax.plot(p95.index, p95.to_numpy(), linestyle="--", marker=".", markersize=3,
                color=line.get_color(), label=f"{name} p95")
    ax.set_ylabel("ms")
    ax.set_title("Latency per prompt version and arm (answered requests)")
    ax.legend(fontsize=7)
    _time_axis(ax, rep)
    return fig


def _draw(rep: OpsReport, out_dir: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    if rep.records:
        for key, draw in (("volume", _plot_volume), ("mix", _plot_mix), ("review", _plot_review),
                          ("latency", _plot_latency)):
            path = out_dir / IMAGES[key]
            draw(rep).savefig(path, dpi=100)
            paths[key] = path
    if rep.live:
        many = len(rep.prompts) > 1
        series = [(_series_name(q.prompt, q.version, q.arm, many),
                   [*q.quality.categories, q.quality.micro]) for q in rep.live[:4]]
        paths["feedback"] = pr_plot(series, out_dir / IMAGES["feedback"],
                                    "Precision and recall from reviewer feedback (95% Wilson "
                                    "intervals)")
    from gateway.quality import whatif

    many = len({w.prompt for w in rep.what_if}) > 1
    for w in [w for w in rep.what_if if whatif.plottable(w)][:MAX_WHATIF_PLOTS]:
        key = _whatif_key(w)
        paths[key] = whatif.plot(w, out_dir / _image(key),
                                 f"{_series_name(w.prompt, w.version, 'what-if', many)}: "
                                 "precision against coverage")
    return paths


def _embed(html_text: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        html_text = html_text.replace(f'src="{_image(key)}"',
                                      f'src="{png_data_uri(path.read_bytes())}"')
    return html_text


def write_ops_report(rep: OpsReport, out_dir: Path) -> dict[str, Path]:
    """`ops-report.md` with its PNG plots, and the self-contained `ops-report.html`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _draw(rep, out_dir)
    md_path, html_path = out_dir / "ops-report.md", out_dir / "ops-report.html"
    md_path.write_text(ops_markdown(rep, list(images)), encoding="utf-8")
    html_path.write_text(_embed(ops_html(rep, list(images)), images), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, **{f"{k}_png": p for k, p in images.items()}}

