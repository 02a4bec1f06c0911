"""`modgate feedback ...`: close the loop between reviewers, live traffic and the labelled set.

    modgate feedback quality --since 7d
    modgate feedback disagreements --since 7d --out datasets/live-week12.jsonl \\
        --content listings-week12.csv --exclude-dataset datasets/listings-sample.jsonl

Reviewer labels (`POST /v1/feedback`, kept in `<data_dir>/feedback/`) are joined with the
decision log (`<data_dir>/<decision_log.dir>`) on the request id. `quality` prints live
precision and recall per prompt version and arm; `disagreements` writes the decisions that
disagreed (with a reviewer, or between a shadow version and the caller's verdict) as new
dataset rows for `modgate eval validate` and `modgate eval run`. Times are UTC; `--since` and
`--until` take ISO 8601 or a duration before now (90m, 24h, 7d).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.decisions import _progress_bar, _range, _skipped
from gateway.config import AppConfig, ConfigError, load_config

__all__ = ["feedback_app", "load_sources"]

feedback_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Reviewer feedback joined with the decision log: live precision and recall per prompt "
         "version, and disagreements exported as dataset rows for the next evaluation.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", "--from", help="decisions from this time (inclusive): ISO 8601 in UTC unless an "
                              "offset is given, or a duration before now such as 90m, 24h, 7d")]
UntilOpt = Annotated[str | None, typer.Option(
    "--until", "--to", help="decisions up to this time (exclusive); same forms as --since")]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="only this prompt")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


def load_sources(config: Path | None) -> tuple[AppConfig, Path, Path]:
    """The configuration, its decision-log directory and its feedback directory."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    log_dir = cfg.data_path() / cfg.decision_log.dir
    if not log_dir.is_dir():
        raise _fail(f"no decision log at {log_dir} (decision_log.dir, relative to data_dir "
                    f"{cfg.data_path()}): has a gateway with this configuration run yet?")
    return cfg, log_dir, cfg.data_path() / "feedback"


def _stats_line(s: Any) -> str:
    from gateway.quality.evaluation.report import _ci

    return (f"  {s.category:<22}{s.support:>8}{s.predicted:>10}  {_ci(s.precision, s.precision_ci):<20}"
            f"{_ci(s.recall, s.recall_ci):<20}")


