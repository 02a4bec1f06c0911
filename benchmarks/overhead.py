"""Gateway overhead: `modgate gateway` in front of a fast stub upstream, next to the floor (the
least a Python moderation gateway does), one request at a time and at 32 connections (closed
loop, `wrk`).

    .venv/bin/python benchmarks/overhead.py [--duration 10] [--repeat 3] [--out benchmarks/results]

Everything realistic is switched on: API-key auth, prompt resolution from the registry,
sandboxed rendering, traffic assignment, verdict validation, the decision log, metrics and
tracing at 10 % sampling (exported over OTLP/HTTP to a local receiver). Scenarios:

- `floor`: `benchmarks/floor_gateway.py`, FastAPI + a pydantic request model + the shipped
  prompt rendered in a sandboxed Jinja2 environment + one aiohttp call to the stub + orjson,
  on uvicorn with uvloop/httptools, and nothing else: the reference every scenario is set
  against (issue 20);
- `plain`: no rollout (tracing at 10 %); `plain-trace-off` and `plain-trace-100` the same with
  tracing off and at 100 %, for the cost of tracing;
- `rollout`: a 10 % canary and a 5 % shadow of another version;
- `rollout-hanging-shadow`: the same, with the shadow target never answering.

Reports per scenario: requests/s at 32 connections (one gateway worker) and its ratio to the
floor's, p50 at 1 connection and its difference from the floor's (both taken within each
round, then the median over rounds: the machine drifts between rounds, a ratio within one
round does not), added p50/p99 over the stub called directly, and the gateway's CPU time per
request; the cost of tracing at 10 % (1 - plain / plain-trace-off). Each figure is the median
over `--repeat` rounds of every scenario (the c32 throughput of every round is kept beside
it). LiteLLM's figure from the issue is recorded as a reference only. Needs `wrk` (Debian
package).

`--paired` runs a second floor gateway at the same time as each scenario, on the same CPU, and
sets the scenario against that one: on a machine others are loading, the floor row measured a
minute earlier may have seen a different machine, the paired floor saw the same one.

On a machine with two or more CPUs the gateway worker (or the floor) is pinned to the first
CPU and the stub, wrk and this script to the rest (`--shared` turns that off), so a figure is
what one worker does with one core to itself rather than how the load generator and the
gateway split two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prompt_registry.keys import generate_key  # noqa: E402
from prompt_registry.loader import seed_store  # noqa: E402
from prompt_registry.rollouts import GateConfig, ShadowSpec  # noqa: E402
from prompt_registry.sqlite_store import SqlitePromptStore  # noqa: E402
from testsupport.otlp_receiver import OtlpHttpReceiver  # noqa: E402

LISTING = {"item_id": "bench-1", "seller_id": "seller-42", "title": "Wireless earbuds, sealed box",
           "description": "Genuine product with one year warranty. Ships in two days.", "locale": "en-US"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _lua(tmp: Path, body: dict, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    lines.append(f"wrk.body = {json.dumps(json.dumps(body))}")
    # vary the seller per request so traffic assignment spreads over arms
    lines.append('counter = 0\nrequest = function()\n  counter = counter + 1\n'
                 '  local b = string.gsub(wrk.body, "seller%-42", "seller-" .. counter)\n'
                 '  return wrk.format(nil, nil, nil, b)\nend')
    path = tmp / f"wrk-{abs(hash(json.dumps([body, headers])))}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wrk(url: str, script: Path, connections: int, duration: int) -> dict[str, float]:
    return _wrk_both([(url, script)], connections, duration)[0]


def _wrk_both(targets: list[tuple[str, Path]], connections: int, duration: int) -> list[dict[str, float]]:
    """One wrk per (url, script), all running at the same time."""
    procs = [subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
                               url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for url, script in targets]
    outs = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
        outs.append(_parse_wrk(out))
    return outs


def _parse_wrk(out: str) -> dict[str, float]:
    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"p50_ms": ms("50%"), "p99_ms": ms("99%"), "rps": rps, "requests": total,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _modgate_gateway(name: str, tmp: Path, stub_port: int, gw_port: int, receiver: OtlpHttpReceiver,
                     ) -> tuple[list[str], dict[str, str], float]:
    """The command line, extra headers and tracing ratio of `modgate gateway` for *name*."""
    data = tmp / name
    store = SqlitePromptStore(data / "registry.db")
    seed_store(store, ROOT / "configs" / "prompts")
    key, record = generate_key("bench", ["moderate"], created_by="bench")
    store.put_key(record)
    if name.startswith("rollout"):
        start_bench_rollout(store)
    store.close()
    config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
    config["data_dir"] = str(data)
    config["registry"]["seed_dir"] = None
    config["gateway"].update(port=gw_port, max_inflight_per_model=512, max_queued_per_model=4096)
    config["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
    ratio = TRACING.get(name, 0.1)
    config["tracing"] = ({"exporter": "none", "sample_ratio": 0.0} if ratio == 0 else
                         {"exporter": "otlp_http", "endpoint": receiver.endpoint, "sample_ratio": ratio})
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return ([sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(cfg_path)],
            {"Authorization": f"Bearer {key}"}, ratio)


def start_bench_rollout(store: SqlitePromptStore) -> None:
    """The rollout scenarios' rollout: versions 2 (a 10 % canary) and 3 (a 5 % shadow)."""
    from gateway.rollouts.ops import start_rollout

    spec = store.resolve("listing-moderation", "production").spec
    v2 = store.publish(spec.model_copy(update={"description": "v2"}), actor="bench").version.version
    v3 = store.publish(spec.model_copy(update={"description": "v3"}), actor="bench").version.version
    start_rollout(store, "listing-moderation", canary_version=v2, steps=[10, 100],
                  shadows=[ShadowSpec(version=v3, sample_rate=0.05)], step_hold_s=1e9,
                  gates=GateConfig(), auto=False, subject_key="seller_id", actor="bench",
                  # v2 has no scorecard, so its promotion gate fails: a benchmark rollout
                  # starts on an override, like an admin's (only the 10 % step is used)
                  **_override("unscored benchmark versions"))


