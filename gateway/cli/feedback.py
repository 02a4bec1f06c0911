"""`modgate feedback ...`: close the loop between reviewers, live traffic and the labelled set.

    modgate feedback quality --since 7d
    modgate feedback import labels.csv --key "$MODGATE_API_KEY"
    modgate feedback disagreements --since 7d --out datasets/live-week12.jsonl \\
        --content listings-week12.csv --exclude-dataset datasets/listings-sample.jsonl

Reviewer labels (`POST /v1/feedback`, kept in `<data_dir>/feedback/`) are joined with the
decision log (`<data_dir>/<decision_log.dir>`) on the request id. `quality` prints live
precision and recall per prompt version and arm; `disagreements` writes the decisions that
disagreed (with a reviewer, or between a shadow version and the caller's verdict) as new
dataset rows for `modgate eval validate` and `modgate eval run`. `--since` and `--until` take
ISO 8601 or a duration before now (90m, 24h, 7d); times without an offset are UTC, or in the
zone `quality --tz` names.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from gateway.cli.client import KeyFileOpt
from gateway.cli.decisions import _progress_bar, _range, _skipped
from gateway.config import AppConfig, ConfigError, load_config
from gateway.quality.reporting import MISSING

if TYPE_CHECKING:
    import httpx

    from gateway.cli.client import RegistryClient
    from gateway.decision_log import DecisionRecord
    from gateway.quality.agreement import PairAgreement
    from gateway.quality.whatif import VersionWhatIf, WhatIfAccumulator
    from prompt_registry import PromptSpec, VerdictSchema
    from prompt_registry.models import OperatingPoint

__all__ = ["MISSING", "TargetOpt", "TzOpt", "WhatIfOpt", "feedback_app", "http_client",
           "load_sources", "read_label_file", "what_if_points", "what_if_results", "zone"]


feedback_app = typer.Typer(
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Reviewer feedback: import a review tool's labels; joined with the decision log, live "
         "precision and recall per prompt version and agreement between reviewers; "
         "disagreements exported as dataset rows for the next evaluation.")

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
TzOpt = Annotated[str, typer.Option(
    "--tz", metavar="ZONE", help="IANA time zone of the report (e.g. Asia/Shanghai, "
                                 "America/New_York): --since/--until without an offset are read "
                                 "in it, days split at its midnight and times are shown in it "
                                 "(default: UTC)")]
_ZONE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+){0,3}$")
WhatIfOpt = Annotated[list[str] | None, typer.Option(
    "--what-if", metavar="CATEGORY=BLOCK_AT:REVIEW_AT",
    help="an operating point to try on the logged verdicts of CATEGORY (repeatable): block at or "
         "above BLOCK_AT, needs_review from REVIEW_AT up, allow below (as a version's "
         "`thresholds:` would); CATEGORY=off: no point, the model's decision stands. "
         "E.g. --what-if counterfeit=0.85:0.4")]
TargetOpt = Annotated[float, typer.Option(
    "--target-precision", min=0.5, max=1.0,
    help="the what-if's proposed operating points: the 95% Wilson lower bound of precision "
         "they must reach on the labels (as `modgate eval thresholds`)")]


def zone(name: str) -> tzinfo:
    """The time zone --tz names; a usage error (exit 2) naming the problem otherwise."""
    if len(name) <= 64 and _ZONE.match(name):
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise _fail(f"--tz {name[:64]!r}: not an IANA time zone name; use one such as UTC, "
                "Asia/Shanghai or America/New_York", 2)


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


def what_if_points(specs: list[str] | None) -> list[tuple[str, OperatingPoint | None]]:
    """The --what-if operating points; a usage error (exit 2) naming the problem otherwise."""
    from gateway.quality.whatif import parse_point

    out = []
    for spec in specs or []:
        try:
            out.append(parse_point(spec))
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
    return out


def what_if_results(acc: WhatIfAccumulator, cfg: AppConfig, specs: list[str] | None,
                    points: list[tuple[str, OperatingPoint | None]], target: float,
                    notes: list[str]) -> list[VersionWhatIf]:
    """The threshold what-if of the versions *acc* saw, their current operating points read
    from the registry (read only; when it cannot be read they are unknown, and *notes* says
    why). A --what-if category that no prompt of the window has is a usage error."""
    from prompt_registry import RegistryError

    specs_read: dict[tuple[str, int], PromptSpec | None] = {}
    store = None
    if cfg.registry.store == "sqlite" and not cfg.registry_path().exists():
        notes.append(f"no registry at {cfg.registry_path()}: the current operating points of "
                     "the what-if are unknown")
    else:
        from gateway.stores import open_store

        try:
            store = open_store(cfg)
        except (ConfigError, RegistryError) as exc:
            notes.append(f"registry not readable, the current operating points of the what-if "
                         f"are unknown: {exc}")

    def spec_of(name: str, version: int) -> PromptSpec | None:
        if (name, version) not in specs_read:
            try:
                specs_read[name, version] = (store.get_version(name, version).spec
                                             if store is not None else None)
            except RegistryError:
                specs_read[name, version] = None
        return specs_read[name, version]

    try:
        versions = acc.versions()
        if not versions and store is not None and specs:
            try:  # nothing logged: check the categories against the registry's newest versions
                versions = [(n, max(vs)) for n in store.list_prompts() if (vs := store.versions(n))]
            except RegistryError:
                versions = []
        known: dict[str, set[str]] = {}
        for name, version in versions:
            spec = spec_of(name, version)
            known.setdefault(name, set()).update(
                [c for c in spec.verdict.categories if c != "none"] if spec is not None
                else acc.categories(name))
        for spec_text, (cat, _) in zip(specs or [], points, strict=True):
            if known and not any(cat in cats for cats in known.values()):
                every = sorted(set().union(*known.values()))
                raise _fail(f"--what-if {spec_text!r}: {cat!r} is not a violation category of "
                            f"{', '.join(sorted(known))} ({', '.join(every)})", 2)
        return acc.results(spec_of, points, target)
    finally:
        if store is not None:
            store.close()


def _ci(value: float | None, ci: Any) -> str:
    if value is None:
        return MISSING
    return f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})" if ci else f"{value:.2f}"


def _stats_line(s: Any) -> str:
    return (f"  {s.category:<22}{s.support:>8}{s.predicted:>10}  {_ci(s.precision, s.precision_ci):<20}"
            f"{_ci(s.recall, s.recall_ci):<20}")


@feedback_app.command("quality")
def quality_cmd(since: SinceOpt = None, until: UntilOpt = None, prompt: PromptOpt = None,
                tz: TzOpt = "UTC", what_if: WhatIfOpt = None,
                target_precision: TargetOpt = 0.9, config: ConfigOpt = None,
                as_json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Live precision and recall per prompt version and arm, from reviewer labels.

    Opens with the headline: per prompt, for all locales and then each locale (en-US, zh-CN,
    ...), what callers got (stable, canary and pinned arms): decisions, review rate
    (needs_review share) and precision of the reviewed decisions, each with its change
    against the previous period of the same length (when --since is given). Then per version
    and arm, shadows included, per category and per locale.

    Every reviewer label is joined with the decision it reviews (same request id) and with the
    shadow evaluations of that request, so a shadowed candidate is scored on the same items.
    Metrics and intervals (95% Wilson) are the offline scorecard's. Recall is only meaningful
    when reviewers also see a fair sample of allowed listings; the output says how many
    decisions of each version were reviewed. A metric that cannot be computed (no
    predictions, no support) reads "undefined".

    Then the threshold what-if: each logged verdict decided again, by the function the
    gateway serves with, at other operating points of its category (block at or above
    BLOCK_AT, needs_review from REVIEW_AT up, allow below), per version, category and locale:
    block rate and review rate over the category's decisions, and over the labelled ones
    precision (of what the point blocks, the share the reviewer confirmed) and recall (of what
    the reviewer put in the category, the share the point blocks), 95% Wilson intervals. The
    points: the version's current ones (from the registry), the one `modgate eval thresholds`
    would propose from these labels (--target-precision), and each --what-if. Decisions
    without a calibrated probability are counted ("no probability") and decided as the gateway
    decides them (an allow becomes needs_review), never dropped.

    When two reviewers labelled the same requests, their agreement follows: Cohen's kappa per
    pair of reviewers on the requests both labelled (a reviewer is the API key, with the
    display name a `feedback import` sent for it). Kappa is "undefined" when both gave one and
    the same label to every common request.

    \b
    Examples:
      modgate feedback quality --since 7d
      modgate feedback quality --since 2025-03-01 --until 2025-03-08 --tz Asia/Shanghai
      modgate feedback quality --since 7d --what-if counterfeit=0.85:0.4 --what-if adult=off
      modgate feedback quality --since 24h --json | jq '.versions[] | {version, arm, reviewed}'
    """
    from gateway.quality.decisions import ReadStats, read_segments
    from gateway.quality.live_quality import (
        HeadlineAccumulator,
        LiveQualityAccumulator,
        read_feedback,
    )
    from gateway.quality.ops_report import headline_table
    from gateway.quality.reporting import local_time, tz_name
    from gateway.quality.whatif import WhatIfAccumulator

    zone_ = zone(tz)
    points = what_if_points(what_if)
    start, end = _range(since, until, zone_)
    previous = start - ((end or datetime.now(UTC)) - start) if start is not None else None
    cfg, log_dir, fb_dir = load_sources(config)
    fb = read_feedback(fb_dir, previous or start)
    acc = LiveQualityAccumulator(fb.labels)
    thresholds = WhatIfAccumulator(fb.labels)
    by_locale = LiveQualityAccumulator(fb.labels, by_locale=True)
    head, head_before = HeadlineAccumulator(fb.labels), HeadlineAccumulator(fb.labels)
    stats = ReadStats()
    read = 0
    with _progress_bar(not quiet and not as_json) as progress:
        for rec in read_segments(log_dir, previous or start, end, stats=stats, progress=progress):
            if prompt is not None and rec.prompt_name != prompt:
                continue
            if start is not None and rec.ts < start:
                head_before.add(rec)
                continue
            read += 1
            acc.add(rec)
            by_locale.add(rec)
            head.add(rec)
            thresholds.add(rec)
    notes: list[str] = []
    what_ifs = what_if_results(thresholds, cfg, what_if, points, target_precision, notes)
    results = acc.results()
    categories = [s.category for q in results for s in q.quality.categories]
    locales = by_locale.results(list(dict.fromkeys(categories)))
    headline = head.results()
    before = head_before.results() if previous is not None else None
    from gateway.quality.agreement import pair_agreement, read_reviewer_labels

    pairs = pair_agreement(read_reviewer_labels(fb_dir, start), acc.matched)
    if as_json:
        def st(s: Any) -> dict[str, Any]:
            return {"category": s.category, "support": s.support, "predicted": s.predicted,
                    "tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": s.precision,
                    "precision_ci": s.precision_ci, "recall": s.recall, "recall_ci": s.recall_ci}
        typer.echo(json.dumps({
            "since": start.isoformat() if start else None, "until": end.isoformat() if end else None,
            "tz": tz_name(zone_), "decisions": read, "labels": len(fb.labels),
            "matched": len(acc.matched), "bad_feedback_lines": fb.bad_lines,
            "headline": [h.to_dict() for h in headline],
            "previous": None if previous is None else {
                "since": previous.isoformat(), "until": start.isoformat() if start else None,
                "headline": [h.to_dict() for h in before or []]},
            "versions": [{"prompt": q.prompt, "version": q.version, "arm": q.arm,
                          "decisions": q.decisions, "reviewed": q.reviewed,
                          "micro": st(q.quality.micro), "flagged": st(q.quality.flagged),
                          "categories": [st(s) for s in q.quality.categories],
                          "locales": [{"locale": x.locale, "decisions": x.decisions,
                                       "reviewed": x.reviewed, "micro": st(x.quality.micro),
                                       "flagged": st(x.quality.flagged)}
                                      for x in locales if (x.prompt, x.version, x.arm)
                                      == (q.prompt, q.version, q.arm)]} for q in results],
            "reviewer_agreement": [{"reviewers": [x.a, x.b], "common": x.common,
                                    "agreement": x.agreement, "kappa": x.kappa}
                                   for x in pairs],
            "what_if": [w.to_dict() for w in what_ifs], "notes": notes,
        }, indent=2, ensure_ascii=False))
        return
    zn = tz_name(zone_)
    window = (f"from {local_time(start, zone_)} to "
              f"{local_time(end, zone_) if end else 'now'} ({zn})" if start else
              f"up to {local_time(end, zone_)} ({zn})" if end else "in the whole log")
    typer.echo(f"{read} decision(s) read {window}{_skipped(stats)}; {len(fb.labels)} reviewer "
               f"label(s) in {fb_dir}, {len(acc.matched)} for these decisions"
               + (f" ({fb.bad_lines} unreadable feedback line(s) skipped)" if fb.bad_lines else ""))
    if headline:
        many = len({h.prompt for h in headline}) > 1
        header, rows = headline_table(headline, before, many=many)
        typer.echo("\nheadline: what callers got (stable, canary, pinned arms), "
                   + (f"change against the previous period ({local_time(previous, zone_)} to "
                      f"{local_time(start, zone_)})" if previous is not None and start is not None
                      else "no previous period to compare with (give --since)"))
        _text_table(header, rows)
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
        mine = [x for x in locales if (x.prompt, x.version, x.arm) == (q.prompt, q.version, q.arm)]
        typer.echo(f"  {'locale':<22}{'reviewed':>18}  {'precision (95% CI)':<20}"
                   f"{'recall (95% CI)':<20}")
        for x in mine:
            m = x.quality.micro
            typer.echo(f"  {x.locale or '':<22}{f'{x.reviewed} of {x.decisions}':>18}  "
                       f"{_ci(m.precision, m.precision_ci):<20}{_ci(m.recall, m.recall_ci):<20}")
    _what_if_lines(what_ifs, notes)
    _agreement_lines(pairs)


