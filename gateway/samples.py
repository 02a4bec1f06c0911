"""The listing-content sample store: what a reviewer, a shadow flip or a replay needs to read.

The decision log keeps ids and verdicts only; nothing else in the gateway keeps listing content.
Reviewing a decision, reading *why* a shadow flipped, or replaying last week's traffic through a
candidate all need the title and description the model saw. This module keeps them for a share
of traffic, and only when the operator opted in:

- **off by default** (`samples.enabled: false`); with it on, a stable hash of the item id picks
  `share` of the items (so every replica samples the same items, and a resubmitted item is
  sampled again), and only primary decisions (stable, canary, pinned arms) are kept;
- **retention-limited**: rows older than `retention_days` are purged by the background task
  (and by `modgate samples purge`); reads never return an expired row even before the purge ran;
- **deletable by item id** (`DELETE /v1/admin/samples/{item_id}`, `modgate samples delete`);
- **read with a scope** (`samples:read`; deleting needs `samples:delete`);
- **never on the request path**: `SampleRecorder.offer` is O(1) and never blocks. It puts the
  row into a bounded in-memory queue; when the queue is full the row is dropped and counted
  (`modgate_samples_dropped_total`). A background task writes batches in a worker thread.

Content never goes to logs, spans or metrics: this module logs counts and errors only, and its
metrics carry no labels.

Storage (`samples.store`): `sqlite`, one file (`samples.path`, relative to `data_dir`) per
gateway process unless they share a volume, so the review queue and the admin routes read the
rows of the replica that answers; or `redis`, the registry's Redis, shared by every replica
(each row a key that expires with its retention, indexed by time and by item).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, cast

import orjson
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from gateway.pipeline import Evaluation

if TYPE_CHECKING:
    import redis

    from gateway.config import AppConfig

__all__ = ["RedisSampleStore", "Sample", "SampleRecorder", "SampleSettings", "SampleStore",
           "SqliteSampleStore", "content_for", "is_sampled", "open_configured", "open_sample_store",
           "sample_store_path"]

log = logging.getLogger("modgate.samples")

# Arms whose decisions are traffic answers (a shadow's verdict is not what the caller got).
_PRIMARY_ARMS = frozenset({"stable", "canary", "pinned"})
_HASH_SALT = b"modgate-samples\x00"
# What a replay needs to render the listing again (a dataset row's fields), besides whatever
# else the version's template declares.
_LISTING_FIELDS = ("title", "description", "seller_id")


class SampleSettings(BaseModel):
    """`samples:` in the config file: the opt-in store of listing content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="keep listing content for a share of traffic "
                          "(review queue, shadow flips, replay); off by default")
    share: float = Field(0.05, gt=0.0, le=1.0, description="share of items whose content is "
                         "kept, chosen by a stable hash of the item id")
    retention_days: float = Field(14.0, gt=0.0, le=366.0, description="rows older than this are "
                                  "purged and never read")
    store: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite: a file per gateway "
                                              "process (or shared volume); redis: the registry's "
                                              "Redis (registry.redis_url or its env var), shared "
                                              "by every replica")
    path: str = Field("samples.db", description="SQLite file, relative to data_dir")
    queue_max: int = Field(10_000, ge=1, le=1_000_000, description="rows waiting to be written; "
                           "beyond this new rows are dropped and counted (never blocks a request)")
    purge_interval_s: float = Field(600.0, gt=0.0, description="how often expired rows are purged")


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled primary decision with the listing content the model saw."""

    request_id: str
    item_id: str
    ts: datetime
    prompt: str
    version: int
    arm: str
    locale: str
    decision: str
    category: str | None
    confidence: float | None
    content: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"request_id": self.request_id, "item_id": self.item_id, "ts": self.ts.isoformat(),
                "prompt": self.prompt, "version": self.version, "arm": self.arm,
                "locale": self.locale, "decision": self.decision, "category": self.category,
                "confidence": self.confidence, "content": dict(self.content)}


def is_sampled(item_id: str, share: float) -> bool:
    """Whether *item_id* falls in the sampled share: a stable hash, the same on every replica
    and every run, so an item is either always or never kept."""
    if share >= 1.0:
        return True
    digest = hashlib.sha256(_HASH_SALT + item_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2.0 ** 64


_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    request_id TEXT PRIMARY KEY,
    item_id TEXT NOT NULL,
    ts REAL NOT NULL,
    prompt TEXT NOT NULL,
    version INTEGER NOT NULL,
    arm TEXT NOT NULL,
    locale TEXT NOT NULL,
    decision TEXT NOT NULL,
    category TEXT,
    confidence REAL,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_item ON samples(item_id);
CREATE INDEX IF NOT EXISTS samples_ts ON samples(ts);
"""
_COLUMNS = "request_id, item_id, ts, prompt, version, arm, locale, decision, category, confidence, content"
_MAX_IDS_PER_QUERY = 500


