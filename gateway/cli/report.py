"""`modgate report ops`: the operational report of a time window, as HTML and Markdown.

    modgate report ops --since 24h
    modgate report ops --from 2025-03-01 --to 2025-03-08 --tz Asia/Shanghai --out week10/

Reads the decision log, the reviewer-feedback log and the registry (audit log, rollouts) of the
configuration and writes `ops-report.md` (with PNG plots next to it) and `ops-report.html` (one
self-contained file with the plots embedded: mail it, attach it, open it offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.decisions import _progress_bar, _range, _skipped
from gateway.cli.feedback import (
    ConfigOpt,
    JsonOpt,
    PromptOpt,
    QuietOpt,
    TargetOpt,
    TzOpt,
    WhatIfOpt,
    _fail,
    _text_table,
    load_sources,
    what_if_points,
    what_if_results,
    zone,
)

__all__ = ["report_app"]

report_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                         context_settings={"help_option_names": ["-h", "--help"]},
                         help="Reports for a time window: what was decided, by which prompt "
                              "version, how well, and what changed.")


@report_app.command("ops")
def ops_cmd(
    since: Annotated[str, typer.Option(
        "--since", "--from", help="window start (inclusive): ISO 8601 in UTC unless an offset is "
                                  "given, or a duration before now such as 90m, 24h, 7d")] = "24h",
    until: Annotated[str | None, typer.Option(
        "--until", "--to", help="window end (exclusive), same forms; default: now")] = None,
    prompt: PromptOpt = None, tz: TzOpt = "UTC",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="output directory (default: <data_dir>/reports/ops-<from>-<to>)")] = None,
    what_if: WhatIfOpt = None, target_precision: TargetOpt = 0.9,
    config: ConfigOpt = None, as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Write the operational report of a time window (HTML and Markdown, with plots).

    It opens with the point: per prompt, for all locales and each locale (en-US, zh-CN, ...),
    the decisions callers got, the review rate and the precision from reviewer labels, each
    against the previous period of the same length; then every rollout that ran in the
    window with its outcome, and the registry events (publishes, label moves, rollout
    transitions), one line each: what moved, why, by whom (the evidence is a click away in
    the HTML, and in --json).

    Then the detail per prompt version and arm (stable, canary, pinned, shadow): volume and
    traffic share, per locale, per day (of --tz: days split at its midnight), verdict mix per
    category (table, and over time), review rate (needs_review share, 95% Wilson interval)
    and parse failures, precision and recall from reviewer feedback, a caller x shadow table
    per category for each shadowed version, tokens (prompt, cached prompt, completion) and
    their cost at the prices of `reporting.prices`, latency p50/p95/p99.

    And the threshold what-if on reviewer labels: every verdict of the window decided again,
    by the function the gateway serves with, at the version's current operating points, at
    the one `modgate eval thresholds` would propose from the labels (--target-precision) and
    at each --what-if CATEGORY=BLOCK_AT:REVIEW_AT (block at or above BLOCK_AT, needs_review
    from REVIEW_AT up, allow below; CATEGORY=off: the model decides): per version, category
    and locale the block and review rates, and precision and recall of what the point blocks
    (95% Wilson intervals), with a precision-coverage plot per version marking the points.
    Decisions without a calibrated probability are counted and decided as the gateway
    decides them, never dropped.

    \b
    Examples:
      modgate report ops --since 24h
      modgate report ops --from 2025-03-01 --to 2025-03-08 --tz Asia/Shanghai -o week10/
      modgate report ops --since 7d --what-if counterfeit=0.85:0.4 --target-precision 0.95
      modgate report ops --since 7d --json | jq '.headline'
    """
    from datetime import UTC, datetime

    from gateway.quality.decisions import ReadStats, read_segments
    from gateway.quality.live_quality import read_feedback
    from gateway.quality.ops_report import (
        build_report,
        headline_table,
        registry_events,
        write_ops_report,
    )
    from gateway.quality.whatif import WhatIfAccumulator

    zone_ = zone(tz)
    points = what_if_points(what_if)
    start, end = _range(since, until, zone_)
    assert start is not None
    end = end or datetime.now(UTC)
    if start >= end:
        raise _fail(f"--since ({start:%Y-%m-%d %H:%M:%S}) must be before now", 2)
    if out is not None and out.exists() and not out.is_dir():
        raise _fail(f"--out {out} is a file; give a directory", 2)
    cfg, log_dir, fb_dir = load_sources(config)
    previous = start - (end - start)
    fb = read_feedback(fb_dir, previous)
    thresholds = WhatIfAccumulator(fb.labels)
    stats = ReadStats()
    with _progress_bar(not quiet and not as_json) as progress:
        rep = build_report(read_segments(log_dir, previous, end, stats=stats, progress=progress),
                           fb.labels, start=start, end=end, prompt=prompt, tz=zone_,
                           previous_start=previous, prices=cfg.reporting.prices,
                           currency=cfg.reporting.currency, whatif=thresholds)
    if stats.torn_lines or stats.bad_lines:
        rep.notes.append(f"decision log:{_skipped(stats)}")
    if fb.bad_lines:
        rep.notes.append(f"feedback log: {fb.bad_lines} unreadable line(s) skipped")
    prompts = [prompt] if prompt else rep.prompts
    if cfg.registry.store == "sqlite" and not cfg.registry_path().exists():
        rep.notes.append(f"no registry at {cfg.registry_path()}: rollout events left out")
    else:
        from gateway.config import ConfigError
        from gateway.stores import open_store
        from prompt_registry import RegistryError

        try:
            store = open_store(cfg)
            try:
                rep.events, rep.rollouts = registry_events(store, prompts, start, end)
            finally:
                store.close()
        except (ConfigError, RegistryError) as exc:
            rep.notes.append(f"registry not readable, rollout events left out: {exc}")
    rep.what_if = what_if_results(thresholds, cfg, what_if, points, target_precision, rep.notes)
    local_start, local_end = start.astimezone(zone_), end.astimezone(zone_)
    out_dir = out or (cfg.data_path() / "reports"
                      / f"ops-{local_start:%Y%m%dT%H%M}-{local_end:%Y%m%dT%H%M}")
    try:
        paths = write_ops_report(rep, out_dir)
    except OSError as exc:
        raise _fail(f"cannot write the report to {out_dir}: {exc}") from None
    if as_json:
        data = rep.to_dict()
        data["paths"] = {k: str(p) for k, p in paths.items()}
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return
    typer.echo(f"{rep.records} decision(s) from {local_start:%Y-%m-%d %H:%M} to "
               f"{local_end:%Y-%m-%d %H:%M} {tz}{_skipped(stats)}; {rep.feedback_matched} reviewer "
               f"label(s); {len(rep.events)} registry event(s)")
    if rep.headline:
        typer.echo("headline (what callers got; change against the previous period of the "
                   "same length):")
        header, rows = headline_table(rep.headline, rep.headline_before,
                                      many=len(rep.prompts) > 1)
        _text_table(header, rows)
    if rep.what_if:
        typer.echo(f"threshold what-if on reviewer labels: {len(rep.what_if)} version(s), "
                   f"{sum(len(w.categories) for w in rep.what_if)} category table(s) in the report")
    for r in rep.rollouts:
        typer.echo(f"rollout {r['id']} of {r['prompt']}: {r['outcome']}")
    for n in rep.notes:
        typer.echo(f"note: {n}")
    typer.echo(f"report: {paths['html']}\n        {paths['markdown']}")
