"""Reports of an evaluation: Markdown, PNG plots, per-item tables and one HTML report.

    write_scorecard(sc, out, dataset)  v<N>.json, v<N>.md, v<N>-pr.png, v<N>-confusion.png,
                                       v<N>-reliability.png, v<N>-coverage.png, v<N>-items.csv,
                                       v<N>-items.parquet
    write_comparison(cmp, out)         compare-v<A>-v<B>.json / .md / -pr.png
    write_run_report(scs, cmps, out)   report-v<A>-v<B>....md (summary of the run) and
                                       report-v<A>-v<B>....html (self-contained: everything above,
                                       plots embedded; see gateway.quality.reporting)

The per-item tables have one row per dataset item: gold and predicted labels, correctness,
failure, tags and, when the dataset is given, its title, description and notes. CSV is UTF-8
with a byte-order mark (spreadsheets then read CJK text correctly), tags joined by ';';
Parquet is typed (`correct` boolean, `confidence` double, `tags` list<string>), for DuckDB:

    duckdb -c "select locale, avg(correct::int) from 'v2-items.parquet' group by all"

Plots use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import csv
import functools
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.quality.evaluation.scorecard import (
    ALPHA,
    CategoryDelta,
    CategoryStats,
    Comparison,
    Quality,
    Scorecard,
)
from gateway.quality.reporting import MISSING, figure, figure_html, html_page, markdown_html

if TYPE_CHECKING:
    from gateway.quality.evaluation.dataset import Dataset

__all__ = [
    "ITEM_COLUMNS",
    "comparison_markdown",
    "confusion_plot",
    "item_rows",
    "load_scorecard",
    "pr_plot",
    "report_paths",
    "run_html",
    "run_markdown",
    "scorecard_markdown",
    "write_comparison",
    "write_items",
    "write_run_report",
    "write_scorecard",
]

MAX_LISTED_ITEMS = 200
LATENCY_NOT_COMPARED = (
    "Latency is not compared between versions here: a run evaluates the versions one after "
    "another (the first one meets a cold model server and an empty prefix cache) and cached "
    "answers keep the latency of the run that produced them, so a difference would be run "
    "order, not the version. Compare latency where both versions serve under the same "
    "conditions: a canary (`modgate rollouts status`, `modgate report ops`) or `benchmarks/`.")


def _f(x: float | None, digits: int = 2) -> str:
    return MISSING if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.1f}%"


def _ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else f"{value:.2f}"


def _signed(x: float | None) -> str:
    return MISSING if x is None else f"{x:+.2f}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(("---:" if (align and align[i] == "r") else "---") for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _stats_row(s: CategoryStats) -> list[object]:
    return [s.category, s.support, s.predicted, s.tp, s.fp, s.fn, _ci(s.precision, s.precision_ci),
            _ci(s.recall, s.recall_ci), _f(s.f1)]


def _quality_tables(q: Quality) -> list[str]:
    rows = [_stats_row(s) for s in q.categories]
    rows.append(["**macro**", "", "", "", "", "", _f(q.macro_precision), _f(q.macro_recall),
                 _f(q.macro_f1)])
    rows.append(["**micro**", *_stats_row(q.micro)[1:]])
    rows.append(["**flagged** (any vs allow)", *_stats_row(q.flagged)[1:]])
    return _table(["category", "support", "predicted", "TP", "FP", "FN", "precision (95% CI)",
                   "recall (95% CI)", "F1"], rows, "lrrrrrrrr")


def scorecard_markdown(sc: Scorecard) -> str:
    q = sc.overall
    lines = [
        f"# Scorecard: {sc.prompt} v{sc.version}",
        "",
        (f"- prompt version: `{sc.prompt}` v{sc.version} (content sha256 `{sc.version_hash[:12]}`), "
        f"model `{sc.model}`"),
        f"- dataset: `{sc.dataset_source}` — {q.n} items, sha256 `{sc.dataset_sha256[:12]}`",
        f"- created: {sc.created_at} ({sc.cached} of {q.n} results from the cache)",
        "",
    ]
    err = sc.rates["error"]
    if err.count:
        lines += [f"> **Warning:** {err.count} item(s) got no verdict (backend errors: "
                  + ", ".join(f"{k} ×{v}" for k, v in sorted(sc.error_types.items()))
                  + "). They count as misses below. Re-run to retry them: errors are not cached.",
                  ""]
    lines += [
        "## Summary",
        "",
        (f"Macro F1 **{_f(q.macro_f1)}** (precision {_f(q.macro_precision)}, recall "
        f"{_f(q.macro_recall)}); accuracy {_ci(q.accuracy, q.accuracy_ci)} "
        f"({q.correct}/{q.n} items with the right outcome), exact decision match "
        f"{_pct(q.decision_accuracy)}."),
        "",
        ("Intervals are 95% Wilson score intervals. A row is positive for a category when its gold "
        "decision is not `allow` and its gold category is that category; a verdict is positive "
        "when its decision is not `allow` (so `needs_review` counts) and its category is that "
        "category."),
        "",
        "## Per category",
        "",
        *_quality_tables(q),
        "",
        "## Rates, latency and tokens",
        "",
    ]
    rate_rows = []
    for name, what in (("needs_review", "verdicts that are needs_review (of answered)"),
                       ("parse_failure", "model output not a valid verdict (of answered)"),
                       ("error", "backend errors, no verdict (of all)")):
        r = sc.rates[name]
        rate_rows.append([what, f"{r.count}/{r.n}", _pct(r.rate),
                          f"{_pct(r.ci[0])}–{_pct(r.ci[1])}" if r.ci else MISSING])
    lines += _table(["rate", "count", "share", "95% CI"], rate_rows, "lrrr")
    if sc.fail_reasons:
        lines += ["", "Parse failures: " + ", ".join(f"`{k}` ×{v}" for k, v in sorted(sc.fail_reasons.items()))]
    lat, tok = sc.latency_ms, sc.tokens
    lines += ["", (f"Tokens: {tok['prompt']} prompt + {tok['completion']} completion = "
                   f"{tok['total']}. Latency of this run: p50 {_f(lat['p50'], 1)} ms, p95 "
                   f"{_f(lat['p95'], 1)} ms, mean {_f(lat['mean'], 1)} ms; a property of the run "
                   "(its order, a cold or warm model server, cached answers), not of the "
                   "version: see the run report before comparing it with another version's."),
              "", *_calibration_lines(sc), "", "## Per locale", ""]
    loc_rows = [[loc, lq.n, _ci(lq.accuracy, lq.accuracy_ci), _f(lq.macro_f1),
                 _ci(lq.flagged.precision, lq.flagged.precision_ci),
                 _ci(lq.flagged.recall, lq.flagged.recall_ci)]
                for loc, lq in sc.per_locale.items()]
    lines += _table(["locale", "items", "accuracy", "macro F1", "flagged precision",
                     "flagged recall"], loc_rows, "lrrrrr")
    for loc, lq in sc.per_locale.items():
        lines += ["", f"### {loc}", "", *_quality_tables(lq)]
    lines += ["", "## Confusion matrix (outcome labels)", "",
              ("Rows: gold; columns: predicted. `none` = allowed, `needs_review` = flagged without a "
              "category (including unparseable output), `error` = no verdict."), ""]
    lines += _table(["gold \\ predicted", *sc.columns],
                    [[lab, *row] for lab, row in zip(sc.labels, sc.confusion, strict=True)],
                    "l" + "r" * len(sc.columns))
    lines += ["", "Decisions (rows: gold; columns: predicted):", ""]
    lines += _table(["gold \\ predicted", *sc.decisions, "error"],
                    [[d, *row] for d, row in zip(sc.decisions, sc.decision_confusion, strict=True)],
                    "l" + "r" * (len(sc.decisions) + 1))
    wrong = [o for o in sc.items if not o.correct]
    lines += ["", f"## Items with the wrong outcome ({len(wrong)})", ""]
    if wrong:
        shown = wrong[:MAX_LISTED_ITEMS]
        lines += _table(["item", "locale", "gold", "predicted", "confidence", "tags"], [
            [o.item_id, o.locale, f"{o.gold_decision}/{o.gold_category}",
             f"error:{o.error_type}" if o.error_type else
             f"{o.decision}/{o.category or '-'}" + (f" ({o.fail_reason})" if o.fail_reason else ""),
             _f(o.confidence), ", ".join(o.tags)] for o in shown])
        if len(wrong) > len(shown):
            lines += ["", f"… and {len(wrong) - len(shown)} more (see the JSON scorecard)."]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _calibration_lines(sc: Scorecard) -> list[str]:
    from gateway.quality.evaluation.calibration import SOURCES, Reliability

    lines = ["## Calibration", "",
             ("How far each number is from a probability that the model's decision is right: "
              "expected calibration error (ECE) over 10 equal-width bins, 0 is perfect. The "
              "calibrated probability comes from the engine's token log-probabilities at the "
              "decision, renormalised over the allowed decisions; the confidence is what the "
              "model wrote. See `v" f"{sc.version}-reliability.png`."), ""]
    if not sc.calibration:
        return [*lines, "Not computed (scorecard written before calibration existed)."]
    rows = []
    for key, label in SOURCES.items():
        rel = Reliability.from_dict(sc.calibration[key])
        rows.append([label, rel.n, rel.left_out, _f(rel.ece, 3)])
    lines += _table(["probability", "items", "left out", "ECE"], rows, "lrrr")
    decided = Counter(o.decided_by for o in sc.items if o.decided_by)
    if decided.get("threshold") or decided.get("fail_closed"):
        lines += ["", "Decided by: " + ", ".join(f"{k} {v}" for k, v in sorted(decided.items()))
                  + " (operating points of this version applied to the model's answers)."]
    return lines


def _significance(p: float) -> str:
    return ("significant at the 5% level" if p < ALPHA else
            "could be chance at the 5% level")


def _category_sentence(d: CategoryDelta, a: int, b: int) -> str:
    parts = []
    if d.recall_gained or d.recall_lost:
        parts.append(
            f"recall {_f(d.a.recall)} → {_f(d.b.recall)}: v{b} catches {d.recall_gained} that "
            f"v{a} missed and misses {d.recall_lost} that v{a} caught (p = {_p(d.recall_p)}: "
            f"{_significance(d.recall_p)})")
    if d.fp_removed or d.fp_added:
        parts.append(
            f"false positives {d.a.fp} → {d.b.fp} (precision {_f(d.a.precision)} → "
            f"{_f(d.b.precision)}): {d.fp_removed} removed, {d.fp_added} new "
            f"(p = {_p(d.fp_p)}: {_significance(d.fp_p)})")
    if not parts:
        return f"- **{d.category}**: no item changed for this category."
    return f"- **{d.category}**: " + "; ".join(parts) + "."


def comparison_markdown(cmp: Comparison) -> str:
    a, b = cmp.a_version, cmp.b_version
    lines = [
        f"# Comparison: {cmp.prompt} v{a} → v{b}",
        "",
        f"- v{a} sha256 `{cmp.a_hash[:12]}`, v{b} sha256 `{cmp.b_hash[:12]}`",
        f"- dataset sha256 `{cmp.dataset_sha256[:12]}`: {cmp.n} items answered by both versions"
        + (f" ({cmp.excluded_errors} left out: a backend error in one of them)"
           if cmp.excluded_errors else ""),
        "",
        "## Bottom line",
        "",
        (f"Accuracy {_pct(cmp.a_accuracy)} → {_pct(cmp.b_accuracy)}. v{b} got **{cmp.fixed}** items "
        f"right that v{a} got wrong (fixed) and **{cmp.broken}** wrong that v{a} got right "
        f"(broken); {cmp.changed} more changed verdict without changing correctness. Exact McNemar "
        f"test on per-item correctness: p = {_p(cmp.mcnemar_p)}, the difference "
        f"{'is significant at the 5% level' if cmp.mcnemar_p < ALPHA else 'could be chance'}."),
        "",
    ]
    for d in cmp.overall:
        what = ("Any violation category (micro)" if d.category == "micro"
                else "Flagging at all (flag vs allow)")
        lines.append(f"- {what}: precision {_f(d.a.precision)} → {_f(d.b.precision)}, recall "
                     f"{_f(d.a.recall)} → {_f(d.b.recall)}; {d.recall_gained} more caught, "
                     f"{d.recall_lost} newly missed (p = {_p(d.recall_p)}); {d.fp_removed} false "
                     f"positives removed, {d.fp_added} new (p = {_p(d.fp_p)}).")
    micro = next(d for d in cmp.overall if d.category == "micro")
    if micro.fp_removed > micro.fp_added and micro.recall_lost == 0:
        claim = (f"v{b} removes false positives without missing anything v{a} caught"
                 + (" — and the drop in false positives is significant at the 5% level."
                    if micro.fp_p < ALPHA else
                    ", but the drop in false positives could still be chance."))
    elif micro.recall_lost > 0:
        claim = (f"v{b} misses {micro.recall_lost} violation(s) that v{a} caught: recall was lost "
                 "on these items (listed below as broken).")
    else:
        claim = f"v{b} does not remove more false positives than it adds."
    lines += ["", f"**Precision without losing recall?** {claim}", "",
              "## Which categories changed", "",
              ("Per category, p is the exact McNemar test on the items where only one version "
              "was right about that category. With several categories tested, one p below 0.05 "
              f"can happen by chance; a stricter bar is 0.05/{len(cmp.categories)} = "
              f"{0.05 / max(1, len(cmp.categories)):.3f} (Bonferroni)."), ""]
    lines += [_category_sentence(d, a, b) for d in cmp.categories]
    lines += ["", "## Per-category metrics", ""]
    rows = [[d.category, d.a.support, _ci(d.a.precision, d.a.precision_ci),
             _ci(d.b.precision, d.b.precision_ci), _signed(d.delta_precision),
             _ci(d.a.recall, d.a.recall_ci), _ci(d.b.recall, d.b.recall_ci), _signed(d.delta_recall),
             _f(d.a.f1), _f(d.b.f1), _signed(d.delta_f1),
             f"+{d.recall_gained}/−{d.recall_lost} (p {_p(d.recall_p)})",
             f"−{d.fp_removed}/+{d.fp_added} (p {_p(d.fp_p)})"]
            for d in [*cmp.categories, *cmp.overall]]
    lines += _table(["category", "support", f"P v{a}", f"P v{b}", "ΔP", f"R v{a}", f"R v{b}", "ΔR",
                     f"F1 v{a}", f"F1 v{b}", "ΔF1", "caught +new/−lost", "false pos. −removed/+new"],
                    rows, "lrrrrrrrrrrrr")
    lines += ["", f"Macro F1 {_f(cmp.a.macro_f1)} → {_f(cmp.b.macro_f1)}.", "",
              "McNemar table (items): ", ""]
    lines += _table(["", f"v{b} correct", f"v{b} wrong"],
                    [[f"v{a} correct", cmp.both_correct, cmp.only_a_correct],
                     [f"v{a} wrong", cmp.only_b_correct, cmp.both_wrong]], "lrr")
    lines += ["", f"## Items whose verdict changed ({len(cmp.items)})", ""]
    if cmp.items:
        shown = cmp.items[:MAX_LISTED_ITEMS]
        lines += _table(["status", "item", "locale", "gold", f"v{a}", f"v{b}", "tags"],
                        [[c.status, c.item_id, c.locale, c.gold, c.a, c.b, ", ".join(c.tags)]
                         for c in shown])
        if len(cmp.items) > len(shown):
            lines += ["", f"… and {len(cmp.items) - len(shown)} more (see the JSON comparison)."]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


# -- plots -------------------------------------------------------------------------------------


_figure = figure


def pr_plot(series: Sequence[tuple[str, Sequence[CategoryStats]]], path: Path, title: str) -> Path:
    """Precision and recall per category with 95% Wilson intervals, one bar per series."""
    import numpy as np

    cats = [s.category for s in series[0][1]]
    fig = _figure(max(7.0, 1.1 * len(cats) + 2), 6.5)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(cats))
    width = 0.8 / len(series)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, metric in zip(axes, ("precision", "recall"), strict=True):
        for i, (name, stats) in enumerate(series):
            by_cat = {s.category: s for s in stats}
            vals, lows, highs = [], [], []
            for c in cats:
                s = by_cat.get(c)
                v = getattr(s, metric) if s else None
                ci = getattr(s, f"{metric}_ci") if s else None
                vals.append(np.nan if v is None else v)
                lows.append(0.0 if v is None or ci is None else max(0.0, v - ci[0]))
                highs.append(0.0 if v is None or ci is None else max(0.0, ci[1] - v))
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(pos, np.nan_to_num(vals), width, yerr=[lows, highs], capsize=3,
                   label=name, color=colors[i % len(colors)], alpha=0.85)
            for p_, v in zip(pos, vals, strict=True):
                if np.isnan(v):
                    ax.text(p_, 0.02, MISSING, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_xticks(x, cats, rotation=30, ha="right")
    fig.savefig(path, dpi=110)
    return path


def scorecard_reliability_plot(sc: Scorecard, path: Path) -> Path:
    from gateway.quality.evaluation.calibration import Reliability, reliability_plot

    data = {k: Reliability.from_dict(v) for k, v in sc.calibration.items()}
    return reliability_plot(data, path, f"{sc.prompt} v{sc.version}: reliability of the decision")


def coverage_plot(sc: Scorecard, path: Path) -> Path:
    """Per-category precision-coverage curves of the calibrated block probability."""
    from gateway.quality.evaluation.calibration import propose, thresholds_plot

    return thresholds_plot(propose(sc.items, sc.categories, target=1.0), path,
                           f"{sc.prompt} v{sc.version}: precision against coverage of the block "
                           "probability, per category")


def confusion_plot(sc: Scorecard, path: Path) -> Path:
    import numpy as np

    matrix = np.array(sc.confusion, dtype=float)
    cols = sc.columns
    fig = _figure(max(6.0, 0.8 * len(cols) + 2.5), max(5.0, 0.6 * len(sc.labels) + 2))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="items")
    names = {"none": "none (allow)", "needs_review": "needs_review (no category)"}
    ax.set_xticks(range(len(cols)), [names.get(c, c) for c in cols], rotation=35, ha="right")
    ax.set_yticks(range(len(sc.labels)), [names.get(c, c) for c in sc.labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = matrix.max() if matrix.size else 0
    for (r, c), v in np.ndenumerate(matrix):
        if v:
            ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > top / 2 else "black")
    ax.set_title(f"{sc.prompt} v{sc.version}: confusion matrix (outcome labels)")
    fig.savefig(path, dpi=110)
    return path


# -- files -------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def scorecard_paths(out_dir: Path, version: int) -> dict[str, Path]:
    return {"json": out_dir / f"v{version}.json", "markdown": out_dir / f"v{version}.md",
            "pr_png": out_dir / f"v{version}-pr.png",
            "confusion_png": out_dir / f"v{version}-confusion.png",
            "reliability_png": out_dir / f"v{version}-reliability.png",
            "coverage_png": out_dir / f"v{version}-coverage.png",
            "items_csv": out_dir / f"v{version}-items.csv",
            "items_parquet": out_dir / f"v{version}-items.parquet"}


def write_scorecard(sc: Scorecard, out_dir: Path, dataset: Dataset | None = None) -> dict[str, Path]:
    """Write a scorecard's JSON, Markdown, plots and per-item tables (titles from *dataset*)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = scorecard_paths(out_dir, sc.version)
    _write_json(paths["json"], sc.to_dict())
    paths["markdown"].write_text(scorecard_markdown(sc), encoding="utf-8")
    pr_plot([(f"v{sc.version}", [*sc.overall.categories, sc.overall.micro])], paths["pr_png"],
            f"{sc.prompt} v{sc.version}: precision and recall (95% Wilson intervals)")
    confusion_plot(sc, paths["confusion_png"])
    scorecard_reliability_plot(sc, paths["reliability_png"])
    coverage_plot(sc, paths["coverage_png"])
    written = write_items(sc, paths["items_csv"], paths["items_parquet"], dataset)
    if "items_parquet" not in written:
        del paths["items_parquet"]
    return paths