def _row(r: tuple[object, ...]) -> Sample:
    content = orjson.loads(r[10])  # type: ignore[arg-type]
    return Sample(request_id=str(r[0]), item_id=str(r[1]),
                  ts=datetime.fromtimestamp(float(r[2]), UTC),  # type: ignore[arg-type]
                  prompt=str(r[3]), version=int(r[4]), arm=str(r[5]),  # type: ignore[call-overload]
                  locale=str(r[6]), decision=str(r[7]),
                  category=None if r[8] is None else str(r[8]),
                  confidence=None if r[9] is None else float(r[9]),  # type: ignore[arg-type]
                  content={str(k): str(v) for k, v in content.items()})


class SampleStore(Protocol):
    """Where sampled rows live (SQLite file or Redis). Synchronous: the gateway calls it in a
    worker thread. Every read hides rows older than the retention, purged or not."""

    def put_many(self, samples: Sequence[Sample]) -> None: ...
    def by_request(self, request_ids: Iterable[str]) -> dict[str, Sample]: ...
    def by_item(self, item_ids: Iterable[str]) -> dict[str, Sample]: ...
    def item(self, item_id: str) -> list[Sample]: ...
    def recent(self, *, since: datetime | None = None, until: datetime | None = None,
               prompt: str | None = None, limit: int = 100_000) -> list[Sample]: ...
    def delete_item(self, item_id: str) -> int: ...
    def purge(self, *, everything: bool = False) -> int: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class SqliteSampleStore:
    """The rows, in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, *, retention_days: float = 14.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention = timedelta(days=retention_days)
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _cutoff(self) -> float:
        return (self.clock() - self.retention).timestamp()

    def put_many(self, samples: Sequence[Sample]) -> None:
        rows = [(s.request_id, s.item_id, s.ts.timestamp(), s.prompt, s.version, s.arm, s.locale,
                 s.decision, s.category, s.confidence, orjson.dumps(dict(s.content)))
                for s in samples]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(f"INSERT OR REPLACE INTO samples ({_COLUMNS}) "
                                     f"VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _select(self, where: str, args: Sequence[object], tail: str = "") -> list[Sample]:
        with self._lock:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM samples WHERE ts >= ? AND ({where}) "
                                   f"{tail}", (self._cutoff(), *args))
            return [_row(r) for r in cur.fetchall()]

    def _by(self, column: Literal["request_id", "item_id"], keys: Iterable[str]) -> list[Sample]:
        unique = list(dict.fromkeys(keys))
        out: list[Sample] = []
        for i in range(0, len(unique), _MAX_IDS_PER_QUERY):
            chunk = unique[i:i + _MAX_IDS_PER_QUERY]
            out.extend(self._select(f"{column} IN ({','.join('?' * len(chunk))})", chunk,
                                    "ORDER BY ts"))
        return out

    def by_request(self, request_ids: Iterable[str]) -> dict[str, Sample]:
        return {s.request_id: s for s in self._by("request_id", request_ids)}

    def by_item(self, item_ids: Iterable[str]) -> dict[str, Sample]:
        """The latest sample per item id."""
        return {s.item_id: s for s in self._by("item_id", item_ids)}  # ordered by ts: latest wins

    def item(self, item_id: str) -> list[Sample]:
        """Every live sample of one item, oldest first."""
        return self._by("item_id", [item_id])

    def recent(self, *, since: datetime | None = None, until: datetime | None = None,
               prompt: str | None = None, limit: int = 100_000) -> list[Sample]:
        """Samples in a time window (newest first), optionally of one prompt."""
        where, args = ["1=1"], []  # type: tuple[list[str], list[object]]
        if since is not None:
            where.append("ts >= ?")
            args.append(since.timestamp())
        if until is not None:
            where.append("ts < ?")
            args.append(until.timestamp())
        if prompt is not None:
            where.append("prompt = ?")
            args.append(prompt)
        return self._select(" AND ".join(where), args, f"ORDER BY ts DESC LIMIT {int(limit)}")

    def delete_item(self, item_id: str) -> int:
        """Delete every row of one item (expired ones too); how many there were."""
        with self._lock:
            return self._db.execute("DELETE FROM samples WHERE item_id = ?", (item_id,)).rowcount

    def purge(self, *, everything: bool = False) -> int:
        """Delete rows older than the retention (*everything*: all rows); how many."""
        cutoff = float("inf") if everything else self._cutoff()
        with self._lock:
            return self._db.execute("DELETE FROM samples WHERE ts < ?", (cutoff,)).rowcount

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM samples WHERE ts >= ?",
                                   (self._cutoff(),)).fetchone()
            return int(row[0])


class RedisSampleStore:
    """The rows in Redis, shared by every gateway replica. Each row is a JSON string that
    expires at the end of its retention (Redis drops it on its own); a sorted set indexes rows
    by time and a set per item lists its rows (both trimmed by `purge`)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "modgate:samples",
                 retention_days: float = 14.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._r = client
        self._p = prefix
        self.retention = timedelta(days=retention_days)
        self.clock = clock

    def _row_key(self, request_id: str) -> str:
        return f"{self._p}:row:{request_id}"

    def _item_key(self, item_id: str) -> str:
        return f"{self._p}:item:{item_id}"

    @property
    def _ts_key(self) -> str:
        return f"{self._p}:ts"

    def _cutoff(self) -> float:
        return (self.clock() - self.retention).timestamp()

    def close(self) -> None:
        self._r.close()

    def put_many(self, samples: Sequence[Sample]) -> None:
        now = self.clock().timestamp()
        ttl_max = int(self.retention.total_seconds()) + 1
        pipe = self._r.pipeline(transaction=False)
        for s in samples:
            ttl = int(s.ts.timestamp() + self.retention.total_seconds() - now) + 1
            if ttl <= 0:
                continue
            pipe.set(self._row_key(s.request_id), orjson.dumps(s.as_dict()), ex=ttl)
            pipe.zadd(self._ts_key, {s.request_id: s.ts.timestamp()})
            pipe.sadd(self._item_key(s.item_id), s.request_id)
            pipe.expire(self._item_key(s.item_id), ttl_max)
        pipe.execute()

    def _rows(self, request_ids: Sequence[str]) -> list[Sample]:
        cutoff = self._cutoff()
        out: list[Sample] = []
        for i in range(0, len(request_ids), _MAX_IDS_PER_QUERY):
            chunk = request_ids[i:i + _MAX_IDS_PER_QUERY]
            for raw in self._r.mget([self._row_key(r) for r in chunk]):
                if raw is None:
                    continue
                d = orjson.loads(raw)
                ts = datetime.fromisoformat(d["ts"])
                if ts.timestamp() < cutoff:
                    continue
                out.append(Sample(request_id=d["request_id"], item_id=d["item_id"], ts=ts,
                                  prompt=d["prompt"], version=int(d["version"]), arm=d["arm"],
                                  locale=d["locale"], decision=d["decision"], category=d["category"],
                                  confidence=d["confidence"], content=d["content"]))
        return out

    def _item_ids(self, item_ids: Iterable[str]) -> list[str]:
        pipe = self._r.pipeline(transaction=False)
        unique = list(dict.fromkeys(item_ids))
        for item in unique:
            pipe.smembers(self._item_key(item))
        return [m.decode() for members in pipe.execute() for m in members]

    def by_request(self, request_ids: Iterable[str]) -> dict[str, Sample]:
        return {s.request_id: s for s in self._rows(list(dict.fromkeys(request_ids)))}

    def by_item(self, item_ids: Iterable[str]) -> dict[str, Sample]:
        rows = sorted(self._rows(self._item_ids(item_ids)), key=lambda s: s.ts)
        return {s.item_id: s for s in rows}

    def item(self, item_id: str) -> list[Sample]:
        return sorted(self._rows(self._item_ids([item_id])), key=lambda s: s.ts)

    def recent(self, *, since: datetime | None = None, until: datetime | None = None,
               prompt: str | None = None, limit: int = 100_000) -> list[Sample]:
        lo = max(self._cutoff(), since.timestamp() if since is not None else float("-inf"))
        hi = f"({until.timestamp()}" if until is not None else "+inf"
        # decode_responses is off: members are bytes (redis-py's stubs allow any response type)
        ids = [m.decode() for m in cast("list[bytes]", self._r.zrevrangebyscore(self._ts_key, hi, lo))]
        rows = [s for s in self._rows(ids) if prompt is None or s.prompt == prompt]
        return rows[:limit]

    def delete_item(self, item_id: str) -> int:
        ids = self._item_ids([item_id])
        if not ids:
            return 0
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(*[self._row_key(r) for r in ids])
        pipe.zrem(self._ts_key, *ids)
        pipe.delete(self._item_key(item_id))
        deleted: int = pipe.execute()[0]
        return deleted

    def purge(self, *, everything: bool = False) -> int:
        hi = "+inf" if everything else f"({self._cutoff()}"
        ids = [m.decode() for m in cast("list[bytes]", self._r.zrangebyscore(self._ts_key, "-inf", hi))]
        if not ids:
            return 0
        live = 0
        for i in range(0, len(ids), _MAX_IDS_PER_QUERY):
            chunk = ids[i:i + _MAX_IDS_PER_QUERY]
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(*[self._row_key(r) for r in chunk])
            pipe.zrem(self._ts_key, *chunk)
            live += int(pipe.execute()[0])
        return live

    def count(self) -> int:
        n: int = self._r.zcount(self._ts_key, self._cutoff(), "+inf")
        return n