def run_scenario(name: str, tmp: Path, args: argparse.Namespace, receiver: OtlpHttpReceiver) -> dict:
    hang = name == "rollout-hanging-shadow"
    stub_port, gw_port = _free_port(), _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port", str(stub_port),
                             *(["--hang-shadows"] if hang else [])])
    if name == FLOOR:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "floor_gateway.py"), "--port", str(gw_port),
               "--upstream", f"http://127.0.0.1:{stub_port}/v1"]
        auth: dict[str, str] = {}
        ratio = 0.0
    else:
        cmd, auth, ratio = _modgate_gateway(name, tmp, stub_port, gw_port, receiver)
    gw_cpus = args.gateway_cpus
    gw = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          preexec_fn=(lambda: os.sched_setaffinity(0, gw_cpus)) if gw_cpus else None)
    paired = args.paired and name != FLOOR
    extra: list[subprocess.Popen[bytes]] = []
    if paired:  # the floor beside it, on the same CPU, with a stub of its own
        floor_stub_port, floor_port = _free_port(), _free_port()
        extra.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_upstream.py"), "--port",
                                       str(floor_stub_port)]))
        extra.append(subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "floor_gateway.py"), "--port", str(floor_port),
             "--upstream", f"http://127.0.0.1:{floor_stub_port}/v1"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=(lambda: os.sched_setaffinity(0, gw_cpus)) if gw_cpus else None))
    try:
        _wait_http(f"http://127.0.0.1:{stub_port}/v1/models")
        _wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        if paired:
            _wait_http(f"http://127.0.0.1:{floor_stub_port}/v1/models")
            _wait_http(f"http://127.0.0.1:{floor_port}/healthz")
        from gateway.pipeline import ModerationPipeline
        from prompt_registry.loader import load_prompt_file
        from serving.http_backend import build_chat_body

        spec = load_prompt_file(ROOT / "configs/prompts/listing-moderation.yaml")
        version = type("V", (), {"spec": spec})()
        _, chat = ModerationPipeline.build_chat(version, LISTING, "en-US", request_id="direct")  # type: ignore[arg-type]
        direct_script = _lua(tmp, build_chat_body(chat), {})
        gw_script = _lua(tmp, LISTING, auth)
        stub_url = f"http://127.0.0.1:{stub_port}/v1/chat/completions"
        gw_url = f"http://127.0.0.1:{gw_port}/v1/moderate"
        _wrk(gw_url, gw_script, 4, 2)  # warm-up
        result: dict = {"scenario": name, "tracing_sample_ratio": ratio}
        result["direct_c1"] = _wrk(stub_url, direct_script, 1, args.duration)
        if paired:
            floor_url, floor_script = f"http://127.0.0.1:{floor_port}/v1/moderate", _lua(tmp, LISTING, {})
            _wrk(floor_url, floor_script, 4, 2)  # warm-up
            result["gateway_c1"], result["paired_floor_c1"] = _wrk_both(
                [(gw_url, gw_script), (floor_url, floor_script)], 1, args.duration)
        else:
            result["gateway_c1"] = _wrk(gw_url, gw_script, 1, args.duration)
        result["direct_c32"] = _wrk(stub_url, direct_script, 32, args.duration)
        cpu0 = _cpu_seconds(gw.pid)
        if paired:
            result["gateway_c32"], result["paired_floor_c32"] = _wrk_both(
                [(gw_url, gw_script), (floor_url, floor_script)], 32, args.duration)
        else:
            result["gateway_c32"] = _wrk(gw_url, gw_script, 32, args.duration)
        cpu = _cpu_seconds(gw.pid) - cpu0
        result["added_p50_ms_c1"] = round(result["gateway_c1"]["p50_ms"] - result["direct_c1"]["p50_ms"], 3)
        result["added_p99_ms_c1"] = round(result["gateway_c1"]["p99_ms"] - result["direct_c1"]["p99_ms"], 3)
        result["gateway_rps_c32"] = result["gateway_c32"]["rps"]
        result["gateway_cpu_ms_per_request"] = round(cpu * 1000 / max(1, result["gateway_c32"]["requests"]), 3)
        return result
    finally:
        for proc in (gw, stub, *extra):
            proc.terminate()
        for proc in (gw, stub, *extra):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a hanging-shadow stub holds its graceful shutdown
                proc.kill()
                proc.wait(timeout=20)


