"""`modgate decisions ...`: the decision log from the command line.

    modgate decisions export --format parquet --out week.parquet --since 7d
    modgate decisions tail -n 50
    modgate decisions stats --since 24h

The directory comes from the configuration (`decision_log.dir`, relative to `data_dir`); all
replica sub-directories are read. Times are UTC: `--since`/`--until` take ISO 8601
(`2025-01-31`, `2025-01-31T12:00:00Z`, `2025-01-31T14:00+02:00`) or a duration before now
(`90m`, `24h`, `7d`); `--since` (or `--from`) is inclusive, `--until` (or `--to`) exclusive.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from gateway.config import ConfigError, load_config
from gateway.decision_log import DecisionLogSettings, DecisionRecord, list_segments
from gateway.quality.decisions import ExportFormat, ReadStats, export, read_segments, tail

__all__ = ["decisions_app"]

decisions_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                            context_settings={"help_option_names": ["-h", "--help"]},
                            help="Export, tail and summarise the decision log (every verdict "
                                 "the gateway produced).")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", envvar="MODGATE_CONFIG",
                                               help="configuration file (default: configs/modgate.yaml)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", "--from", help="from this time (inclusive): ISO 8601 in UTC unless an offset is given, "
                    "or a duration before now such as 90m, 24h, 7d")]
UntilOpt = Annotated[str | None, typer.Option(
    "--until", "--to", help="up to this time (exclusive); same forms as --since")]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_FORMATS = ("parquet", "csv")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"modgate: error: {message}", err=True)
    return typer.Exit(code)


def _when(value: str | None, option: str, now: datetime, tz: tzinfo = UTC) -> datetime | None:
    """*value* as an aware UTC time; a time without an offset is read in *tz* (--tz)."""
    if value is None:
        return None
    text = value.strip()
    m = _DURATION.match(text)
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"{option}: cannot read {value!r} as a time; use ISO 8601 (2025-01-31, "
                    "2025-01-31T12:00:00Z) or a duration before now (90m, 24h, 7d)", 2) from None
    return (parsed.replace(tzinfo=tz) if parsed.tzinfo is None else parsed).astimezone(UTC)


def _range(since: str | None, until: str | None,
           tz: tzinfo = UTC) -> tuple[datetime | None, datetime | None]:
    now = datetime.now(UTC)
    start, end = _when(since, "--since", now, tz), _when(until, "--until", now, tz)
    if start is not None and end is not None and start >= end:
        raise _fail(f"--since ({start:%Y-%m-%d %H:%M:%S}) must be before --until "
                    f"({end:%Y-%m-%d %H:%M:%S})", 2)
    return start, end


def _log_dir(config: Path | None) -> Path:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    settings = getattr(cfg, "decision_log", None)
    if not isinstance(settings, DecisionLogSettings):
        settings = DecisionLogSettings()
    directory = cfg.data_path() / settings.dir
    if not directory.is_dir():
        raise _fail(f"no decision log at {directory} (decision_log.dir, relative to data_dir "
                    f"{cfg.data_path()}): has a gateway with this configuration run yet?")
    return directory


def _fmt_ts(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def _skipped(stats: ReadStats) -> str:
    parts = []
    if stats.torn_lines:
        parts.append(f"{stats.torn_lines} torn line(s) skipped")
    if stats.bad_lines:
        parts.append(f"{stats.bad_lines} unreadable line(s) skipped")
    return f" ({'; '.join(parts)})" if parts else ""


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield None
        return
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="reading segments",
               file=sys.stderr, leave=False, delay=0.5)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@decisions_app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write (replaced atomically)")],
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", help="parquet (typed, for DuckDB/pandas) or csv (UTF-8 with a header, "
                               "for spreadsheets); default from --out's extension")] = None,
    since: SinceOpt = None, until: UntilOpt = None, config: ConfigOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Export decisions to Parquet (typed, for DuckDB) or CSV (for spreadsheets). Times are UTC.

    DuckDB comes as a Python module (no `duckdb` command): query the file with the
    virtualenv's python (.venv/bin/python), e.g.

    \b
      modgate decisions export --out out.parquet --since 7d
      python -c "import duckdb; duckdb.sql(\\"select arm, decision, count(*) from 'out.parquet' group by all\\").show()"
    """
    if fmt is None:
        fmt = out.suffix.lower().lstrip(".")
        if fmt not in _FORMATS:
            raise _fail(f"cannot tell the format from {out.name!r}: pass --format parquet or "
                        "--format csv", 2)
    fmt = fmt.lower()
    if fmt not in _FORMATS:
        raise _fail(f"unknown format {fmt!r}: use parquet or csv", 2)
    start, end = _range(since, until)
    if not out.parent.is_dir():
        raise _fail(f"cannot write {out}: directory {out.parent} does not exist", 2)
    directory = _log_dir(config)
    stats = ReadStats()
    try:
        with _progress_bar(not quiet) as progress:
            rows = export(directory, out, cast(ExportFormat, fmt), start, end, progress,
                              stats=stats)
    except OSError as exc:
        raise _fail(f"export failed: {exc}") from None
    typer.echo(f"exported {rows} decision(s) to {out}{_skipped(stats)}")