# -- per-item tables ---------------------------------------------------------------------------

ITEM_COLUMNS = ("prompt", "version", "version_hash", "dataset_sha256", "item_id", "locale",
                "title", "description", "gold_decision", "gold_category", "gold_label",
                "decision", "category", "confidence", "predicted_label", "correct",
                "fail_reason", "error_type", "tags", "notes", "decision_probability",
                "category_probability", "block_probability", "probability_unresolved",
                "decided_by", "model_decision")


def item_rows(sc: Scorecard, dataset: Dataset | None = None) -> list[dict[str, Any]]:
    """One row per item (ITEM_COLUMNS); title, description and notes are empty without *dataset*."""
    rows_by_id = {r.item_id: r for r in dataset.rows} if dataset is not None else {}
    out = []
    for o in sc.items:
        row = rows_by_id.get(o.item_id)
        out.append({
            "prompt": sc.prompt, "version": sc.version, "version_hash": sc.version_hash,
            "dataset_sha256": sc.dataset_sha256, "item_id": o.item_id, "locale": o.locale,
            "title": row.title if row else None, "description": row.description if row else None,
            "gold_decision": o.gold_decision, "gold_category": o.gold_category,
            "gold_label": o.gold_label, "decision": o.decision, "category": o.category,
            "confidence": o.confidence, "predicted_label": o.predicted_label,
            "correct": o.correct, "fail_reason": o.fail_reason, "error_type": o.error_type,
            "tags": list(o.tags), "notes": row.notes if row else None,
            "decision_probability": o.decision_probability,
            "category_probability": o.category_probability,
            "block_probability": o.block_probability,
            "probability_unresolved": o.probability_unresolved,
            "decided_by": o.decided_by, "model_decision": o.model_decision})
    return out