def _override(reason: str) -> dict[str, object]:
    """The override keyword for start_rollout where it takes one (since the gate guards
    traffic); nothing for older code, so the same script measures both sides of an A/B."""
    import inspect

    from gateway.rollouts.ops import start_rollout

    if "override" not in inspect.signature(start_rollout).parameters:
        return {}
    from prompt_registry.gates import GateOverride

    return {"override": GateOverride(reason=reason, by="bench")}


FLOOR = "floor"
# tracing sample ratio per scenario (anything not named here: 10 %, the judged setting)
TRACING = {FLOOR: 0.0, "plain-trace-off": 0.0, "plain-trace-100": 1.0}
MEDIAN_KEYS = ("added_p50_ms_c1", "added_p99_ms_c1", "gateway_rps_c32", "gateway_cpu_ms_per_request")
FLOOR_KEYS = ("rps_c32_vs_floor", "p50_ms_c1_minus_floor")
# Issue 20's targets, each against the floor measured in the same run
TARGETS = {
    "rps_c32_vs_floor_min": {"plain": 0.8, "rollout": 0.7},  # the judged scenarios
    "p50_ms_c1_minus_floor_max": 0.2,  # in the judged scenarios
    "tracing_cost_max": 0.10,  # 1 - plain / plain-trace-off at 32 connections
}
# Recorded for reference only (not measured by this script): issue 20's side-by-side run.
REFERENCE = ("LiteLLM proxy 1.80 in the same harness (issue 20, one run on 2026-12-03, one worker "
             "pinned like these): ~128 req/s and 7.5 ms p50 at 1 connection, ~140 req/s at 32; "
             "not re-measured here")


def vs_floor(rounds: dict[str, list[dict]]) -> None:
    """Each round's throughput as a ratio to the floor's and p50 at 1 connection minus the
    floor's, from the same round (the machine drifts between rounds; a ratio within one round
    does not)."""
    floor = rounds.get(FLOOR)
    if not floor:
        return
    for runs in rounds.values():
        for r, f in zip(runs, floor, strict=True):
            # --paired: the floor that ran at the same time on the same CPU
            f_c1, f_c32 = r.get("paired_floor_c1", f["gateway_c1"]), r.get("paired_floor_c32", f["gateway_c32"])
            r["rps_c32_vs_floor"] = round(r["gateway_rps_c32"] / f_c32["rps"], 3)
            r["p50_ms_c1_minus_floor"] = round(r["gateway_c1"]["p50_ms"] - f_c1["p50_ms"], 3)


