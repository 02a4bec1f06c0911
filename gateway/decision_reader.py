"""Reading the decision log (`gateway.decision_log` writes it): merged reads over every
replica's segments and the last N records. Shared by the offline tools
(`gateway.quality.decisions`: exports, reports, feedback joins) and the console's Decisions page,
which reads the gateway's own log; so it lives in the core, beside the writer, and needs
nothing beyond the standard library and pydantic.

How a segment ended. Every line of a segment is a `DecisionRecord`; nothing else is ever
written into one. When the writer closes a segment it puts an end marker beside it, the sidecar
`<segment>.end` (`gateway.decision_log.SegmentEnd`: records, bytes, closed_at, reason
`rotated` or `shutdown`), so readers that validate every line as a record (this module's
older versions, `duckdb read_json('*/*.jsonl')`) see the same lines and count no new bad ones.
`read_segments` checks the markers of the segments it reads:

* a segment without a valid marker (none, unreadable, or `bytes` differs from the segment's
  size) is listed in `ReadStats.unclean_ends`: its writer stopped without closing it (the
  replica was killed or crashed, a write error cut the segment, or it is the segment a running
  replica is writing now). Records acknowledged by a durable-mode gateway are all in it; a
  buffered-mode gateway may have lost its last few milliseconds of records there;
* `ReadStats.ended_cleanly[replica]` says whether the replica's newest segment has a
  `shutdown` marker, i.e. the replica's log ends with a clean stop. A running replica reads as
  False (its newest segment is still open), as do logs written before markers existed.

A crash can tear at most the last line of the segment being written (a writer never appends to
an old segment): that line, without its newline, is skipped and counted in `torn_lines`.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from gateway.decision_log import (
    _MIB,
    _PRUNE_SLACK,
    FIELDS,
    DecisionRecord,
    Segment,
    list_segments,
    read_segment_end,
)

__all__ = ["CSV_BOM", "DecisionFilter", "ReadStats", "csv_lines", "decision_counts", "read_segments", "tail"]

log = logging.getLogger("modgate.decisions")


@dataclass
class ReadStats:
    """What a read saw besides records."""

    segments: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    records: int = 0
    torn_lines: int = 0
    bad_lines: int = 0
    torn_segments: list[str] = field(default_factory=list)
    # Segments (paths) the writer never closed: no valid end marker (see the module docstring).
    unclean_ends: list[str] = field(default_factory=list)
    # Replica directory name -> its newest segment carries a `shutdown` end marker.
    ended_cleanly: dict[str, bool] = field(default_factory=dict)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _selected(segs: list[Segment], since: datetime | None) -> list[Segment]:
    """Drop segments that cannot hold records at or after `since`: a record is written after
    it is made, so every record of a segment is older than the start of the next one."""
    if since is None:
        return segs
    keep = []
    for i, seg in enumerate(segs):
        nxt = segs[i + 1] if i + 1 < len(segs) else None
        if nxt is not None and nxt.start + timedelta(seconds=1) + _PRUNE_SLACK < since:
            continue
        keep.append(seg)
    return keep


def _check_ends(segs: list[Segment], stats: ReadStats) -> None:
    """Record which of one replica's segments (in write order) ended without a marker."""
    last_clean = False
    for seg in segs:
        end = read_segment_end(seg.path)
        clean = end is not None and end.bytes == seg.size
        if not clean:
            stats.unclean_ends.append(str(seg.path))
        last_clean = clean and end is not None and end.reason == "shutdown"
    if segs:
        stats.ended_cleanly[segs[-1].path.parent.name] = last_clean


def _read_segment(seg: Segment, stats: ReadStats, on_bytes: Callable[[int], None]) -> Iterator[DecisionRecord]:
    try:
        fh = open(seg.path, "rb")  # noqa: SIM115 - closed in finally, generator-scoped
    except FileNotFoundError:  # deleted by retention while we were reading
        return
    try:
        pending = 0
        for line in fh:
            pending += len(line)
            if pending >= _MIB:
                on_bytes(pending)
                pending = 0
            if not line.endswith(b"\n"):
                # The last line without its newline: a write in progress or torn by a crash.
                try:
                    rec = DecisionRecord.model_validate_json(line)
                except ValidationError:
                    stats.torn_lines += 1
                    stats.torn_segments.append(str(seg.path))
                    continue
                yield rec
                continue
            if not line.strip():
                continue
            try:
                yield DecisionRecord.model_validate_json(line)
            except ValidationError as exc:
                stats.bad_lines += 1
                if stats.bad_lines <= 10:
                    log.warning("decision log: skipping an unreadable line in %s: %s", seg.path,
                                exc.errors()[0]["msg"] if exc.errors() else exc)
        on_bytes(pending)
    finally:
        fh.close()


