"""Write-behind metric files (`gateway.metric_files`), the value class of the worker processes of
a multi-worker gateway: a change of a metric does not touch the file (that per-change write made
CPU per request higher with two workers than with one); a flush writes each changed value once;
what prometheus-client's `MultiProcessCollector` reads after a flush (or after close) equals what
the metrics were given. Proven by counting file writes, not by timing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.metric_files import WriteBehind


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every `MmapedDict.write_value` of the test, by key."""
    seen: list[str] = []
    original = MmapedDict.write_value

    def counting(self: MmapedDict, key: str, value: float, timestamp: float) -> None:
        seen.append(key)
        original(self, key, value, timestamp)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(MmapedDict, "write_value", counting)
    return seen


@pytest.fixture
def writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteBehind]:
    # A flush interval the test never reaches: only explicit flushes write.
    wb = WriteBehind(str(tmp_path), flush_s=3600)
    monkeypatch.setattr(values, "ValueClass", wb.value_class)
    yield wb
    wb.close()


def _scrape(directory: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    return {s.name + str(sorted(s.labels.items())): s.value
            for m in registry.collect() for s in m.samples}


def _metrics() -> tuple[Counter, Histogram, Gauge]:
    r = CollectorRegistry()
    return (Counter("t_requests", "requests", ["code"], registry=r),
            Histogram("t_seconds", "stage time", ["stage"], buckets=(0.01, 0.1, 1.0), registry=r),
            Gauge("t_inflight", "in flight", registry=r, multiprocess_mode="livesum"))


def test_changes_do_not_write_the_files_until_a_flush(writer: WriteBehind, writes: list[str],
                                                      tmp_path: Path) -> None:
    requests, seconds, inflight = _metrics()
    ok, stage = requests.labels(code="200"), seconds.labels(stage="backend")
    for i in range(500):
        inflight.inc()
        ok.inc()
        stage.observe(0.05 if i % 2 else 0.5)
        inflight.dec()
    assert writes == []  # the old value class wrote 500 * 5 times
    before = _scrape(tmp_path)
    assert before["t_requests_total[('code', '200')]"] == 0  # the entry exists, its figure is not out yet

    writer.flush()
    # One write per value that changed: the counter, the histogram's sum and its two buckets
    # hit; the gauge is back at 0, which is what its file holds already.
    assert sorted(writes) == sorted(set(writes)) and len(writes) == 4
    after = _scrape(tmp_path)
    assert after["t_requests_total[('code', '200')]"] == 500
    assert after["t_seconds_count[('stage', 'backend')]"] == 500
    assert after["t_seconds_bucket[('le', '0.1'), ('stage', 'backend')]"] == 250
    assert after["t_seconds_sum[('stage', 'backend')]"] == pytest.approx(250 * 0.05 + 250 * 0.5)
    assert after["t_inflight[]"] == 0

    writes.clear()
    writer.flush()
    assert writes == []  # nothing changed since


def test_close_writes_what_is_left_and_a_gauge_set_keeps_its_value(writer: WriteBehind,
                                                                   tmp_path: Path) -> None:
    requests, _, inflight = _metrics()
    requests.labels(code="429").inc(3)
    inflight.set(7)
    writer.close()
    got = _scrape(tmp_path)
    assert got["t_requests_total[('code', '429')]"] == 3
    assert got["t_inflight[]"] == 7


def test_the_values_read_back_what_the_file_holds(writer: WriteBehind, tmp_path: Path) -> None:
    """A value made again for a key already in this process's file starts from the file's figure
    (prometheus-client's own class does the same), so a flush never writes a counter backwards."""
    requests, _, _ = _metrics()
    requests.labels(code="200").inc(5)
    writer.flush()
    again = Counter("t_requests", "requests", ["code"], registry=CollectorRegistry())
    assert again.labels(code="200")._value.get() == 5
