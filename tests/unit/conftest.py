"""Fixtures shared by the gateway's unit tests: a seeded SQLite registry, a caller key and a
fake backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlitePromptStore]:
    """The registry as `modgate up` seeds it: configs/prompts published, production -> v1."""
    s = SqlitePromptStore(tmp_path / "r.db")
    seed_store(s, ROOT / "configs" / "prompts")
    yield s
    s.close()


@pytest.fixture
def caller_key(store: SqlitePromptStore) -> str:
    """An API key with the `moderate` scope."""
    key, record = generate_key("svc-listing", ["moderate"], created_by="test")
    store.put_key(record)
    return key
