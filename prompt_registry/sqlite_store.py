"""Embedded prompt store on SQLite: the zero-set-up default.

One file (WAL mode) holds the tables `versions` (name, version, content hash, spec JSON),
`labels` (name, label → version), `scorecards` ((name, version, dataset sha256) → record),
`gate_policies` (name → gate policy record, revision), `four_eyes` (name → four-eyes setting
and approval requests, revision), `version_lifecycle` (name → deprecated/blocked versions,
revision), rollouts, API keys and `audit`. Every write is one `BEGIN IMMEDIATE` transaction,
so version numbering, the version row and its audit entry land together or not at all, and label
compare-and-set is atomic across processes sharing the file.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import orjson

from prompt_registry.errors import (
    ApprovalConflict,
    GatePolicyConflict,
    LabelConflict,
    LifecycleConflict,
    PromptNotFound,
    StoreUnavailable,
)
from prompt_registry.file_watch import DirectoryWatch
from prompt_registry.gates import (
    FourEyesRecord,
    GatePolicy,
    ScorecardRecord,
    check_four_eyes_action,
    check_recorded_action,
    check_scorecard_version,
    scorecard_audit_note,
)
from prompt_registry.keys import ApiKeyRecord
from prompt_registry.lifecycle import LifecycleRecord
from prompt_registry.models import PromptSpec, PromptVersion
from prompt_registry.rollouts import Rollout, RolloutConflict
from prompt_registry.store import AuditEntry, PublishResult, Subscription

__all__ = ["SqlitePromptStore"]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _wrap_errors(
    fn: Callable[Concatenate[SqlitePromptStore, _P], _R],
) -> Callable[Concatenate[SqlitePromptStore, _P], _R]:
    """SQLite failures (locked past the timeout, disk gone) surface as StoreUnavailable.

    Typed with ParamSpec so the wrapped method keeps its signature: an untyped decorator made
    every method `Callable[..., Any]` to mypy, which then matched any store protocol."""

    @functools.wraps(fn)
    def wrapper(self: SqlitePromptStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"prompt store {self._path}: {exc}") from exc

    return wrapper

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL,
    spec TEXT NOT NULL, created_at TEXT NOT NULL, created_by TEXT NOT NULL,
    PRIMARY KEY (name, version), UNIQUE (name, content_hash)
);
CREATE TABLE IF NOT EXISTS labels (
    name TEXT NOT NULL, label TEXT NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (name, label)
);
CREATE TABLE IF NOT EXISTS rollouts (
    name TEXT PRIMARY KEY, record TEXT NOT NULL, revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_stats (
    rollout_id TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, key)
);
CREATE TABLE IF NOT EXISTS rollout_flips (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id TEXT NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS verdict_memos (
    request_id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL
);
-- Expired memos are deleted at every flush: without this index that DELETE scanned the whole
-- table (a week of canary traffic) once a second.
CREATE INDEX IF NOT EXISTS verdict_memos_expiry ON verdict_memos (expires_at);
CREATE TABLE IF NOT EXISTS scorecards (
    name TEXT NOT NULL, version INTEGER NOT NULL, dataset_sha256 TEXT NOT NULL,
    record TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (name, version, dataset_sha256)
);
CREATE TABLE IF NOT EXISTS gate_policies (
    name TEXT PRIMARY KEY, record TEXT NOT NULL, revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS four_eyes (
    name TEXT PRIMARY KEY, record TEXT NOT NULL, revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS version_lifecycle (
    name TEXT PRIMARY KEY, record TEXT NOT NULL, revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, name TEXT NOT NULL, label TEXT, from_version INTEGER,
    to_version INTEGER, note TEXT NOT NULL
);
"""


def _now() -> datetime:
    return datetime.now(UTC)


