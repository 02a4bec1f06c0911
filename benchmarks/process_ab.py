"""CPU per request of whole gateway processes, A/B in one run: the same app under another ASGI
server, with another worker count, or from another checkout (issue 20).

    python benchmarks/process_ab.py --arms n1,n2 [--sequential] [--rounds 8] [--duration 8]
    python benchmarks/process_ab.py --arms n2@base,n2 --base-tree /tmp/main-checkout
    python benchmarks/process_ab.py --kind floor --arms uvicorn,granian     # needs `pip install granian`
        [--scenario plain] [--connections 32] [--out FILE]

`overhead_cpu.py --ab` drives the gateway's ASGI app in process: the figure for code changes,
but it cannot see the HTTP server, the supervisor or a second worker. This starts each arm as
its own processes (`modgate gateway` with `overhead.py`'s scenario config, or
`floor_gateway.py` for `--kind floor`), every one pinned to the first CPU, each with its own
stub upstream, and drives each with `wrk` at `--connections` (closed loop) on the other CPUs.
With `--idle S`, each arm's CPU per second without load comes first (timers, pollers,
the supervisor). The figure is the CPU time of the arm's whole process tree (supervisor and workers, every
thread) per answered request; each round gives every arm a figure, and an arm's result is the
median over rounds of its ratio to the first arm's figure in the same round.

Arms (comma-separated; the first is the reference):

- `uvicorn`: the gateway (or the floor) as shipped;
- `granian`: the same app under granian 2 (one worker process, uvloop), built by this script's
  `granian_app` factory; for the record of issue 20's ASGI-server trial (kept: uvicorn);
- `nN`: the gateway with `gateway.workers: N`;
- any of these with `@base`: run from `--base-tree` (another checkout) instead of this one.

By default the arms run at the same time (each sees the same machine second by second, the way
`overhead.py --paired` runs the floor); then the kernel shares the CPU per process, so an arm
of N workers gets N shares. `--sequential` runs them one after another, each alone on the CPU,
the order alternating per round: the fair way to compare worker counts.
"""

from __future__ import annotations

import argparse
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

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import (  # noqa: E402
    LISTING,
    _cpu_seconds,
    _free_port,
    _lua,
    _modgate_gateway,
    _wait_http,
    _wrk_both,
)
from testsupport.otlp_receiver import OtlpHttpReceiver  # noqa: E402

_APP_ENV = "MODGATE_PROCESS_AB_APP"  # "floor <upstream>" or "gateway <config path>"


def granian_app() -> Any:
    """granian's factory target (`benchmarks.process_ab:granian_app`): the app `_APP_ENV` names."""
    kind, _, arg = os.environ[_APP_ENV].partition(" ")
    if kind == "floor":
        from benchmarks.floor_gateway import build_app

        return build_app(ROOT / "configs" / "prompts" / "listing-moderation.yaml", arg)
    from gateway.bootstrap import build_gateway
    from gateway.config import load_config
    from gateway.stores import open_store

    cfg = load_config(Path(arg))
    return build_gateway(cfg, open_store(cfg))


def _serve_granian(port: int) -> None:
    from granian import Granian  # type: ignore[import-not-found]
    from granian.constants import Interfaces, Loops  # type: ignore[import-not-found]

    Granian("benchmarks.process_ab:granian_app", address="127.0.0.1", port=port, interface=Interfaces.ASGI,
            workers=1, loop=Loops.uvloop, factory=True, websockets=False, log_enabled=False,
            backlog=1024).serve()