def read_segments(
    directory: Path | str,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    stats: ReadStats | None = None,
    progress: Callable[[int, int], None] | None = None,
    kinds: tuple[str, ...] | None = ("moderation",),
) -> Iterator[DecisionRecord]:
    """Every record with `since <= ts < until` (naive datetimes are UTC), oldest first.

    By default only moderations (verdicts of a registry prompt): raw chat completions are
    logged as `kind: raw_chat` with no prompt and no verdict, and every quality reader would
    otherwise have to skip them. `kinds=None` reads everything (the export does).

    `directory` is the log root (one sub-directory per replica) or one replica directory.
    Each replica's segments are read in write order and the replicas are merged by `ts`. A
    line torn by a crash (the last one of a segment, without its newline) is skipped and
    counted in `stats.torn_lines`; an unreadable complete line in `stats.bad_lines`. End
    markers are checked before the first record: segments read that the writer never closed
    are in `stats.unclean_ends`, and `stats.ended_cleanly` says per replica whether its newest
    segment was closed by a clean shutdown (module docstring).
    `progress(bytes_read, bytes_total)` is called as segments are read.
    """
    since, until = _as_utc(since), _as_utc(until)
    stats = stats if stats is not None else ReadStats()
    groups = [_selected(segs, since) for segs in list_segments(directory).values()]
    stats.segments = sum(len(g) for g in groups)
    stats.bytes_total = sum(s.size for g in groups for s in g)
    for g in groups:
        _check_ends(g, stats)

    def on_bytes(n: int) -> None:
        stats.bytes_read += n
        if progress is not None and n:
            progress(min(stats.bytes_read, stats.bytes_total), stats.bytes_total)

    def stream(segs: list[Segment]) -> Iterator[DecisionRecord]:
        for seg in segs:
            for rec in _read_segment(seg, stats, on_bytes):
                if ((since is None or rec.ts >= since) and (until is None or rec.ts < until)
                        and (kinds is None or rec.kind in kinds)):
                    yield rec

    streams = [stream(g) for g in groups]
    merged: Iterable[DecisionRecord] = streams[0] if len(streams) == 1 else heapq.merge(
        *streams, key=lambda r: r.ts)
    for rec in merged:
        stats.records += 1
        yield rec
    if progress is not None:
        progress(stats.bytes_total, stats.bytes_total)


