"""Reading and exporting the decision log (`gateway.decision_log` writes it): merged reads over
every replica's segments, the last N records, and typed Parquet / spreadsheet CSV exports.
Offline only (pyarrow).

The reading itself (`read_segments`, `tail`, `ReadStats`, and how a segment's end marker is
judged) lives in the core module `gateway.decision_reader`, shared with the console's
Decisions page; it is re-exported here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from gateway.decision_log import FIELDS
from gateway.decision_reader import ReadStats, read_segments, tail

__all__ = ["ExportFormat", "ReadStats", "arrow_schema", "export", "read_segments", "tail"]

ExportFormat = Literal["parquet", "csv"]


_STRING_FIELDS = ("request_id", "item_id", "subject", "prompt_name", "label", "arm", "shadow_of",
                  "decision", "category", "fail_reason", "error_type", "model", "locale",
                  "trace_id", "kind", "front_door", "caller", "escalation", "escalation_error",
                  "first_model", "first_decision", "first_category", "first_fail_reason",
                  "decided_by", "model_decision")


def arrow_schema() -> Any:
    """The Parquet schema of an export (column order = `DecisionRecord` field order)."""
    import pyarrow as pa

    types: dict[str, Any] = {name: pa.string() for name in _STRING_FIELDS}
    types.update(ts=pa.timestamp("us", tz="UTC"), prompt_version=pa.int64(),
                 confidence=pa.float64(), latency_ms=pa.float64(), prompt_tokens=pa.int64(),
                 completion_tokens=pa.int64(), reasoning_tokens=pa.int64(),
                 first_confidence=pa.float64(), first_prompt_tokens=pa.int64(),
                 first_completion_tokens=pa.int64(), cached_prompt_tokens=pa.int64(),
                 decision_probability=pa.float64(), category_probability=pa.float64(),
                 block_probability=pa.float64(), probability_unresolved=pa.float64(),
                 block_probability_low=pa.float64(), decision_unresolved=pa.float64(),
                 first_decision_margin=pa.float64())
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
