"""Embedded prompt store on SQLite: the zero-set-up default.

One file (WAL mode) holds three tables: `versions` (name, version, content hash, spec JSON),
`labels` (name, label → version) and `audit`. Every write is one `BEGIN IMMEDIATE` transaction,
so version numbering, the version row and its audit entry land together or not at all, and label
compare-and-set is atomic across processes sharing the file.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import orjson

from prompt_registry.errors import LabelConflict, PromptNotFound, StoreUnavailable
from prompt_registry.models import PromptSpec, PromptVersion
from prompt_registry.store import AuditEntry, PublishResult

__all__ = ["SqlitePromptStore"]

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
    def get_version(self, name: str, version: int) -> PromptVersion:
        row = self._con().execute(
            "SELECT name, version, content_hash, spec, created_at, created_by FROM versions "
            "WHERE name=? AND version=?", (name, version)).fetchone()
        if row is None:
            if not self._exists(name):
                raise PromptNotFound(f"unknown prompt {name!r}")
            raise PromptNotFound(f"prompt {name!r} has no version {version}")
        return self._row_to_version(row)

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

    def list_prompts(self) -> list[str]:
        rows = self._con().execute("SELECT DISTINCT name FROM versions ORDER BY name").fetchall()
        return [r[0] for r in rows]

    def labels(self, name: str) -> dict[str, int]:
        rows = self._con().execute(
            "SELECT label, version FROM labels WHERE name=? ORDER BY label", (name,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def _exists(self, name: str) -> bool:
        return self._con().execute(
            "SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone() is not None

    # -- writer ---------------------------------------------------------------------------
    def publish(self, spec: PromptSpec, *, actor: str, note: str = "") -> PublishResult:
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
        return PublishResult(version=version, created=True)

    def set_label(self, name: str, label: str, version: int, *, expected: int | None = None,
                  actor: str, note: str = "") -> int | None:
        with self._tx() as con:
            if con.execute("SELECT 1 FROM versions WHERE name=? AND version=?",
                           (name, version)).fetchone() is None:
                raise PromptNotFound(f"prompt {name!r} has no version {version}")
            row = con.execute("SELECT version FROM labels WHERE name=? AND label=?",
                              (name, label)).fetchone()
            previous = row[0] if row else None
            if expected is not None and previous != expected:
                raise LabelConflict(
                    f"label {label!r} of {name!r} points at {previous}, not {expected}")
            con.execute("INSERT INTO labels VALUES (?,?,?) ON CONFLICT(name, label) "
                        "DO UPDATE SET version=excluded.version", (name, label, version))
            con.execute(
                "INSERT INTO audit (at, actor, action, name, label, from_version, to_version, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (_now().isoformat(), actor, "label", name, label, previous, version, note))
        return previous

    def audit(self, name: str) -> list[AuditEntry]:
        rows = self._con().execute(
            "SELECT at, actor, action, name, label, from_version, to_version, note FROM audit "
            "WHERE name=? ORDER BY id", (name,)).fetchall()
        return [AuditEntry(at=datetime.fromisoformat(r[0]), actor=r[1], action=r[2], prompt=r[3],
                           label=r[4], from_version=r[5], to_version=r[6], note=r[7]) for r in rows]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