def _items_arrow_schema() -> Any:
    import pyarrow as pa

    types = {name: pa.string() for name in ITEM_COLUMNS}
    types.update(version=pa.int64(), confidence=pa.float64(), correct=pa.bool_(),
                 decision_probability=pa.float64(), category_probability=pa.float64(),
                 block_probability=pa.float64(), probability_unresolved=pa.float64(),
                 tags=pa.list_(pa.string()))
    return pa.schema([pa.field(name, types[name]) for name in ITEM_COLUMNS])


def write_items(sc: Scorecard, csv_path: Path, parquet_path: Path | None,
                dataset: Dataset | None = None) -> dict[str, Path]:
    """Per-item results as CSV (spreadsheets) and Parquet (SQL); Parquet is skipped, and left
    out of the returned paths, when pyarrow is not installed."""
    rows = item_rows(sc, dataset)
    written = {"items_csv": csv_path}
    with csv_path.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(ITEM_COLUMNS)
        for r in rows:
            cells = {**r, "tags": ";".join(r["tags"]),
                     "correct": "true" if r["correct"] else "false"}
            writer.writerow(["" if cells[c] is None else cells[c] for c in ITEM_COLUMNS])
    if parquet_path is not None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow ships with the cpu/gpu extras
            return written
        pq.write_table(pa.Table.from_pylist(rows, schema=_items_arrow_schema()), parquet_path,
                       compression="zstd")
        written["items_parquet"] = parquet_path
    return written


