"""Redis under N gateway processes: commands and Redis CPU per request, and whether rollout
counters, caller limits and change events stay correct, for `docs/capacity.md`.

    .venv/bin/python benchmarks/redis_capacity.py [--workers 1,2,4] [--duration 12]
                                                  [--connections 16] [--out benchmarks/results]

One real `redis-server` (AOF with `appendfsync everysec`, as `k8s/components/redis/redis.conf`)
holds the registry; for each N, one `modgate gateway` with `gateway.workers: N` (N processes on
one port, each with its own Redis connections, exactly like N single-worker pods) runs in front
of the stub upstream (`benchmarks/stub_upstream.py`) with everything that talks to Redis on:
API keys, a rollout (10 % canary, 5 % shadow: per-request verdict memos and per-second counter
flushes), caller limits on Redis (one Lua call and one ZREM per request), prompt-cache refresh
and change events, the rollout controller and the webhook/rollout-gauge loop. Per N:

- idle: Redis commands/s with no traffic (each process's background loops);
- load: an open loop (`--rate` moderations/s on schedule, over `--connections` connections,
  which the kernel spreads over the workers) on `/v1/moderate`, plus a rate-limited key
  (5/s, burst 10) sent at three times its rate, while a thread moves the production label of
  a second, preloaded prompt back and forth in the store every 0.5 s and polls every worker
  over its own connection until all serve the move (change events under load). Open loop,
  because a closed loop at saturation would measure queueing rather than per-request cost;
  keep `--rate` below what the machine sustains (`latency_p99_ms` says whether it did);
- from `INFO commandstats` (reset before each phase): commands per request (by command; the
  Lua script's inner commands are listed under their own names and also inside `evalsha`) and
  Redis CPU (`usec`) per request; CPU seconds of the gateway processes and of redis-server per
  request (from /proc);
- checks, after a graceful stop (which flushes the recorder): the rollout's request counters
  equal the moderations answered 200, exactly one new verdict memo per such request, the
  limited key admitted between 90 % and 100 % of burst + rate × time, every move seen by every
  worker;
- sample store (`samples`, on the same Redis, `share` 5 %, listings with a 220-character
  description): Redis memory per kept row (`MEMORY USAGE` of its keys: row, time index, item
  sets, divided by the rows);
- decision-log bytes per record and records per moderation (warm-up included), from the
  segments the gateways wrote; the caller-limit decisions taken locally because Redis answered
  later than `redis_timeout_s` (`modgate_caller_limits_fallback_total`, summed over workers).

Writes `benchmarks/results/redis_capacity.json` (`uptime` before and after each N: this machine
is shared and noisy). `benchmarks/capacity_plan.py` turns it into `docs/capacity.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.rollouts.ops import start_rollout  # noqa: E402
from prompt_registry.gates import GateOverride  # noqa: E402
from prompt_registry.keys import generate_key  # noqa: E402
from prompt_registry.loader import seed_store  # noqa: E402
from prompt_registry.redis_store import RedisPromptStore  # noqa: E402
from prompt_registry.rollouts import GateConfig, ShadowSpec  # noqa: E402
from testsupport.redis_server import RedisServer  # noqa: E402

PROMPT = "listing-moderation"
PROBE = "capacity-probe"  # a second prompt whose label this script moves under load
LIMITED_RATE, LIMITED_BURST = 5.0, 10
# A description of 220 characters: the median of the locust workload (benchmarks/locust), so the
# sample store's bytes per row are those of a typical listing.
LISTING = {"item_id": "bench-1", "seller_id": "seller-42", "title": "Wireless earbuds, sealed box",
           "description": ("Genuine product with one year warranty. Ships in two days from our "
                           "warehouse, tracked delivery, original packaging never opened, charging "
                           "case and three sizes of ear tips included. Invoice available on request."),
           "locale": "en-US"}
SAMPLE_SHARE = 0.05  # samples.share's default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() or "unknown"


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _commandstats(r: redis.Redis) -> dict[str, dict[str, float]]:
    stats = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): {"calls": float(v["calls"]), "usec": float(v["usec"])}
            for k, v in stats.items()}


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _seed(url: str, prefix: str) -> dict[str, str]:
    store = RedisPromptStore(url, prefix=prefix)
    try:
        seed_store(store, ROOT / "configs" / "prompts")
        spec = store.resolve(PROMPT, "production").spec
        v2 = store.publish(spec.model_copy(update={"description": "v2"}), actor="bench").version.version
        v3 = store.publish(spec.model_copy(update={"description": "v3"}), actor="bench").version.version
        start_rollout(store, PROMPT, canary_version=v2, steps=[10, 100],
                      shadows=[ShadowSpec(version=v3, sample_rate=0.05)], step_hold_s=1e9,
                      gates=GateConfig(), auto=False, subject_key="seller_id", actor="bench",
                      override=GateOverride(reason="unscored benchmark versions", by="bench"))
        probe = spec.model_copy(update={"name": PROBE})
        store.publish(probe, actor="bench")
        store.publish(probe.model_copy(update={"description": "probe v2"}), actor="bench")
        store.set_label(PROBE, "production", 1, expected=None, actor="bench")
        keys = {}
        for name, scopes in (("bench", ["moderate"]), ("limited", ["moderate"]), ("ops", ["admin"])):
            keys[name], record = generate_key(name, scopes, created_by="bench")
            store.put_key(record)
        return keys
    finally:
        store.close()


async def _open_loop(url: str, keys: dict[str, str], rate: float, duration: float,
                     connections: int) -> dict[str, dict[str, Any]]:
    """Open loop: `rate` moderations/s with the bench key and 3 x its rate with the limited
    key, each sent on schedule whatever the answers take (a closed loop at saturation would
    measure queueing, not the per-request cost)."""
    import aiohttp

    out: dict[str, dict[str, Any]] = {k: {"200": 0, "429": 0, "other": 0, "latency_ms": []}
                                      for k in ("bench", "limited")}
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def send(who: str, i: int) -> None:
            body = {**LISTING, "item_id": f"{who}-{i}", "seller_id": f"seller-{i}"}
            t = time.perf_counter()
            async with session.post(f"{url}/v1/moderate", json=body,
                                    headers={"x-api-key": keys[who]}) as resp:
                await resp.read()
                code = str(resp.status) if resp.status in (200, 429) else "other"
            out[who][code] += 1
            if who == "bench":
                out[who]["latency_ms"].append((time.perf_counter() - t) * 1000)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        schedule = sorted([(i / rate, "bench", i) for i in range(int(rate * duration))]
                          + [(i / (3 * LIMITED_RATE), "limited", i)
                             for i in range(int(3 * LIMITED_RATE * duration))])
        for at, who, i in schedule:
            delay = t0 + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(who, i)))
        await asyncio.gather(*tasks)
    return out


def run_n(n: int, args: argparse.Namespace, server: RedisServer, stub_port: int, tmp: Path) -> dict[str, Any]:
    prefix = f"cap{n}"
    keys = _seed(server.url, prefix)
    r = redis.Redis.from_url(server.url)
    port = _free_port()
    data = tmp / f"data-{n}"
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(data)
    config["registry"] = {"store": "redis", "redis_url": server.url, "redis_key_prefix": prefix,
                          "seed_dir": None}
    config["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
    config["gateway"].update(port=port, workers=n, preload_prompts=[PROBE],
                             max_inflight_per_model=512, max_queued_per_model=4096,
                             # redis_timeout_s 2 s (default 0.25): on this shared 2-core VM a
                             # scheduling stall, not Redis, can exceed 0.25 s, and the limiter then
                             # decides locally by design (counted: limiter_fallbacks)
                             caller_limits={"enabled": True, "rate_per_s": 100000, "burst": 100000,
                                            "max_concurrent": 1000, "redis_timeout_s": 2.0,
                                            "callers": {"limited": {"rate_per_s": LIMITED_RATE,
                                                                    "burst": LIMITED_BURST}}})
    config["tracing"] = {"exporter": "none", "sample_ratio": 0.0}
    config["samples"] = {"enabled": True, "store": "redis", "share": SAMPLE_SHARE}
    cfg_path = tmp / f"gw-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"workers": n, "uptime_before": _uptime()}
    gw = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(cfg_path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    pinned: dict[int, httpx.Client] = {}
    try:
        _wait_http(f"{url}/healthz", gw)
        admin = {"x-api-key": keys["ops"]}
        deadline = time.monotonic() + 60
        while len(pinned) < n:  # one keep-alive connection per worker
            if time.monotonic() > deadline:
                raise SystemExit(f"did not reach {n} workers")
            c = httpx.Client(headers=admin, timeout=5)
            pid = c.get(f"{url}/v1/cache/prompts").json()["process"]
            if pid in pinned:
                c.close()
            else:
                pinned[pid] = c
        # warm-up: every worker resolves the prompt, its keys and the rollout
        warm = asyncio.run(_open_loop(url, keys, args.rate, 2.0, args.connections))
        time.sleep(1.5)  # the warm-up's counters flushed
        procs = [gw.pid] + [p.pid for p in psutil.Process(gw.pid).children(recursive=True)]
        redis_pid = server.proc.pid if server.proc else 0

        # -- idle --------------------------------------------------------------------------
        r.config_resetstat()
        t0 = time.monotonic()
        time.sleep(args.idle)
        idle = _commandstats(r)
        idle_s = time.monotonic() - t0
        result["idle_commands_per_s"] = round(sum(v["calls"] for v in idle.values()) / idle_s, 1)
        result["idle_commands_per_s_by_command"] = {
            k: round(v["calls"] / idle_s, 2) for k, v in sorted(idle.items())}

        # -- load --------------------------------------------------------------------------
        store = RedisPromptStore(server.url, prefix=prefix)
        rollout = store.get_rollout(PROMPT)
        assert rollout is not None
        before = store.rollout_stats(rollout.id)
        memos_before = sum(1 for _ in r.scan_iter(f"{prefix}:memo:*", count=1000))
        r.config_resetstat()
        cpu_gw0, cpu_redis0 = _cpu(procs), _cpu([redis_pid])
        t0 = time.monotonic()
        stop_moves = threading.Event()
        moves: dict[str, Any] = {"visibility_ms": [], "missed": 0}

        def move_probe() -> None:
            """Move the probe prompt's label in the store; every worker must serve it."""
            current = 1
            while not stop_moves.wait(0.5):
                target = 2 if current == 1 else 1
                start = time.perf_counter()
                store.set_label(PROBE, "production", target, expected=current, actor="bench")
                pending = dict(pinned)
                while pending and time.perf_counter() - start < 5:
                    pending = {p: c for p, c in pending.items()
                               if next((e["version"] for e in c.get(f"{url}/v1/cache/prompts").json()["entries"]
                                        if e["prompt"] == PROBE), None) != target}
                if pending:
                    moves["missed"] += 1
                else:
                    moves["visibility_ms"].append((time.perf_counter() - start) * 1000)
                current = target

        mover = threading.Thread(target=move_probe)
        mover.start()
        try:
            load = asyncio.run(_open_loop(url, keys, args.rate, args.duration, args.connections))
        finally:
            stop_moves.set()
            mover.join()
        load_s = time.monotonic() - t0
        stats = _commandstats(r)
        cpu_gw, cpu_redis = _cpu(procs) - cpu_gw0, _cpu([redis_pid]) - cpu_redis0
        ok_requests = load["bench"]["200"] + load["limited"]["200"]
        handled = sum(sum(v for k, v in d.items() if k != "latency_ms") for d in load.values())
        metrics_text = next(iter(pinned.values())).get(f"{url}/metrics").text  # summed over workers
        fallbacks = sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
                        if line.startswith("modgate_caller_limits_fallback_total"))
        vis = sorted(moves["visibility_ms"])
        lat = sorted(load["bench"]["latency_ms"])
        result.update({
            "load_seconds": round(load_s, 2), "offered_rps": args.rate,
            "achieved_rps": round(load["bench"]["200"] / args.duration, 1),
            "bench_key": {k: v for k, v in load["bench"].items() if k != "latency_ms"},
            "latency_p50_ms": round(statistics.median(lat), 2) if lat else None,
            "latency_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
            "redis_commands_per_request": round(sum(v["calls"] for v in stats.values()) / handled, 2),
            "redis_commands_per_request_by_command": {
                k: round(v["calls"] / handled, 3) for k, v in sorted(stats.items())},
            "redis_usec_per_request": round(sum(v["usec"] for v in stats.values()) / handled, 2),
            "redis_cpu_ms_per_request": round(cpu_redis * 1000 / handled, 4),
            "gateway_cpu_ms_per_request": round(cpu_gw * 1000 / handled, 3),
            "limited": {k: v for k, v in load["limited"].items() if k != "latency_ms"} | {
                "seconds": args.duration,
                "allowed_at_most": int(LIMITED_BURST + LIMITED_RATE * args.duration) + 1,
                "allowed_at_least": int(0.9 * (LIMITED_BURST + LIMITED_RATE * (args.duration - 1)))},
            "limiter_fallbacks": int(fallbacks),
            "moderations_answered_total": ok_requests + warm["bench"]["200"] + warm["limited"]["200"],
            "probe_moves": len(vis) + moves["missed"], "probe_moves_missed": moves["missed"],
            "probe_visibility_p50_ms": round(statistics.median(vis), 2) if vis else None,
            "probe_visibility_p95_ms": round(vis[int(0.95 * (len(vis) - 1))], 2) if vis else None,
        })
    finally:
        for c in pinned.values():
            c.close()
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=90)
    # -- after a graceful stop: everything flushed -------------------------------------------
    after = store.rollout_stats(rollout.id)
    counted = sum(after.get(f"{arm}:requests", 0) - before.get(f"{arm}:requests", 0)
                  for arm in ("stable", "canary"))
    memos = sum(1 for _ in r.scan_iter(f"{prefix}:memo:*", count=1000)) - memos_before
    store.close()
    segments = list((data / "decisions").glob("*/decisions-*.jsonl"))
    records = sum(sum(1 for _ in p.open("rb")) for p in segments)
    size = sum(p.stat().st_size for p in segments)
    memo_key = next(r.scan_iter(f"{prefix}:memo:*", count=100), None)
    sample_keys = list(r.scan_iter(f"{prefix}:samples:*", count=1000))
    sample_rows = sum(1 for k in sample_keys if b":samples:row:" in k)
    sample_bytes = sum(int(r.memory_usage(k) or 0) for k in sample_keys)
    result.update({
        "rollout_requests_counted": counted, "requests_answered_200": ok_requests,
        "verdict_memos_written": memos,
        "memo_bytes": int(r.memory_usage(memo_key) or 0) if memo_key else None,
        "sample_share": SAMPLE_SHARE, "sample_rows": sample_rows,
        "sample_content_chars": len(LISTING["title"]) + len(LISTING["description"]),
        "sample_store_bytes_per_row": round(sample_bytes / sample_rows, 1) if sample_rows else None,
        "decision_log_streams": len({p.parent.name for p in segments}),
        "decision_log_records": records, "decision_log_bytes": size,
        "decision_log_bytes_per_record": round(size / records, 1) if records else None,
        "uptime_after": _uptime(),
    })
    r.close()
    lim = result["limited"]
    result["checks"] = {
        "rollout_counters_exact": counted == ok_requests,
        "one_memo_per_request": memos == ok_requests,
        "caller_limit_held": lim["allowed_at_least"] <= lim["200"] <= lim["allowed_at_most"],
        "every_move_seen_by_every_worker": moves["missed"] == 0 and bool(moves["visibility_ms"]),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated N (gateway processes)")
    ap.add_argument("--duration", type=int, default=12, help="seconds of load per N")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle measurement per N")
    ap.add_argument("--rate", type=float, default=100.0, help="offered moderations/s (open loop)")
    ap.add_argument("--connections", type=int, default=32, help="client connections (spread "
                    "over the workers by the kernel)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    ns = [int(x) for x in args.workers.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server = RedisServer(tmp / "redis", appendfsync="everysec").start()
        stub_port = _free_port()
        stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"),
                                 "--port", str(stub_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_http(f"http://127.0.0.1:{stub_port}/v1/models", stub)
            for n in ns:
                print(f"redis_capacity: {n} gateway process(es)...", file=sys.stderr)
                runs.append(run_n(n, args, server, stub_port, tmp))
        finally:
            stub.terminate()
            stub.wait(timeout=20)
            server.stop()
    doc = {
        "benchmark": "redis_capacity",
        "command": "python benchmarks/redis_capacity.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
        "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2],
        "scenario": "rollout 10 % canary + 5 % shadow, caller limits on Redis, sample store on "
                    "Redis (5 %), tracing off",
        "limited_key": {"rate_per_s": LIMITED_RATE, "burst": LIMITED_BURST},
        "runs": runs,
        "all_checks_pass": all(all(r["checks"].values()) for r in runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redis_capacity.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