def _what_if_lines(what_ifs: list[VersionWhatIf], notes: list[str]) -> None:
    from gateway.quality import whatif

    if not what_ifs:
        return
    typer.echo(f"\nthreshold what-if on reviewer labels (target precision lower bound "
               f"{what_ifs[0].target:g}; block at or above BLOCK_AT, review from REVIEW_AT, "
               "allow below; precision and recall of what the point blocks)")
    for w in what_ifs:
        typer.echo(f"\n{whatif.title(w)}")
        for n in whatif.notes(w):
            typer.echo(f"  note: {n}")
        _text_table(whatif.HEADER, whatif.table(w), names=3)
    for n in notes:
        typer.echo(f"note: {n}")


def _text_table(header: list[str], rows: list[list[str]], names: int | None = None) -> None:
    """A plain-text table: the first columns left-aligned (names: *names* of them, default
    those headed prompt or locale), the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    if names is None:
        names = sum(1 for h in header if h in ("prompt", "locale"))
    for row in [header, *rows]:
        typer.echo("  " + "  ".join(str(c).ljust(w) if i < names else str(c).rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


def _agreement_lines(pairs: list[PairAgreement]) -> None:
    if not pairs:
        return
    typer.echo("\nagreement between reviewers (requests both labelled)")
    typer.echo(f"  {'reviewers':<44}{'common':>8}{'agreement':>11}{'kappa':>11}")
    for x in pairs:
        kappa = MISSING if x.kappa is None else f"{x.kappa:.3f}"
        typer.echo(f"  {x.a + ' / ' + x.b:<44}{x.common:>8}{x.agreement:>11.1%}{kappa:>11}")


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
    to get the item ids there. Items the sample store kept (`samples:` in the configuration)
    get their text from it without --content; where both have an item, --content wins.

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
        ds, ds_problems = read_dataset(path)
        if ds is None:
            raise _fail(f"--exclude-dataset {path}: {ds_problems[0] if ds_problems else 'unreadable'}", 2)
        exclude |= {r.item_id for r in ds.rows}
    start, end = _range(since, until)
    cfg, log_dir, fb_dir = load_sources(config)
    fb = read_feedback(fb_dir, start)
    stats = ReadStats()
    with _progress_bar(not quiet and not as_json) as progress:
        found, n = find_disagreements(read_segments(log_dir, start, end, stats=stats,
                                                    progress=progress), fb.labels, prompt=prompt)
    from gateway.cli.samples import sample_listings  # content the sample store kept; --content wins
    listing = {**sample_listings(cfg, [d.item_id for d in found]), **listing}
    result = build_rows(found, listing, exclude=exclude)
    if result.rows:
        write_dataset(result.rows, out)
        check, out_problems = read_dataset(out)
        if check is None:  # a bug here, not the user's: say so rather than leave a broken file
            raise _fail(f"{out} does not validate: {out_problems[0]}")
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


# -- modgate feedback import ----------------------------------------------------------------------

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_COLUMNS = ("request_id", "item_id", "decision", "category", "reviewer", "note")
_PRIMARY_ARMS = ("stable", "canary", "pinned")


@dataclass
class LabelRow:
    row: int                      # spreadsheet row (the header is row 1) or JSON Lines line
    request_id: str | None
    item_id: str | None
    decision: str
    category: str | None
    reviewer: str
    note: str
    problems: list[str] = field(default_factory=list)


def _cell(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def read_label_file(path: Path) -> tuple[list[LabelRow], list[str], bytes]:
    """The rows of a review tool's export (CSV with or without a BOM, or JSON Lines), the
    problems of the file as a whole, and its bytes (their hash names the import)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [], [f"{path}: cannot read: {exc.strerror or exc}"], b""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return [], [f"{path}: not UTF-8 (save the file as UTF-8)"], raw
    suffix = path.suffix.lower()
    records: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if not header:
            return [], [f"{path}: empty file"], raw
        reader.fieldnames = header
        unknown = [h for h in header if h and h not in _COLUMNS]
        if unknown:
            problems.append(f"{path}: unknown column(s) {', '.join(unknown)} (columns: "
                            f"{', '.join(_COLUMNS)})")
        try:
            for d in reader:
                records.append((reader.line_num, dict(d)))
        except csv.Error as exc:
            problems.append(f"{path}: row {reader.line_num}: malformed CSV: {exc}")
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as exc:
                problems.append(f"row {n}: not valid JSON: {exc}")
                continue
            if not isinstance(d, dict):
                problems.append(f"row {n}: each line must be a JSON object")
                continue
            unknown = sorted(k for k in d if k not in _COLUMNS)
            if unknown:
                problems.append(f"row {n}: unknown field(s) {', '.join(unknown)}")
            records.append((n, d))
    else:
        return [], [f"{path}: use a .csv or .jsonl file (a review tool's export)"], raw
    rows = [LabelRow(row=n, request_id=_cell(d.get("request_id")), item_id=_cell(d.get("item_id")),
                     decision=(_cell(d.get("decision")) or "").lower(),
                     category=(c.lower() if (c := _cell(d.get("category"))) else None),
                     reviewer=_cell(d.get("reviewer")) or "", note=_cell(d.get("note")) or "")
            for n, d in records]
    if not rows and not problems:
        problems.append(f"{path}: no rows")
    return rows, problems, raw