def write_comparison(cmp: Comparison, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"compare-v{cmp.a_version}-v{cmp.b_version}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md",
             "pr_png": out_dir / f"{stem}-pr.png"}
    _write_json(paths["json"], cmp.to_dict())
    paths["markdown"].write_text(comparison_markdown(cmp), encoding="utf-8")
    micro = {d.category: d for d in cmp.overall}["micro"]
    pr_plot([(f"v{cmp.a_version}", [*(d.a for d in cmp.categories), micro.a]),
             (f"v{cmp.b_version}", [*(d.b for d in cmp.categories), micro.b])], paths["pr_png"],
            f"{cmp.prompt} v{cmp.a_version} vs v{cmp.b_version} on the same items "
            "(95% Wilson intervals)")
    return paths


# -- the run report: one Markdown summary and one self-contained HTML file ----------------------


def report_paths(out_dir: Path, versions: Sequence[int]) -> dict[str, Path]:
    stem = "report-" + "-".join(f"v{v}" for v in versions)
    return {"markdown": out_dir / f"{stem}.md", "html": out_dir / f"{stem}.html"}


def _summary_lines(scorecards: Sequence[Scorecard], comparisons: Sequence[Comparison]) -> list[str]:
    first = scorecards[0]
    models = ", ".join(dict.fromkeys(f"`{sc.model}`" for sc in scorecards))
    lines = [f"- dataset: `{first.dataset_source}` — {first.overall.n} items, sha256 "
             f"`{first.dataset_sha256[:12]}`",
             f"- model: {models}; created {max(sc.created_at for sc in scorecards)}",
             "", "## Versions", ""]
    rows = []
    for sc in scorecards:
        q, r = sc.overall, sc.rates
        rows.append([f"v{sc.version}", f"`{sc.version_hash[:12]}`", _f(q.macro_f1),
                     _ci(q.accuracy, q.accuracy_ci), _ci(q.micro.precision, q.micro.precision_ci),
                     _ci(q.micro.recall, q.micro.recall_ci),
                     _ci(q.flagged.precision, q.flagged.precision_ci),
                     _ci(q.flagged.recall, q.flagged.recall_ci), _pct(r["needs_review"].rate),
                     r["parse_failure"].count, r["error"].count,
                     _ece(sc, "decision_probability"), _ece(sc, "confidence")])
    lines += _table(["version", "sha256", "macro F1", "accuracy (95% CI)", "micro precision",
                     "micro recall", "flagged precision", "flagged recall", "needs_review",
                     "parse failures", "errors", "ECE calibrated", "ECE confidence"], rows,
                    "llrrrrrrrrrrr")
    lines += ["", LATENCY_NOT_COMPARED]
    lines += ["", "## Per category: precision and recall (95% Wilson intervals)", ""]
    cats = list(dict.fromkeys(c for sc in scorecards for c in sc.categories))
    header = ["category", "support"]
    for sc in scorecards:
        header += [f"precision v{sc.version}", f"recall v{sc.version}"]
    rows = []
    for cat in cats:
        stats = [sc.overall.category(cat) for sc in scorecards]
        row: list[object] = [cat, next((s.support for s in stats if s is not None), 0)]
        for s in stats:
            row += ([_ci(s.precision, s.precision_ci), _ci(s.recall, s.recall_ci)] if s
                    else [MISSING, MISSING])
        rows.append(row)
    lines += _table(header, rows, "lr" + "rr" * len(scorecards))
    if comparisons:
        lines += ["", "## Comparisons", ""]
        for c in comparisons:
            lines.append(
                f"- v{c.a_version} → v{c.b_version}: accuracy {_pct(c.a_accuracy)} → "
                f"{_pct(c.b_accuracy)} on {c.n} items; **{c.fixed} fixed**, **{c.broken} broken**, "
                f"{c.changed} changed; exact McNemar p = {_p(c.mcnemar_p)} "
                f"({_significance(c.mcnemar_p)}). Details: `compare-v{c.a_version}-v{c.b_version}.md`.")
    lines += ["", "## Files", "",
              "Per version: `v<N>.md` (scorecard), `v<N>.json`, `v<N>-items.csv` (one row per item, "
              "for a spreadsheet) and `v<N>-items.parquet` (for DuckDB or pandas), plots "
              "`v<N>-pr.png`, `v<N>-confusion.png`, `v<N>-reliability.png` and `v<N>-coverage.png`; per comparison `compare-v<A>-v<B>.md`, "
              "`.json` and `-pr.png`."]
    return lines


