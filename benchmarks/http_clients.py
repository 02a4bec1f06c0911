"""Why the HTTP backend uses aiohttp: httpx vs aiohttp as the gateway's upstream client.

    .venv/bin/python benchmarks/http_clients.py [--requests 4000] [--concurrency 32]

Each client posts the same ~2 KB chat request to the fast stub upstream
(benchmarks/stub_upstream.py, started here) with `concurrency` requests in flight, on uvloop,
reading and decoding every answer. Reports requests/s per client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import _free_port, _wait_http  # noqa: E402

BODY = orjson.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 8})


async def with_httpx(url: str, n: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                r = await client.post(url, content=BODY, headers={"content-type": "application/json"})
                orjson.loads(r.content)

        start = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return n / (time.perf_counter() - start)


async def with_aiohttp(url: str, n: int, concurrency: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem, session.post(url, data=BODY, headers={"content-type": "application/json"}) as r:
                orjson.loads(await r.read())

        start = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    port = _free_port()
    stub = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/stub_upstream.py"), "--port", str(port)])
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        uvloop.install()
        rps = {"httpx": asyncio.run(with_httpx(url, args.requests, args.concurrency)),
               "aiohttp": asyncio.run(with_aiohttp(url, args.requests, args.concurrency))}
    finally:
        stub.terminate()
        stub.wait(timeout=20)
    from benchmarks.run_locust import git_commit

    commit = git_commit()  # "-dirty" when the tree differs from the commit
    result = {
        "benchmark": "upstream_http_clients",
        "command": "python benchmarks/http_clients.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus); client and stub share the machine",
        "requests": args.requests, "concurrency": args.concurrency,
        "httpx_rps": round(rps["httpx"], 1), "aiohttp_rps": round(rps["aiohttp"], 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_clients.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
