"""Redis crash drills: `kill -9` a real `redis-server` (AOF on, `appendfsync always`) in the
middle of a stream of registry writes and of moderation traffic, restart it on the same port
and data directory, and check what docs/failure-semantics.md promises:

- every publish and label move that was acknowledged (returned) is there afterwards, intact;
  one that was not is either absent or complete - never half written (each write is one Lua
  script): version numbers have no gaps, every version has its dedup hash and exactly one
  audit entry, every label points at a version that exists;
- moderation keeps being answered from the gateway's prompt cache while Redis is dead, flagged
  `prompt.stale: true`, without waiting on Redis; registry writes get `503
  registry_unavailable`; after the restart the gateway un-stales and sees new label moves.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.limits import CallerLimitsSettings, RedisCallerLimiter, build_caller_limiter
from gateway.telemetry import Metrics
from prompt_registry import PromptSpec, StoreUnavailable
from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.redis_store import RedisPromptStore
from serving.fake_backend import FakeBackend
from tests.drills.live import metric, serve_asgi
from testsupport.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
NAME = "drill-prompt"
LABEL = "canary"
PREFIX = "drill"
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": "Wireless earbuds"}


def _variant(base: PromptSpec, tag: str, name: str = NAME) -> PromptSpec:
    return base.model_copy(update={"name": name, "description": f"drill variant {tag}"})


@dataclass
class WriteLog:
    """What the writers sent and what was acknowledged (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: list[tuple[PromptSpec, int]] = field(default_factory=list)  # (spec, version)
    unacked: list[PromptSpec] = field(default_factory=list)
    moves: list[tuple[int, bool]] = field(default_factory=list)  # (to version, acknowledged), in order
    errors: Counter[str] = field(default_factory=Counter)
    killed_at: int | None = None  # len(acked) when the server was killed


def _publisher(url: str, base: PromptSpec, writer: int, log: WriteLog, stop: threading.Event) -> None:
    store = RedisPromptStore(url, prefix=PREFIX, timeout_s=0.5)  # one client per writer process
    i = 0
    try:
        while not stop.is_set():
            spec = _variant(base, f"w{writer}-{i}")
            i += 1
            try:
                result = store.publish(spec, actor=f"writer-{writer}", note=f"drill {writer}/{i}")
            except StoreUnavailable as exc:
                with log.lock:
                    log.unacked.append(spec)
                    log.errors["unreachable" if "unreachable" in str(exc) else str(exc)] += 1
                stop.wait(0.02)
                continue
            assert result.created, "every variant is new content"
            with log.lock:
                log.acked.append((spec, result.version.version))
    finally:
        store.close()


def _label_mover(url: str, log: WriteLog, stop: threading.Event) -> None:
    """Moves LABEL to the newest acknowledged version, compare-and-set while it knows where
    the label is, blind after a failed move (it may or may not have happened)."""
    store = RedisPromptStore(url, prefix=PREFIX, timeout_s=0.5)
    expected: int | None = 1
    try:
        while not stop.is_set():
            with log.lock:
                target = log.acked[-1][1] if log.acked else 1
            try:
                store.set_label(NAME, LABEL, target, expected=expected, actor="mover")
            except StoreUnavailable:
                with log.lock:
                    log.moves.append((target, False))
                expected = None
                stop.wait(0.02)
                continue
            with log.lock:
                log.moves.append((target, True))
            expected = target
            stop.wait(0.005)
    finally:
        store.close()


def check_registry_integrity(url: str, log: WriteLog, *, seed_moves: int = 1) -> dict[str, int]:
    """The whole state of NAME after the crash, against what was acknowledged (`log.moves`
    comes after `seed_moves` label moves made before the drill)."""
    store = RedisPromptStore(url, prefix=PREFIX, timeout_s=2.0)
    raw = redis.Redis.from_url(url)
    try:
        key = f"{PREFIX}:prompt:{NAME}"
        seq = int(raw.get(f"{key}:seq") or 0)
        versions = store.versions(NAME)
        # Numbering and record are written together: no gap, no number without a record.
        assert versions == list(range(1, seq + 1)), (seq, versions[-5:])
        hashes = {h.decode(): int(v) for h, v in raw.hgetall(f"{key}:hashes").items()}
        records = {v: store.get_version(NAME, v) for v in versions}
        for v, record in records.items():  # every record whole, its hash entry pointing back
            assert record.version == v and record.spec.name == NAME
            assert record.spec.content_hash() == record.content_hash, f"v{v} content corrupted"
            assert hashes.get(record.content_hash) == v, f"v{v} has no dedup entry"
        assert len(hashes) == len(versions), "a dedup entry without its version"
        audit = store.audit(NAME)
        published = Counter(e.to_version for e in audit if e.action == "publish")
        assert published == Counter(versions), "each version has exactly one publish audit entry"

        # Acknowledged publishes: present, exactly as sent.
        for spec, v in log.acked:
            assert records[v].spec == spec, f"acknowledged v{v} differs from what was published"
            assert records[v].content_hash == spec.content_hash()
        assert len({v for _, v in log.acked}) == len(log.acked)
        # Unacknowledged ones: absent, or complete (the script ran; the answer was lost).
        landed = 0
        for spec in log.unacked:
            v = hashes.get(spec.content_hash())
            if v is not None:
                assert records[v].spec == spec
                landed += 1

        # The label: the last acknowledged move, or a later unacknowledged one that landed.
        current = store.labels(NAME).get(LABEL)
        last_acked = max((i for i, (_, ok) in enumerate(log.moves) if ok), default=None)
        allowed = {1} if last_acked is None else {log.moves[last_acked][0]}
        allowed |= {v for i, (v, ok) in enumerate(log.moves) if not ok and (last_acked is None or i > last_acked)}
        assert current in allowed, (current, allowed)
        assert current in records
        label_moves = [e.to_version for e in audit if e.action == "label" and e.label == LABEL]
        acked_moves = [v for v, ok in log.moves if ok]
        assert len(acked_moves) <= len(label_moves) - seed_moves <= len(log.moves)
        it = iter(label_moves)
        assert all(v in it for v in acked_moves), "an acknowledged label move is not audited"

        # And the registry takes writes again, numbering on from where it was.
        after = store.publish(_variant(records[1].spec, "after-restart"), actor="drill")
        assert after.version.version == seq + 1
        return {"versions": len(versions), "acked": len(log.acked), "unacked": len(log.unacked),
                "unacked_landed": landed, "moves": len(log.moves), "acked_moves": len(acked_moves)}
    finally:
        raw.close()
        store.close()


def test_acknowledged_writes_survive_kill_9_and_nothing_is_half_written(
        tmp_path: Path, example_spec: PromptSpec) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    log = WriteLog()
    stop = threading.Event()
    setup = RedisPromptStore(server.url, prefix=PREFIX)
    seeded = setup.publish(_variant(example_spec, "seed"), actor="drill").version.version
    setup.set_label(NAME, LABEL, seeded, actor="drill")
    setup.close()
    threads = [threading.Thread(target=_publisher, args=(server.url, example_spec, w, log, stop))
               for w in range(4)]
    threads.append(threading.Thread(target=_label_mover, args=(server.url, log, stop)))
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30  # a guard only (a loaded CI is slow)
        while len(log.acked) < 40:  # mid-stream: writes are in flight when it dies
            assert time.monotonic() < deadline, "the writers made no progress"
            time.sleep(0.01)
        server.kill()
        with log.lock:
            log.killed_at = len(log.acked)
        time.sleep(0.5)  # writers keep trying against a dead server
        server.start()
        deadline = time.monotonic() + 30  # a guard only (a loaded CI is slow)
        while len(log.acked) < log.killed_at + 20:  # and get through again after the restart
            assert time.monotonic() < deadline, "no write was acknowledged after the restart"
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    try:
        assert not any(t.is_alive() for t in threads)
        assert log.errors["unreachable"] >= 1 and set(log.errors) == {"unreachable"}, log.errors
        assert any(not ok for _, ok in log.moves) and any(ok for _, ok in log.moves)
        summary = check_registry_integrity(server.url, log)
        print(f"kill -9 drill: {summary}")
    finally:
        server.stop()


def test_a_torn_aof_tail_is_dropped_whole(tmp_path: Path, example_spec: PromptSpec) -> None:
    """Past what `kill -9` can do (the kernel keeps what Redis wrote): the machine dies while
    the last write is half on disk. Redis logs each script's effects as one MULTI/EXEC block
    and, loading a truncated AOF, drops an unfinished block whole - so wherever the tail is
    torn, the publish in flight is absent and the rest intact."""
    server = RedisServer(tmp_path / "redis").start()
    store = RedisPromptStore(server.url, prefix=PREFIX)
    for i in range(3):
        store.publish(_variant(example_spec, f"torn-{i}"), actor="drill")
    store.set_label(NAME, LABEL, 2, actor="drill")
    store.publish(_variant(example_spec, "torn-last"), actor="drill")  # v4: the torn one
    store.close()
    server.kill()
    data_dir = tmp_path / "redis"
    crashed = tmp_path / "crashed"  # the data directory as the crash left it
    shutil.copytree(data_dir, crashed)
    aofs = sorted(crashed.glob("appendonlydir/*.incr.aof")) or [crashed / "appendonly.aof"]  # Redis 7 / 6
    data = aofs[-1].read_bytes()
    block = data.rfind(b"MULTI\r\n")
    assert block > 0 and data.endswith(b"EXEC\r\n"), "expected the last script as MULTI/EXEC"
    try:
        for cut in (block + 7, block + (len(data) - block) // 2, len(data) - 3):
            shutil.rmtree(data_dir)
            shutil.copytree(crashed, data_dir)
            (data_dir / aofs[-1].relative_to(crashed)).write_bytes(data[:cut])
            server.start()
            log = WriteLog(acked=[(_variant(example_spec, f"torn-{i}"), i + 1) for i in range(3)],
                           moves=[(2, True)])
            summary = check_registry_integrity(server.url, log, seed_moves=0)  # then publishes v4
            assert summary["versions"] == 3, (cut, summary)
            server.kill()
    finally:
        server.stop()


# -- the gateway rides it out --------------------------------------------------------------

@dataclass
class Answer:
    started: float
    ended: float
    status: int
    body: dict


def test_gateway_serves_from_its_cache_through_kill_9(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = RedisPromptStore(server.url, prefix="gw", timeout_s=1.0)  # the gateway's
    seed_store(store, ROOT / "configs" / "prompts")
    caller, caller_record = generate_key("caller", ["moderate"], created_by="drill")
    admin, admin_record = generate_key("admin", ["admin"], created_by="drill")
    store.put_key(caller_record)
    store.put_key(admin_record)
    writer = RedisPromptStore(server.url, prefix="gw", timeout_s=2.0)  # an operator's CLI
    spec = store.resolve("listing-moderation", "production").spec
    # Per-caller limits on the same Redis, as `modgate gateway` wires them with a Redis registry
    # (generous: the drill checks they neither fail open nor fail requests while Redis is dead).
    limits = CallerLimitsSettings(enabled=True, backend="redis", rate_per_s=1000, burst=1000,
                                  max_concurrent=64, redis_retry_s=0.5, redis_timeout_s=2.0)
    settings = GatewaySettings(prompt_refresh_s=0.2, prompt_max_staleness_s=600, caller_limits=limits,
                               readiness_cache_s=0)
    metrics = Metrics()
    workers_n = 4
    answers: list[Answer] = []
    marks: dict[str, float] = {}
    leaked: list[str] = []  # request ids of leases left on Redis at the end

    async def traffic(client: httpx.AsyncClient, worker: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            started = time.monotonic()
            r = await client.post("/v1/moderate", json={**LISTING, "item_id": f"w{worker}-{i}"})
            answers.append(Answer(started, time.monotonic(), r.status_code, r.json()))
            await asyncio.sleep(0.01)

    async def wait_for(predicate, within_s: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + within_s
        while not predicate():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.02)

    async def run() -> None:
        limiter = build_caller_limiter(limits, redis_url=server.url, key_prefix="gw",
                                       registry=metrics.registry)
        assert isinstance(limiter, RedisCallerLimiter)
        app = create_app(settings, store, FakeBackend(), metrics=metrics, limiter=limiter)
        async with serve_asgi(app) as url, httpx.AsyncClient(
                base_url=url, timeout=10, headers={"authorization": f"Bearer {caller}"}) as client:
            admin_headers = {"authorization": f"Bearer {admin}"}
            assert (await client.get("/v1/prompts", headers=admin_headers)).status_code == 200
            stop = asyncio.Event()
            workers = [asyncio.create_task(traffic(client, w, stop)) for w in range(workers_n)]
            await asyncio.sleep(0.5)

            marks["kill"] = time.monotonic()
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(1.5)  # several refresh intervals with Redis dead
            # ... and at least 40 answers served meanwhile, however slow the machine is (a
            # gateway that stopped serving fails this wait; 60 s is only a guard)
            await wait_for(lambda: sum(a.started > marks["kill"] for a in answers) >= 40, 60.0)
            r = await client.post("/v1/prompts", json=_variant(spec, "during").model_dump(mode="json"),
                                  headers=admin_headers)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "registry_unavailable" and r.json()["error"]["retryable"]
            assert limiter.degraded  # limits decided in this process meanwhile
            marks["fallbacks"] = await metric(client, "modgate_caller_limits_fallback_total")
            ready = (await client.get("/readyz")).json()
            assert ready["status"] == "ready", ready
            assert ready["checks"]["prompts"]["listing-moderation:production"]["stale"] is True

            marks["restart"] = time.monotonic()
            await asyncio.to_thread(server.start)
            marks["restarted"] = time.monotonic()
            await wait_for(lambda: any(a.started > marks["restarted"] and a.status == 200
                                       and not a.body["prompt"]["stale"] for a in answers), 30.0)
            marks["fresh"] = time.monotonic()
            await wait_for(lambda: not limiter.degraded, 30.0)  # limits shared on Redis again

            # A label move made after the crash reaches the gateway (events or refresh).
            v2 = (await asyncio.to_thread(writer.publish, _variant(spec, "v2", spec.name),
                                          actor="drill")).version.version
            await asyncio.to_thread(writer.set_label, spec.name, "production", v2, expected=1,
                                    actor="drill")
            await wait_for(lambda: any(a.status == 200 and a.body["prompt"]["version"] == v2
                                       for a in answers), 30.0)
            stop.set()
            await asyncio.gather(*workers)
            raw = redis.Redis.from_url(server.url)
            leases = raw.zrange(f"gw:limits:{{{caller_record.key_id}}}:inflight", 0, -1)
            raw.close()
            leaked.extend(m.decode().split("/")[0] for m in leases)

    try:
        asyncio.run(run())
    finally:
        writer.close()
        store.close()
        server.stop()

    # Every answer, before, during and after the outage: a verdict, from the cached prompt.
    assert answers and all(a.status == 200 for a in answers), Counter(a.status for a in answers)
    down = [a for a in answers if marks["kill"] < a.started and a.ended < marks["restart"]]
    assert len(down) >= 40, len(down)
    assert all(a.body["prompt"]["version"] == 1 and a.body["decision"] for a in down)
    # ... without waiting on Redis (a dead Redis is a refused connection; the cache refreshes
    # in the background anyway). Seconds of slack for a loaded machine: no answer waited out a
    # Redis timeout (the limiter's is 2 s) more than once.
    assert max(a.ended - a.started for a in down) < 4.0
    # Flagged stale once the cache has noticed (its first refresh after the kill), and from then
    # on every answer until Redis is back.
    first_stale = min((a.ended for a in down if a.body["prompt"]["stale"]), default=None)
    assert first_stale is not None, "no answer during the outage said the prompt was stale"
    assert first_stale - marks["kill"] < settings.prompt_refresh_s + 3.0  # seconds of slack for a loaded machine
    assert all(a.body["prompt"]["stale"] for a in down if a.started > first_stale)
    before = [a for a in answers if a.ended < marks["kill"]]
    assert before and not any(a.body["prompt"]["stale"] for a in before)
    assert marks["fresh"] - marks["restarted"] < 10.0  # seconds of slack for a loaded machine
    assert marks["fallbacks"] >= 40  # every request during the outage, none refused or failed
    # Leases taken on Redis by requests in flight at the kill could not be given back: they
    # stay until lease_ttl_s. No other lease is left behind (every request since the restart
    # gave its slot back).
    in_flight_at_kill = {a.body["request_id"] for a in answers
                         if a.started < marks["kill"] < a.ended}
    assert len(leaked) <= workers_n and set(leaked) <= in_flight_at_kill, (leaked, in_flight_at_kill)


def test_caller_limits_are_shared_again_right_after_a_redis_restart(tmp_path: Path) -> None:
    """After `kill -9` and a restart, the limiter's pooled connections are dead; the pool must
    replace them, not fail the next command on each (regression: redis-py 8 skips that check
    by default, so releases failed and their leases stayed counted for lease_ttl_s)."""
    server = RedisServer(tmp_path / "redis").start()
    limits = CallerLimitsSettings(enabled=True, backend="redis", rate_per_s=1000, burst=1000,
                                  max_concurrent=64, redis_timeout_s=2.0)  # fsync on a busy disk

    async def run() -> None:
        limiter = build_caller_limiter(limits, redis_url=server.url, key_prefix="rl")
        assert isinstance(limiter, RedisCallerLimiter)
        try:
            async def one(i: int) -> None:
                lease = await limiter.acquire("caller", f"r{i}")
                await asyncio.sleep(0.01)  # held together: one pooled connection each
                await lease.release()

            await asyncio.gather(*(one(i) for i in range(8)))
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            await asyncio.gather(*(one(i) for i in range(8, 16)))
            assert not limiter.degraded
            assert (limiter.stats.fallbacks, limiter.stats.redis_errors,
                    limiter.stats.release_errors) == (0, 0, 0), limiter.stats
            assert await limiter._r.zcard("rl:limits:{caller}:inflight") == 0
        finally:
            await limiter.aclose()

    try:
        asyncio.run(run())
    finally:
        server.stop()
