"""The listing-content sample store (`gateway.samples`): opt-in, a stable share of items,
retention, deletion by item id, scopes, a bounded queue that never blocks a request, and
content that never reaches logs, spans or metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.decision_log import DecisionLog
from gateway.feedback import FeedbackLog
from gateway.samples import (
    RedisSampleStore,
    Sample,
    SampleRecorder,
    SampleSettings,
    SampleStore,
    SqliteSampleStore,
    content_for,
    is_sampled,
    open_sample_store,
)
from gateway.telemetry import Metrics, TracingSettings, build_tracer_provider
from prompt_registry.keys import generate_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend

MARK_TITLE = "ZQX-unmistakable-title-7731"
MARK_DESC = "QJV-unmistakable-description-5520 微信联系"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _sample(rid: str, item: str, ts: datetime, decision: str = "allow",
            category: str | None = None) -> Sample:
    return Sample(request_id=rid, item_id=item, ts=ts, prompt="listing-moderation", version=1,
                  arm="stable", locale="en-US", decision=decision, category=category,
                  confidence=0.9, content={"title": f"title {rid}", "description": "d"})


def test_the_share_is_a_stable_hash_of_the_item_id() -> None:
    ids = [f"item-{i}" for i in range(20_000)]
    picked = [i for i in ids if is_sampled(i, 0.05)]
    assert 0.04 < len(picked) / len(ids) < 0.06
    assert picked == [i for i in ids if is_sampled(i, 0.05)]  # the same items every time
    assert set(picked) <= {i for i in ids if is_sampled(i, 0.2)}  # a larger share keeps them
    assert all(is_sampled(i, 1.0) for i in ids[:10])


def test_off_by_default_and_nothing_is_opened(tmp_path: Path) -> None:
    assert SampleSettings().enabled is False
    assert open_sample_store(SampleSettings(), tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert content_for(None, request_ids=["r"]) == {}


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., SampleStore]:
    """Both stores pass the same tests (Redis: a real redis-server, a fresh key prefix)."""
    if request.param == "sqlite":
        return lambda **kw: SqliteSampleStore(tmp_path / "s.db", **kw)
    import redis

    server = request.getfixturevalue("redis_server")
    prefix = request.getfixturevalue("redis_prefix")
    return lambda **kw: RedisSampleStore(redis.Redis.from_url(server.url), prefix=prefix, **kw)


def test_retention_hides_and_purges_old_rows_and_delete_is_by_item(
        make_store: Callable[..., SampleStore]) -> None:
    clock = Clock()
    store = make_store(retention_days=14, clock=clock)
    now = clock.now
    store.put_many([_sample("r-old", "item-a", now - timedelta(days=13, hours=23)),
                    _sample("r-new", "item-a", now - timedelta(days=1)),
                    _sample("r-b", "item-b", now - timedelta(hours=1), "block", "counterfeit")])
    clock.now += timedelta(hours=2)  # r-old is now past the 14 days
    assert set(store.by_request(["r-old", "r-new", "r-b"])) == {"r-new", "r-b"}  # before any purge
    assert store.count() == 2
    assert [s.request_id for s in store.recent()] == ["r-b", "r-new"]  # newest first
    assert [s.request_id for s in store.recent(since=now - timedelta(hours=2))] == ["r-b"]
    assert store.recent(prompt="other-prompt") == []
    assert store.by_item(["item-a"])["item-a"].request_id == "r-new"
    assert store.item("item-b")[0].content == {"title": "title r-b", "description": "d"}
    assert store.purge() == 1
    assert content_for(store, item_ids=["item-b"], request_ids=["r-new"]) == {
        "item-b": {"title": "title r-b", "description": "d"},
        "r-new": {"title": "title r-new", "description": "d"}}
    assert store.delete_item("item-a") == 1
    assert store.item("item-a") == [] and store.count() == 1
    clock.now += timedelta(days=14)  # r-b is now past retention too
    assert store.by_request(["r-b"]) == {}
    store.put_many([_sample("r-c", "item-c", clock.now)])
    assert store.purge(everything=True) == 2 and store.count() == 0
    store.close()


def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    metrics = Metrics()
    settings = SampleSettings(enabled=True, share=1.0, queue_max=2)
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "s.db"), settings, registry=metrics.registry)
    ev = _evaluation()
    kept = [recorder.offer(request_id=f"r{i}", item_id=f"i{i}", variables={"title": "t"}, ev=ev,
                           arm="stable") for i in range(5)]
    assert kept == [True, True, False, False, False]
    assert recorder.dropped_count == 3
    assert metrics.registry.get_sample_value("modgate_samples_dropped_total") == 3
    assert not recorder.offer(request_id="s", item_id="i9", variables={}, ev=ev, arm="shadow")
    asyncio.run(recorder.aclose())
    assert metrics.registry.get_sample_value("modgate_samples_recorded_total") == 2
    store = SqliteSampleStore(tmp_path / "s.db")
    assert set(store.by_request(["r0", "r1", "r2"])) == {"r0", "r1"}
    store.close()


def _evaluation():  # type: ignore[no-untyped-def]
    from gateway.pipeline import Evaluation
    from gateway.verdict import Verdict
    from prompt_registry.loader import load_prompt_file
    from prompt_registry.models import PromptVersion
    from serving import ChatResult
    from serving.protocol import Timings

    root = Path(__file__).resolve().parents[2]
    spec = load_prompt_file(root / "configs" / "prompts" / "listing-moderation.yaml")
    version = PromptVersion.model_construct(spec=spec, version=1, content_hash="h",
                                            created_at=datetime.now(UTC), created_by="t")
    return Evaluation(version=version, label="production", arm="stable", locale="en-US",
                      stale=False, verdict=Verdict("allow", None, 0.9),
                      result=ChatResult(text="", finish_reason="stop", prompt_tokens=1,
                                        completion_tokens=1, model="m", timings=Timings(total_ms=1)))


# -- in the gateway --------------------------------------------------------------------------------

class Stack:
    def __init__(self, client: TestClient, exporter: InMemorySpanExporter, metrics: Metrics,
                 tmp_path: Path, recorder: SampleRecorder, keys: dict[str, str]) -> None:
        self.client, self.exporter, self.metrics = client, exporter, metrics
        self.tmp_path, self.recorder, self.keys = tmp_path, recorder, keys

    def h(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[who]}"}

    def flush(self) -> None:
        self.client.portal.call(self.recorder.flush)  # type: ignore[union-attr]
        log = self.client.app.state.gateway.service.decision_log  # type: ignore[attr-defined]
        self.client.portal.call(log.flush)  # type: ignore[union-attr]


@pytest.fixture
def stack(store: SqlitePromptStore, tmp_path: Path) -> Iterator[Stack]:
    keys = {}
    for name, scopes in {"svc": ["moderate"], "reader": ["samples:read"],
                         "deleter": ["samples:delete"], "reviewer": ["feedback"]}.items():
        key, record = generate_key(name, scopes, created_by="test")  # type: ignore[arg-type]
        store.put_key(record)
        keys[name] = key
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(TracingSettings(sample_ratio=1.0), exporter=exporter)  # type: ignore[arg-type]
    metrics = Metrics()
    settings = SampleSettings(enabled=True, share=1.0)
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "samples.db"), settings, registry=metrics.registry)
    app = create_app(GatewaySettings(), store, FakeBackend(), tracer_provider=provider,
                     metrics=metrics, models=["tiny-llama"],
                     decision_log=DecisionLog(tmp_path / "decisions", replica="gw-0"),
                     feedback_log=FeedbackLog(tmp_path / "feedback"), samples=recorder)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Stack(client, exporter, metrics, tmp_path, recorder, keys)


def test_content_is_stored_and_never_reaches_logs_spans_or_metrics(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = stack.client.post("/v1/moderate", headers=stack.h("svc"), json={
        "item_id": "leak-1", "seller_id": "s-1", "title": MARK_TITLE, "description": MARK_DESC})
    assert r.status_code == 200, r.text
    stack.flush()
    # the store has it (so the greps below can fail) ...
    got = stack.client.get("/v1/admin/samples/leak-1", headers=stack.h("reader"))
    assert got.status_code == 200, got.text
    [row] = got.json()["samples"]
    assert row["content"] == {"title": MARK_TITLE, "description": MARK_DESC, "seller_id": "s-1"}
    assert row["request_id"] == r.json()["request_id"] and row["decision"] == r.json()["decision"]
    # ... and nothing else does
    marks = (MARK_TITLE, MARK_DESC, "ZQX-unmistakable", "QJV-unmistakable")
    decision_log = b"".join(p.read_bytes() for p in (stack.tmp_path / "decisions").rglob("*.jsonl"))
    assert b"leak-1" in decision_log
    spans = stack.exporter.get_finished_spans()
    assert spans
    span_text = repr([(s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events])
                      for s in spans])
    metrics_text = generate_latest(stack.metrics.registry).decode()
    assert "modgate_samples_recorded_total 1.0" in metrics_text
    log_text = "\n".join(f"{rec.getMessage()} {rec.args!r}" for rec in caplog.records)
    for mark in marks:
        assert mark.encode() not in decision_log
        assert mark not in span_text
        assert mark not in metrics_text
        assert mark not in log_text


def test_reading_and_deleting_need_their_scopes(stack: Stack) -> None:
    r = stack.client.post("/v1/moderate", headers=stack.h("svc"),
                          json={"item_id": "del-1", "title": "a lamp"})
    assert r.status_code == 200
    stack.flush()
    for who in ("svc", "reviewer", "deleter"):
        refused = stack.client.get("/v1/admin/samples/del-1", headers=stack.h(who))
        assert refused.status_code == 403 and "samples:read" in refused.json()["error"]["message"]
    for who in ("svc", "reader"):
        refused = stack.client.delete("/v1/admin/samples/del-1", headers=stack.h(who))
        assert refused.status_code == 403 and "samples:delete" in refused.json()["error"]["message"]
    assert stack.client.get("/v1/admin/samples/del-1").status_code == 401
    bad = stack.client.delete("/v1/admin/samples/bad%20id", headers=stack.h("deleter"))
    assert bad.status_code == 422
    gone = stack.client.delete("/v1/admin/samples/del-1", headers=stack.h("deleter"))
    assert gone.status_code == 200 and gone.json() == {"item_id": "del-1", "deleted": 1}
    assert stack.client.get("/v1/admin/samples/del-1", headers=stack.h("reader")).status_code == 404
    again = stack.client.delete("/v1/admin/samples/del-1", headers=stack.h("deleter"))
    assert again.json()["deleted"] == 0


def test_without_the_store_the_routes_say_it_is_off(store: SqlitePromptStore) -> None:
    key, record = generate_key("admin", ["admin"], created_by="test")
    store.put_key(record)
    with TestClient(create_app(GatewaySettings(), store, FakeBackend())) as client:
        r = client.get("/v1/admin/samples/x-1", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 404 and "samples.enabled" in r.json()["error"]["message"]
        assert client.app.state.gateway.service.samples is None  # type: ignore[attr-defined]


def test_cli_stats_delete_and_purge_work_on_a_store_left_behind(tmp_path: Path) -> None:
    """The CLI opens the store file even with sampling off now: rows kept earlier can still
    be deleted and purged."""
    import json

    import yaml
    from typer.testing import CliRunner

    from gateway.cli.main import app as cli

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["samples"] = {"enabled": False, "retention_days": 7}
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    store = SqliteSampleStore(tmp_path / "data" / "samples.db")
    now = datetime.now(UTC)
    store.put_many([_sample("r1", "item-1", now), _sample("r2", "item-1", now),
                    _sample("r3", "item-2", now - timedelta(days=8)), _sample("r4", "item-3", now)])
    store.close()
    runner = CliRunner()

    def run(*args: str) -> dict[str, object]:
        result = runner.invoke(cli, ["samples", *args, "--config", str(path), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)  # type: ignore[no-any-return]

    assert run("stats")["rows"] == 3 and run("stats")["enabled"] is False
    assert run("delete", "item-1")["deleted"] == 2
    assert run("purge")["deleted"] == 1  # item-2, past the 7 days
    assert run("stats")["rows"] == 1
    assert run("purge", "--all")["deleted"] == 1
    bad = runner.invoke(cli, ["samples", "delete", "no spaces", "--config", str(path)])
    assert bad.exit_code == 2 and "not an item id" in bad.output


def test_a_redis_store_uses_the_registrys_redis(tmp_path: Path, redis_server: object,
                                                 redis_prefix: str) -> None:
    import yaml

    from gateway.config import load_config
    from gateway.samples import open_configured

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["samples"] = {"enabled": True, "store": "redis"}
    config["registry"] = {**config["registry"], "redis_url_env": "MODGATE_TEST_NO_SUCH_VAR",
                          "redis_url": None}
    path = tmp_path / "modgate.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="Redis URL"):
        open_configured(load_config(path))
    config["registry"]["redis_url"] = redis_server.url  # type: ignore[attr-defined]
    config["registry"]["redis_key_prefix"] = redis_prefix
    path.write_text(yaml.safe_dump(config))
    store = open_configured(load_config(path))
    assert isinstance(store, RedisSampleStore)
    store.put_many([_sample("r1", "item-1", datetime.now(UTC))])
    store.close()
    again = open_configured(load_config(path), cleanup=True)
    assert again is not None and again.count() == 1 and again.delete_item("item-1") == 1
    again.close()
    assert not (tmp_path / "data" / "samples.db").exists()


# -- the writer's lifecycle ------------------------------------------------------------------------

async def _finishes(coro: object, within_s: float = 10.0) -> bool:
    """Whether *coro* finishes within *within_s*: a bounded check, so a hang fails the test
    instead of hanging the suite (on a loaded machine 10 s is far above a normal close)."""
    task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=within_s)
        return False
    task.result()
    return True


@pytest.mark.parametrize("steps", range(6))
def test_a_close_while_the_writer_wakes_up_ends_and_writes_every_row(tmp_path: Path, steps: int) -> None:
    """A close that lands while the writer is waking up (a row was just offered) must stop it.
    Python 3.11's `asyncio.wait_for` swallows a cancel that arrives once the awaited event has
    fired, so a writer stopped by `cancel()` alone slept on for `purge_interval_s` and the
    gateway's shutdown hung (seen in tests/unit/test_replay.py's fixture). *steps* event-loop
    steps between the offer and the close walk the close across that window."""
    settings = SampleSettings(enabled=True, share=1.0, purge_interval_s=3600)
    recorder = SampleRecorder(SqliteSampleStore(tmp_path / "s.db"), settings)
    ev = _evaluation()

    async def main() -> None:
        recorder.start()
        assert recorder.offer(request_id="r0", item_id="i0", variables={"title": "t"}, ev=ev, arm="stable")
        deadline = asyncio.get_running_loop().time() + 30
        while recorder.recorded_count < 1:  # the writer purged, wrote r0 and waits again
            assert asyncio.get_running_loop().time() < deadline, "the sample writer did not write"
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0)
        assert recorder.offer(request_id="r1", item_id="i1", variables={"title": "t"}, ev=ev, arm="stable")
        for _ in range(steps):
            await asyncio.sleep(0)
        assert await _finishes(recorder.aclose()), f"aclose hung ({steps} steps after an offer)"

    asyncio.run(main())
    assert recorder.recorded_count == 2 and recorder.dropped_count == 0
    store = SqliteSampleStore(tmp_path / "s.db")
    assert set(store.by_request(["r0", "r1"])) == {"r0", "r1"}
    store.close()


def test_the_writer_outlives_a_redis_outage(tmp_path: Path) -> None:
    """A write that fails on Redis (restart, outage) drops its batch and counts it; the writer
    goes on and writes what comes after. It used to catch only SQLite and OS errors: the first
    Redis error ended the writer for good (every later row was queued until the queue was full,
    then dropped), and the gateway's shutdown raised it."""
    import redis

    from testsupport.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()  # AOF on: rows survive the restart
    settings = SampleSettings(enabled=True, share=1.0, purge_interval_s=3600)
    client = redis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=10)
    recorder = SampleRecorder(RedisSampleStore(client, prefix="w"), settings)
    ev = _evaluation()

    async def wait_until(what: str, predicate: Callable[[], bool]) -> None:
        deadline = asyncio.get_running_loop().time() + 30  # a guard against a hang only
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.01)

    async def main() -> None:
        recorder.start()
        recorder.offer(request_id="before", item_id="i", variables={"title": "t"}, ev=ev, arm="stable")
        await wait_until("the writer did not write", lambda: recorder.recorded_count == 1)
        await asyncio.to_thread(server.stop)
        recorder.offer(request_id="r0", item_id="i0", variables={"title": "t"}, ev=ev, arm="stable")
        await wait_until("the failed write was not counted", lambda: recorder.dropped_count == 1)
        await asyncio.to_thread(server.start)
        recorder.offer(request_id="r1", item_id="i1", variables={"title": "t"}, ev=ev, arm="stable")
        await wait_until("the writer did not write after the outage", lambda: recorder.recorded_count == 2)
        assert await _finishes(recorder.aclose())

    try:
        asyncio.run(main())
        check = RedisSampleStore(redis.Redis.from_url(server.url), prefix="w")
        assert set(check.by_request(["before", "r0", "r1"])) == {"before", "r1"}
        check.close()
    finally:
        server.stop()
