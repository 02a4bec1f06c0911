"""The capacity plan (`docs/capacity.md`), computed from recorded measurements and the shipped
configuration, never typed by hand.

    .venv/bin/python benchmarks/capacity_plan.py                 # print the plan
    .venv/bin/python benchmarks/capacity_plan.py --write docs/capacity.md
    .venv/bin/python benchmarks/capacity_plan.py --check docs/capacity.md   # exit 1 if stale

Inputs (every figure in the plan is derived from these):

- `benchmarks/results/redis_capacity.json` (`benchmarks/redis_capacity.py`): per request,
  gateway CPU, Redis commands and Redis CPU time; per gateway process, idle Redis commands/s;
  decision-log bytes per record and records per request; bytes of one verdict memo; and the
  correctness checks under load;
- the Kubernetes manifests (`k8s/base/gateway.yaml`): the gateway's CPU request and the HPA's
  target utilisation and replica bounds;
- the GPU example configurations (`configs/examples/*.yaml` with `replica_gpus`): the models
  and whether prefix caching is on; `benchmarks/GPU.md`'s throughput arithmetic (the constants
  below are the ones it states; `tests/unit/test_capacity_plan.py` checks that they still are);
- the defaults in the code: decision-log retention, verdict-memo TTL, the sample store's
  share and retention.

Assumptions the plan states as such: peak = 5 x the daily mean; one listing = one moderation;
a rollout with a 5 % shadow running all day (the worst case for Redis writes, memos and GPU).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.decision_log import DecisionLogSettings  # noqa: E402
from gateway.rollouts.recorder import RolloutRecorder  # noqa: E402
from gateway.samples import SampleSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "redis_capacity.json"
GATEWAY_MANIFEST = ROOT / "k8s" / "base" / "gateway.yaml"
EXAMPLES = ROOT / "configs" / "examples"
GPU_MD = ROOT / "benchmarks" / "GPU.md"

DAILY_LISTINGS = (1_000_000, 10_000_000, 100_000_000)
PEAK_FACTOR = 5.0
SHADOW_RATE = 0.05  # the benchmark's rollout: 10 % canary, 5 % shadow

# benchmarks/GPU.md, "The arithmetic": sustained dense BF16 on one H100 SXM, and the shape of one
# moderation (shared policy prefix, item, verdict) in tokens.
GPU_SUSTAINED_FLOPS = 790e12
PREFIX_TOKENS, ITEM_TOKENS, VERDICT_TOKENS = 1_000, 200, 20
# GPU.md's figures are ceilings, not measurements (its results table is empty): plan GPUs at
# this share of the ceiling until a measured row replaces it.
GPU_PLANNING_EFFICIENCY = 0.5
REDIS_CORE_BUDGET = 0.5  # plan Redis (single-threaded) to at most half a core at peak


def _cpu(value: str | int | float) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def gateway_pod_settings(path: Path = GATEWAY_MANIFEST) -> dict[str, float]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    container = next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    util = next(m["resource"]["target"]["averageUtilization"] for m in hpa["spec"]["metrics"]
                if m["type"] == "Resource" and m["resource"]["name"] == "cpu")
    return {"cpu_request": _cpu(container["resources"]["requests"]["cpu"]),
            "cpu_limit": _cpu(container["resources"]["limits"]["cpu"]),
            "hpa_utilization": util / 100.0,
            "min_replicas": hpa["spec"]["minReplicas"], "max_replicas": hpa["spec"]["maxReplicas"]}


def gpu_models(directory: Path = EXAMPLES) -> list[dict[str, Any]]:
    """Models with a GPU per replica in the example configs (deduplicated by name)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        for m in (cfg.get("serving") or {}).get("models") or []:
            dep = m.get("deployment") or {}
            if not dep.get("replica_gpus"):
                continue
            found = re.search(r"(\d+(?:\.\d+)?)b\b", m["name"].lower())
            if found is None:
                raise SystemExit(f"{path}: cannot tell the parameter count of {m['name']!r}")
            kwargs = m.get("engine_kwargs") or {}
            entry = out.setdefault(m["name"], {
                "name": m["name"], "params": float(found.group(1)) * 1e9, "configs": [],
                "reasoning": bool(kwargs.get("reasoning_parser")),
                # modgate turns prefix caching on for GPU models unless the config says otherwise
                "prefix_caching": (m.get("engine_kwargs") or {}).get("enable_prefix_caching", True),
                "max_replicas": 0})
            entry["configs"].append(path.name)
            entry["max_replicas"] = max(entry["max_replicas"], int(dep.get("max_replicas") or 1))
    return list(out.values())


