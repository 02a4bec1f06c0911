"""CPU time per moderation of the gateway's own code, in process: an A/B probe for hot-path
changes that holds up on a loaded machine.

    python benchmarks/overhead_cpu.py [--scenario plain] [--requests 3000] [--rounds 5]
        [--concurrency 32] [--out FILE]
    python benchmarks/overhead_cpu.py --ab TREE_A TREE_B ... [--rounds 40] [--requests 300] [--out FILE]

`benchmarks/overhead.py` measures throughput over sockets with `wrk`: the figure that counts,
but on this shared two-core VM a few per cent of change drowns in the other engineers' test
runs. This builds the same gateway as overhead.py's scenario (the shipped config, API-key auth,
the SQLite registry, decision log, metrics, tracing at 10 % exported over OTLP/HTTP to a local
receiver, the HTTP backend calling `stub_upstream.py` in another process) with
`gateway.bootstrap.build_gateway`, and drives its ASGI app directly (no HTTP server) with
*concurrency* requests in flight. It reports the process's CPU time (every thread: span export
and the decision log included) per request for each round, and their minimum and median: CPU
time counts only this process's own work, and the minimum over rounds drops the rounds that
other processes disturbed. Not counted: uvicorn's HTTP parsing, which is the same for every
version of the gateway code.

The gateway process is pinned to the first CPU and the stub to the others, as in overhead.py.
Run it from the checkout to measure (it imports `gateway` from its own tree).

`--ab` compares checkouts (git worktrees, each holding this file) in one run: one worker
process per tree, each with its gateway built and warmed up, and rounds handed to them in
turn (A, B, C, A, B, C ...), so every tree sees the same state of the machine, round after
round; the figure per tree is the median of its rounds, and the ratio to the first tree's
median is printed beside it.

`--scenario floor` drives the floor instead (`benchmarks/floor_gateway.py`'s app, same body,
same stub, same driver): the least a Python moderation gateway does per request. `--ab ...
--floor` adds it as one more arm (from this checkout), so each tree's CPU per request is also a
ratio to the floor's measured in the same rounds: the target of issue 20 (plain ≥ 0.8 × the
floor's throughput) is, in CPU, at most 1.25 × the floor's CPU per request.

`--sample-ratios 0.1,0` runs each tree once per tracing sample ratio (0: tracing off, as
overhead.py's `plain-trace-off`) and prints each tree's CPU cost of tracing from the same
rounds. The OTLP receiver runs in a process of its own, like the collector it stands for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import LISTING, _free_port, _wait_http, start_bench_rollout  # noqa: E402

FLOOR = "floor"


def _config(name: str, data: Path, stub_port: int, endpoint: str, ratio: float = 0.1) -> tuple[Any, Any, str]:
    """The scenario's config, store and API key, as overhead.py builds them."""
    import yaml

    from gateway.config import load_config
    from gateway.stores import open_store
    from prompt_registry.keys import generate_key
    from prompt_registry.loader import seed_store

    raw = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    raw["data_dir"] = str(data)
    raw["registry"]["seed_dir"] = None
    raw["gateway"].update(max_inflight_per_model=512, max_queued_per_model=4096)
    raw["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
    raw["tracing"] = ({"exporter": "none", "sample_ratio": 0.0} if ratio == 0 else
                      {"exporter": "otlp_http", "endpoint": endpoint, "sample_ratio": ratio})
    path = data / "modgate.yaml"
    data.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    store = open_store(cfg)
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("bench", ["moderate"], created_by="bench")
    store.put_key(record)
    if name == "rollout":
        start_bench_rollout(store)
    return cfg, store, key


def _build(name: str, data: Path, stub_port: int, endpoint: str, ratio: float = 0.1) -> tuple[Any, Any, str]:
    """The app to drive, the store to close (None for the floor) and the API key to send."""
    if name == FLOOR:
        from benchmarks.floor_gateway import build_app

        return build_app(ROOT / "configs" / "prompts" / "listing-moderation.yaml",
                         f"http://127.0.0.1:{stub_port}/v1"), None, "unused"
    from gateway.bootstrap import build_gateway

    cfg, store, key = _config(name, data, stub_port, endpoint, ratio)
    return build_gateway(cfg, store), store, key


async def _drive(app: Any, key: str, total: int, concurrency: int, start_no: int) -> int:
    """*total* POST /v1/moderate requests through the ASGI app, *concurrency* at a time; the
    number that did not answer 200."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode())]
    counter = iter(range(start_no, start_no + total))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for n in counter:
            body = orjson.dumps({**LISTING, "seller_id": f"seller-{n}"})
            sent = False
            # As uvicorn's receive: after the body, a read waits until the response is complete
            # (the caller never goes away), then says `http.disconnect`.
            complete = asyncio.Event()

            async def receive(body: bytes = body, complete: asyncio.Event = complete) -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await complete.wait()
                return {"type": "http.disconnect"}

            status = 0

            async def send(message: dict[str, Any], complete: asyncio.Event = complete) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif not message.get("more_body", False):
                    complete.set()

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/moderate", "raw_path": b"/v1/moderate",
                     "query_string": b"", "root_path": "", "headers": [*headers,
                     (b"content-length", str(len(body)).encode())],
                     "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
            await app(scope, receive, send)
            failed += status != 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


async def _round(app: Any, key: str, args: argparse.Namespace, no: int) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    failed = await _drive(app, key, args.requests, args.concurrency, (no + 1) * 10**6)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu_us_per_request": round(cpu * 1e6 / args.requests, 1),
            "wall_rps": round(args.requests / wall, 1), "non_200": failed}


async def _serve_rounds(app: Any, key: str, args: argparse.Namespace) -> None:
    """--worker: a round per line read from stdin, its figures as one JSON line on stdout."""
    loop = asyncio.get_running_loop()
    async with app.router.lifespan_context(app):
        await _drive(app, key, 500, args.concurrency, 0)  # warm-up
        print("ready", flush=True)
        no = 0
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
            print(json.dumps(await _round(app, key, args, no)), flush=True)
            no += 1


async def _measure(app: Any, key: str, args: argparse.Namespace) -> dict[str, Any]:
    async with app.router.lifespan_context(app):
        await _drive(app, key, 500, args.concurrency, 0)  # warm-up
        rounds, failed = [], 0
        for r in range(args.rounds):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            failed += await _drive(app, key, args.requests, args.concurrency, (r + 1) * 10**6)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            rounds.append({"cpu_us_per_request": round(cpu * 1e6 / args.requests, 1),
                           "wall_rps": round(args.requests / wall, 1)})
    cpu = [r["cpu_us_per_request"] for r in rounds]
    return {"cpu_us_per_request_min": min(cpu), "cpu_us_per_request_median": statistics.median(cpu),
            "rounds": rounds, "non_200": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["plain", "rollout", FLOOR], default="plain")
    ap.add_argument("--requests", type=int, default=3000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--ab", nargs="+", type=Path, metavar="TREE",
                    help="compare these checkouts in one run, rounds in turn (see above)")
    ap.add_argument("--floor", action="store_true",
                    help="with --ab: the floor gateway as one more arm, each tree also as a ratio to it")
    ap.add_argument("--sample-ratio", type=float, default=0.1, help="tracing sample ratio (0: tracing off)")
    ap.add_argument("--sample-ratios", type=lambda s: [float(x) for x in s.split(",")], metavar="R1,R2",
                    help="with --ab: each tree once per ratio, e.g. 0.1,0 for the CPU cost of tracing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ab:
        return ab(args)
    cpus = sorted(os.sched_getaffinity(0))
    stub_port = _free_port()
    # Keep-alive for an hour: with --ab a worker sits idle while the other trees run their rounds,
    # and on a loaded machine that idles longer than uvicorn's 5 s. The stub then closed the pooled
    # connections under the gateway as it sent on them (the floor crashed, modgate retried and
    # sometimes opened its circuit inside a measured round), an artefact of the rounds, not a cost.
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port", str(stub_port),
                             "--keep-alive", "3600"],
                            preexec_fn=(lambda: os.sched_setaffinity(0, set(cpus[1:]))) if len(cpus) > 1 else None)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    # Its protobuf decoding is the collector's CPU, not the gateway's.
    receiver = subprocess.Popen([sys.executable, "-m", "testsupport.otlp_receiver"], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                preexec_fn=(lambda: os.sched_setaffinity(0, set(cpus[1:]))) if len(cpus) > 1 else None)
    try:
        assert receiver.stdout is not None
        endpoint = receiver.stdout.readline().strip()
        _wait_http(f"http://127.0.0.1:{stub_port}/v1/models")
        with tempfile.TemporaryDirectory() as tmp:
            app, store, key = _build(args.scenario, Path(tmp), stub_port, endpoint, args.sample_ratio)
            import uvloop

            if args.worker:
                uvloop.run(_serve_rounds(app, key, args))
                return
            result = uvloop.run(_measure(app, key, args))
            if store is not None:
                store.close()
    finally:
        stub.terminate()
        stub.wait(20)
        receiver.terminate()
        receiver.wait(20)
    from benchmarks.run_locust import git_commit

    doc = {"benchmark": "overhead_cpu", "command": "python benchmarks/overhead_cpu.py " + " ".join(sys.argv[1:]),
           "when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": git_commit(),
           "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
           "scenario": args.scenario, "concurrency": args.concurrency, "requests_per_round": args.requests,
           "load": os.getloadavg(), **result}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("scenario", "commit", "cpu_us_per_request_min",
                                          "cpu_us_per_request_median", "non_200", "load")}))


def ab(args: argparse.Namespace) -> None:
    """One worker per tree; *rounds* rounds each, handed out in turn."""
    from benchmarks.run_locust import git_commit

    trees = [t.resolve() for t in args.ab]
    ratios = args.sample_ratios or [args.sample_ratio]
    arms_run = [(tree, args.scenario, r) for tree in trees for r in ratios] + ([(ROOT, FLOOR, 0.0)] if args.floor else [])
    workers = []
    for tree, scenario, ratio in arms_run:
        script = tree / "benchmarks" / "overhead_cpu.py"
        if not script.is_file():
            raise SystemExit(f"{script} is missing: copy this file into the tree")
        env = {**os.environ, "PYTHONPATH": str(tree)}
        workers.append(subprocess.Popen(
            [sys.executable, str(script), "--worker", "--scenario", scenario, "--requests", str(args.requests),
             "--concurrency", str(args.concurrency), "--sample-ratio", str(ratio)], cwd=tree, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    load_before = os.getloadavg()
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        rounds: list[list[dict[str, Any]]] = [[] for _ in arms_run]
        for _ in range(args.rounds):
            for w, got in zip(workers, rounds, strict=True):
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write("go\n")
                w.stdin.flush()
                got.append(json.loads(w.stdout.readline()))
    finally:
        for w in workers:
            if w.stdin is not None:
                w.stdin.close()
        for w in workers:
            w.wait(60)
    commits, subjects = [], []
    for tree, _scenario, _ratio in arms_run:
        out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        commit, _, subject = out.stdout.strip().partition(" ")
        commits.append(commit or "unknown")
        subjects.append(subject)
    base = statistics.median(r["cpu_us_per_request"] for r in rounds[0])
    floor = statistics.median(r["cpu_us_per_request"] for r in rounds[-1]) if args.floor else None
    arms = []
    for (tree, scenario, ratio), commit, subject, got in zip(arms_run, commits, subjects, rounds, strict=True):
        cpu = [r["cpu_us_per_request"] for r in got]
        med = statistics.median(cpu)
        arm = {"tree": tree.name if scenario != FLOOR else FLOOR, "scenario": scenario, "commit": commit,
               "subject": subject, "cpu_us_per_request_median": med, "cpu_us_per_request_min": min(cpu),
               "vs_first": round(med / base, 3), "non_200": sum(r["non_200"] for r in got),
               "cpu_us_per_request_rounds": cpu, "sample_ratio": ratio}
        if floor is not None:
            arm["vs_floor"] = round(med / floor, 3)
        arms.append(arm)
        vs_floor = f"  x{med / floor:.3f} of the floor" if floor is not None else ""
        print(f"{commit:>10}  {arm['tree']:<24} median {med:7.1f} us CPU/request  min {min(cpu):7.1f}  "
              f"x{med / base:.3f} of the first{vs_floor}  non-200 {arm['non_200']}"
              + (f"  tracing {ratio:g}" if len(ratios) > 1 else ""))
    off = {tree: a["cpu_us_per_request_median"] for (tree, sc, r), a in zip(arms_run, arms, strict=True)
           if r == 0 and sc != FLOOR}
    for (tree, sc, r), a in zip(arms_run, arms, strict=True):
        if r and sc != FLOOR and tree in off:
            a["tracing_cpu_cost"] = round(a["cpu_us_per_request_median"] / off[tree] - 1, 3)
            print(f"{a['tree']}: tracing at {r:g} costs {100 * a['tracing_cpu_cost']:+.1f} % CPU per request "
                  "vs tracing off (same rounds)")
    doc = {"benchmark": "overhead_cpu_ab", "command": "python benchmarks/overhead_cpu.py " + " ".join(sys.argv[1:]),
           "when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": git_commit(),
           "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
           "scenario": args.scenario, "concurrency": args.concurrency, "requests_per_round": args.requests,
           "rounds": args.rounds, "load": {"before": load_before, "after": os.getloadavg()}, "arms": arms}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
