"""How long the gateway's hot path takes to resolve a prompt label from its in-memory cache.

    .venv/bin/python benchmarks/registry_resolve.py [--calls 200000] [--out benchmarks/results]

Target (issue 3): under 20 µs per resolve. Measures `PromptCache.resolve` on a warm entry,
inside a running asyncio loop, with a real SQLite store behind it (not touched on hits).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.prompt_cache import PromptCache
from prompt_registry.loader import seed_store
from prompt_registry.sqlite_store import SqlitePromptStore

TARGET_US = 20.0


async def measure(calls: int, batches: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlitePromptStore(Path(tmp) / "r.db")
        seed_store(store, ROOT / "configs" / "prompts")
        cache = PromptCache(store, refresh_s=3600)
        await cache.resolve("listing-moderation", "production")
        per_batch = calls // batches
        results = []
        for _ in range(batches):
            start = time.perf_counter()
            for _ in range(per_batch):
                await cache.resolve("listing-moderation", "production")
            results.append((time.perf_counter() - start) / per_batch * 1e6)
        store.close()
        return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    per_call = asyncio.run(measure(args.calls, args.batches))
    result = {
        "benchmark": "registry_resolve",
        "command": "python benchmarks/registry_resolve.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "calls": args.calls,
        "median_us_per_resolve": round(statistics.median(per_call), 3),
        "worst_batch_us_per_resolve": round(max(per_call), 3),
        "target_us": TARGET_US,
        "meets_target": statistics.median(per_call) < TARGET_US,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry_resolve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
