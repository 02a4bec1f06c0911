"""What one Ray Serve hop costs, and what sending several requests per hop buys.

    .venv/bin/python benchmarks/handle_hop.py [--duration 8] [--concurrency 1,32]
        [--settings 1,8:2:1,8:2:2,16:2:2,32:2:4] [--out benchmarks/results]

The gateway's `handle` transport calls model replicas through Ray Serve deployment handles. To
see the hop alone, the replica here is a trivial deployment with the same two methods the real
`LLMServer` subclass has (`chat_json`, `chat_json_batch`) that answer a canned chat completion
at once — no engine. The driver (this process, like `modgate up`) runs the gateway's real
`RayHandleBackend` at each `--concurrency` (requests in flight) for `--duration` seconds per setting.

A setting is `max_size[:max_wait_ms[:max_hops]]` of `serving.handle_batch`; `1` is one request
per Ray call (no batching). Reports requests/s, p50/p99 latency and the mean requests per call.
Writes `<out>/handle_hop.json`; `benchmarks/make_results.py` puts it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_locust import git_commit  # noqa: E402

APP = "hopbench"
MODEL = "stub-model"

COMPLETION = {
    "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": '{"decision":"allow","category":"none","confidence":0.90}'}}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 20, "total_tokens": 1220,
              "prompt_tokens_details": {"cached_tokens": 1024}},
}


def parse_setting(text: str) -> dict[str, float]:
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected max_size[:max_wait_ms[:max_hops]]")
    try:
        size = int(parts[0])
        wait = float(parts[1]) if len(parts) > 1 else 2.0
        hops = int(parts[2]) if len(parts) > 2 else 4
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers expected") from None
    return {"max_size": size, "max_wait_ms": wait, "max_hops": hops}


def deploy() -> None:
    from ray import serve

    @serve.deployment(name=f"LLMServer:{MODEL}", max_ongoing_requests=256)
    class StubLLMServer:
        async def chat_json(self, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
            return COMPLETION

        async def chat_json_batch(self, bodies: list[dict[str, Any]],
                                  headers: list[dict[str, str]]) -> list[dict[str, Any]]:
            return [COMPLETION for _ in bodies]

    serve.run(StubLLMServer.bind(), name=APP, route_prefix=None)


async def drive(setting: dict[str, float], duration: float, concurrency: int) -> dict[str, Any]:
    from serving.config import HandleBatchConfig
    from serving.http_backend import OpenAIHttpBackend
    from serving.protocol import ChatRequest
    from serving.ray_handle_backend import RayHandleBackend

    backend = RayHandleBackend(APP, stream_fallback=OpenAIHttpBackend("http://127.0.0.1:1/v1"),
                               batch=HandleBatchConfig(**setting))
    request = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "listing"}], max_tokens=24,
                          request_id="hop")
    await backend.chat(request, timeout_s=30)  # resolve the handle, warm the path
    latencies: list[float] = []
    stop = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await backend.chat(request, timeout_s=30)
            latencies.append((time.perf_counter() - t) * 1000.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    stats = backend.batch_stats().get(MODEL, {"mean_batch": 1.0})
    await backend.aclose()
    latencies.sort()
    return {**setting, "rps": round(len(latencies) / wall, 1),
            "p50_ms": round(latencies[len(latencies) // 2], 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2),
            "requests": len(latencies), "mean_batch": stats["mean_batch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per setting (default 8)")
    ap.add_argument("--concurrency", default="1,32",
                    help="requests in flight, comma-separated (default %(default)s: one at a time "
                         "shows the wait an idle batcher adds, 32 what batching buys)")
    ap.add_argument("--settings", default="1,8:2:1,8:2:2,16:2:2,32:2:4",
                    help="comma-separated max_size[:max_wait_ms[:max_hops]] (default %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.settings.split(",") if s]

    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        deploy()
        # Untimed: Ray's first thousands of calls are slower (routers, connections warming up);
        # without this the first setting measured would be penalised.
        asyncio.run(drive(settings[0], min(args.duration, 5.0), 32))
        rows = []
        for setting, conc in [(s, int(c)) for c in args.concurrency.split(",") for s in settings]:
            row = {"concurrency": conc, **asyncio.run(drive(setting, args.duration, conc))}
            print(f"c{conc:<3} max_size {row['max_size']:>3} wait {row['max_wait_ms']} ms hops {row['max_hops']}: "
                  f"{row['rps']:8.1f} req/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                  f"mean batch {row['mean_batch']}", flush=True)
            rows.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "handle_hop",
        "command": "python benchmarks/handle_hop.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus); "
                   "driver and Ray share the machine",
        "duration_s": args.duration,
        "settings": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "handle_hop.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'handle_hop.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
