"""The operational report: what the gateway decided over a time window, and how well.

Sources: the decision log (every verdict, primary and shadow), the reviewer-feedback log (joined
on request id, gateway/quality/live_quality.py) and the registry (audit log and rollout state). For each
prompt version and arm (`stable`, `canary`, `pinned`, `shadow`):

- **volume**: decisions and backend errors; for caller-facing arms, the share of the prompt's
  caller traffic;
- **verdict mix**: the share of each outcome label (`none` = allowed, a violation category,
  `needs_review` = flagged without a category, `error` = no verdict), as a table and over time;
- **review rate**: the share of verdicts that are `needs_review` (with 95% Wilson interval),
  which includes unusable model output (the gateway fails closed), and the parse-failure rate;
- **precision and recall from reviewer feedback**, per category, with 95% Wilson intervals;
- **latency**: p50/p95/p99 of the answered requests (`prompt_registry.rollout_stats.quantile_of`,
  the quantile the rollout gates and `modgate rollouts status` read from their sketch;
  `latency_ms` as the decision log has it: the whole request for callers, the evaluation for
  shadows);
- **rollout events**: publishes, label moves and rollout transitions from the registry's audit
  log inside the window (also marked on the time plots), and each prompt's current rollout.

`build_report` computes everything (pure, testable); `write_ops_report` writes `ops-report.md`
with PNG plots next to it and `ops-report.html`, the same report with the plots embedded (one
self-contained file, gateway/quality/reporting.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

from gateway.decision_log import DecisionRecord
from gateway.quality.evaluation.report import _ci, _f, _pct, _table, pr_plot
from gateway.quality.evaluation.scorecard import outcome_label, wilson
from gateway.quality.live_quality import (
    PRIMARY_ARMS,
    FeedbackLabel,
    LiveQuality,
    LiveQualityAccumulator,
)
from gateway.quality.reporting import figure, html_page, markdown_html, png_data_uri
from prompt_registry.rollout_stats import quantile_of
from prompt_registry.store import PromptReader, RolloutReader

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["OpsReport", "build_report", "choose_bucket", "ops_markdown", "write_ops_report"]

_BUCKETS: tuple[tuple[str, timedelta], ...] = (
    ("1min", timedelta(minutes=1)), ("5min", timedelta(minutes=5)),
    ("15min", timedelta(minutes=15)), ("30min", timedelta(minutes=30)),
    ("1h", timedelta(hours=1)), ("3h", timedelta(hours=3)), ("6h", timedelta(hours=6)),
    ("12h", timedelta(hours=12)), ("1D", timedelta(days=1)), ("7D", timedelta(days=7)))
_ARM_ORDER = {a: i for i, a in enumerate([*PRIMARY_ARMS, "shadow"])}
_COLUMNS = ("ts", "prompt", "version", "arm", "outcome", "decision", "fail_reason", "error_type",
            "latency_ms")
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
    events: list[RegistryEvent] = field(default_factory=list)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the reader must know (skipped lines...)
    frame: Any = None                     # pandas DataFrame of the decisions (for the plots)

    @property
    def prompts(self) -> list[str]:
        return sorted({r["prompt"] for r in self.volume})

    def to_dict(self) -> dict[str, Any]:
        def live(q: LiveQuality) -> dict[str, Any]:
            def stats(s: Any) -> dict[str, Any]:
                return {"support": s.support, "predicted": s.predicted, "tp": s.tp, "fp": s.fp,
                        "fn": s.fn, "precision": s.precision, "precision_ci": s.precision_ci,
                        "recall": s.recall, "recall_ci": s.recall_ci}
            return {"prompt": q.prompt, "version": q.version, "arm": q.arm,
                    "decisions": q.decisions, "reviewed": q.reviewed,
                    "micro": stats(q.quality.micro), "flagged": stats(q.quality.flagged),
                    "categories": {s.category: stats(s) for s in q.quality.categories}}
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "generated_at": self.generated_at.isoformat(timespec="seconds"),
                "records": self.records, "bucket": self.bucket, "volume": self.volume,
                "verdict_mix": self.verdict_mix, "review": self.review, "latency": self.latency,
                "errors": self.errors, "fail_reasons": self.fail_reasons,
                "feedback": {"labels": self.feedback_labels, "matched": self.feedback_matched,
                             "quality": [live(q) for q in self.live]},
                "events": self.events, "rollouts": self.rollouts, "notes": self.notes}


def _key(r: dict[str, Any]) -> tuple[str, int, int]:
    return (r["prompt"], r["version"], _ARM_ORDER.get(r["arm"], 9))


def build_report(records: Iterable[DecisionRecord], labels: dict[str, FeedbackLabel], *,
                 start: datetime, end: datetime, prompt: str | None = None,
                 now: datetime | None = None) -> OpsReport:
    """Every number of the report from the decision records of the window and reviewer labels."""
    import pandas as pd

    acc = LiveQualityAccumulator(labels)
    rows: list[tuple[Any, ...]] = []
    for rec in records:
        if prompt is not None and rec.prompt_name != prompt:
            continue
        acc.add(rec)
        rows.append((rec.ts, rec.prompt_name, rec.prompt_version, rec.arm,
                     outcome_label(rec.decision, rec.category, error=rec.error_type is not None),
                     rec.decision, rec.fail_reason, rec.error_type, rec.latency_ms))
    df = pd.DataFrame.from_records(rows, columns=list(_COLUMNS))
    bucket, _ = choose_bucket(start, end)
    volume: list[dict[str, Any]] = []
    mix: list[dict[str, Any]] = []
    review: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
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
        for table in (volume, mix, review, latency):
            table.sort(key=_key)
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
        frame=df)


# -- rollout events (from the registry) --------------------------------------------------------


class RegistryEvent(TypedDict):
    """One audit entry of the window as the report shows it (see `registry_events`)."""
    at: datetime  # always timezone-aware
    prompt: str
    action: str
    label: str | None
    from_version: int | None
    to_version: int | None
    actor: str
    note: str


class RegistryHistory(PromptReader, RolloutReader, Protocol):
    """What the report reads from the registry (audit log, rollouts): read facets only, since
    an offline report must not be able to change what it reports on."""


def registry_events(store: RegistryHistory, prompts: Sequence[str], start: datetime,
                    end: datetime) -> tuple[list[RegistryEvent], list[dict[str, Any]]]:
    """Audit entries of *prompts* inside [start, end), oldest first, and each prompt's current
    (or last) rollout."""
    events: list[RegistryEvent] = []
    rollouts: list[dict[str, Any]] = []
    for name in prompts:
        for e in store.audit(name):
            at = e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)
            if start <= at < end:
                events.append({"at": at, "prompt": name, "action": e.action, "label": e.label,
                               "from_version": e.from_version, "to_version": e.to_version,
                               "actor": e.actor, "note": e.note})
        r = store.get_rollout(name)
        if r is not None:
            rollouts.append({"prompt": name, "id": r.id, "state": r.state,
                             "stable_version": r.stable_version, "canary_version": r.canary_version,
                             "weight": r.weight, "shadows": [f"v{s.version}@{s.sample_rate:.0%}"
                                                             for s in r.shadows],
                             "started_at": r.started_at, "updated_at": r.updated_at,
                             "last_decision": r.last_decision})
    events.sort(key=lambda e: e["at"])
    return events, rollouts


def _event_text(e: RegistryEvent) -> str:
    if e["action"] == "publish":
        return f"published v{e['to_version']}"
    if e["action"] == "label":
        if e["from_version"] is None:
            return f"label {e['label']} set to v{e['to_version']}"
        return f"label {e['label']}: v{e['from_version']} → v{e['to_version']}"
    if e["action"] == "rollout":
        return f"rollout {e['label']} (stable v{e['from_version']}, canary v{e['to_version']})"
    return e["action"]


# -- Markdown ----------------------------------------------------------------------------------


def _ts(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _who(r: dict[str, Any], many: bool) -> str:
    return (f"{r['prompt']} " if many else "") + f"v{r['version']} {r['arm']}"


def _live_who(q: LiveQuality, many: bool) -> str:
    return _who({"prompt": q.prompt, "version": q.version, "arm": q.arm}, many)


IMAGES = {"volume": "ops-volume.png", "mix": "ops-verdict-mix.png",
          "review": "ops-review-rate.png", "feedback": "ops-feedback.png",
          "latency": "ops-latency.png"}


def ops_markdown(rep: OpsReport, images: Sequence[str] = ()) -> str:
    """The report as Markdown; *images* are the keys of IMAGES that were drawn."""
    many = len(rep.prompts) > 1

    def img(key: str, alt: str) -> list[str]:
        return ["", f"![{alt}]({IMAGES[key]})"] if key in images else []

    lines = [f"# Operations report: {_ts(rep.start)} → {_ts(rep.end)}", "",
             f"- window: from {rep.start.isoformat(timespec='seconds')} (inclusive) to "
             f"{rep.end.isoformat(timespec='seconds')} (exclusive); plots in {rep.bucket} buckets",
             f"- {rep.records} decision(s) (primary and shadow) for "
             f"{', '.join(f'`{p}`' for p in rep.prompts) or 'no prompt'}",
             f"- reviewer labels: {rep.feedback_matched} for requests in the window "
             f"({rep.feedback_labels} read)",
             f"- generated {rep.generated_at.isoformat(timespec='seconds')}"]
    lines += [f"- **note:** {n}" for n in rep.notes]
    lines += ["", "## Rollouts and prompt changes", ""]
    if rep.rollouts:
        lines += _table(["prompt", "rollout", "state", "stable", "canary (weight)", "shadows",
                         "started", "last decision"],
                        [[r["prompt"], f"`{r['id']}`", r["state"], f"v{r['stable_version']}",
                          f"v{r['canary_version']} ({r['weight']}%)" if r["canary_version"] else "-",
                          ", ".join(r["shadows"]) or "-", _ts(r["started_at"]),
                          r["last_decision"] or "-"] for r in rep.rollouts])
        lines.append("")
    if rep.events:
        lines += _table(["time", "prompt", "event", "actor", "note"],
                        [[_ts(e["at"]), e["prompt"], _event_text(e), e["actor"],
                          e["note"].replace("|", "/").replace("\n", " ")] for e in rep.events])
        lines += ["", "Events are marked on the time plots below (dashed lines)."]
    else:
        lines.append("No publish, label move or rollout transition in the window.")
    if not rep.records:
        lines += ["", "## Decisions", "", "No decisions in the window."]
        return "\n".join(lines) + "\n"

    lines += ["", "## Volume per prompt version and arm", "",
              ("`traffic share` is the share of the prompt's caller traffic (stable, canary and "
               "pinned; shadows are extra evaluations of sampled stable requests).")]
    lines += ["", *_table(["prompt version / arm", "decisions", "backend errors", "traffic share"],
                          [[_who(r, many), r["decisions"], r["errors"], _pct(r["traffic_share"])]
                           for r in rep.volume], "lrrr")]
    lines += img("volume", "decisions over time per version and arm")

    names = {"none": "allow", "needs_review": "needs_review", "error": "error"}
    lines += ["", "## Verdict mix per category", "",
              ("Share of each outcome: `allow`, a violation category (block or needs_review with "
               "that category), `needs_review` without a category, or `error` (no verdict).")]
    lines += ["", *_table(["prompt version / arm", "n", *(names.get(o, o) for o in rep.outcomes)],
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
                            if r["ci"] else "n/a", r["parse_failures"],
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
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------------------------


def _series_name(prompt: str, version: int, arm: str, many: bool) -> str:
    return (f"{prompt} " if many else "") + f"v{version} {arm}"


def _event_marks(rep: OpsReport) -> list[tuple[datetime, str]]:
    """Events to mark, those closer than 1/80 of the window merged into one mark."""
    close = (rep.end - rep.start) / 80
    marks: list[tuple[datetime, list[str]]] = []
    for e in rep.events:
        if marks and e["at"] - marks[-1][0] < close:
            marks[-1][1].append(_event_text(e))
        else:
            marks.append((e["at"], [_event_text(e)]))
    return [(at, texts[0] if len(texts) == 1 else f"{len(texts)} events") for at, texts in marks]


def _time_axis(ax: Any, rep: OpsReport) -> None:
    import matplotlib.dates as mdates

    ax.set_xlim(rep.start, rep.end)
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
    df["bucket"] = df["ts"].dt.floor(rep.bucket)
    return df


def _all_buckets(rep: OpsReport) -> Any:
    """Every bucket of the window, so that empty ones show as 0 (counts) or gaps (rates)."""
    import pandas as pd

    first = pd.Timestamp(rep.start).floor(rep.bucket)
    return pd.date_range(first, pd.Timestamp(rep.end), freq=rep.bucket, inclusive="left")


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
    return paths


def _embed(html_text: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        html_text = html_text.replace(f'src="{IMAGES[key]}"',
                                      f'src="{png_data_uri(path.read_bytes())}"')
    return html_text


def write_ops_report(rep: OpsReport, out_dir: Path) -> dict[str, Path]:
    """`ops-report.md` with its PNG plots, and the self-contained `ops-report.html`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _draw(rep, out_dir)
    md = ops_markdown(rep, list(images))
    md_path, html_path = out_dir / "ops-report.md", out_dir / "ops-report.html"
    md_path.write_text(md, encoding="utf-8")
    body = md.split("\n", 1)[1] if md.startswith("# ") else md
    title = f"Operations report: {_ts(rep.start)} → {_ts(rep.end)}"
    html_path.write_text(_embed(html_page(title, markdown_html(body)), images), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, **{f"{k}_png": p for k, p in images.items()}}