class SqlitePromptStore:
    """Thread-safe SQLite store. One connection per thread; writes serialised by SQLite."""

    def __init__(self, path: Path | str) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._subscribers: list[_SqliteSubscription] = []
        self._con().executescript(_SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(self._path, timeout=10.0, isolation_level=None,
                                      check_same_thread=False)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open prompt store {self._path}: {exc}") from exc
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=10000")
            self._local.con = con
        return con

    class _Tx:
        def __init__(self, con: sqlite3.Connection) -> None:
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, exc_type: object, *_: object) -> None:
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> SqlitePromptStore._Tx:
        return self._Tx(self._con())

    @staticmethod
    def _row_to_version(row: tuple[str, int, str, str, str, str]) -> PromptVersion:
        _name, version, content_hash, spec, created_at, created_by = row
        return PromptVersion(
            spec=PromptSpec.model_validate(orjson.loads(spec)), version=version,
            content_hash=content_hash, created_at=datetime.fromisoformat(created_at),
            created_by=created_by,
        )

    # -- reader ---------------------------------------------------------------------------
    @_wrap_errors
    def get_version(self, name: str, version: int) -> PromptVersion:
        row = self._con().execute(
            "SELECT name, version, content_hash, spec, created_at, created_by FROM versions "
            "WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no version {version}")
        return self._row_to_version(row)

    @_wrap_errors
    def resolve(self, name: str, label: str) -> PromptVersion:
        row = self._con().execute(
            "SELECT v.name, v.version, v.content_hash, v.spec, v.created_at, v.created_by "
            "FROM labels l JOIN versions v ON v.name=l.name AND v.version=l.version "
            "WHERE l.name=? AND l.label=?", (name, label)).fetchone()
        if row is None:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no label {label!r}")
        return self._row_to_version(row)

    @_wrap_errors
    def list_prompts(self) -> list[str]:
        rows = self._con().execute("SELECT DISTINCT name FROM versions ORDER BY name").fetchall()
        return [r[0] for r in rows]

    @_wrap_errors
    def labels(self, name: str) -> dict[str, int]:
        rows = self._con().execute(
            "SELECT label, version FROM labels WHERE name=? ORDER BY label", (name,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def _exists(self, name: str) -> bool:
        return self._con().execute(
            "SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone() is not None

    # -- writer ---------------------------------------------------------------------------
    @_wrap_errors
    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult:
        spec.check_renders()  # publish-time only: versions already stored keep loading
        digest = spec.content_hash()
        with self._tx() as con:
            row = con.execute(
                "SELECT name, version, content_hash, spec, created_at, created_by FROM versions "
                "WHERE name=? AND content_hash=?", (spec.name, digest)).fetchone()
            if row is not None:
                return PublishResult(version=self._row_to_version(row), created=False)
            (latest,) = con.execute(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE name=?", (spec.name,)
            ).fetchone()
            now = _now()
            version = PromptVersion(spec=spec, version=latest + 1, content_hash=digest,
                                    created_at=now, created_by=actor)
            con.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?)",
                (spec.name, version.version, digest, orjson.dumps(spec.model_dump(mode="json")).decode(),
                 now.isoformat(), actor))
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (now.isoformat(), actor, "publish", spec.name, None, None, version.version,
                 note or spec.policy.change_note))
        self._notify(spec.name)
        return PublishResult(version=version, created=True)

    @_wrap_errors
    def set_label(self, name: str, label: str, version: int, *, expected: int | None = None,
                  actor: str, note: str = "") -> int | None:
        with self._tx() as con:
            if con.execute("SELECT 1 FROM versions WHERE name=? AND version=?",
                           (name, version)).fetchone() is None:
                if not self._exists(name):
                    raise PromptNotFound(f"unknown prompt {name!r}")
                raise PromptNotFound(f"prompt {name!r} has no version {version}")
            row = con.execute("SELECT version FROM labels WHERE name=? AND label=?",
                              (name, label)).fetchone()
            previous = row[0] if row else None
            if expected is not None and (previous or 0) != expected:
                raise LabelConflict(
                    f"label {label!r} of {name!r} points at {previous}, not {expected}")
            con.execute("INSERT INTO labels VALUES (?,?,?) ON CONFLICT(name, label) "
                        "DO UPDATE SET version=excluded.version", (name, label, version))
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, "label", name, label, previous, version, note))
        self._notify(name)
        return previous

    @_wrap_errors
    def record_audit(self, name: str, action: str, *, label: str | None = None,
                     from_version: int | None = None, to_version: int | None = None,
                     actor: str, note: str = "") -> None:
        check_recorded_action(action)
        with self._tx() as con:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, action, name, label, from_version, to_version, note))
        self._notify(name)

    @_wrap_errors
    def audit(self, name: str) -> list[AuditEntry]:
        rows = self._con().execute(
            "SELECT at, actor, action, name, label, from_version, to_version, note FROM audit "
            "WHERE name=? ORDER BY id", (name,)).fetchall()
        return [AuditEntry(at=datetime.fromisoformat(r[0]), actor=r[1], action=r[2], prompt=r[3],
                           label=r[4], from_version=r[5], to_version=r[6], note=r[7]) for r in rows]

    @_wrap_errors
    def get_rollout(self, prompt: str) -> Rollout | None:
        row = self._con().execute("SELECT record FROM rollouts WHERE name=?", (prompt,)).fetchone()
        return Rollout.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def list_rollouts(self) -> list[Rollout]:
        rows = self._con().execute("SELECT record FROM rollouts ORDER BY name").fetchall()
        return [Rollout.model_validate_json(r[0]) for r in rows]

    @_wrap_errors
    def put_rollout(self, rollout: Rollout, *, expected_revision: int | None, actor: str,
                    note: str = "") -> None:
        with self._tx() as con:
            row = con.execute("SELECT record, revision FROM rollouts WHERE name=?",
                              (rollout.prompt,)).fetchone()
            current = Rollout.model_validate_json(row[0]) if row else None
            if expected_revision is None:
                if current is not None and current.active:
                    raise RolloutConflict(f"prompt {rollout.prompt!r} already has an active rollout "
                                          f"({current.id}, {current.state})")
            elif current is None or current.id != rollout.id or row[1] != expected_revision:
                raise RolloutConflict(f"rollout of {rollout.prompt!r} changed concurrently "
                                      f"(expected revision {expected_revision})")
            con.execute("INSERT INTO rollouts VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET "
                        "record=excluded.record, revision=excluded.revision",
                        (rollout.prompt, rollout.model_dump_json(), rollout.revision))
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, "rollout", rollout.prompt, rollout.state,
                 rollout.stable_version, rollout.canary_version, note))
        self._notify(rollout.prompt)

    @_wrap_errors
    def put_scorecard(self, record: ScorecardRecord, *, actor: str, note: str = "") -> bool:
        name, version = record.prompt, record.version
        with self._tx() as con:
            row = con.execute("SELECT content_hash FROM versions WHERE name=? AND version=?",
                              (name, version)).fetchone()
            if row is None:
                if not self._exists(name):
                    raise PromptNotFound(f"unknown prompt {name!r}")
                raise PromptNotFound(f"prompt {name!r} has no version {version}")
            check_scorecard_version(record, row[0])
            replaced = con.execute(
                "SELECT 1 FROM scorecards WHERE name=? AND version=? AND dataset_sha256=?",
                (name, version, record.dataset_sha256)).fetchone() is not None
            con.execute("INSERT INTO scorecards VALUES (?,?,?,?,?) ON CONFLICT(name, version, "
                        "dataset_sha256) DO UPDATE SET record=excluded.record, "
                        "created_at=excluded.created_at",
                        (name, version, record.dataset_sha256, record.model_dump_json(),
                         record.created_at.isoformat()))
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, "scorecard", name, None, None, version,
                 scorecard_audit_note(record, note, replaced=replaced)))
        self._notify(name)
        return replaced

    @_wrap_errors
    def get_scorecard(self, name: str, version: int, dataset_sha256: str) -> ScorecardRecord | None:
        row = self._con().execute(
            "SELECT record FROM scorecards WHERE name=? AND version=? AND dataset_sha256=?",
            (name, version, dataset_sha256)).fetchone()
        return ScorecardRecord.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def list_scorecards(self, name: str, version: int | None = None) -> list[ScorecardRecord]:
        if version is None:
            rows = self._con().execute("SELECT record FROM scorecards WHERE name=?", (name,)).fetchall()
        else:
            rows = self._con().execute("SELECT record FROM scorecards WHERE name=? AND version=?",
                                       (name, version)).fetchall()
        records = [ScorecardRecord.model_validate_json(r[0]) for r in rows]
        return sorted(records, key=lambda r: (r.version, r.created_at, r.dataset_sha256))

    @_wrap_errors
    def get_gate_policy(self, name: str) -> GatePolicy | None:
        row = self._con().execute("SELECT record FROM gate_policies WHERE name=?", (name,)).fetchone()
        return GatePolicy.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def put_gate_policy(self, policy: GatePolicy, *, expected_revision: int, actor: str,
                        note: str = "") -> None:
        self._put_revisioned("gate_policies", "gate policy", "the gate policy", GatePolicyConflict, policy.prompt,
                             policy.model_dump_json(), policy.revision, expected_revision,
                             audit=(actor, "gate_policy", "gate-policy", None, None, note))

    @_wrap_errors
    def get_lifecycle(self, name: str) -> LifecycleRecord | None:
        row = self._con().execute("SELECT record FROM version_lifecycle WHERE name=?", (name,)).fetchone()
        return LifecycleRecord.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def put_lifecycle(self, record: LifecycleRecord, *, expected_revision: int, actor: str,
                      version: int, note: str = "") -> None:
        self._put_revisioned("version_lifecycle", "lifecycle", "the version states", LifecycleConflict,
                             record.prompt, record.model_dump_json(), record.revision, expected_revision,
                             audit=(actor, "lifecycle", None, None, version, note))

    @_wrap_errors
    def get_four_eyes(self, name: str) -> FourEyesRecord | None:
        row = self._con().execute("SELECT record FROM four_eyes WHERE name=?", (name,)).fetchone()
        return FourEyesRecord.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def put_four_eyes(self, record: FourEyesRecord, *, expected_revision: int, actor: str,
                      action: str, label: str | None = None, from_version: int | None = None,
                      to_version: int | None = None, note: str = "") -> None:
        check_four_eyes_action(action)
        self._put_revisioned("four_eyes", "four-eyes", "the four-eyes record", ApprovalConflict, record.prompt,
                             record.model_dump_json(), record.revision, expected_revision,
                             audit=(actor, action, label, from_version, to_version, note))

    def _put_revisioned(self, table: str, noun: str, what: str, conflict: type[LabelConflict], name: str,
                        record_json: str, revision: int, expected_revision: int, *,
                        audit: tuple[str, str, str | None, int | None, int | None, str]) -> None:
        """One per-prompt record (gate policy, four eyes, version states) written by compare-and-set on its
        revision, with its audit entry, in one transaction; then announced."""
        if revision != expected_revision + 1:
            raise conflict(f"{noun} revision {revision} does not follow "
                           f"revision {expected_revision}")
        with self._tx() as con:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            row = con.execute(f"SELECT revision FROM {table} WHERE name=?", (name,)).fetchone()  # noqa: S608 - table is ours
            current = row[0] if row else 0
            if current != expected_revision:
                raise conflict(f"{what} of {name!r} is at revision {current}, not "
                               f"{expected_revision} (changed concurrently)")
            con.execute(f"INSERT INTO {table} VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET "  # noqa: S608
                        "record=excluded.record, revision=excluded.revision",
                        (name, record_json, revision))
            actor, action, label, from_version, to_version, note = audit
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, action, name, label, from_version, to_version, note))
        self._notify(name)

    @_wrap_errors
    def add_rollout_stats(self, rollout_id: str, counters: dict[str, int],
                          flips: list[str] | None = None, *, keep_flips: int = 500) -> None:
        with self._tx() as con:
            con.executemany(
                "INSERT INTO rollout_stats VALUES (?,?,?) ON CONFLICT(rollout_id, key) "
                "DO UPDATE SET value = value + excluded.value",
                [(rollout_id, k, v) for k, v in counters.items()])
            if flips:
                con.executemany("INSERT INTO rollout_flips (rollout_id, record) VALUES (?,?)",
                                [(rollout_id, f) for f in flips])
                con.execute("DELETE FROM rollout_flips WHERE rollout_id=? AND id NOT IN (SELECT id "
                            "FROM rollout_flips WHERE rollout_id=? ORDER BY id DESC LIMIT ?)",
                            (rollout_id, rollout_id, keep_flips))

    @_wrap_errors
    def rollout_stats(self, rollout_id: str) -> dict[str, int]:
        rows = self._con().execute("SELECT key, value FROM rollout_stats WHERE rollout_id=?",
                                   (rollout_id,)).fetchall()
        return {k: v for k, v in rows}

    @_wrap_errors
    def rollout_flips(self, rollout_id: str, limit: int = 100) -> list[str]:
        rows = self._con().execute("SELECT record FROM rollout_flips WHERE rollout_id=? "
                                   "ORDER BY id DESC LIMIT ?", (rollout_id, limit)).fetchall()
        return [r[0] for r in rows]

    @_wrap_errors
    def remember_verdicts(self, memos: dict[str, str], *, ttl_s: float) -> None:
        now = time.time()
        with self._tx() as con:
            con.executemany("INSERT OR REPLACE INTO verdict_memos VALUES (?,?,?)",
                            [(rid, rec, now + ttl_s) for rid, rec in memos.items()])
            con.execute("DELETE FROM verdict_memos WHERE expires_at < ?", (now,))

    @_wrap_errors
    def recall_verdict(self, request_id: str) -> str | None:
        row = self._con().execute("SELECT record FROM verdict_memos WHERE request_id=? AND expires_at >= ?",
                                  (request_id, time.time())).fetchone()
        return row[0] if row else None

    @_wrap_errors
    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self._con().execute("SELECT record FROM api_keys WHERE key_id=?", (key_id,)).fetchone()
        return ApiKeyRecord.model_validate_json(row[0]) if row else None

    @_wrap_errors
    def put_key(self, record: ApiKeyRecord) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO api_keys VALUES (?,?) ON CONFLICT(key_id) DO UPDATE SET "
                        "record=excluded.record", (record.key_id, record.model_dump_json()))

    @_wrap_errors
    def list_keys(self) -> list[ApiKeyRecord]:
        rows = self._con().execute("SELECT record FROM api_keys ORDER BY key_id").fetchall()
        return [ApiKeyRecord.model_validate_json(r[0]) for r in rows]

    @_wrap_errors
    def versions(self, name: str) -> list[int]:
        rows = self._con().execute(
            "SELECT version FROM versions WHERE name=? ORDER BY version", (name,)).fetchall()
        return [r[0] for r in rows]

    def ping(self) -> None:
        self.list_prompts()

    def subscribe(self, callback: Callable[[str | None], None], *,
                  poll_s: float = 0.02, idle_poll_s: float = 1.0) -> Subscription:
        """Changes made in this process are announced at once; changes by other processes
        sharing the file are noticed by reading SQLite's `data_version` (one `PRAGMA`, no disk
        I/O: the shared-memory WAL index).

        When: on Linux the thread sleeps on an inotify watch of the database's directory and
        reads `data_version` when the database or its WAL is written, then again after 1, 2,
        4 ... ms up to every `poll_s` for `_SETTLE_S` (the WAL is written before the commit
        completes), and otherwise every `idle_poll_s` only (a safety net: ~1 wake-up a second
        instead of ~50). Without inotify it reads every `poll_s`. 20 ms: the worker processes of one gateway
        (`gateway.workers`) must see a publish made through any of them within 50 ms (p95;
        `benchmarks/publish_visibility.py --sqlite`), and detection plus the cache's re-read
        must fit."""
        sub = _SqliteSubscription(self._path, callback, poll_s, idle_poll_s)
        self._subscribers.append(sub)
        return sub

    def _notify(self, name: str) -> None:
        for sub in list(self._subscribers):
            sub.notify(name)

    def close(self) -> None:
        for sub in self._subscribers:
            sub.close()
        self._subscribers.clear()
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