def sample_store_path(settings: SampleSettings, data_dir: Path) -> Path:
    path = Path(settings.path)
    return path if path.is_absolute() else data_dir / path


def open_sample_store(settings: SampleSettings, data_dir: Path, *, redis_url: str | None = None,
                      redis_prefix: str = "modgate", cleanup: bool = False,
                      clock: Callable[[], datetime] | None = None) -> SampleStore | None:
    """The store the settings name; None when sampling is off (nothing is kept or read).
    *cleanup* (the CLI's delete and purge): open it even with sampling off, since rows kept
    earlier must stay deletable, but not create an SQLite file that does not exist. Raises
    ValueError for `store: redis` without a URL."""
    if not settings.enabled and not cleanup:
        return None
    kwargs = {} if clock is None else {"clock": clock}
    if settings.store == "redis":
        if not redis_url:
            raise ValueError("samples.store is redis but the registry's Redis URL is not set "
                             "(registry.redis_url or its environment variable)")
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        return RedisSampleStore(client, prefix=f"{redis_prefix}:samples",
                                retention_days=settings.retention_days, **kwargs)
    path = sample_store_path(settings, data_dir)
    if cleanup and not path.exists():
        return None
    return SqliteSampleStore(path, retention_days=settings.retention_days, **kwargs)