def _ece(sc: Scorecard, source: str) -> str:
    ece = (sc.calibration.get(source) or {}).get("ece")
    return _f(ece, 3)


def _title(scorecards: Sequence[Scorecard]) -> str:
    return (f"Evaluation: {scorecards[0].prompt} "
            + ", ".join(f"v{sc.version}" for sc in scorecards))


def run_markdown(scorecards: Sequence[Scorecard], comparisons: Sequence[Comparison]) -> str:
    """The run's Markdown summary: every version side by side, and each comparison's verdict."""
    return "\n".join([f"# {_title(scorecards)}", "", *_summary_lines(scorecards, comparisons)]) + "\n"


def run_html(scorecards: Sequence[Scorecard], comparisons: Sequence[Comparison],
             images: dict[str, bytes]) -> str:
    """The self-contained HTML report of a run. *images* holds the PNGs by stem:
    `v<N>-pr`, `v<N>-confusion`, `v<N>-reliability`, `v<N>-coverage` and
    `compare-v<A>-v<B>-pr`."""
    parts = ['<section id="summary">',
             markdown_html("\n".join(_summary_lines(scorecards, comparisons)), shift_headings=1),
             "</section>"]
    nav = [("summary", "Summary")]
    for c in comparisons:
        stem = f"compare-v{c.a_version}-v{c.b_version}"
        nav.append((stem, f"v{c.a_version} → v{c.b_version}"))
        parts += [f'<section id="{stem}">',
                  markdown_html(comparison_markdown(c), shift_headings=1)
                  .replace("</h2>", "</h2>\n" + figure_html(
                      images[f"{stem}-pr"], f"precision and recall, v{c.a_version} vs v{c.b_version}",
                      "Precision and recall per category on the items both versions answered; "
                      "bars are 95% Wilson intervals."), 1),
                  "</section>"]
    for sc in scorecards:
        nav.append((f"v{sc.version}", f"v{sc.version}"))
        figs = (figure_html(images[f"v{sc.version}-pr"], f"precision and recall of v{sc.version}",
                            "Precision and recall per category, micro average last; bars are 95% "
                            "Wilson intervals.")
                + figure_html(images[f"v{sc.version}-confusion"], f"confusion matrix of v{sc.version}",
                              "Confusion matrix of outcome labels (rows gold, columns predicted).")
                + figure_html(images[f"v{sc.version}-reliability"], f"reliability diagram of v{sc.version}",
                              "Share of decisions that were right against the predicted probability, "
                              "per bin (item counts beside the points): the calibrated probability "
                              "and the self-reported confidence; the diagonal is perfect calibration.")
                + figure_html(images[f"v{sc.version}-coverage"], f"precision-coverage curves of v{sc.version}",
                              "Per category, among the verdicts the model put in it: precision "
                              "(solid) and its 95% Wilson lower bound (dotted) of blocking every "
                              "verdict whose block probability is at or above a threshold, against "
                              "the share blocked. `modgate eval thresholds` proposes operating "
                              "points from these."))
        parts += [f'<section id="v{sc.version}">',
                  markdown_html(scorecard_markdown(sc), shift_headings=1).replace(
                      "</h2>", "</h2>\n" + figs, 1),
                  "</section>"]
    return html_page(_title(scorecards), "\n".join(parts), nav=nav)