def reasoning_items_per_s(gpu_md: Path = GPU_MD) -> float:
    """A reasoning model's items/s on one H100 from GPU.md's own table (decode-bound, so the
    dense-prefill formula does not apply): the no-overlap bound at R = 200 reasoning tokens."""
    row = re.search(r"^\| H100 SXM \(3\.35 TB/s\) \| 200 \|.*?\*\*~(\d+)–(\d+)\*\*", gpu_md.read_text(), re.M)
    if row is None:
        raise SystemExit(f"{gpu_md}: no H100 row at R = 200 in the reasoning model's table")
    return float(row.group(1))


def per_gpu_items_per_s(model: dict[str, Any]) -> float:
    if model.get("reasoning"):
        return reasoning_items_per_s()
    tokens = ITEM_TOKENS + VERDICT_TOKENS + (0 if model["prefix_caching"] else PREFIX_TOKENS)
    return GPU_SUSTAINED_FLOPS / (2 * model["params"] * tokens)


def plan(measured: dict[str, Any], pod: dict[str, float], models: list[dict[str, Any]]) -> dict[str, Any]:
    runs = {r["workers"]: r for r in measured["runs"]}
    base = runs[min(runs)]
    cpu_ms = base["gateway_cpu_ms_per_request"]
    cmds = base["redis_commands_per_request"]
    usec = base["redis_usec_per_request"]
    idle = base["idle_commands_per_s"] / base["workers"]  # per gateway process
    recs = base["decision_log_records"] / max(1, base["moderations_answered_total"])
    rec_bytes = base["decision_log_bytes_per_record"]
    memo_bytes = base["memo_bytes"]
    sample_bytes = base.get("sample_store_bytes_per_row") or 0.0
    samples = SampleSettings()
    retention = DecisionLogSettings().retention_days or 0.0
    memo_ttl_days = inspect.signature(RolloutRecorder).parameters["memo_ttl_s"].default / 86400
    per_pod_cores = pod["cpu_request"] * pod["hpa_utilization"]
    rows = []
    for daily in DAILY_LISTINGS:
        mean = daily / 86400
        peak = mean * PEAK_FACTOR
        cores = peak * cpu_ms / 1000
        pods = max(int(pod["min_replicas"]), math.ceil(cores / per_pod_cores))
        redis_ops = peak * cmds + pods * idle
        gpus = {m["name"]: max(1, math.ceil(peak * (1 + SHADOW_RATE)
                                            / (per_gpu_items_per_s(m) * GPU_PLANNING_EFFICIENCY)))
                for m in models}
        rows.append({
            "daily": daily, "mean_rps": mean, "peak_rps": peak, "gateway_cores": cores, "pods": pods,
            "pods_above_hpa_max": pods > pod["max_replicas"],
            "redis_ops_peak": redis_ops, "redis_core_share": peak * usec / 1e6,
            "gpus": gpus,
            "decision_log_gb_day": daily * recs * rec_bytes / 1e9,
            "decision_log_gb_retained": daily * recs * rec_bytes * retention / 1e9,
            "memo_gb": daily * memo_ttl_days * memo_bytes / 1e9,
            "sample_rows_day": daily * samples.share,
            "sample_gb_day": daily * samples.share * sample_bytes / 1e9,
            "sample_gb_retained": daily * samples.share * sample_bytes * samples.retention_days / 1e9,
        })
    return {"rows": rows, "cpu_ms": cpu_ms, "cmds": cmds, "usec": usec, "idle": idle, "recs": recs,
            "rec_bytes": rec_bytes, "memo_bytes": memo_bytes, "retention": retention,
            "memo_ttl_days": memo_ttl_days, "per_pod_cores": per_pod_cores, "runs": runs,
            "sample_bytes": sample_bytes, "samples": samples}


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def render(measured: dict[str, Any], pod: dict[str, float], models: list[dict[str, Any]]) -> str:
    p = plan(measured, pod, models)
    rows, runs = p["rows"], p["runs"]
    heads = " | ".join(f"{_n(r['daily'] / 1e6)} M/day" for r in rows)
    sep = "|---|" + "---:|" * len(rows)

    def line(label: str, values: list[str]) -> str:
        return f"| {label} | " + " | ".join(values) + " |"

    out = [
        "# Capacity plan: 1 M, 10 M and 100 M listings a day",
        "",
        "<!-- Generated by `python benchmarks/capacity_plan.py --write docs/capacity.md` from",
        "     benchmarks/results/redis_capacity.json, k8s/base/gateway.yaml, configs/examples/ and",
        "     benchmarks/GPU.md. Do not edit by hand: tests/unit/test_capacity_plan.py checks it. -->",
        "",
        "Every number below is computed by `benchmarks/capacity_plan.py` from measured per-request",
        "costs (`benchmarks/redis_capacity.py`, recorded in `benchmarks/results/redis_capacity.json`),",
        "the shipped Kubernetes manifests and GPU configurations, and `benchmarks/GPU.md`'s",
        "throughput arithmetic. Re-run the benchmark on the target hardware and regenerate: the",
        "measurements here come from a shared 2-core VM and overstate the CPU a dedicated core needs.",
        "",
        "## Assumptions",
        "",
        f"- One listing is one moderation; the peak is {PEAK_FACTOR:g} × the daily mean.",
        f"- A rollout runs all day with a {SHADOW_RATE:.0%} shadow (the worst case for Redis writes,",
        "  verdict memos and GPU work); without one, memos and counter writes disappear and the",
        "  shadow share of GPU work too.",
        f"- Gateway pods as shipped (`k8s/base/gateway.yaml`): CPU request {pod['cpu_request']:g} core,",
        f"  HPA target {pod['hpa_utilization']:.0%} of it, so the HPA keeps each pod near",
        f"  {p['per_pod_cores']:.2f} core of use; replicas {int(pod['min_replicas'])}–{int(pod['max_replicas'])};",
        "  one gateway process per pod (`gateway.workers: 1`).",
        f"- GPUs are planned at {GPU_PLANNING_EFFICIENCY:.0%} of `benchmarks/GPU.md`'s per-GPU ceiling",
        "  (no measured GPU row exists yet); Redis at most "
        f"{REDIS_CORE_BUDGET:.0%} of its one core at peak.",
        "",
        "## Measured per-request costs",
        "",
        f"From `{RESULTS.relative_to(ROOT).as_posix()}` ({measured.get('when', 'unknown')}, commit "
        f"{measured.get('commit', 'unknown')}; {measured.get('scenario', '')}). One real redis-server,",
        "N gateway processes sharing it, open-loop load against the stub upstream:",
        "",
        "| N gateway processes | " + " | ".join(str(n) for n in sorted(runs)) + " |",
        "|---|" + "---:|" * len(runs),
        line("offered / answered moderations/s", [f"{runs[n]['offered_rps']:g} / {runs[n]['achieved_rps']:g}"
                                                  for n in sorted(runs)]),
        line("latency p50 / p99 (ms)", [f"{runs[n]['latency_p50_ms']} / {runs[n]['latency_p99_ms']}"
                                        for n in sorted(runs)]),
        line("gateway CPU per request (ms, all processes)", [f"{runs[n]['gateway_cpu_ms_per_request']}"
                                                             for n in sorted(runs)]),
        line("Redis commands per request", [f"{runs[n]['redis_commands_per_request']}" for n in sorted(runs)]),
        line("Redis CPU per request (µs, INFO commandstats)", [f"{runs[n]['redis_usec_per_request']}"
                                                               for n in sorted(runs)]),
        line("Redis commands/s while idle (all processes)", [f"{runs[n]['idle_commands_per_s']}"
                                                             for n in sorted(runs)]),
        line("change events: label move → every process (p95 ms)",
             [f"{runs[n]['probe_visibility_p95_ms']}" for n in sorted(runs)]),
        line("rollout counters = answered requests", [
            f"{runs[n]['rollout_requests_counted']} = {runs[n]['requests_answered_200']}"
            f" {'✓' if runs[n]['checks']['rollout_counters_exact'] else '✗'}" for n in sorted(runs)]),
        line("verdict memos = answered requests", [
            f"{runs[n]['verdict_memos_written']} {'✓' if runs[n]['checks']['one_memo_per_request'] else '✗'}"
            for n in sorted(runs)]),
        line("limited key admitted (allowed range)", [
            f"{runs[n]['limited']['200']} ({runs[n]['limited']['allowed_at_least']}–"
            f"{runs[n]['limited']['allowed_at_most']}) {'✓' if runs[n]['checks']['caller_limit_held'] else '✗'}"
            for n in sorted(runs)]),
        line("load average before → after", [
            f"{_load(runs[n]['uptime_before'])} → {_load(runs[n]['uptime_after'])}" for n in sorted(runs)]),
        "",
        "Redis commands per request, by command (N = " + str(min(runs)) + "; the Lua limiter script's",
        "inner commands are counted under their own names as well as `evalsha`):",
        "",
        "| command | per request |",
        "|---|---:|",
    ]
    by_cmd = runs[min(runs)]["redis_commands_per_request_by_command"]
    out += [f"| `{k}` | {v} |" for k, v in sorted(by_cmd.items(), key=lambda kv: -kv[1]) if v >= 0.005]
    out += [
        "",
        "Where they come from (`gateway/limits.py`, `gateway/rollouts/recorder.py`,",
        "`gateway/prompt_cache.py`, `gateway/auth.py`): per request, one `EVALSHA` of the limiter",
        "(inside it `TIME`, `GET`, `ZREMRANGEBYSCORE`, `ZCARD`, `SET`, `ZADD`, `PEXPIRE`) and one `ZREM`",
        "when the lease is released; under a rollout one verdict memo `SET` (pipelined once a second",
        "per process) and the arm counters as `HINCRBY` in one `MULTI`/`EXEC` per process per second",
        "(so their cost per request falls as the per-process rate rises). Prompt resolution,",
        "rollouts and API keys are served from each process's memory and re-read on change events",
        "or every `prompt_refresh_s` / `key_cache_s`: they are the idle commands, per process.",
        "",
        "## The plan",
        "",
        f"| | {heads} |",
        sep,
        line("mean / peak moderations/s", [f"{_n(r['mean_rps'], 1)} / {_n(r['peak_rps'], 1)}" for r in rows]),
        line("gateway CPU at peak (cores)", [_n(r["gateway_cores"], 2) for r in rows]),
        line("gateway pods (HPA steady state)", [
            f"{r['pods']}" + (" (raise `maxReplicas`)" if r["pods_above_hpa_max"] else "") for r in rows]),
    ]
    for m in models:
        out.append(line(f"GPU replicas of `{m['name']}`", [str(r["gpus"][m["name"]]) for r in rows]))
    out += [
        line("Redis commands/s at peak", [_n(r["redis_ops_peak"]) for r in rows]),
        line("Redis CPU at peak (share of its one core)", [f"{r['redis_core_share']:.1%}" for r in rows]),
        line("decision log per day (GB)", [_n(r["decision_log_gb_day"], 2) for r in rows]),
        line(f"decision log kept ({p['retention']:g} days retention, GB)",
             [_n(r["decision_log_gb_retained"], 1) for r in rows]),
        line(f"verdict memos in Redis ({p['memo_ttl_days']:g}-day TTL, GB)", [_n(r["memo_gb"], 2) for r in rows]),
        line(f"sample store rows per day ({p['samples'].share:.0%} of listings)",
             [_n(r["sample_rows_day"]) for r in rows]),
        line("sample store per day (GB, Redis)", [_n(r["sample_gb_day"], 2) for r in rows]),
        line(f"sample store kept ({p['samples'].retention_days:g} days retention, GB)",
             [_n(r["sample_gb_retained"], 1) for r in rows]),
        "",
        "How each row is computed:",
        "",
        f"- **Gateway pods**: peak × {p['cpu_ms']} ms CPU per request (N = {min(runs)} above) ÷ "
        f"{p['per_pod_cores']:.2f} core per pod, at least {int(pod['min_replicas'])}. A pod's limit is "
        f"{pod['cpu_limit']:g} cores, so a pod also absorbs bursts above the HPA target.",
    ]
    for m in models:
        ceiling = per_gpu_items_per_s(m)
        how = (f"a reasoning model, decode-bound: `benchmarks/GPU.md`'s expected items/s on one H100 "
               f"at R = 200 reasoning tokens, its lower (no-overlap) bound = {ceiling:.0f} items/s per GPU"
               if m.get("reasoning") else
               f"{m['params'] / 1e9:g}e9 parameters, prefix caching {'on' if m['prefix_caching'] else 'off'}: "
               f"ceiling {GPU_SUSTAINED_FLOPS / 1e12:g} TFLOP/s ÷ (2 × parameters × "
               f"{ITEM_TOKENS + VERDICT_TOKENS + (0 if m['prefix_caching'] else PREFIX_TOKENS)} tokens "
               f"computed per item) = {ceiling:.0f} items/s per GPU")
        out.append(
            f"- **GPU replicas of `{m['name']}`** ({', '.join(m['configs'])}; {how}; "
            f"planned at {GPU_PLANNING_EFFICIENCY:.0%} of it, "
            f"for peak × {1 + SHADOW_RATE:g} (the shadow). The largest `max_replicas` in those "
            f"configs is {m['max_replicas']}"
            + (": raise it (and the RayService GPU worker group) for "
               + ", ".join(f"{_n(r['daily'] / 1e6)} M/day" for r in rows if r["gpus"][m["name"]] > m["max_replicas"])
               if any(r["gpus"][m["name"]] > m["max_replicas"] for r in rows) else "") + ".")
    over = [r for r in rows if r["redis_core_share"] > REDIS_CORE_BUDGET]
    big_memo = [r for r in rows if r["memo_gb"] + r["sample_gb_retained"] > 0.5]
    out += [
        f"- **Redis commands/s**: peak × {p['cmds']} commands per request + pods × {_n(p['idle'], 1)} "
        "idle commands/s per process.",
        f"- **Redis CPU**: peak × {p['usec']} µs per request (Redis's own accounting; its process CPU "
        "including networking is higher, see `redis_cpu_ms_per_request` in the results).",
        f"- **Decision log**: listings × {p['recs']:.3f} records per request (shadows add records) × "
        f"{p['rec_bytes']} bytes per record (measured from the segments the benchmark's gateways wrote).",
        f"- **Verdict memos** (the per-request sample Redis keeps so that reviewer feedback can be matched "
        f"to the arm that answered): listings × {p['memo_ttl_days']:g} days × {p['memo_bytes']} bytes "
        "(`MEMORY USAGE` of one memo key).",
        f"- **Sample store** (`samples`, opt-in; listing content for review, shadow flips and replay): "
        f"listings × `share` {p['samples'].share:g} × {p['sample_bytes']} bytes of Redis per kept row "
        f"(measured on the benchmark's Redis: row, time index and item set, with a "
        f"{runs[min(runs)].get('sample_content_chars', '?')}-character title and description), kept "
        f"`retention_days` {p['samples'].retention_days:g}. With `samples.store: sqlite` the same rows "
        "go to a file per host instead.",
        "",
        "## What the numbers say",
        "",
        ("- Redis CPU stays within budget at every volume." if not over else
         f"- Redis CPU exceeds {REDIS_CORE_BUDGET:.0%} of one core at "
         + ", ".join(f"{_n(r['daily'] / 1e6)} M/day" for r in over)
         + ": shard the caller-limit keys (they are hash-tagged per caller, `{key id}`, so Redis "
         "Cluster spreads them) or run limits on their own Redis."),
        ("- Verdict memos and the sample store fit the shipped Redis (`maxmemory 768mb`) at every "
         "volume." if not big_memo else
         "- Verdict memos plus the sample store outgrow the shipped Redis (`maxmemory 768mb`, "
         "`noeviction`: writes would be refused) at "
         + ", ".join(f"{_n(r['daily'] / 1e6)} M/day ({_n(r['memo_gb'] + r['sample_gb_retained'], 1)} GB)"
                     for r in big_memo)
         + " with a rollout running all day and samples on Redis: shorten the memo TTL to the "
         "feedback delay you need, keep samples in SQLite or lower `samples.share`, or give Redis "
         "the memory."),
        _growth_line(runs),
        _checks_line(runs),
        "",
    ]
    return "\n".join(out)