@feedback_app.command("quality")
def quality_cmd(since: SinceOpt = None, until: UntilOpt = None, prompt: PromptOpt = None,
                config: ConfigOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Live precision and recall per prompt version and arm, from reviewer labels.

    Every reviewer label is joined with the decision it reviews (same request id) and with the
    shadow evaluations of that request, so a shadowed candidate is scored on the same items.
    Metrics and intervals (95% Wilson) are the offline scorecard's. Recall is only meaningful
    when reviewers also see a fair sample of allowed listings; the output says how many
    decisions of each version were reviewed.

    \b
    Examples:
      modgate feedback quality --since 7d
      modgate feedback quality --since 2025-03-01 --until 2025-03-08 --prompt listing-moderation
      modgate feedback quality --since 24h --json | jq '.versions[] | {version, arm, reviewed}'
    """
    from gateway.quality.decisions import ReadStats, read_segments
    from gateway.quality.live_quality import LiveQualityAccumulator, read_feedback

    start, end = _range(since, until)
    _, log_dir, fb_dir = load_sources(config)
    fb = read_feedback(fb_dir, start)
    acc = LiveQualityAccumulator(fb.labels)
    stats = ReadStats()
    with _progress_bar(not quiet and not as_json) as progress:
        for rec in read_segments(log_dir, start, end, stats=stats, progress=progress):
            if prompt is None or rec.prompt_name == prompt:
                acc.add(rec)
    results = acc.results()
    if as_json:
        def st(s: Any) -> dict[str, Any]:
            return {"category": s.category, "support": s.support, "predicted": s.predicted,
                    "tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": s.precision,
                    "precision_ci": s.precision_ci, "recall": s.recall, "recall_ci": s.recall_ci}
        typer.echo(json.dumps({
            "since": start.isoformat() if start else None, "until": end.isoformat() if end else None,
            "decisions": stats.records, "labels": len(fb.labels), "matched": len(acc.matched),
            "bad_feedback_lines": fb.bad_lines,
            "versions": [{"prompt": q.prompt, "version": q.version, "arm": q.arm,
                          "decisions": q.decisions, "reviewed": q.reviewed,
                          "micro": st(q.quality.micro), "flagged": st(q.quality.flagged),
                          "categories": [st(s) for s in q.quality.categories]} for q in results],
        }, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{stats.records} decision(s) read{_skipped(stats)}; {len(fb.labels)} reviewer "
               f"label(s) in {fb_dir}, {len(acc.matched)} for these decisions"
               + (f" ({fb.bad_lines} unreadable feedback line(s) skipped)" if fb.bad_lines else ""))
    if not results:
        typer.echo("no reviewed decisions: nothing to measure yet (reviewers label decisions "
                   "with POST /v1/feedback {request_id, decision, category})")
        return
    for q in results:
        typer.echo(f"\n{q.prompt} v{q.version} {q.arm}: {q.reviewed} of {q.decisions} decision(s) "
                   f"reviewed ({q.review_share:.1%})")
        typer.echo(f"  {'category':<22}{'support':>8}{'predicted':>10}  {'precision (95% CI)':<20}"
                   f"{'recall (95% CI)':<20}")
        for s in [*q.quality.categories, q.quality.micro, q.quality.flagged]:
            if s.support or s.predicted or s.category in ("micro", "flagged"):
                typer.echo(_stats_line(s))


@feedback_app.command("disagreements")
def disagreements_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset file to write: .jsonl or .csv "
                                      "(the format `modgate eval run --dataset` reads)")],
    content: Annotated[Path | None, typer.Option(
        "--content", help="listing content by item id (.csv with a header, or .jsonl): columns "
                          "item_id and title, optionally description, locale, seller_id; other "
                          "columns are ignored")] = None,
    exclude_dataset: Annotated[list[Path] | None, typer.Option(
        "--exclude-dataset", metavar="DATASET", help="leave out items already in this dataset (repeatable)")] = None,
    since: SinceOpt = None, until: UntilOpt = None, prompt: PromptOpt = None,
    config: ConfigOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Export live disagreements as new rows of a labelled dataset.

    A disagreement is a decision a reviewer labelled differently (POST /v1/feedback; the
    caller's verdict or a shadow version's on the same request), or a shadow version whose
    verdict differs from the one the caller got. One row per item (its newest disagreeing
    request), gold label = the reviewer's, tags source:live, disagreement:feedback,
    disagreement:shadow-flip and wrong:v<N>, and notes saying what every version and the
    reviewer said.

    Listing content: the decision log deliberately stores no titles or descriptions (only ids,
    versions and verdicts), so rows get their text from --content, a file you export from your
    listing store for the item ids (e.g. `select item_id, title, description, locale from
    listings where item_id in (...)`). Nothing is guessed: disagreements without a reviewer
    label (unreviewed shadow flips) or without content go to <out>.pending.csv, same columns,
    the missing cells blank and the notes saying what to fill in. Run once without --content
    to get the item ids there.

    \b
    Examples:
      modgate feedback disagreements --since 7d --out live.jsonl --content listings.csv
      modgate eval validate live.jsonl
      modgate eval run -p listing-moderation -v 1 -v 2 --dataset live.jsonl
      # after filling in the blanks of live.pending.csv in a spreadsheet:
      modgate eval validate live.pending.csv
    """
    from gateway.quality.decisions import ReadStats, read_segments
    from gateway.quality.disagreements import (
        build_rows,
        find_disagreements,
        read_content,
        write_pending,
    )
    from gateway.quality.evaluation.dataset import read_dataset, write_dataset
    from gateway.quality.live_quality import read_feedback

    suffix = out.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise _fail(f"--out {out.name!r}: use a .jsonl or .csv file name (the dataset formats)", 2)
    if not out.parent.is_dir():
        raise _fail(f"cannot write {out}: directory {out.parent} does not exist", 2)
    pending_path = out.with_name(out.stem + ".pending.csv")
    listing: dict[str, Any] = {}
    if content is not None:
        listing, problems = read_content(content)
        if problems:
            for p in problems[:20]:
                typer.echo(p, err=True)
            raise _fail(f"--content {content}: {len(problems)} problem(s)", 2)
    exclude: set[str] = set()
    for path in exclude_dataset or []:
        ds, problems = read_dataset(path)
        if ds is None:
            raise _fail(f"--exclude-dataset {path}: {problems[0] if problems else 'unreadable'}", 2)
        exclude |= {r.item_id for r in ds.rows}
    start, end = _range(since, until)
    _, log_dir, fb_dir = load_sources(config)
    fb = read_feedback(fb_dir, start)
    stats = ReadStats()
    with _progress_bar(not quiet and not as_json) as progress:
        found, n = find_disagreements(read_segments(log_dir, start, end, stats=stats,
                                                    progress=progress), fb.labels, prompt=prompt)
    result = build_rows(found, listing, exclude=exclude)
    if result.rows:
        write_dataset(result.rows, out)
        check, problems = read_dataset(out)
        if check is None:  # a bug here, not the user's: say so rather than leave a broken file
            raise _fail(f"{out} does not validate: {problems[0]}")
    if result.pending:
        write_pending(result.pending, pending_path)
    feedback_n = sum(1 for d in found if d.feedback)
    flips = sum(1 for d in found if d.shadow_flip)
    summary = {
        "decisions": n, "items": len(found), "feedback_mismatches": feedback_n,
        "shadow_flips": flips, "rows": len(result.rows), "pending": len(result.pending),
        "without_label": result.no_label, "without_content": result.no_content,
        "invalid": result.invalid, "excluded": result.excluded,
        "out": str(out) if result.rows else None,
        "pending_out": str(pending_path) if result.pending else None,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{n} decision(s) read{_skipped(stats)}: {len(found)} item(s) with a disagreement "
               f"({feedback_n} with a reviewer, {flips} shadow flip(s))")
    if result.excluded:
        typer.echo(f"  {result.excluded} item(s) left out: already in "
                   + ", ".join(str(p) for p in exclude_dataset or []))
    if result.rows:
        typer.echo(f"wrote {len(result.rows)} dataset row(s) to {out}; next: modgate eval "
                   f"validate {out}")
    else:
        typer.echo(f"no complete row to write, so {out} was not written")
    if result.pending:
        why = []
        if result.no_label:
            why.append(f"{result.no_label} without a reviewer label")
        if result.no_content:
            why.append(f"{result.no_content} without listing content"
                       + ("" if content else " (pass --content)"))
        if result.invalid:
            why.append(f"{result.invalid} not valid as they are")
        typer.echo(f"wrote {len(result.pending)} row(s) to fill in to {pending_path}: "
                   + ", ".join(why))
