"""The durable decision log: every verdict the gateway produces, kept as JSON lines on disk.

Who reads it: prompt-operations specialists comparing prompt versions and arms in SQL (DuckDB)
or a spreadsheet (`modgate decisions export`), and operators who must be able to show what was
decided, by which prompt version, for which item. One line per decision (or per backend
failure, `error_type` set and no verdict); listing content (titles, descriptions) is never
stored, only ids, the prompt version, the verdict and its cost.

Why local segment files and not a database or a queue:

* zero set-up: a directory under `data_dir`, nothing to run or to keep reachable. The request
  path never waits on it, so a slow or full disk cannot slow moderation down;
* append-only JSON lines: a crash can at most tear the last line of the segment being written,
  and readers skip such a line (`read_segments` counts it). Nothing is ever rewritten;
* readable by anything: `jq`, `grep`, `duckdb -c "select * from read_json('decisions/*/*.jsonl')"`,
  or `modgate decisions export --format parquet|csv` for typed Parquet and spreadsheet CSV.
  Shipping them elsewhere (Vector, Fluent Bit, a nightly `aws s3 sync`) needs no gateway change.

Layout: `<decision_log.dir>/<replica>/decisions-<UTC yyyymmddTHHMMSS>-<seq>.jsonl`, where
`<replica>` is the host name (the pod name in Kubernetes), `<host>-w<i>` for worker `i` of a
gateway with `gateway.workers` above 1 (`gateway.workers`). One directory per gateway replica,
so several replicas can share one volume (a ReadWriteMany PVC) without ever writing the same
file; with a ReadWriteOnce PVC per replica (a StatefulSet) the layout is the same. In
Kubernetes mount a PersistentVolumeClaim at the data directory: on an `emptyDir` the log dies
with the pod. Readers (`read_segments`, the CLI) read every replica directory and merge by time.

Write path: `DecisionLog.append` is synchronous and O(1): it puts the record into a bounded
in-memory queue, and when the queue is full it drops the record and counts it (`dropped`),
because moderation must never wait for the log. A background task takes batches off the queue
and writes them in a worker thread (`asyncio.to_thread`), one `write` per batch, then `fsync`
(`fsync: true`, the default): a flush that returned is on disk and survives a crash of the
process or the machine. After the first record of a batch arrives the task lingers `linger_ms`
(default 5 ms) to let the batch fill (group commit): under load that is one write, one fsync
and one thread hand-off per few milliseconds instead of one per request (in a gateway profile
at ~1,500 requests/s the writer thread had ~7 % of the samples, mostly in fsync).
The same thread rotates segments when one would exceed `segment_max_bytes` or is older than
`segment_max_age_s`, and applies retention: closed segments that started more than `retention_days` (plus one segment age) ago are deleted, in
this replica's directory and in sibling replica directories (replicas that are gone), and the
oldest closed segments of this replica beyond `retention_max_bytes` in total.

Durability (`durability:`): in `buffered` mode (the default, above) an answer leaves before
its record is on disk, so a `kill -9` loses what was still queued (at most about `linger_ms` of
answers plus one write). In `durable` mode the request path awaits
`DecisionLog.append_durable(record)`, which returns only once the batch holding the record has
been written and fsynced (group commit still applies: every request waiting on one batch shares
its one write and fsync, and pays up to `linger_ms` plus that write). It raises
`DecisionLogUnavailable` instead of returning when the record is not on disk within
`durable_timeout_s` (a full queue is waited on, not dropped; a slow disk), when the write of its
batch fails, or when the log is closed. An acknowledged record is never lost to a crash of the
process (nor of the machine with `fsync: true`); the converse does not hold: a record whose
caller got the error may still reach the log later (its batch is retried, or its write finished
after the timeout), so the log can hold a decision whose request was answered with an error.

End markers: when the writer closes a segment (rotation, `rotate()`, `aclose()`) it writes a
sidecar `<segment>.end` (`END_SUFFIX`) next to it: one JSON object, `SegmentEnd`, `{"kind":
"segment_end", "segment", "replica", "records", "bytes", "closed_at", "reason": "rotated" |
"shutdown"}`, written to a temporary name, fsynced, renamed, directory fsynced. A segment
without a valid marker (missing, unreadable, or whose `bytes` is not the segment's size) is one
the writer never closed: the replica crashed (`kill -9`, OOM, power loss), a write error cut it,
or it is the segment a running replica is writing now. A sidecar, not a last line, so that
nothing that reads `decisions-*.jsonl` (older modgate readers that validate every line as a
`DecisionRecord`, `duckdb read_json`, `jq`, the soak's record count) sees anything new:
`gateway.decision_reader.read_segments` reports the ends in `ReadStats.unclean_ends` and
`ReadStats.ended_cleanly`. Retention deletes a segment's marker with it.

Failures: a write error (disk full, permissions, a vanished directory) is counted
(`write_errors`) and logged, and never reaches the request path in buffered mode (in durable
mode the requests waiting on the failed batch get `DecisionLogUnavailable`). The batch being written stays
in memory and is retried with backoff; what was written of it but not yet synced is truncated
away first, so a retry does not duplicate lines. Meanwhile new records queue up to `queue_max`,
then are dropped and counted. If even the truncation fails, a retried batch may be written
twice: the log is at-least-once, and `(request_id, arm)` identifies a decision.
`aclose()` drains the queue and flushes (retrying for `close_timeout_s`) before shutdown.

Segment names use the injected clock (`clock`), like rotation by age and retention, so tests
control time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["END_SUFFIX", "FIELDS", "DecisionLog", "DecisionLogSettings", "DecisionLogUnavailable",
           "DecisionRecord", "LogRow", "Segment", "SegmentEnd", "encode_record", "list_segments",
           "read_segment_end"]

log = logging.getLogger("modgate.decision_log")

Arm = Literal["stable", "canary", "shadow", "pinned", "raw"]
Kind = Literal["moderation", "raw_chat"]
FrontDoor = Literal["moderate", "moderations", "chat", "decisions"]
ExportFormat = Literal["parquet", "csv"]
Clock = Callable[[], datetime]
Durability = Literal["buffered", "durable"]
EndReason = Literal["rotated", "shutdown"]

_SEGMENT = re.compile(r"^decisions-(\d{8}T\d{6})-(\d+)\.jsonl$")
_SEGMENT_GLOB = "decisions-*.jsonl"
END_SUFFIX = ".end"  # a closed segment's marker: <segment>.jsonl.end (never matches the glob)
_END_GLOB = "decisions-*.jsonl" + END_SUFFIX
# Records can be appended (and so written) a little after a segment opens; when pruning by time
# allow this much clock disagreement between the caller's `ts` and the writer's clock.
_PRUNE_SLACK = timedelta(minutes=5)
_MIB = 1024 * 1024


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DecisionLogUnavailable(Exception):
    """Durable mode: the record is not on disk, so the answer must not leave. Raised by
    `DecisionLog.append_durable` when the write (or fsync) of the record's batch failed (the
    `OSError` is the `__cause__`), when it was not on disk within `durable_timeout_s` (waiting
    for room in a full queue included), or when the log is closed. Retryable: a later request
    may find the disk writable again."""


class DecisionRecord(BaseModel):
    """One decision (or one failed attempt at one) as stored and exported.

    Exactly one of `decision` and `error_type` is set: `error_type` (e.g. `model_unavailable`,
    `model_timeout`) means the backend failed and no verdict exists. `shadow_of` (the request id
    of the primary decision) is set exactly when `arm` is `shadow`. Unknown fields are rejected,
    so listing content cannot end up in the log by accident.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    ts: datetime = Field(..., description="when the decision was made (UTC)")
    kind: Kind = Field("moderation", description="moderation (a registry prompt's verdict) or "
                       "raw_chat (a chat completion with the caller's own messages: no prompt, "
                       "no verdict, no content kept)")
    request_id: str
    item_id: str
    subject: str = Field(..., description="seller id or other traffic-stickiness key")
    prompt_name: str | None
    prompt_version: int | None
    label: str | None = None
    arm: Arm
    shadow_of: str | None = None
    decision: str | None = None
    category: str | None = None
    confidence: float | None = Field(None, description="the confidence the model wrote in its answer "
                                     "(not a probability)")
    fail_reason: str | None = None
    error_type: str | None = None
    model: str
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = Field(None, description="of prompt_tokens, those the model "
                                             "server answered from its prefix cache (null when it "
                                             "does not say); the ops report prices them apart")
    locale: str | None = None
    trace_id: str | None = None
    front_door: FrontDoor | None = Field(None, description="the API that was called: moderate "
                                         "(/v1/moderate), moderations (/v1/moderations), chat "
                                         "(/v1/chat/completions), decisions (/v1/decisions); null "
                                         "for shadows and old records")
    caller: str | None = Field(None, description="name of the API key that called")
    reasoning_tokens: int | None = Field(None, description="tokens a reasoning model spent "
                                         "before its verdict (its rationale is never stored here)")
    escalation: str | None = Field(None, description="cascade: why the first model's verdict "
                                   "went to the version's second model (needs_review, "
                                   "low_margin, margin_unavailable: low_margin asked for but the "
                                   "verdict had no calibrated probability, low_confidence); null "
                                   "when it stood. decision, model and the token counts are then "
                                   "the second model's")
    escalation_error: str | None = Field(None, description="cascade: the second call failed "
                                         "(its error type); the answer was needs_review")
    first_model: str | None = Field(None, description="cascade: the first model (set with escalation)")
    first_decision: str | None = None
    first_category: str | None = None
    first_confidence: float | None = None
    first_fail_reason: str | None = None
    first_prompt_tokens: int | None = None
    first_completion_tokens: int | None = None
    # Calibrated probabilities and who decided (issue 19); appended so export columns keep their order.
    decision_probability: float | None = Field(
        None, description="calibrated probability of the decision the model generated (token "
        "log-probabilities renormalised over the allowed decisions); null without log-probabilities")
    category_probability: float | None = Field(None, description="calibrated probability of the "
                                               "category, given the decision")
    block_probability: float | None = Field(None, description="calibrated probability of 'block': "
                                            "what a version's operating points are applied to")
    probability_unresolved: float | None = Field(
        None, description="probability mass the engine's top alternatives left unattributed "
        "(0: the probabilities are exact; otherwise each lies within this of its lower bound)")
    decided_by: Literal["model", "threshold", "fail_closed"] | None = Field(
        None, description="model (its decision stands), threshold (the version's operating point "
        "decided from the block probability), fail_closed (no usable answer or probability)")
    model_decision: str | None = Field(None, description="the decision the model generated, when "
                                       "decided_by is not model")
    block_probability_low: float | None = Field(
        None, description="the mass attributed to 'block' (lower bound of block_probability); with "
        "decision_unresolved exactly what an operating point reads, so a threshold what-if "
        "re-decides the logged verdict as the gateway would")
    decision_unresolved: float | None = Field(None, description="the unattributed probability "
                                              "mass of the decision alone")
    first_decision_margin: float | None = Field(
        None, description="cascade: the first verdict's calibrated decision margin (probability "
        "of its decision minus the next most likely one; what low_margin compares with "
        "min_margin); null when it had no calibrated probability")

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        offset = value.utcoffset()
        if offset is None:
            raise ValueError("ts must be timezone-aware (UTC)")
        return value.astimezone(UTC) if offset else value

    @model_validator(mode="after")
    def _consistent(self) -> DecisionRecord:
        if self.kind == "raw_chat":
            if self.decision is not None or self.arm != "raw":
                raise ValueError("a raw_chat record has arm 'raw' and no decision")
            return self
        if self.prompt_name is None or self.prompt_version is None:
            raise ValueError("a moderation record names its prompt_name and prompt_version")
        if self.arm == "raw":
            raise ValueError("arm 'raw' is only for raw_chat records")
        if (self.decision is None) == (self.error_type is None):
            raise ValueError("exactly one of decision and error_type must be set")
        if (self.shadow_of is not None) != (self.arm == "shadow"):
            raise ValueError("shadow_of is set exactly when arm is 'shadow'")
        if (self.escalation is None) != (self.first_model is None):
            raise ValueError("first_model is set exactly when escalation is")
        if self.escalation_error is not None and self.escalation is None:
            raise ValueError("escalation_error needs escalation")
        return self