def _growth_line(runs: dict[int, dict[str, Any]]) -> str:
    ns = sorted(runs)
    lo, hi = ns[0], ns[-1]
    a, b = runs[lo]["redis_commands_per_request"], runs[hi]["redis_commands_per_request"]
    return (f"- Redis commands per request go from {a} with {lo} gateway process(es) to {b} with {hi} "
            f"({(b - a) / a:+.0%}); idle commands/s from {runs[lo]['idle_commands_per_s']} to "
            f"{runs[hi]['idle_commands_per_s']}. The per-request part (limiter, memo) does not depend "
            "on N; what grows with N is each process's background reads and once-a-second flushes.")


def _checks_line(runs: dict[int, dict[str, Any]]) -> str:
    failed = [(n, name) for n in sorted(runs) for name, ok in runs[n]["checks"].items() if not ok]
    if not failed:
        return ("- Under load, with every N: rollout counters and verdict memos exact, the caller "
                "limit held across processes, every label move seen by every process.")
    details = "; ".join(
        f"N = {n}: {name}" + (f" (limiter decisions taken locally because Redis answered late: "
                              f"{runs[n].get('limiter_fallbacks')})" if name == "caller_limit_held" else "")
        for n, name in failed)
    return f"- Checks that did not hold in this run: {details}."


def _load(uptime: str) -> str:
    m = re.search(r"load average: ([\d.]+)", uptime or "")
    return m.group(1) if m else "?"


def build() -> str:
    measured = json.loads(RESULTS.read_text())
    return render(measured, gateway_pod_settings(), gpu_models())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path, help="write the plan to this file")
    ap.add_argument("--check", type=Path, help="exit 1 when this file differs from the plan")
    args = ap.parse_args()
    text = build()
    if args.check:
        if args.check.read_text() != text:
            print(f"{args.check} is stale: run python benchmarks/capacity_plan.py --write {args.check}",
                  file=sys.stderr)
            return 1
        return 0
    if args.write:
        args.write.write_text(text)
        print(f"capacity_plan: wrote {args.write}")
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