def _line(r: DecisionRecord) -> str:
    prompt = f"{r.prompt_name} v{r.prompt_version}" + (f" ({r.label})" if r.label else "")
    if r.error_type is not None:
        outcome = f"ERROR {r.error_type}"
    else:
        outcome = f"{r.decision}"
        if r.category:
            outcome += f" {r.category}"
        if r.confidence is not None:
            outcome += f" {r.confidence:.2f}"
        if r.fail_reason:
            outcome += f" [{r.fail_reason}]"
    arm = r.arm + (f" of {r.shadow_of}" if r.shadow_of else "")
    return (f"{_fmt_ts(r.ts)}  {prompt:<28} {arm:<8} {outcome:<32} item={r.item_id} "
            f"subject={r.subject} req={r.request_id} {r.latency_ms:.0f}ms")


@decisions_app.command("tail")
def tail_cmd(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, help="how many decisions")] = 20,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """The newest decisions, oldest first."""
    records = tail(_log_dir(config), n)
    if as_json:
        typer.echo(json.dumps({"decisions": [r.model_dump(mode="json") for r in records]},
                              indent=2, ensure_ascii=False))
        return
    if not records:
        typer.echo("no decisions logged yet")
    for r in records:
        typer.echo(_line(r))


@decisions_app.command("stats")
def stats_cmd(since: SinceOpt = None, until: UntilOpt = None, config: ConfigOpt = None,
              as_json: JsonOpt = False) -> None:
    """Counts by prompt version x arm x decision (errors as error:<type>), and fail reasons.

    `share` is the row's share of all decisions in the range (primary and shadow); `of arm` is
    its share of its own prompt version and arm (so an arm that answers one decision reads
    100% there).
    """
    start, end = _range(since, until)
    directory = _log_dir(config)
    stats = ReadStats()
    groups: Counter[tuple[str | None, int | None, str, str | None, str | None]] = Counter()
    arms: Counter[tuple[str | None, int | None, str]] = Counter()
    fail_reasons: Counter[str] = Counter()
    first = last = None
    for r in read_segments(directory, start, end, stats=stats):
        groups[(r.prompt_name, r.prompt_version, r.arm, r.decision, r.error_type)] += 1
        arms[(r.prompt_name, r.prompt_version, r.arm)] += 1
        if r.fail_reason:
            fail_reasons[r.fail_reason] += 1
        first = r.ts if first is None or r.ts < first else first
        last = r.ts if last is None or r.ts > last else last
    total = sum(groups.values())
    rows = [{"prompt_name": k[0], "prompt_version": k[1], "arm": k[2], "decision": k[3],
             "error_type": k[4], "count": c, "share": c / total,
             "arm_share": c / arms[k[:3]]}
            for k, c in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                               -kv[1], str(kv[0][3])))]
    data: dict[str, Any] = {
        "directory": str(directory), "since": start.isoformat() if start else None,
        "until": end.isoformat() if end else None, "records": stats.records,
        "first": first.isoformat() if first else None, "last": last.isoformat() if last else None,
        "groups": rows, "fail_reasons": dict(fail_reasons.most_common()),
        "torn_lines": stats.torn_lines, "bad_lines": stats.bad_lines,
        "replicas": len(list_segments(directory)),
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if not stats.records:
        typer.echo(f"no decisions in range{_skipped(stats)}")
        return
    assert first is not None and last is not None
    typer.echo(f"{stats.records} decision(s) from {_fmt_ts(first)} to {_fmt_ts(last)}"
               f"{_skipped(stats)}\n")
    typer.echo(f"{'prompt':<28} {'version':>7}  {'arm':<7} {'outcome':<28} {'count':>9} {'share':>7}"
               f" {'of arm':>7}")
    for row in rows:
        outcome = row["decision"] if row["error_type"] is None else f"error:{row['error_type']}"
        typer.echo(f"{row['prompt_name']:<28} {'v' + str(row['prompt_version']):>7}  "
                   f"{row['arm']:<7} {outcome:<28} {row['count']:>9} {row['share']:>7.1%}"
                   f" {row['arm_share']:>7.1%}")
    if fail_reasons:
        typer.echo("\nfail_reason")
        for reason, count in fail_reasons.most_common():
            typer.echo(f"  {reason:<28} {count:>9}")