def _png(path: Path, render: Callable[[Path], object]) -> bytes:
    if not path.is_file():
        render(path)
    return path.read_bytes()


def write_run_report(scorecards: Sequence[Scorecard], comparisons: Sequence[Comparison],
                     out_dir: Path) -> dict[str, Path]:
    """Write `report-v<A>-v<B>....md` and `.html` for a run (plots missing on disk are drawn)."""
    if not scorecards:
        raise ValueError("a run report needs at least one scorecard")
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for sc in scorecards:
        p = scorecard_paths(out_dir, sc.version)
        series = [(f"v{sc.version}", [*sc.overall.categories, sc.overall.micro])]
        title = f"{sc.prompt} v{sc.version}: precision and recall (95% Wilson intervals)"
        images[f"v{sc.version}-pr"] = _png(p["pr_png"], functools.partial(pr_plot, series, title=title))
        images[f"v{sc.version}-confusion"] = _png(p["confusion_png"],
                                                  functools.partial(confusion_plot, sc))
        images[f"v{sc.version}-reliability"] = _png(p["reliability_png"],
                                                    functools.partial(scorecard_reliability_plot, sc))
        images[f"v{sc.version}-coverage"] = _png(p["coverage_png"], functools.partial(coverage_plot, sc))
    for c in comparisons:
        stem = f"compare-v{c.a_version}-v{c.b_version}"
        path = out_dir / f"{stem}-pr.png"
        if not path.is_file():
            write_comparison(c, out_dir)
        images[f"{stem}-pr"] = path.read_bytes()
    paths = report_paths(out_dir, [sc.version for sc in scorecards])
    paths["markdown"].write_text(run_markdown(scorecards, comparisons), encoding="utf-8")
    paths["html"].write_text(run_html(scorecards, comparisons, images), encoding="utf-8")
    return paths


def load_scorecard(out_dir: Path, prompt: str, version: int, dataset_sha256: str) -> Scorecard:
    """The scorecard `eval run` stored in *out_dir*; FileNotFoundError when there is none,
    ValueError when the file is of another prompt or dataset."""
    path = scorecard_paths(out_dir, version)["json"]
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("prompt") != prompt or data.get("dataset_sha256") != dataset_sha256:
        raise ValueError(f"{path} is a scorecard of {data.get('prompt')} on dataset "
                         f"{str(data.get('dataset_sha256'))[:12]}, not of {prompt} on "
                         f"{dataset_sha256[:12]}")
    if data.get("version") != version:
        raise ValueError(f"{path} is a scorecard of v{data.get('version')}, not of v{version}")
    return Scorecard.from_dict(data)