def _latest_decisions(log_dir: Path, items: set[str]) -> dict[str, DecisionRecord]:
    """The newest decision the caller got (not a shadow's, not an error) for each item."""
    from gateway.quality.decisions import read_segments

    found: dict[str, DecisionRecord] = {}
    for rec in read_segments(log_dir):
        if rec.item_id in items and rec.arm in _PRIMARY_ARMS:
            old = found.get(rec.item_id)
            if old is None or rec.ts >= old.ts:
                found[rec.item_id] = rec
    return found


def _decisions_by_request(log_dir: Path, requests: set[str]) -> dict[str, DecisionRecord]:
    from gateway.quality.decisions import read_segments

    return {r.request_id: r for r in read_segments(log_dir)
            if r.request_id in requests and r.arm in _PRIMARY_ARMS}


def http_client(url: str) -> httpx.Client:
    """The client `import` posts with (tests replace it)."""
    import httpx

    return httpx.Client(base_url=url, timeout=30.0)


def _check_rows(rows: list[LabelRow], client: RegistryClient, log_dir: Path | None,
                default: tuple[str, str]) -> None:
    """Fill each row's problems: ids, item_id resolution, and the label checked as
    POST /v1/feedback checks it (against the verdict schema of the version that answered).
    A remote key that may not read the registry leaves the label check to the gateway."""
    from gateway.cli.client import KEY_REFUSED_EXIT, ClientError, prompt_version
    from gateway.feedback import check_label
    from gateway.problems import InvalidLabel

    by_item: dict[str, DecisionRecord] = {}
    by_request: dict[str, DecisionRecord] = {}
    items = {r.item_id for r in rows if r.request_id is None and r.item_id}
    if log_dir is not None:
        by_item = _latest_decisions(log_dir, items) if items else {}
        by_request = _decisions_by_request(log_dir, {r.request_id for r in rows if r.request_id})
    schemas: dict[tuple[str, int], VerdictSchema] = {}

    def schema(name: str, version: int | None) -> VerdictSchema:
        pv = prompt_version(client.version(name, version) if version else client.resolve(name, default[1]))
        key = (name, pv.version)
        if key not in schemas:
            schemas[key] = pv.spec.verdict
        return schemas[key]

    for r in rows:
        rec: DecisionRecord | None = None
        if r.request_id is not None:
            if not _ID.match(r.request_id):
                r.problems.append(f"request_id {r.request_id!r}: 1-128 characters of [A-Za-z0-9._:-]")
            rec = by_request.get(r.request_id)
        elif r.item_id is not None:
            if not _ID.match(r.item_id):
                r.problems.append(f"item_id {r.item_id!r}: 1-128 characters of [A-Za-z0-9._:-]")
            elif log_dir is None:
                r.problems.append(f"item_id {r.item_id}: resolving an item needs the decision log")
            elif (rec := by_item.get(r.item_id)) is None:
                r.problems.append(f"item_id {r.item_id}: no decision for this item in the "
                                  f"decision log ({log_dir})")
            else:
                r.request_id = rec.request_id
        else:
            r.problems.append("request_id or item_id: one is required")
        if not r.decision:
            r.problems.append("decision: required")
            continue
        if len(r.reviewer) > 128:
            r.problems.append("reviewer: at most 128 characters")
        if len(r.note) > 2000:
            r.problems.append("note: at most 2000 characters")
        try:
            if rec is not None and rec.prompt_name:
                sch = schema(rec.prompt_name, rec.prompt_version)
            else:
                sch = schema(default[0], None)
            check_label(sch, r.decision, r.category)
        except ClientError as exc:
            if exc.code != KEY_REFUSED_EXIT:
                r.problems.append(f"cannot check the label: {exc}")
            # else: the key may not read the registry; the gateway checks the label when sent
        except InvalidLabel as exc:
            r.problems.append(f"{exc.field or 'label'}: {exc}")
        except Exception as exc:  # the registry could not say which schema applies
            r.problems.append(f"cannot check the label: {exc}")


