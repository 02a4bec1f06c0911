"""Overload: a saturated model makes the gateway answer 429 fast, and memory stays flat.

    .venv/bin/python benchmarks/overload.py [--duration 20] [--connections 256]

A stub upstream that takes 200 ms per answer (a busy engine) behind `modgate gateway` with
`max_inflight_per_model: 16` and `max_queued_per_model: 32`, driven by `wrk` with far more
connections than that. Reports: share of 429s, latency of the 429 answers (p50/p99 from a
separate probe loop), time from the start of the overload to the first 429, and the gateway's
resident memory before, during and after (it must not grow while shedding).
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
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import LISTING, _free_port, _lua, _wait_http, _wrk  # noqa: E402
from prompt_registry.keys import generate_key  # noqa: E402
from prompt_registry.loader import seed_store  # noqa: E402
from prompt_registry.sqlite_store import SqlitePromptStore  # noqa: E402


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        stub_port, gw_port = _free_port(), _free_port()
        stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/stub_upstream.py"), "--port", str(stub_port),
                                 "--delay", "0.2"])
        store = SqlitePromptStore(tmp / "registry.db")
        seed_store(store, ROOT / "configs" / "prompts")
        key, record = generate_key("bench", ["moderate"], created_by="bench")
        store.put_key(record)
        store.close()
        config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
        config["data_dir"] = str(tmp)
        config["registry"]["seed_dir"] = None
        config["gateway"].update(port=gw_port, max_inflight_per_model=16, max_queued_per_model=32)
        config["serving"].update(mode="http", base_url=f"http://127.0.0.1:{stub_port}/v1")
        (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(tmp / "gw.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_http(f"http://127.0.0.1:{stub_port}/v1/models")
            _wait_http(f"http://127.0.0.1:{gw_port}/healthz")
            url = f"http://127.0.0.1:{gw_port}/v1/moderate"
            headers = {"authorization": f"Bearer {key}"}
            httpx.post(url, json=LISTING, headers=headers, timeout=10)
            rss_before = _rss_mb(gw.pid)
            probes: list[tuple[float, int, float]] = []  # (t since start, status, latency)
            stop = threading.Event()
            start = time.monotonic()

            def probe() -> None:
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        t = time.perf_counter()
                        r = client.post(url, json=LISTING, headers=headers)
                        probes.append((time.monotonic() - start, r.status_code, (time.perf_counter() - t) * 1000))

            prober = threading.Thread(target=probe)
            rss_samples: list[float] = []

            def sample() -> None:
                while not stop.is_set():
                    rss_samples.append(_rss_mb(gw.pid))
                    time.sleep(1)

            sampler = threading.Thread(target=sample)
            prober.start()
            sampler.start()
            load = _wrk(url, _lua(tmp, LISTING, {"Authorization": f"Bearer {key}"}), args.connections, args.duration)
            stop.set()
            prober.join()
            sampler.join()
            time.sleep(2)
            rss_after = _rss_mb(gw.pid)
        finally:
            gw.terminate()
            stub.terminate()
            gw.wait(timeout=20)
            stub.wait(timeout=20)
    shed = [p for p in probes if p[1] == 429]
    ok = [p for p in probes if p[1] == 200]
    lat = sorted(p[2] for p in shed)
    from benchmarks.run_locust import git_commit

    commit = git_commit()  # "-dirty" when the tree differs from the commit
    result = {
        "benchmark": "overload_shedding",
        "command": "python benchmarks/overload.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
        "setup": "stub engine 200 ms/answer; gateway max_inflight 16, max_queued 32; "
                 f"wrk {args.connections} connections for {args.duration}s",
        "load_requests": load["requests"], "load_non_2xx": load["non_2xx"],
        "share_429": round(load["non_2xx"] / max(1, load["requests"]), 4),
        "probe_requests": len(probes), "probe_429": len(shed), "probe_200": len(ok),
        "first_429_after_s": round(min((p[0] for p in shed), default=float("nan")), 3),
        "p50_429_ms": round(statistics.median(lat), 2) if lat else None,
        "p99_429_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_max_during": round(max(rss_samples), 1) if rss_samples else None,
        "rss_mb_after": round(rss_after, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