FIELDS: tuple[str, ...] = tuple(DecisionRecord.model_fields)

# A record as the request path hands it to the log: `DecisionRecord`'s fields in declaration
# order, every one present, with the values validation would leave (what `record.__dict__`
# holds). Built only by `gateway.recording.decision_row`, from parts that are already checked,
# so that a moderation does not pay for validating its record (tests/unit/test_recording.py
# holds its line equal to the validated record's).
LogRow = dict[str, Any]


def encode_record(record: DecisionRecord | LogRow) -> bytes:
    """One log line: the record as a JSON object and a newline. From the validated model's
    `__dict__`, which holds exactly its fields in declaration order (`extra="forbid"`), each a
    str, number, bool, None or datetime, or from a `LogRow`, which is the same dict built
    without the model: orjson gives the bytes `model_dump()` would, without first copying every
    field into a new dict (a quarter of the encoding's CPU, in the writer thread, per record).
    `tests/unit/test_decision_log.py` holds the two equal and the field types to that list."""
    return orjson.dumps(record if type(record) is dict else record.__dict__,
                        option=orjson.OPT_APPEND_NEWLINE)


class DecisionLogSettings(BaseModel):
    """`decision_log:` in the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    dir: str = Field("decisions", description="directory of the log, relative to data_dir; "
                     "each replica writes to a sub-directory named after its host name")
    queue_max: int = Field(100_000, ge=1, description="records waiting to be written; beyond "
                           "this new records are dropped and counted (the request never waits)")
    segment_max_bytes: int = Field(64 * _MIB, ge=4096, description="rotate before a segment "
                                   "file would exceed this size")
    segment_max_age_s: float = Field(3600.0, gt=0, description="rotate segments this old")
    retention_days: float | None = Field(30.0, gt=0, description="delete closed segments older "
                                         "than this; null keeps them")
    retention_max_bytes: int | None = Field(None, ge=0, description="delete the oldest closed "
                                            "segments of a replica beyond this total")
    fsync: bool = Field(True, description="fsync every batch: a flushed record survives a crash")
    linger_ms: float = Field(5.0, ge=0, le=1000, description="how long the writer waits after "
                             "the first record of a batch for more to join it (one write and fsync "
                             "per batch); 0 writes at once")
    durability: Durability = Field("buffered", description="buffered: answers leave before their "
                                   "record is written (a crash loses the last few ms of records); "
                                   "durable: the request waits until its record is written and "
                                   "fsynced (append_durable) and fails if it cannot be")
    durable_timeout_s: float = Field(5.0, gt=0, le=300, description="durable mode: how long a "
                                     "request waits for its record to be on disk (room in a full "
                                     "queue included) before it fails with DecisionLogUnavailable")


# ---------------------------------------------------------------------------------------------
# Segment files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    start: datetime
    seq: int
    size: int


class SegmentEnd(BaseModel):
    """The end marker of a segment the writer closed (the sidecar `<segment>.end`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["segment_end"] = "segment_end"
    segment: str = Field(..., description="the segment's file name")
    replica: str
    records: int = Field(..., ge=0, description="lines in the segment")
    bytes: int = Field(..., ge=0, description="the segment's size when it was closed")
    closed_at: datetime
    reason: EndReason = Field(..., description="rotated (by size, age or rotate()) or shutdown "
                              "(aclose: the replica stopped cleanly)")


def read_segment_end(segment: Path) -> SegmentEnd | None:
    """The end marker of `segment`, or None when there is none (or it is unreadable)."""
    try:
        data = segment.with_name(segment.name + END_SUFFIX).read_bytes()
        end = SegmentEnd.model_validate_json(data)
    except (OSError, ValueError):
        return None
    return end if end.segment == segment.name else None


def _parse_segment(path: Path) -> Segment | None:
    m = _SEGMENT.match(path.name)
    if m is None:
        return None
    try:
        start = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        size = path.stat().st_size
    except (ValueError, OSError):
        return None
    return Segment(path, start, int(m.group(2)), size)


def _segments_in(directory: Path) -> list[Segment]:
    """The segments directly in `directory`, in write order (sequence number)."""
    try:
        paths = list(directory.glob(_SEGMENT_GLOB))
    except OSError:
        return []
    segs = [s for s in map(_parse_segment, paths) if s is not None]
    return sorted(segs, key=lambda s: (s.seq, s.start))


def list_segments(directory: Path | str) -> dict[Path, list[Segment]]:
    """Segments per replica directory: `directory` itself and its immediate sub-directories."""
    directory = Path(directory)
    groups: dict[Path, list[Segment]] = {}
    candidates = [directory]
    try:
        candidates += sorted(p for p in directory.iterdir() if p.is_dir())
    except OSError:
        pass
    for d in candidates:
        segs = _segments_in(d)
        if segs:
            groups[d] = segs
    return groups


def _replica_name(name: str | None = None) -> str:
    raw = name or socket.gethostname() or "replica"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:64].strip(".") or "replica"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises rather than returning 0 on regular files
            raise OSError(errno.EIO, "short write")
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteFailed(Exception):
    def __init__(self, committed: int, cause: OSError) -> None:
        super().__init__(str(cause))
        self.committed = committed
        self.cause = cause


