"""The SQLite store's change detection sleeps on a watch of the database's directory instead of
reading `data_version` every 20 ms (`prompt_registry.file_watch`): an idle subscription reads
nothing, and a commit through another connection is still announced, with the safety-net poll
set far beyond the test. Proven by counts of reads and by the announcement, not by timing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from prompt_registry.file_watch import DirectoryWatch
from prompt_registry.models import PromptSpec
from prompt_registry.sqlite_store import SqlitePromptStore

pytestmark = pytest.mark.skipif(DirectoryWatch.open(Path("."), set()) is None,
                                reason="no inotify here: the store polls every poll_s")

NEVER = 3600.0  # the idle safety-net poll: never reached in these tests


def test_an_idle_subscription_reads_nothing(tmp_path: Path) -> None:
    store = SqlitePromptStore(tmp_path / "registry.db")
    (tmp_path / "unrelated.txt").write_text("a write to another file of the directory")
    sub = store.subscribe(lambda _name: None, idle_poll_s=NEVER)
    try:
        time.sleep(0.5)  # the old loop read data_version ~25 times in this half second
        assert sub.checks == 0  # type: ignore[attr-defined]
    finally:
        sub.close()
        store.close()


def test_a_commit_through_another_connection_is_announced(tmp_path: Path, example_spec: PromptSpec) -> None:
    watcher = SqlitePromptStore(tmp_path / "registry.db")
    writer = SqlitePromptStore(tmp_path / "registry.db")  # its commits reach the watcher only by the file
    got = threading.Event()
    sub = watcher.subscribe(lambda name: got.set() if name is None else None, idle_poll_s=NEVER)
    try:
        writer.publish(example_spec, actor="a")
        assert got.wait(30), "the commit was not announced"
        assert watcher.versions(example_spec.name) == [1]
    finally:
        sub.close()
        watcher.close()
        writer.close()


def test_close_stops_the_thread_blocked_on_the_watch(tmp_path: Path) -> None:
    store = SqlitePromptStore(tmp_path / "registry.db")
    sub = store.subscribe(lambda _name: None, idle_poll_s=NEVER)
    sub.close()
    assert not sub._thread.is_alive()  # type: ignore[attr-defined]
    assert sub._watch.closed  # type: ignore[attr-defined]
    store.close()