def combine(rounds: list[dict]) -> dict:
    """One scenario over several rounds: each headline figure is the median of the rounds; the
    wrk details are those of the round with the median c32 throughput."""
    ordered = sorted(rounds, key=lambda r: r["gateway_rps_c32"])
    out = dict(ordered[len(ordered) // 2])
    for key in MEDIAN_KEYS + FLOOR_KEYS:
        if all(key in r for r in rounds):
            out[key] = round(statistics.median(r[key] for r in rounds), 3)
            out[f"{key}_rounds"] = [r[key] for r in rounds]
    out["rounds"] = len(rounds)
    for key in ("added_p50_ms_c1_rounds", "added_p99_ms_c1_rounds"):
        out.pop(key, None)
    return out


def tracing_cost(results: list[dict]) -> dict | None:
    """What tracing at 10 % costs: 1 - plain / plain-trace-off (throughput at 32 connections, each
    as a ratio to its floor), the median of the per-round figures."""
    by = {r["scenario"]: r for r in results}
    on, off = by.get("plain"), by.get("plain-trace-off")
    if on is None or off is None:
        return None
    # Against the floor of the same round (with --paired: the floor that ran beside each), so the
    # two sides are compared on the same machine state; without a floor, the raw throughputs.
    key = "rps_c32_vs_floor_rounds" if "rps_c32_vs_floor_rounds" in on else "gateway_rps_c32_rounds"
    costs = [round(1 - a / b, 3) for a, b in zip(on[key], off[key], strict=True)]
    return {"with": "plain", "without": "plain-trace-off", "cost": round(statistics.median(costs), 3),
            "cost_rounds": costs, "target_max": TARGETS["tracing_cost_max"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--scenarios", default="floor,plain,plain-trace-off,plain-trace-100,rollout,rollout-hanging-shadow",
                    help="comma-separated; `floor` is benchmarks/floor_gateway.py, the reference every "
                         "other scenario is a ratio to (keep it in the list for those figures)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over all scenarios (default 3); each figure is the median over the "
                         "rounds, with the range of the c32 throughput beside it (run to run this VM "
                         "varies by ±10-15 %%, more than most changes being measured)")
    ap.add_argument("--paired", action="store_true",
                    help="run a floor gateway at the same time as each scenario, on the same CPU (each "
                         "has its own stub and wrk), and take each scenario's ratio and p50 difference "
                         "against that one: both see the same machine second by second, so the ratio "
                         "holds up on a loaded machine. Two workers then share the core fairly, so the "
                         "ratio is that of their CPU per request and each absolute req/s is about half a "
                         "core's; the `floor` row still runs alone")
    ap.add_argument("--shared", action="store_true",
                    help="let gateway, stub and wrk share every CPU (default on 2+ CPUs: the gateway "
                         "worker pinned to CPU 0, stub, wrk and this script to the others, so the "
                         "figure is one worker's capacity, not the load generator's)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    args.gateway_cpus = None
    if not args.shared and len(cpus) >= 2:
        args.gateway_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))  # stub and wrk inherit this
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    names = [n for n in args.scenarios.split(",") if n]
    load_before = os.getloadavg()
    receiver = OtlpHttpReceiver()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp_s:
        for round_no in range(args.repeat):  # rounds, so slow drift of the machine hits every scenario
            for name in names:
                print(f"round {round_no + 1}/{args.repeat}: scenario {name} ...", file=sys.stderr)
                runs[name].append(run_scenario(name, Path(tmp_s) / f"r{round_no}", args, receiver))
    receiver.close()
    vs_floor(runs)
    results = [combine(runs[n]) for n in names]
    from benchmarks.run_locust import git_commit

    commit = git_commit()  # "-dirty" when the tree differs from the commit
    doc = {
        "benchmark": "gateway_overhead",
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus); " + (
            "gateway, stub and wrk share the machine" if args.gateway_cpus is None else
            f"gateway pinned to CPU {min(args.gateway_cpus)}, stub and wrk to the others"),
        "targets": TARGETS if FLOOR in names else {"added_p50_ms_c1": 1.0, "gateway_rps_c32": 1500},
        "floor": ("benchmarks/floor_gateway.py: FastAPI + pydantic + sandboxed Jinja2 render of the shipped "
                  "prompt + aiohttp upstream call + orjson, uvicorn with uvloop/httptools, nothing else"
                  if FLOOR in names else None),
        "reference": REFERENCE,
        "paired": bool(args.paired),
        "load": {"before": load_before, "after": os.getloadavg()},
        "scenarios": results,
    }
    cost = tracing_cost(results)
    if cost is not None:
        doc["tracing_cost"] = cost
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    for r in results:
        floor = (f"  {r['rps_c32_vs_floor']:.3f}x floor @32  p50 {r['p50_ms_c1_minus_floor']:+.3f} ms vs floor @1"
                 if "rps_c32_vs_floor" in r else "")
        print(f"{r['scenario']:<24} (median of {r['rounds']}) {r['gateway_rps_c32']:.0f} req/s @32{floor}  "
              f"p50 @1 {r['gateway_c1']['p50_ms']:.3f} ms (added vs stub {r['added_p50_ms_c1']:.2f} ms, "
              f"p99 {r['added_p99_ms_c1']:.2f} ms)  {r['gateway_cpu_ms_per_request']:.3f} ms CPU/req  "
              f"non-2xx {r['gateway_c32']['non_2xx']}  (req/s rounds {r['gateway_rps_c32_rounds']})")
    if cost is not None:
        print(f"tracing at 10 % costs {100 * cost['cost']:.1f} % of throughput @32 vs tracing off "
              f"(rounds {cost['cost_rounds']}; target <= {100 * cost['target_max']:.0f} %)")
    print(f"reference only: {REFERENCE}")


if __name__ == "__main__":
    main()
