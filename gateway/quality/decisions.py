"""Reading and exporting the decision log (`gateway.decision_log` writes it): merged reads over
every replica's segments, the last N records, and typed Parquet / spreadsheet CSV exports.
Offline only: the server never reads its own log.

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

import contextlib
import heapq
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

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

__all__ = ["ExportFormat", "ReadStats", "arrow_schema", "export", "read_segments", "tail"]

log = logging.getLogger("modgate.decisions")

ExportFormat = Literal["parquet", "csv"]




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


_STRING_FIELDS = ("request_id", "item_id", "subject", "prompt_name", "label", "arm", "shadow_of",
                  "decision", "category", "fail_reason", "error_type", "model", "locale",
                  "trace_id", "kind", "front_door", "caller", "escalation", "escalation_error",
                  "first_model", "first_decision", "first_category", "first_fail_reason")


def arrow_schema() -> Any:
    """The Parquet schema of an export (column order = `DecisionRecord` field order)."""
    import pyarrow as pa

    types: dict[str, Any] = {name: pa.string() for name in _STRING_FIELDS}
    types.update(ts=pa.timestamp("us", tz="UTC"), prompt_version=pa.int64(),
                 confidence=pa.float64(), latency_ms=pa.float64(), prompt_tokens=pa.int64(),
                 completion_tokens=pa.int64(), reasoning_tokens=pa.int64(),
                 first_confidence=pa.float64(), first_prompt_tokens=pa.int64(),
                 first_completion_tokens=pa.int64(), cached_prompt_tokens=pa.int64())
    return pa.schema([pa.field(name, types[name], nullable=name != "ts") for name in FIELDS])


def _batch(rows: list[dict[str, Any]], schema: Any, fmt: ExportFormat) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    batch = pa.RecordBatch.from_struct_array(pa.array(rows, type=pa.struct(list(schema))))
    if fmt == "csv":
        # Spreadsheets recognise "2025-01-31 12:00:00.123" as a date-time; times are UTC.
        ts = pc.strftime(batch.column(0).cast(pa.timestamp("ms", tz="UTC"), safe=False),
                         format="%Y-%m-%d %H:%M:%S")
        batch = batch.set_column(0, pa.field("ts", pa.string(), nullable=False), ts)
    return batch


def export(
    directory: Path | str,
    out_path: Path | str,
    fmt: ExportFormat,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch_rows: int = 50_000,
    stats: ReadStats | None = None,
) -> int:
    """Export records with `since <= ts < until` to Parquet or CSV; returns the row count.

    Parquet is typed (`ts` timestamp[us, UTC], int64, float64, string; one row group per
    batch of `batch_rows`). CSV is UTF-8 with a header row, `ts` as `YYYY-MM-DD HH:MM:SS.mmm`
    in UTC, empty cells for nulls. Records are streamed in batches, so memory does not grow
    with the size of the log. The file appears atomically (written beside, then renamed).
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown export format {fmt!r}; use parquet or csv")
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow ships with the cpu/gpu extras
        raise RuntimeError("exporting needs pyarrow: pip install pyarrow") from None
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out_path = Path(out_path)
    schema = arrow_schema()
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    rows = 0
    writer: Any
    if fmt == "parquet":
        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
    else:
        csv_schema = schema.set(0, pa.field("ts", pa.string(), nullable=False))
        writer = pacsv.CSVWriter(tmp, csv_schema, write_options=pacsv.WriteOptions(
            include_header=True, quoting_style="needed"))
    try:
        # Only the field dicts of one batch are alive at a time.
        buf: list[dict[str, Any]] = []
        for rec in read_segments(directory, since, until, stats=stats, progress=progress, kinds=None):
            buf.append(rec.__dict__)
            if len(buf) >= batch_rows:
                writer.write_batch(_batch(buf, schema, fmt))
                rows += len(buf)
                buf = []
        if buf or rows == 0:
            writer.write_batch(_batch(buf, schema, fmt))
            rows += len(buf)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(Exception):  # already failing; the original error matters
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows
