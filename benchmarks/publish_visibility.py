"""Publish-to-visible latency: how long after a label move until two separate gateway
processes sharing one Redis serve the new version.

    .venv/bin/python benchmarks/publish_visibility.py [--moves 50] [--out benchmarks/results]

Starts its own redis-server and two `modgate gateway` processes on free loopback ports (no
model needed: the gateways' cache endpoint reports which version each serves), then moves the
`production` label back and forth and polls both gateways until both report the new version.
Target (issue 3): under 50 ms. Polling adds up to one loopback round trip (~1 ms) of error.
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

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prompt_registry.keys import generate_key
from prompt_registry.loader import seed_store
from prompt_registry.redis_store import RedisPromptStore
from testsupport.redis_server import RedisServer

TARGET_MS = 50.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server = RedisServer(tmp / "redis").start()
        store = RedisPromptStore(server.url, prefix="bench")
        seed_store(store, ROOT / "configs" / "prompts")
        spec = store.resolve("listing-moderation", "production").spec
        store.publish(spec.model_copy(update={"description": "v2"}), actor="bench")
        key, record = generate_key("bench", ["admin"], created_by="bench")
        store.put_key(record)

        config = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text())
        config["data_dir"] = str(tmp / "data")
        config["registry"] = {"store": "redis", "redis_url": server.url, "redis_key_prefix": "bench",
                              "seed_dir": None}
        config["serving"]["mode"] = "http"
        config["serving"]["base_url"] = f"http://127.0.0.1:{_free_port()}/v1"  # nothing there
        config["gateway"]["prompt_refresh_s"] = 3600  # visibility must come from change events
        procs, urls = [], []
        try:
            for i in range(2):
                port = _free_port()
                cfg_path = tmp / f"gw{i}.yaml"
                cfg = {**config, "gateway": {**config["gateway"], "port": port}}
                cfg_path.write_text(yaml.safe_dump(cfg))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli.main", "gateway", "--config", str(cfg_path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ}))
                urls.append(f"http://127.0.0.1:{port}")
            client = httpx.Client(headers={"x-api-key": key}, timeout=5)

            def served(url: str) -> int | None:
                try:
                    entries = client.get(f"{url}/v1/cache/prompts").json()["entries"]
                except (httpx.HTTPError, ValueError, KeyError):
                    return None
                return next((e["version"] for e in entries if e["label"] == "production"), None)

            deadline = time.monotonic() + 60
            while any(served(u) != 1 for u in urls):
                if time.monotonic() > deadline:
                    raise SystemExit("gateways did not come up within 60 s")
                time.sleep(0.1)

            latencies = []
            current = 1
            for _ in range(args.moves):
                target = 2 if current == 1 else 1
                start = time.perf_counter()
                store.set_label("listing-moderation", "production", target, expected=current, actor="bench")
                pending = set(urls)
                while pending:
                    pending = {u for u in pending if served(u) != target}
                    if time.perf_counter() - start > 5:
                        raise SystemExit("a gateway did not see the move within 5 s")
                latencies.append((time.perf_counter() - start) * 1000)
                current = target
                time.sleep(0.05)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=20)
            store.close()
            server.stop()

    lat = sorted(latencies)
    result = {
        "benchmark": "publish_visibility",
        "command": "python benchmarks/publish_visibility.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
        "moves": len(lat),
        "gateways": 2,
        "p50_ms": round(statistics.median(lat), 2),
        "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 2),
        "max_ms": round(lat[-1], 2),
        "target_ms": TARGET_MS,
        "meets_target": lat[int(0.95 * (len(lat) - 1))] < TARGET_MS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish_visibility.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