def _reverse_lines(path: Path, block: int = 64 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            parts = (fh.read(step) + rest).split(b"\n")
            rest = parts[0]
            yield from reversed(parts[1:])
        if rest:
            yield rest


def tail(directory: Path | str, n: int = 20) -> list[DecisionRecord]:
    """The newest `n` records (oldest first), reading segments from their ends."""
    if n <= 0:
        return []
    per_replica: list[list[DecisionRecord]] = []
    for segs in list_segments(directory).values():
        found: list[DecisionRecord] = []
        got = 0
        for seg in reversed(segs):
            try:
                for line in _reverse_lines(seg.path):
                    if not line.strip():
                        continue
                    try:
                        found.append(DecisionRecord.model_validate_json(line))
                    except ValidationError:
                        continue  # torn last line
                    got += 1
                    if got >= n:
                        break
            except FileNotFoundError:
                continue
            if got >= n:
                break
        found.reverse()  # write order
        per_replica.append(found)
    return list(heapq.merge(*per_replica, key=lambda r: r.ts))[-n:]


# -- the console's view: filtered counts and the spreadsheet CSV ----------------------------------

CSV_BOM = "\ufeff"  # spreadsheet programs read UTF-8 (Chinese categories, caller names) only with it


@dataclass(frozen=True)
class DecisionFilter:
    """Which records a query keeps (None: any). `since <= ts < until`, both UTC."""

    since: datetime
    until: datetime
    prompt: str | None = None
    version: int | None = None
    arm: str | None = None
    category: str | None = None
    locale: str | None = None

    def matches(self, rec: DecisionRecord) -> bool:
        return ((self.prompt is None or rec.prompt_name == self.prompt)
                and (self.version is None or rec.prompt_version == self.version)
                and (self.arm is None or rec.arm == self.arm)
                and (self.category is None or rec.category == self.category)
                and (self.locale is None or rec.locale == self.locale))

    def read(self, directory: Path | str, stats: ReadStats | None = None) -> Iterator[DecisionRecord]:
        """The moderation records that match, oldest first."""
        for rec in read_segments(directory, self.since, self.until, stats=stats):
            if self.matches(rec):
                yield rec


@dataclass
class _Tally:
    n: int = 0
    verdicts: int = 0
    flagged: int = 0
    errors: int = 0

    def add(self, rec: DecisionRecord) -> None:
        self.n += 1
        if rec.decision is None:
            self.errors += 1
            return
        self.verdicts += 1
        if rec.decision != "allow":
            self.flagged += 1

    def as_dict(self) -> dict[str, object]:
        return {"n": self.n, "verdicts": self.verdicts, "flagged": self.flagged,
                "errors": self.errors,
                "flag_rate": self.flagged / self.verdicts if self.verdicts else None}


def decision_counts(records: Iterable[DecisionRecord], *, latest: int = 50,
                    served_only: bool = True) -> dict[str, object]:
    """Counts and flag rates (flagged: a verdict other than `allow`, of all verdicts; records
    without a verdict count as errors) in all, per decision, per category, and per prompt
    version x arm x locale; plus the newest *latest* records (ids and verdicts only: the log
    holds no listing content). With *served_only* the totals, the per-decision and
    per-category counts and the newest records leave out shadow evaluations (no caller got
    them; `shadows` counts them), which still have their own rows per version and arm."""
    total = _Tally()
    shadows = 0
    decisions: dict[str, int] = {}
    categories: dict[str, int] = {}
    groups: dict[tuple[str, int, str, str], _Tally] = {}
    newest: list[DecisionRecord] = []
    for rec in records:
        key = (rec.prompt_name or "", rec.prompt_version or 0, rec.arm, rec.locale or "")
        groups.setdefault(key, _Tally()).add(rec)
        if served_only and rec.arm == "shadow":
            shadows += 1
            continue
        total.add(rec)
        if rec.decision is not None:
            decisions[rec.decision] = decisions.get(rec.decision, 0) + 1
            if rec.decision != "allow":
                cat = rec.category or "none"
                categories[cat] = categories.get(cat, 0) + 1
        newest.append(rec)
        if len(newest) > 2 * latest:
            del newest[:-latest]
    return {
        "total": total.as_dict(),
        "shadows": shadows,
        "decisions": dict(sorted(decisions.items())),
        "categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "groups": [{"prompt": p, "version": v, "arm": a, "locale": loc, **t.as_dict()}
                   for (p, v, a, loc), t in sorted(groups.items())],
        "latest": [{"ts": r.ts.isoformat(), "request_id": r.request_id, "item_id": r.item_id,
                    "prompt": r.prompt_name, "version": r.prompt_version, "arm": r.arm,
                    "decision": r.decision, "category": r.category, "error_type": r.error_type,
                    "locale": r.locale, "latency_ms": r.latency_ms}
                   for r in reversed(newest[-latest:])],
    }


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, datetime):
        # as `modgate decisions export --format csv` writes it: UTC, milliseconds
        ts = value.astimezone(UTC)
        return f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond // 1000:03d}"
    return value


def csv_lines(records: Iterable[DecisionRecord]) -> Iterator[str]:
    """The records as spreadsheet CSV, a line at a time: a byte-order mark, a header of every
    `DecisionRecord` field in order, then one row per record (the columns and the `ts` format
    of `modgate decisions export --format csv`; empty cells for nulls)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    yield CSV_BOM + buf.getvalue()
    for rec in records:
        buf.seek(0)
        buf.truncate()
        writer.writerow([_csv_cell(getattr(rec, name)) for name in FIELDS])
        yield buf.getvalue()