def _tree_cpu(pid: int) -> float:
    """CPU seconds of *pid* and its live descendants (workers, granian's serving process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += _cpu_seconds(p)
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def _start_arm(arm: str, index: int, args: argparse.Namespace, tmp: Path, receiver: OtlpHttpReceiver,
               cpus: set[int]) -> tuple[list[subprocess.Popen[bytes]], str, Path, int]:
    """The arm's stub and server processes, its URL, wrk script and the pid to measure."""
    name, _, where = arm.partition("@")
    tree = args.base_tree.resolve() if where == "base" else ROOT
    stub_port, port = _free_port(), _free_port()
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port", str(stub_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    upstream = f"http://127.0.0.1:{stub_port}/v1"
    auth: dict[str, str] = {}
    if args.kind == "floor":
        cmd = [sys.executable, str(tree / "benchmarks" / "floor_gateway.py"), "--port", str(port), "--upstream", upstream]
        env[_APP_ENV] = f"floor {upstream}"
    else:
        cmd, auth, _ = _modgate_gateway(args.scenario, tmp / f"arm{index}", stub_port, port, receiver)
        config = Path(cmd[-1])
        if name.startswith("n") and name[1:].isdigit():
            raw = yaml.safe_load(config.read_text())
            raw["gateway"]["workers"] = int(name[1:])
            config.write_text(yaml.safe_dump(raw))
        env[_APP_ENV] = f"gateway {config}"
    if name == "granian":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-granian", str(port)]
    elif not (name == "uvicorn" or (name.startswith("n") and name[1:].isdigit())):
        raise SystemExit(f"unknown arm {arm!r}")
    server = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    _wait_http(f"http://127.0.0.1:{stub_port}/v1/models")
    _wait_http(f"http://127.0.0.1:{port}/healthz")
    return [server, stub], f"http://127.0.0.1:{port}/v1/moderate", _lua(tmp, LISTING, auth), server.pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="n1,n2", help="comma-separated, the first is the reference (see above)")
    ap.add_argument("--kind", choices=["gateway", "floor"], default="gateway")
    ap.add_argument("--scenario", default="plain", help="overhead.py's scenario for the gateway")
    ap.add_argument("--base-tree", type=Path, help="the checkout that arms ending in @base run from")
    ap.add_argument("--sequential", action="store_true", help="one arm at a time, each alone on the CPU")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=int, default=8, help="seconds of wrk per arm and round")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--idle", type=float, default=0, metavar="S",
                    help="first measure each arm's CPU per second over S seconds without load")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    ap.add_argument("--serve-granian", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_granian:
        return _serve_granian(args.serve_granian)
    arms = [a for a in args.arms.split(",") if a]
    if any(a.endswith("@base") for a in arms) and args.base_tree is None:
        ap.error("arms ending in @base need --base-tree")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs: the arms on the first, stubs and wrk on the others")
    os.sched_setaffinity(0, set(cpus[1:]))  # stubs and wrk inherit this
    receiver = OtlpHttpReceiver()
    procs: list[subprocess.Popen[bytes]] = []
    rounds: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    idle: dict[str, float] = {}
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory() as tmp_s:
            started = []
            for i, arm in enumerate(arms):
                arm_procs, url, script, pid = _start_arm(arm, i, args, Path(tmp_s), receiver, {cpus[0]})
                procs += arm_procs
                started.append(((url, script), pid))
            _wrk_both([t for t, _ in started], 4, 2)  # warm-up
            if args.idle:
                time.sleep(2)
                c0s = [_tree_cpu(pid) for _, pid in started]
                time.sleep(args.idle)
                idle = {a: round(1000 * (_tree_cpu(pid) - c0) / args.idle, 2)
                        for a, (_, pid), c0 in zip(arms, started, c0s, strict=True)}
                print("idle CPU ms/s: " + "  ".join(f"{a} {v}" for a, v in idle.items()), file=sys.stderr)
            for r in range(args.rounds):
                if args.sequential:
                    outs: list[dict[str, float]] = [{}] * len(arms)
                    cpu = [0.0] * len(arms)
                    for i in (range(len(arms)) if r % 2 == 0 else reversed(range(len(arms)))):
                        c0 = _tree_cpu(started[i][1])
                        outs[i] = _wrk_both([started[i][0]], args.connections, args.duration)[0]
                        cpu[i] = _tree_cpu(started[i][1]) - c0
                else:
                    c0s = [_tree_cpu(pid) for _, pid in started]
                    outs = _wrk_both([t for t, _ in started], args.connections, args.duration)
                    cpu = [_tree_cpu(pid) - c0 for (_, pid), c0 in zip(started, c0s, strict=True)]
                for arm, out, c in zip(arms, outs, cpu, strict=True):
                    rounds[arm].append({"cpu_us_per_request": round(c * 1e6 / max(1, out["requests"]), 1),
                                        "requests": out["requests"], "non_2xx": out["non_2xx"]})
                print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                    f"{a} {rounds[a][-1]['cpu_us_per_request']:.1f} us" for a in arms), file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        receiver.close()
    first = [x["cpu_us_per_request"] for x in rounds[arms[0]]]
    results = []
    for arm in arms:
        cpu_rounds = [x["cpu_us_per_request"] for x in rounds[arm]]
        ratios = [round(c / f, 3) for c, f in zip(cpu_rounds, first, strict=True)]
        results.append({"arm": arm, **({"idle_cpu_ms_per_s": idle[arm]} if arm in idle else {}), "vs_first": statistics.median(ratios), "vs_first_rounds": ratios,
                        "rounds_below_first": sum(x < 1 for x in ratios),
                        "cpu_us_per_request_median": statistics.median(cpu_rounds),
                        "cpu_us_per_request_rounds": cpu_rounds,
                        "requests": sum(x["requests"] for x in rounds[arm]),
                        "non_2xx": sum(x["non_2xx"] for x in rounds[arm])})
        print(f"{arm:<14} x{results[-1]['vs_first']:.3f} of {arms[0]} (median of per-round ratios; below it in "
              f"{results[-1]['rounds_below_first']} of {args.rounds})  median {results[-1]['cpu_us_per_request_median']:.1f}"
              f" us CPU/request  non-2xx {results[-1]['non_2xx']}")
    from benchmarks.run_locust import git_commit

    doc = {"benchmark": "process_ab", "command": "python benchmarks/process_ab.py " + " ".join(sys.argv[1:]),
           "when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": git_commit(),
           "base_tree_commit": (subprocess.run(["git", "-C", str(args.base_tree), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()
                                if args.base_tree else None),
           "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus); every arm "
                      f"pinned to CPU {cpus[0]}, " + ("one at a time, order alternating per round"
                                                      if args.sequential else "all at the same time")
                      + "; stubs and wrk on the others",
           "kind": args.kind, "scenario": args.scenario if args.kind == "gateway" else None,
           "connections": args.connections, "duration_s": args.duration, "rounds": args.rounds,
           "load": {"before": load_before, "after": os.getloadavg()}, "arms": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