@feedback_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="a review tool's export: .csv (UTF-8, with or "
                                         "without a BOM) or .jsonl")],
    url: Annotated[str | None, typer.Option(
        "--url", envvar="MODGATE_URL", help="the gateway's base URL (default: http://<gateway.host>:"
        "<gateway.port>); given, the labels are also checked against that gateway's registry")] = None,
    key: Annotated[str | None, typer.Option(
        "--key", envvar="MODGATE_API_KEY", help="API key with the feedback scope; the labels are "
                                                "recorded under its name")] = None,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="import the valid rows of a file that has invalid ones (by "
                               "default a file with any problem imports nothing)")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="check every row and send nothing")] = False,
    key_file: KeyFileOpt = None, config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Import reviewer labels from a review tool's export (CSV or JSON Lines).

    Columns: request_id or item_id, decision, category, reviewer, note (other columns are
    refused; a header row is needed in CSV). A row with an item_id and no request_id is
    resolved to the newest decision that item got (the caller's, not a shadow's), so this
    needs read access to the decision log of the configuration (decision_log.dir under
    data_dir), as `feedback quality` does. Every row is checked as POST /v1/feedback checks
    it (ids; the decision and category against the verdict schema of the version that
    answered, or the default prompt's); problems are reported with the row number (the
    spreadsheet's, the header being row 1; the line in JSON Lines), and a file with any
    problem imports nothing unless --skip-invalid is given.

    Each label is POSTed to the gateway's /v1/feedback with the key (--key or
    MODGATE_API_KEY; the reviewer is the key, the file's reviewer column its display name)
    and an Idempotency-Key made of the file's sha256 and the row number, so running the
    same import again records nothing twice.

    \b
    Examples:
      modgate feedback import labels.csv --dry-run
      MODGATE_API_KEY=mgk_... modgate feedback import labels.csv --url http://gateway:8080
      modgate feedback import week12.jsonl --skip-invalid --key "$REVIEW_KEY"
    """
    from gateway.cli.client import open_client

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    rows, file_problems, raw = read_label_file(file)
    if not rows and file_problems:
        for p in file_problems:
            typer.echo(p, err=True)
        raise _fail(f"{file}: nothing to import", 2)
    if key_file is not None:  # the key from a file, kept out of the shell history
        from gateway.cli.client import remote_key

        key = remote_key(key_file)
    if not dry_run and not key:
        raise _fail("an API key with the feedback scope is needed: --key or MODGATE_API_KEY", 2)
    log_dir = cfg.data_path() / cfg.decision_log.dir
    with open_client(config, url, key=key) as client:
        _check_rows(rows, client, log_dir if log_dir.is_dir() else None,
                    (cfg.gateway.default_prompt, cfg.gateway.default_label))
    bad = [r for r in rows if r.problems]
    for p in file_problems:
        typer.echo(p, err=True)
    for r in bad:
        for p in r.problems:
            typer.echo(f"{file}: row {r.row}: {p}", err=True)
    summary: dict[str, Any] = {"file": str(file), "rows": len(rows), "invalid": len(bad),
                               "file_problems": file_problems, "sent": 0, "recorded": 0,
                               "duplicates": 0, "replaced": 0, "refused": 0, "dry_run": dry_run}
    if (bad or file_problems) and not skip_invalid:
        raise _fail(f"{file}: {len(bad)} invalid row(s) of {len(rows)}"
                    + (f", {len(file_problems)} file problem(s)" if file_problems else "")
                    + "; nothing imported (fix them, or pass --skip-invalid to import the rest)")
    good = [r for r in rows if not r.problems]
    if dry_run:
        _import_summary(summary, as_json, f"{len(good)} row(s) valid; --dry-run: nothing sent")
        return
    digest = hashlib.sha256(raw).hexdigest()[:32]
    host = "127.0.0.1" if cfg.gateway.host in ("0.0.0.0", "::") else cfg.gateway.host
    base = url or f"http://{host}:{cfg.gateway.port}"
    import httpx

    with http_client(base.rstrip("/")) as client:
        for r in good:
            body = {"request_id": r.request_id, "decision": r.decision, "category": r.category,
                    "reviewer": r.reviewer, "note": r.note}
            try:
                resp = client.post("/v1/feedback", json=body, headers={
                    "authorization": f"Bearer {key}", "idempotency-key": f"import-{digest}-{r.row}"})
            except httpx.HTTPError as exc:
                _import_summary(summary, as_json, "")
                raise _fail(f"cannot reach {base}: {exc}; {summary['sent']} label(s) sent "
                            "(run the same import again: sent rows are not recorded twice)") from None
            summary["sent"] += 1
            if resp.status_code == 202:
                answer = resp.json()
                summary["duplicates" if answer.get("duplicate") else "recorded"] += 1
                summary["replaced"] += bool(answer.get("replaced"))
                continue
            try:
                err = resp.json().get("error", {})
            except ValueError:
                err = {}
            message = f"{resp.status_code} {err.get('type', '')}: {err.get('message', resp.text[:200])}"
            if resp.status_code in (401, 403) or resp.status_code >= 500:
                _import_summary(summary, as_json, "")
                raise _fail(f"{file}: row {r.row}: the gateway answered {message}; stopped "
                            f"after {summary['sent'] - 1} label(s) (re-running is safe)")
            summary["refused"] += 1
            typer.echo(f"{file}: row {r.row}: the gateway refused the label: {message}", err=True)
    _import_summary(summary, as_json, f"{summary['recorded']} label(s) recorded, "
                    f"{summary['duplicates']} already there, {summary['refused']} refused"
                    + (f", {len(bad)} invalid row(s) skipped" if bad else "")
                    + f" (from {len(rows)} row(s) of {file})")
    if summary["refused"]:
        raise typer.Exit(1)


def _import_summary(summary: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif text:
        typer.echo(text)