# After a write to the database's files, read data_version again and again for this long (the
# commit that follows a WAL write, an fsync on a loaded disk included, completes within it):
# first after _FIRST_RECHECK_S, each wait twice the last, at most poll_s.
_SETTLE_S = 1.0
_FIRST_RECHECK_S = 0.001


class _SqliteSubscription:
    def __init__(self, path: str, callback: Callable[[str | None], None], poll_s: float,
                 idle_poll_s: float) -> None:
        self._path = path
        self._callback = callback
        self._poll_s = poll_s
        self._idle_poll_s = max(idle_poll_s, poll_s)
        self._settle_until = 0.0
        self._recheck_s = _FIRST_RECHECK_S
        self._stop = threading.Event()
        self.checks = 0  # data_version reads so far (tests count them)
        db = Path(path)  # watched before the starting point is read: no write falls in between
        self._watch = DirectoryWatch.open(
            db.parent, {db.name, f"{db.name}-wal", f"{db.name}-journal"}) if path != ":memory:" else None
        # Read the starting point before returning, so every commit after subscribe() is seen.
        self._con: sqlite3.Connection | None = None
        self._last: int | None = None
        try:
            self._con = sqlite3.connect(path, timeout=1.0, check_same_thread=False)
            self._last = self._con.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            self._con = None
        self._thread = threading.Thread(target=self._run, name="modgate-registry-poll", daemon=True)
        self._thread.start()

    def notify(self, name: str) -> None:
        self._callback(name)

    def _wait(self) -> None:
        """Sleep until the next read is due: on the watch, `_FIRST_RECHECK_S` after a write to
        the files, then twice as long each time up to `poll_s` until `_SETTLE_S` has passed
        (the commit completes after its WAL write and the fsync that follows), then
        `idle_poll_s`. Without a watch, `poll_s`."""
        watch = self._watch
        if watch is None:
            self._stop.wait(self._poll_s)
            return
        settling = time.monotonic() < self._settle_until
        if watch.wait(self._recheck_s if settling else self._idle_poll_s):
            self._settle_until = time.monotonic() + _SETTLE_S
            self._recheck_s = _FIRST_RECHECK_S
        elif settling:
            self._recheck_s = min(2 * self._recheck_s, self._poll_s)

    def _run(self) -> None:
        con, last = self._con, self._last
        while True:
            self._wait()
            if self._stop.is_set():
                break
            self.checks += 1
            try:
                if con is None:
                    con = sqlite3.connect(self._path, timeout=1.0, check_same_thread=False)
                (version,) = con.execute("PRAGMA data_version").fetchone()
            except sqlite3.Error:
                con = None
                last = None  # after reconnecting, announce "anything may have changed" once
                continue
            if last is None or version != last:
                self._callback(None)
            last = version
        if con is not None:
            con.close()

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.interrupt()
        self._thread.join(timeout=5)
        if self._watch is not None and not self._thread.is_alive():
            self._watch.close()