def open_configured(cfg: AppConfig, *, cleanup: bool = False) -> SampleStore | None:
    """`open_sample_store` for a loaded configuration (the registry's Redis for `redis`)."""
    import os

    reg = cfg.registry
    url = reg.redis_url or os.environ.get(reg.redis_url_env)
    return open_sample_store(cfg.samples, cfg.data_path(), redis_url=url,
                             redis_prefix=reg.redis_key_prefix, cleanup=cleanup)


def content_for(store: SampleStore | None, *, request_ids: Iterable[str] = (),
                item_ids: Iterable[str] = ()) -> dict[str, Mapping[str, str]]:
    """Listing content to join onto a report (shadow flips, disagreement exports, replay), keyed
    by request id and by item id (the latest sample of the item); empty without a store. A
    caller that shows the result must have checked `samples:read` (or be an operator on the
    host, like the offline CLI)."""
    if store is None:
        return {}
    out: dict[str, Mapping[str, str]] = {}
    for s in store.by_item(item_ids).values():
        out[s.item_id] = s.content
    for s in store.by_request(request_ids).values():
        out[s.request_id] = s.content
    return out


class SampleRecorder:
    """Takes sampled decisions off the request path and writes them in batches."""

    def __init__(self, store: SampleStore, settings: SampleSettings, *,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 monotonic: Callable[[], float] = time.monotonic,
                 close_timeout_s: float = 10.0) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self.close_timeout_s = close_timeout_s
        self._queue: deque[Sample] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_purge = float("-inf")
        self.recorded_count = 0
        self.dropped_count = 0
        self._recorded = Counter("modgate_samples_recorded", "Sampled decisions written to the "
                                 "sample store", registry=registry)
        self._dropped = Counter("modgate_samples_dropped", "Sampled decisions dropped because the "
                                "sample store's queue was full or its write failed", registry=registry)

    def offer(self, *, request_id: str, item_id: str, variables: Mapping[str, object],
              ev: Evaluation, arm: str) -> bool:
        """Keep this decision's content if its item is in the sampled share. O(1), never
        blocks, never raises for a full queue (the row is dropped and counted). True when
        queued."""
        if arm not in _PRIMARY_ARMS or not is_sampled(item_id, self.settings.share):
            return False
        if len(self._queue) >= self.settings.queue_max:
            self.dropped_count += 1
            self._dropped.inc()
            return False
        v = ev.verdict
        keep = (*_LISTING_FIELDS, *ev.version.spec.variables)
        content = {k: str(variables[k]) for k in dict.fromkeys(keep)
                   if k not in ("locale", "item_id") and variables.get(k) is not None}
        if ev.rationale and "rationale" not in content:
            # a reasoning model's analysis (listing-derived text): kept here and nowhere else
            content["rationale"] = ev.rationale
        self._queue.append(Sample(
            request_id=request_id, item_id=item_id, ts=self.clock(), prompt=ev.version.name,
            version=ev.version.version, arm=arm, locale=ev.locale, decision=v.decision,
            category=v.category, confidence=v.confidence, content=content))
        self._wake.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sample-writer")

    async def aclose(self) -> None:
        """Stop the writer, write what is still queued, close the store.

        The writer is asked to stop (a flag and its wake-up event) rather than cancelled: on
        Python 3.11 `asyncio.wait_for` swallows a cancel that lands just as the awaited event
        fires (a row was just offered), and the writer then slept on for `purge_interval_s`
        while the gateway's shutdown waited for it. A write in flight finishes and is counted.
        A writer that does not stop within `close_timeout_s` is cancelled and logged: shutdown
        is bounded whatever the store does."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=self.close_timeout_s)
            if not done:
                log.error("sample store: the writer did not stop within %.0f s; cancelled",
                          self.close_timeout_s)
                task.cancel()
                await asyncio.wait({task}, timeout=self.close_timeout_s)
            elif not task.cancelled() and (exc := task.exception()) is not None:
                log.error("sample store: the writer failed: %s", type(exc).__name__)
        await self.flush()
        await asyncio.to_thread(self.store.close)

    async def flush(self) -> None:
        """Write everything queued so far. A batch the store refuses (SQLite, disk, Redis
        errors alike) is dropped, counted and logged; the writer goes on."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), 500))]
            try:
                await asyncio.to_thread(self.store.put_many, batch)
            except Exception as exc:  # noqa: BLE001 - any store failure; never the writer's end
                self.dropped_count += len(batch)
                self._dropped.inc(len(batch))
                log.error("sample store: %d rows not written: %s", len(batch), type(exc).__name__)
                continue
            self.recorded_count += len(batch)
            self._recorded.inc(len(batch))

    async def purge(self) -> int:
        n = await asyncio.to_thread(self.store.purge)
        self._last_purge = self.monotonic()
        if n:
            log.info("sample store: purged %d rows past retention", n)
        return n

    async def _run(self) -> None:
        while not self._stopping:
            if self.monotonic() - self._last_purge >= self.settings.purge_interval_s:
                try:
                    await self.purge()
                except Exception as exc:  # noqa: BLE001 - retried at the next interval
                    log.error("sample store: purge failed: %s", type(exc).__name__)
                    self._last_purge = self.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.purge_interval_s)
            self._wake.clear()
            await self.flush()
