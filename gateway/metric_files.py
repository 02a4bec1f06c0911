"""Write-behind metric files for the worker processes of one gateway (`gateway.workers` above 1).

In multiprocess mode prometheus-client keeps every metric value of a process in a memory-mapped
file of the run directory, so whichever worker answers `/metrics` can sum them all. Its own
value class writes the file on every change: a process-wide lock, a pid check and a struct pack
into the map, ~1.4 µs against ~0.4 µs for the single-process value, and a moderation changes
~22 values (stage histograms, request, verdict and token counters, the in-flight gauge). That
made CPU per request higher with two workers than with one (issue 20's target: no higher).

`install()` replaces the value class with one that changes an in-memory float under its own
lock, exactly as the single-process value does, and a thread of this module copies the values
that changed into the same files every `FLUSH_S` (and at exit, and before this worker answers a
scrape). The files, their names and their layout are prometheus-client's, so its
`MultiProcessCollector` and `mark_process_dead` read and clean them as before.

The price: another worker's figures in a scrape are up to `FLUSH_S` old (Prometheus scrapes
every 15 s or more), and a worker killed outright loses its last `FLUSH_S` of increments; a
worker that stops (SIGTERM, Ctrl-C, an exception) writes everything first.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any, ClassVar

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

__all__ = ["FLUSH_S", "WriteBehind", "flush", "install"]

FLUSH_S = 1.0

_installed: WriteBehind | None = None


class _Value:
    """One metric value: a float in memory, copied to its process's file by `WriteBehind`."""

    _multiprocess = True  # read by prometheus-client (no exemplars in multiprocess mode)
    owner: ClassVar[WriteBehind]

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any,
                 help_text: str, multiprocess_mode: str = "", **_: Any) -> None:
        prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._lock = threading.Lock()
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._file, (self._value, self._timestamp) = self.owner.register(self, prefix, self._key)
        self._written = (self._value, self._timestamp)

    def inc(self, amount: float) -> None:
        with self._lock:
            self._value += amount
            self._timestamp = 0.0

    def set(self, value: float, timestamp: float | None = None) -> None:
        with self._lock:
            self._value = value
            self._timestamp = timestamp or 0.0

    def set_exemplar(self, exemplar: Any) -> None:
        return None

    def get(self) -> float:
        with self._lock:
            return self._value

    def get_exemplar(self) -> None:
        return None

    def write(self) -> None:
        """Copy the value into the file if it changed (the caller holds the owner's lock)."""
        with self._lock:
            state = (self._value, self._timestamp)
        if state != self._written:
            self._file.write_value(self._key, *state)  # type: ignore[no-untyped-call]
            self._written = state


class WriteBehind:
    """This process's metric files in *directory* and the thread that keeps them current."""

    def __init__(self, directory: str, *, flush_s: float = FLUSH_S) -> None:
        self.directory = directory
        self.flush_s = flush_s
        self._pid = os.getpid()
        self._files: dict[str, MmapedDict] = {}
        self._values: list[_Value] = []
        self._lock = threading.Lock()  # the files (MmapedDict is not thread-safe) and _values
        self._stop = threading.Event()
        self.value_class: type[_Value] = type("WriteBehindValue", (_Value,), {"owner": self})
        self._thread = threading.Thread(target=self._run, name="modgate-metrics-flush", daemon=True)
        self._thread.start()

    def register(self, value: _Value, prefix: str, key: str) -> tuple[MmapedDict, tuple[float, float]]:
        """The file *value* lives in and its current (value, timestamp) there (a new entry is
        written at once, so a labelled child shows in scrapes from its creation, as before)."""
        with self._lock:
            f = self._files.get(prefix)
            if f is None:
                path = os.path.join(self.directory, f"{prefix}_{self._pid}.db")
                f = self._files[prefix] = MmapedDict(path)  # type: ignore[no-untyped-call]
            self._values.append(value)
            return f, f.read_value(key)  # type: ignore[no-untyped-call]

    def flush(self) -> None:
        with self._lock:
            for value in self._values:
                value.write()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write every value (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()


def install(directory: str, *, flush_s: float = FLUSH_S) -> WriteBehind:
    """Every metric value created from now on in this process is write-behind, in *directory*
    (the run's `PROMETHEUS_MULTIPROC_DIR`). Call before the gateway builds its metrics; values
    made earlier keep prometheus-client's own class. Written out at interpreter exit too."""
    global _installed
    if _installed is not None:
        raise RuntimeError("write-behind metric files are already installed in this process")
    _installed = WriteBehind(directory, flush_s=flush_s)
    values.ValueClass = _installed.value_class
    atexit.register(_installed.close)
    return _installed


def flush() -> None:
    """Write this process's changed values now (before a scrape); nothing when not installed."""
    if _installed is not None:
        _installed.flush()
