"""Summarise one locust run (benchmarks/run_locust.py) into tables and plots.

    .venv/bin/python benchmarks/summarize_locust.py benchmarks/results/locust/cpu-smoke \\
        [--results-md benchmarks/RESULTS.md] [--no-results-md]

Reads what the run left in the directory: locust's `locust_stats.csv`,
`locust_stats_history.csv` and `locust_failures.csv` (the end-of-run `*_final.csv` copies the
locustfile writes after locust quit take precedence), the locustfile's
`locust_verdicts.json` (verdict mix, latency histograms) and run_locust.py's `run.json`
(command, time, machine, commit, profile settings). Writes next to them:

- `summary.md`   the profile's section: throughput, p50/p95/p99, error rate, verdict mix;
- `summary.json` the same figures, machine-readable (benchmark, command, when, machine,
                 git_commit like the other benchmarks/results/*.json);
- `throughput.png`, `latency_over_time.png`, `latency_distribution.png` (matplotlib, Agg);

and replaces (or appends) the profile's section of benchmarks/RESULTS.md, between
`<!-- locust:<profile> begin -->` and `<!-- locust:<profile> end -->`. Every figure comes from
those files.

Throughput is given twice: over the whole run (locust's figure, spawn ramp included) and
while all users were running (request count difference over that interval, from the history).
Percentiles in the main table are locust's (response times rounded to 2 significant digits
above 100 ms); the latency table adds exact client-side percentiles and the gateway's own
`latency_ms` from the responses, whose difference is what the client side (network, locust
on a shared CPU) adds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # matplotlib lives in the venv

PREFIX = "locust"
AGG = "Aggregated"


# --- reading ---------------------------------------------------------------------------------


def _num(v: str | None) -> float | None:
    if v is None or v in ("", "N/A"):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def final_or(out: Path, kind: str) -> Path:
    """The locustfile's end-of-run `<prefix>_<kind>_final.csv` if there, else locust's own."""
    final = out / f"{PREFIX}_{kind}_final.csv"
    return final if final.exists() else out / f"{PREFIX}_{kind}.csv"


def merge_verdicts(out: Path) -> dict[str, Any]:
    counts: dict[str, Counter[str]] = {}
    client: Counter[int] = Counter()
    gateway: Counter[int] = Counter()
    sellers = multi = 0
    files = sorted(out.glob(f"{PREFIX}_verdicts*.json"))
    for f in files:
        d = json.loads(f.read_text())
        for dim, c in d.get("counts", {}).items():
            counts.setdefault(dim, Counter()).update(c)
        client.update({int(k): v for k, v in d.get("client_latency_ms_hist", {}).items()})
        gateway.update({int(k): v for k, v in d.get("gateway_latency_ms_hist", {}).items()})
        sellers += d.get("sellers_seen", 0)
        multi += d.get("sellers_in_several_arm_versions", 0)
    return {"files": len(files), "counts": counts, "client_ms": client, "gateway_ms": gateway,
            "sellers_seen": sellers, "sellers_in_several_arm_versions": multi}


def hist_percentile(hist: Counter[int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= rank:
            return float(value)
    return float(max(hist))


# --- figures ---------------------------------------------------------------------------------


def compute(out: Path) -> dict[str, Any]:
    stats = read_csv(final_or(out, "stats"))
    history = [r for r in read_csv(out / f"{PREFIX}_stats_history.csv") if r.get("Name") == AGG]
    failures = read_csv(final_or(out, "failures"))
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    v = merge_verdicts(out)

    rows = []
    for r in stats:
        n = int(r["Request Count"])
        f = int(r["Failure Count"])
        rows.append({
            "name": r["Name"] if r["Name"] != AGG else "all",
            "requests": n, "failures": f,
            "error_rate": (f / n) if n else None,
            "rps": _num(r["Requests/s"]),
            "p50_ms": _num(r.get("50%")), "p95_ms": _num(r.get("95%")), "p99_ms": _num(r.get("99%")),
            "max_ms": _num(r.get("Max Response Time")), "avg_ms": _num(r.get("Average Response Time")),
        })
    agg = next((r for r in rows if r["name"] == "all"), None)

    # steady state: from the first history row with every user running to the last row
    steady = None
    users = [int(_num(r["User Count"]) or 0) for r in history]
    if history and max(users) > 0:
        top = max(users)
        full = [r for r, u in zip(history, users, strict=True) if u == top]
        first, last = full[0], full[-1]
        dt = float(last["Timestamp"]) - float(first["Timestamp"])
        if dt >= 5:
            dn = float(last["Total Request Count"]) - float(first["Total Request Count"])
            df = float(last["Total Failure Count"]) - float(first["Total Failure Count"])
            steady = {"users": top, "seconds": dt, "requests": int(dn),
                      "rps": dn / dt, "error_rate": (df / dn) if dn else None}

    lat = {
        "client": {q: hist_percentile(v["client_ms"], q / 100) for q in (50, 95, 99)},
        "gateway": {q: hist_percentile(v["gateway_ms"], q / 100) for q in (50, 95, 99)},
        "client_samples": sum(v["client_ms"].values()),
        "gateway_samples": sum(v["gateway_ms"].values()),
    }
    return {"run": run, "rows": rows, "agg": agg, "steady": steady, "history": history,
            "failures": failures, "verdicts": v, "latency": lat}


# --- markdown --------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def _settings_line(s: dict[str, Any]) -> str:
    parts = [f"{s.get('users')} users", f"spawn {s.get('spawn_rate')}/s", f"{s.get('run_time')}"]
    if s.get("pacing"):
        parts.append(f"{s['pacing']} req/s per user")
    else:
        w = s.get("wait", [0, 0])
        parts.append(f"think time {w[0]}–{w[1]} s" if isinstance(w, list) else f"think time {w} s")
    if int(s.get("processes", 1) or 1) > 1:
        parts.append(f"{s['processes']} locust processes")
    parts.append(f"zh-CN {s.get('zh_share')}, violating-looking {s.get('violating_share')}, "
                 f"{s.get('sellers')} sellers (skew {s.get('seller_skew')}), prompts `{s.get('prompts')}`, "
                 f"descriptions lognormal median {s.get('desc_median')} chars "
                 f"[{s.get('desc_min')}, {s.get('desc_max')}] (zh-CN ×{s.get('zh_char_scale')})")
    return "; ".join(str(p) for p in parts)


MIX_ORDER = ["decision", "category", "arm", "fail_reason", "prompt_version", "locale_variant",
             "intent_decision", "stale", "errors"]
MIX_TITLES = {"decision": "decision", "category": "category", "arm": "arm",
              "fail_reason": "fail_reason", "prompt_version": "prompt version (label)",
              "locale_variant": "request locale → variant served", "intent_decision":
              "listing text → decision", "stale": "prompt.stale", "errors": "errors (status type)"}


def markdown(profile: str, d: dict[str, Any], out: Path, md_dir: Path) -> str:
    run, agg, steady, lat, v = d["run"], d["agg"], d["steady"], d["latency"], d["verdicts"]
    rel = os.path.relpath(out, md_dir)
    lines = [f"## Load test: `{profile}`", ""]
    if run.get("settings", {}).get("why"):
        lines += [" ".join(run["settings"]["why"].split()), ""]
    lines += [f"- command: `{run.get('command', '?')}`",
              f"- locust: `{run.get('locust_command', '?')}`",
              (f"- when: {run.get('when', '?')}; machine: {run.get('machine', '?')}; "
              f"commit: {run.get('git_commit') or '?'}; stack: {run.get('stack', '?')}"),
              f"- profile: {_settings_line(run.get('settings', {}))}", ""]

    lines += [("| requests | throughput, whole run (req/s) | throughput, all users running (req/s) "
              "| p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | error rate |"),
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if agg:
        lines.append(f"| {agg['requests']:,} | {_f(agg['rps'], 2)} | "
                     f"{_f(steady['rps'], 2) if steady else '—'} | {_f(agg['p50_ms'])} | "
                     f"{_f(agg['p95_ms'])} | {_f(agg['p99_ms'])} | {_f(agg['max_ms'])} | "
                     f"{_pct(agg['error_rate'])} |")
    lines.append("")
    if steady:
        lines += [(f"All {steady['users']} users ran for {steady['seconds']:.0f} s "
                  f"({steady['requests']:,} requests, error rate {_pct(steady['error_rate'])})."), ""]

    per = [r for r in d["rows"] if r["name"] != "all"]
    if len(per) > 1:
        lines += ["| endpoint | requests | req/s | p50 (ms) | p95 (ms) | p99 (ms) | error rate |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in per:
            lines.append(f"| `{r['name']}` | {r['requests']:,} | {_f(r['rps'], 2)} | {_f(r['p50_ms'])} | "
                         f"{_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {_pct(r['error_rate'])} |")
        lines.append("")

    if lat["client_samples"]:
        lines += ["| latency (ms, exact) | p50 | p95 | p99 | samples |", "|---|---:|---:|---:|---:|",
                  (f"| client (locust, every answer) | {_f(lat['client'][50])} | {_f(lat['client'][95])} | "
                  f"{_f(lat['client'][99])} | {lat['client_samples']:,} |"),
                  (f"| gateway `latency_ms` (200s) | {_f(lat['gateway'][50])} | {_f(lat['gateway'][95])} | "
                  f"{_f(lat['gateway'][99])} | {lat['gateway_samples']:,} |"), ""]

    counts = v["counts"]
    if counts:
        lines += ["Verdict mix (answers with a verdict; errors: answers without):", "",
                  "| | value | count | share |", "|---|---|---:|---:|"]
        for dim in [*MIX_ORDER, *sorted(set(counts) - set(MIX_ORDER) - {"intent_category"})]:
            c = counts.get(dim)
            if not c:
                continue
            total = sum(c.values())
            for i, (val, n) in enumerate(c.most_common()):
                lines.append(f"| {MIX_TITLES.get(dim, dim) if i == 0 else ''} | `{val}` | {n:,} | "
                             f"{100 * n / total:.1f} % |")
        lines.append("")
        lines += [(f"Sellers seen: {v['sellers_seen']:,}; seen in more than one arm/version: "
                  f"{v['sellers_in_several_arm_versions']:,} (canary stickiness: expected 0 while no "
                  "rollout step or promotion happens during the run)."), ""]

    if d["failures"]:
        lines += ["| failure | occurrences |", "|---|---:|"]
        for f in sorted(d["failures"], key=lambda r: -int(r["Occurrences"]))[:10]:
            lines.append(f"| `{f['Name']}`: {f['Error']} | {int(f['Occurrences']):,} |")
        lines.append("")

    for png, title in (("throughput.png", "throughput"), ("latency_over_time.png", "latency over time"),
                       ("latency_distribution.png", "latency distribution")):
        if (out / png).exists():
            lines.append(f"![{profile}: {title}]({rel}/{png})")
    lines += ["", f"Raw: `{rel}/` (locust CSVs, `report.html`, `summary.json`)."]
    return "\n".join(lines) + "\n"


def summary_json(profile: str, d: dict[str, Any]) -> dict[str, Any]:
    run, agg, steady, lat, v = d["run"], d["agg"], d["steady"], d["latency"], d["verdicts"]
    def r2(x: float | None) -> float | None:
        return None if x is None else round(x, 2)

    return {
        "benchmark": f"locust/{profile}",
        "command": run.get("command"),
        "when": run.get("when"),
        "machine": run.get("machine"),
        "git_commit": run.get("git_commit"),
        "profile": profile,
        "settings": {k: val for k, val in run.get("settings", {}).items() if k != "why"},
        "requests": agg["requests"] if agg else 0,
        "failures": agg["failures"] if agg else 0,
        "error_rate": r2(agg["error_rate"]) if agg and agg["error_rate"] is not None else None,
        "throughput_rps": r2(agg["rps"]) if agg else None,
        "throughput_all_users_rps": r2(steady["rps"]) if steady else None,
        "p50_ms": agg["p50_ms"] if agg else None,
        "p95_ms": agg["p95_ms"] if agg else None,
        "p99_ms": agg["p99_ms"] if agg else None,
        "max_ms": agg["max_ms"] if agg else None,
        "client_exact_ms": {f"p{q}": x for q, x in lat["client"].items()},
        "gateway_latency_ms": {f"p{q}": x for q, x in lat["gateway"].items()},
        "endpoints": [r for r in d["rows"] if r["name"] != "all"],
        "verdict_mix": {dim: dict(c.most_common()) for dim, c in v["counts"].items()},
        "sellers_seen": v["sellers_seen"],
        "sellers_in_several_arm_versions": v["sellers_in_several_arm_versions"],
        "locust_exit_code": run.get("locust_exit_code"),
    }


# --- plots -----------------------------------------------------------------------------------


def plots(profile: str, d: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = d["history"]
    if hist:
        t0 = float(hist[0]["Timestamp"])
        t = [float(r["Timestamp"]) - t0 for r in hist]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(t, [_num(r["Requests/s"]) or 0 for r in hist], label="requests/s")
        ax.plot(t, [_num(r["Failures/s"]) or 0 for r in hist], label="failures/s", color="tab:red")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("per second (locust's 10 s window)")
        ax2 = ax.twinx()
        ax2.plot(t, [_num(r["User Count"]) or 0 for r in hist], color="tab:gray", ls="--", label="users")
        ax2.set_ylabel("users")
        ax2.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left")
        ax.set_title(f"{profile}: throughput")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4))
        for col in ("50%", "95%", "99%"):
            pts = [(x, _num(r.get(col))) for x, r in zip(t, hist, strict=True)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"p{col[:-1]}")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("ms (locust's 10 s window)")
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left")
        ax.set_title(f"{profile}: latency percentiles over time")
        fig.tight_layout()
        fig.savefig(out / "latency_over_time.png", dpi=110)
        plt.close(fig)

    v = d["verdicts"]
    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = False
    if v["client_ms"]:
        lo = max(1, min(min(v["client_ms"]), min(v["gateway_ms"], default=10**9)))
        hi = max(max(v["client_ms"]), max(v["gateway_ms"], default=1)) + 1
        bins = _log_bins(lo, hi)
        for name, h, color in (("client (locust)", v["client_ms"], "tab:blue"),
                               ("gateway latency_ms", v["gateway_ms"], "tab:orange")):
            if h:
                keys = sorted(h)
                ax.hist([max(k, lo) for k in keys], bins=bins, weights=[h[k] for k in keys],
                        histtype="step", lw=1.6, label=name, color=color)
        for q, ls in ((50, "-"), (95, "--"), (99, ":")):
            x = d["latency"]["client"][q]
            if x is not None:
                ax.axvline(x, color="tab:blue", ls=ls, lw=0.8, label=f"client p{q} = {x:.0f} ms")
        ax.set_xscale("log")
        from matplotlib.ticker import ScalarFormatter

        for axis in (ax.xaxis,):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("latency, ms (log scale)")
        ax.set_ylabel("requests")
        drawn = True
    elif d["agg"]:
        stats = read_csv(final_or(out, "stats"))
        agg = next(r for r in stats if r["Name"] == AGG)
        cols = [c for c in agg if re.fullmatch(r"[0-9.]+%", c)]
        ax.plot([_num(agg[c]) for c in cols], [float(c[:-1]) for c in cols], marker="o",
                label="locust percentiles (all requests)")
        ax.set_xlabel("ms")
        ax.set_ylabel("percentile")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_title(f"{profile}: latency distribution")
        fig.tight_layout()
        fig.savefig(out / "latency_distribution.png", dpi=110)
    plt.close(fig)


def _log_bins(lo: float, hi: float, per_decade: int = 24) -> list[float]:
    a, b = math.log10(lo), math.log10(hi)
    n = max(10, int((b - a) * per_decade) + 1)
    return [10 ** (a + (b - a) * i / n) for i in range(n + 1)]


# --- RESULTS.md ------------------------------------------------------------------------------


def update_results_md(path: Path, profile: str, section: str) -> None:
    begin = f"<!-- locust:{profile} begin (benchmarks/summarize_locust.py) -->"
    end = f"<!-- locust:{profile} end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmark results\n\nGenerated from the files in `benchmarks/results/`; no figure is typed "
        "by hand.\n\n")
    pattern = re.compile(rf"<!-- locust:{re.escape(profile)} begin[^>]*-->.*?{re.escape(end)}\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a run's directory: benchmarks/results/locust/<profile>")
    ap.add_argument("--profile", default=None, help="default: run.json's profile, else the directory name")
    ap.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md alone")
    args = ap.parse_args()
    out = args.out.resolve()
    if not (out / f"{PREFIX}_stats.csv").exists():
        print(f"summarize_locust: no {PREFIX}_stats.csv in {out}", file=sys.stderr)
        return 2
    d = compute(out)
    profile = args.profile or d["run"].get("profile") or out.name
    plots(profile, d, out)
    md_path = args.results_md.resolve()
    section = markdown(profile, d, out, md_path.parent)
    (out / "summary.md").write_text(markdown(profile, d, out, out), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary_json(profile, d), indent=2,
                                                 ensure_ascii=False) + "\n")
    if not args.no_results_md:
        update_results_md(md_path, profile, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