class _SegmentWriter:
    """The open segment of one replica directory. Used from worker threads, one at a time."""

    def __init__(self, directory: Path, *, max_bytes: int, max_age: timedelta, fsync: bool,
                 replica: str = "") -> None:
        self.directory = directory
        self.replica = replica
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.fsync = fsync
        self.fd: int | None = None
        self.path: Path | None = None
        self.opened_at: datetime | None = None
        self.size = 0
        self.committed = 0
        self.lines = 0  # committed lines of the open segment
        self._next_seq: int | None = None

    def _open(self, now: datetime) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._next_seq is None:
            self._next_seq = max((s.seq for s in _segments_in(self.directory)), default=0) + 1
        while True:
            path = self.directory / f"decisions-{now:%Y%m%dT%H%M%S}-{self._next_seq:06d}.jsonl"
            self._next_seq += 1
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                             0o640)
            except FileExistsError:
                continue
            break
        if self.fsync:
            try:
                _fsync_dir(self.directory)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        self.fd, self.path, self.opened_at = fd, path, now
        self.size = self.committed = self.lines = 0

    def close(self, now: datetime, reason: EndReason = "rotated") -> None:
        """Close the open segment and mark its end (best effort: without the marker the
        segment reads as one the writer never closed)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
            if self.path is not None and self.size == self.committed:
                self._mark_end(self.path, now, reason)
        self.path = self.opened_at = None

    def _mark_end(self, path: Path, now: datetime, reason: EndReason) -> None:
        end = path.with_name(path.name + END_SUFFIX)
        tmp = path.with_name(f".{end.name}.tmp")
        marker = SegmentEnd(segment=path.name, replica=self.replica, records=self.lines,
                            bytes=self.committed, closed_at=now, reason=reason)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                _write_all(fd, orjson.dumps(marker.model_dump(mode="json"),
                                            option=orjson.OPT_APPEND_NEWLINE))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, end)
            if self.fsync:
                _fsync_dir(self.directory)
        except OSError as exc:
            log.warning("decision log: could not mark the end of %s (%s); it will read as a "
                        "segment that was never closed", path, exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def abort(self) -> None:
        """After a failed write: cut what was not synced and close; the next write opens a new
        segment. Best effort: this runs because the disk is misbehaving."""
        fd, path = self.fd, self.path
        if fd is None or path is None:
            return
        try:
            if self.size != self.committed:
                os.ftruncate(fd, self.committed)
        except OSError as exc:
            log.error("decision log: could not truncate %s after a failed write (%s); a retried "
                      "batch may appear twice", path, exc)
        try:
            os.close(fd)
        except OSError:
            pass
        self.fd = None
        self.path = self.opened_at = None
        if self.committed == 0:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def rotate_if_old(self, now: datetime) -> bool:
        if self.fd is not None and self.opened_at is not None and now - self.opened_at >= self.max_age:
            self.close(now)
            return True
        return False

    def write(self, lines: list[bytes], now: datetime) -> None:
        """Write `lines` (each ending in a newline), rotating as needed; raise `_WriteFailed`
        saying how many leading lines are durable."""
        done = 0
        i = 0
        try:
            while i < len(lines):
                self.rotate_if_old(now)
                if self.fd is None:
                    self._open(now)
                assert self.fd is not None
                chunk: list[bytes] = []
                size = self.size
                while i < len(lines):
                    line = lines[i]
                    if size > 0 and size + len(line) > self.max_bytes:
                        break
                    chunk.append(line)
                    size += len(line)
                    i += 1
                if chunk:
                    self.size = size  # before writing: abort() truncates a partial write
                    _write_all(self.fd, b"".join(chunk))
                    if self.fsync:
                        os.fsync(self.fd)
                    self.committed = size
                    self.lines += len(chunk)
                    done = i
                if self.size >= self.max_bytes or i < len(lines):
                    self.close(now)
        except OSError as exc:
            self.abort()
            raise _WriteFailed(done, exc) from exc


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------


_Waiter = asyncio.Future[None]
_Entry = tuple[DecisionRecord | LogRow, _Waiter | None]


def _settle(waiters: list[_Waiter], error: str | None, cause: BaseException | None) -> None:
    """Resolve durable appends (on their event loop): None means on disk."""
    for fut in waiters:
        if fut.done():  # the caller timed out (cancelled) or it was settled already
            continue
        if error is None:
            fut.set_result(None)
        else:
            exc = DecisionLogUnavailable(error)
            exc.__cause__ = cause
            fut.set_exception(exc)


class DecisionLog:
    """Append decisions from the request path; a background task makes them durable.

    Use from one event loop: `await log.start()` at start-up, `log.append(record)` per
    decision (never blocks, never raises), `await log.aclose()` at shutdown. `await
    log.flush()` writes everything appended so far (raises `OSError` if the disk refuses).
    In durable mode (`log.durable`) the request path awaits `log.append_durable(record)`
    instead, which returns once the record is written and fsynced and raises
    `DecisionLogUnavailable` otherwise.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        replica: str | None = None,
        queue_max: int = 100_000,
        segment_max_bytes: int = 64 * _MIB,
        segment_max_age_s: float = 3600.0,
        retention_days: float | None = 30.0,
        retention_max_bytes: int | None = None,
        fsync: bool = True,
        batch_max: int = 5_000,
        linger_s: float = 0.0,
        idle_s: float = 1.0,
        retention_interval_s: float = 600.0,
        close_timeout_s: float = 5.0,
        durable: bool = False,
        durable_timeout_s: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be at least 1")
        if durable_timeout_s <= 0:
            raise ValueError("durable_timeout_s must be positive")
        self.root = Path(root)
        self.replica = _replica_name(replica)
        self.directory = self.root / self.replica
        self.queue_max = queue_max
        self.segment_max_age_s = segment_max_age_s
        self.retention_days = retention_days
        self.retention_max_bytes = retention_max_bytes
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.idle_s = idle_s
        self.retention_interval = timedelta(seconds=retention_interval_s)
        self.close_timeout_s = close_timeout_s
        self.durable = durable  # the configured mode: the request path should use append_durable
        self.durable_timeout_s = durable_timeout_s
        self.clock: Clock = clock or _utc_now
        self.written = 0
        self.batches = 0  # successful writes (each one write + fsync)
        self.dropped = 0
        self.write_errors = 0
        self.retention_deleted = 0
        self.durable_failures = 0  # append_durable calls that raised DecisionLogUnavailable
        self._accepted = 0
        self._queue: deque[_Entry] = deque()
        self._pending: list[_Entry] = []
        self._room: asyncio.Event | None = None  # set when the writer takes a batch off the queue
        self._room_waiters = 0
        self._io_lock = threading.Lock()
        self._writer = _SegmentWriter(self.directory, max_bytes=segment_max_bytes,
                                      max_age=timedelta(seconds=segment_max_age_s), fsync=fsync,
                                      replica=self.replica)
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self._next_retention: datetime | None = None

    @classmethod
    def from_settings(cls, settings: DecisionLogSettings, data_dir: Path, **kwargs: Any) -> DecisionLog | None:
        """The configured log (None when `enabled: false`); `dir` is relative to `data_dir`."""
        if not settings.enabled:
            return None
        return cls(Path(data_dir) / settings.dir, queue_max=settings.queue_max,
                   segment_max_bytes=settings.segment_max_bytes,
                   segment_max_age_s=settings.segment_max_age_s,
                   retention_days=settings.retention_days,
                   retention_max_bytes=settings.retention_max_bytes, fsync=settings.fsync,
                   linger_s=settings.linger_ms / 1000.0,
                   durable=settings.durability == "durable",
                   durable_timeout_s=settings.durable_timeout_s, **kwargs)

    # -- request path ------------------------------------------------------------------------

    def append(self, record: DecisionRecord | LogRow) -> bool:
        """Queue `record` (the model, or a `LogRow` from `gateway.recording`) for writing. Never blocks, never raises; False when it was dropped
        (queue full or log closed)."""
        try:
            if self._closed or len(self._queue) >= self.queue_max:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.warning("decision log: %s; %d decisions dropped so far",
                                "closed" if self._closed else f"queue full ({self.queue_max})",
                                self.dropped)
                return False
            self._queue.append((record, None))
            self._accepted += 1
            self._notify()
            return True
        except Exception:  # pragma: no cover - defensive: the request path must not fail here
            log.exception("decision log: append failed")
            return False

    async def append_durable(self, record: DecisionRecord | LogRow) -> None:
        """Queue `record` and return once the batch holding it has been written and fsynced
        (group commit: concurrent callers share one write and one fsync).

        Raises `DecisionLogUnavailable` when the write of its batch fails, when it is not on
        disk within `durable_timeout_s` (a full queue is waited on, within the same time), or
        when the log is closed. Starts the writer if `start()` was not called yet."""
        if self._closed:
            self.durable_failures += 1
            raise DecisionLogUnavailable("the decision log is closed")
        if self._task is None:
            await self.start()
        fut: _Waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.durable_timeout_s):
                while len(self._queue) >= self.queue_max and not self._closed:
                    await self._wait_for_room()
                if self._closed:
                    raise DecisionLogUnavailable("the decision log is closed")
                self._queue.append((record, fut))
                self._accepted += 1
                self._notify()
                await fut
        except TimeoutError:
            self.durable_failures += 1
            queued = fut.cancelled()
            raise DecisionLogUnavailable(
                f"the decision record was not on disk within {self.durable_timeout_s:g} s"
                + (" (it stays queued and may still be written)" if queued else
                   f" (the queue stayed full: {self.queue_max})")) from None
        except DecisionLogUnavailable:
            self.durable_failures += 1
            raise

    async def _wait_for_room(self) -> None:
        if self._room is None:
            self._room = asyncio.Event()
        self._room.clear()
        self._room_waiters += 1
        try:
            # Check again now that the writer thread can see us waiting: it may have emptied
            # the queue in between and, seeing no waiter, not signalled.
            if len(self._queue) < self.queue_max or self._closed:
                return
            await self._room.wait()
        finally:
            self._room_waiters -= 1

    def _signal_room(self) -> None:
        """From the writer thread: a batch left the queue, waiting durable appends may enter."""
        room, loop = self._room, self._loop
        if room is None or loop is None or not self._room_waiters:
            return
        try:
            loop.call_soon_threadsafe(room.set)
        except RuntimeError:  # the loop is closed
            pass

    @staticmethod
    def _resolve(waiters: list[_Waiter], error: str | None = None,
                 cause: BaseException | None = None) -> None:
        """Settle durable appends from any thread, on their own event loop."""
        if not waiters:
            return
        try:
            waiters[0].get_loop().call_soon_threadsafe(_settle, waiters, error, cause)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _notify(self) -> None:
        wake, loop = self._wake, self._loop
        if wake is None or loop is None or wake.is_set():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    @property
    def queued(self) -> int:
        """Records accepted but not yet written (queue plus a batch being retried)."""
        return len(self._queue) + len(self._pending)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "write_errors": self.write_errors,
                "queued": self.queued, "retention_deleted": self.retention_deleted,
                "durable_failures": self.durable_failures}

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background writer. Does not raise on a bad directory: that is logged,
        counted and retried like any write error."""
        if self._task is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        try:
            await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            self.write_errors += 1
            log.error("decision log: cannot create %s: %s (will retry)", self.directory, exc)
        self._task = asyncio.create_task(self._run(), name="modgate-decision-log")
        if self._queue:
            self._wake.set()

    async def aclose(self) -> None:
        """Stop the writer, drain the queue and flush (retrying for `close_timeout_s`), close
        the segment. Records still unwritten after that are logged as lost."""
        if self._closed:
            return
        self._closed = True
        if self._stop is not None and self._wake is not None:
            self._stop.set()
            self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # pragma: no cover - _run does not raise
                log.exception("decision log: writer task failed")
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_timeout_s
        delay = 0.05
        while self.queued:
            try:
                await asyncio.to_thread(self._write_step)
            except OSError:
                if loop.time() + delay > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if self.queued:
            log.error("decision log: %d decisions could not be written before shutdown and are "
                      "lost", self.queued)
            self._resolve([f for _, f in (*self._pending, *self._queue) if f is not None],
                          "the decision log closed before the record was written")
        if self._room is not None:
            self._room.set()  # durable appends waiting for room see the log closed
        await asyncio.to_thread(self._close_segment, "shutdown")

    async def flush(self) -> None:
        """Write and sync everything appended before this call. Raises the `OSError` if the
        disk refuses (the records stay queued for the next attempt)."""
        target = self._accepted
        while self.written < target and self.queued:
            await asyncio.to_thread(self._write_step)

    async def rotate(self) -> None:
        """Close the current segment now (the next record opens a new one)."""
        await asyncio.to_thread(self._close_segment, "rotated")

    async def enforce_retention(self) -> int:
        """Apply retention now; returns how many segments were deleted."""
        return await asyncio.to_thread(self._retention)

    # -- background task -------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None and self._stop is not None
        backoff = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            if not self.queued:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_s)
                except TimeoutError:
                    pass
                if self._stop.is_set():
                    break
            if self.queued and self.linger_s > 0 and len(self._queue) < self.batch_max:
                await asyncio.sleep(self.linger_s)  # group commit: let the batch fill
            if self.queued:
                try:
                    await asyncio.to_thread(self._write_step)
                    backoff = 0.0
                except Exception as exc:
                    if not isinstance(exc, OSError):  # a bug: count it, keep the gateway up
                        self.write_errors += 1
                        log.exception("decision log: unexpected error while writing")
                    backoff = min(max(backoff * 2, 0.1), 10.0)
                    try:
                        await asyncio.wait_for(self._stop.wait(), backoff)
                    except TimeoutError:
                        pass
                    continue
            try:
                await self._housekeeping()
            except Exception:
                log.exception("decision log: housekeeping failed")

    async def _housekeeping(self) -> None:
        now = self.clock()
        w = self._writer
        if w.fd is not None and w.opened_at is not None and now - w.opened_at >= w.max_age:
            await asyncio.to_thread(self._rotate_if_old)
        if self._next_retention is None or now >= self._next_retention:
            self._next_retention = now + self.retention_interval
            await asyncio.to_thread(self._retention)

    # -- worker-thread side (under _io_lock) ------------------------------------------------------

    def _write_step(self) -> int:
        with self._io_lock:
            if not self._pending:
                take = min(self.batch_max, len(self._queue))
                self._pending = [self._queue.popleft() for _ in range(take)]
                if take:
                    self._signal_room()
            if not self._pending:
                return 0
            batch = self._pending
            lines = [encode_record(r) for r, _ in batch]
            try:
                self._writer.write(lines, self.clock())
            except _WriteFailed as failed:
                synced = [f for _, f in batch[:failed.committed] if f is not None]
                del batch[:failed.committed]
                # The callers waiting on the rest get the error; their records stay in memory
                # and are retried like any other (at-least-once, see the module docstring).
                refused = [f for _, f in batch if f is not None]
                self._pending = [(r, None) for r, _ in batch]
                self.written += failed.committed
                self.write_errors += 1
                if not self._failing:
                    log.error("decision log: writing to %s failed: %s; %d decisions kept in memory "
                              "and retried", self.directory, failed.cause, self.queued)
                self._failing = True
                # Counters first: a caller that sees the outcome sees them updated.
                self._resolve(synced)
                self._resolve(refused, f"writing the decision log failed: {failed.cause}",
                              failed.cause)
                raise failed.cause from None
            self.written += len(batch)
            self.batches += 1
            self._pending = []
            if self._failing:
                self._failing = False
                log.warning("decision log: writing to %s works again", self.directory)
            self._resolve([f for _, f in batch if f is not None])
            return len(batch)

    def _rotate_if_old(self) -> None:
        with self._io_lock:
            try:
                if self._writer.rotate_if_old(self.clock()):
                    self._retention_locked()
            except OSError as exc:
                log.warning("decision log: closing a segment failed: %s", exc)

    def _close_segment(self, reason: EndReason) -> None:
        with self._io_lock:
            try:
                self._writer.close(self.clock(), reason)
            except OSError as exc:
                log.warning("decision log: closing a segment failed: %s", exc)

    def _retention(self) -> int:
        with self._io_lock:
            return self._retention_locked()

    def _retention_locked(self) -> int:
        now = self.clock()
        current = self._writer.path
        deleted = 0

        def delete(seg: Segment) -> bool:
            nonlocal deleted
            try:
                seg.path.unlink()
            except FileNotFoundError:
                return True
            except OSError as exc:
                log.warning("decision log: retention could not delete %s: %s", seg.path, exc)
                return False
            deleted += 1
            _unlink_quietly(seg.path.with_name(seg.path.name + END_SUFFIX))
            return True

        if self.retention_days is not None:
            # A segment holds records up to segment_max_age_s after its start: keep it until the
            # newest of them is older than retention_days.
            cutoff = now - timedelta(days=self.retention_days, seconds=self.segment_max_age_s)
            for directory, segs in list_segments(self.root).items():
                for seg in segs:
                    if seg.path != current and seg.start < cutoff:
                        delete(seg)
                _sweep_orphan_ends(directory)
                if directory != self.directory and directory != self.root:
                    try:
                        directory.rmdir()  # a replica that is gone; only if now empty
                    except OSError:
                        pass
        if self.retention_max_bytes is not None:
            segs = _segments_in(self.directory)
            total = sum(s.size for s in segs)
            for seg in segs:
                if total <= self.retention_max_bytes:
                    break
                if seg.path == current:
                    continue
                if delete(seg):
                    total -= seg.size
        if deleted:
            self.retention_deleted += deleted
            log.info("decision log: retention deleted %d segment(s)", deleted)
        return deleted


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("decision log: retention could not delete %s: %s", path, exc)


def _sweep_orphan_ends(directory: Path) -> None:
    """End markers whose segment is gone (deleted by a modgate that did not know markers)."""
    try:
        ends = list(directory.glob(_END_GLOB))
    except OSError:
        return
    for end in ends:
        if not end.with_name(end.name[: -len(END_SUFFIX)]).exists():
            _unlink_quietly(end)
