"""Latency of one moderation at a time through a running stack, and what the gateway adds.

    .venv/bin/python benchmarks/single_request.py --key "$(jq -r '.["local-caller"]' data/local-keys.json)" \
        [--gateway http://127.0.0.1:8080] [--serving http://127.0.0.1:8000/v1] [-n 50]

Sends n sequential requests to `POST /v1/moderate`, then the same rendered chat request
(same prompt version, same constraint) straight to the model server, alternating so both see
the same engine state. Reports p50/p95 of each and the difference: the gateway's overhead
(auth, validation, label resolution, rendering, verdict parsing, one extra loopback hop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prompt_registry.loader import load_prompt_file
from prompt_registry.render import render_messages
from serving.http_backend import build_chat_body
from serving.protocol import ChatRequest

LISTING = {"item_id": "bench-1", "seller_id": "seller-42",
           "title": "Designer sneakers AAA replica 1:1 mirror quality",
           "description": "Same as the original, logo included. WhatsApp me to pay by bank transfer.",
           "locale": "en-US"}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", default="http://127.0.0.1:8080")
    ap.add_argument("--serving", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--key", default=os.environ.get("MODGATE_API_KEY"), help="caller API key")
    ap.add_argument("--prompt-file", type=Path, default=ROOT / "configs/prompts/listing-moderation.yaml",
                    help="the prompt the gateway serves (to build the identical direct request)")
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if not args.key:
        ap.error("--key (or MODGATE_API_KEY) is required")

    spec = load_prompt_file(args.prompt_file)
    _, templates = spec.select_locale(LISTING["locale"])
    direct_body = build_chat_body(ChatRequest(
        model=spec.model, messages=render_messages(templates, spec.variables, LISTING),
        max_tokens=spec.sampling.max_tokens, temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p, regex=spec.verdict.regex()))

    gw, direct, reported = [], [], []
    with httpx.Client(timeout=60) as client:
        for i in range(args.n + 3):
            t = time.perf_counter()
            r = client.post(f"{args.gateway}/v1/moderate", json=LISTING,
                            headers={"authorization": f"Bearer {args.key}"})
            g = (time.perf_counter() - t) * 1000
            r.raise_for_status()
            t = time.perf_counter()
            d = client.post(f"{args.serving}/chat/completions", json=direct_body)
            dd = (time.perf_counter() - t) * 1000
            d.raise_for_status()
            if i >= 3:  # warm-up
                gw.append(g)
                direct.append(dd)
                reported.append(r.json()["latency_ms"])
    result = {
        "benchmark": "single_request",
        "command": "python benchmarks/single_request.py -n " + str(args.n),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
        "model": spec.model,
        "requests": args.n,
        "gateway_p50_ms": round(statistics.median(gw), 2),
        "gateway_p95_ms": round(pct(gw, 0.95), 2),
        "gateway_reported_p50_ms": round(statistics.median(reported), 2),
        "direct_p50_ms": round(statistics.median(direct), 2),
        "direct_p95_ms": round(pct(direct, 0.95), 2),
        "overhead_p50_ms": round(statistics.median(gw) - statistics.median(direct), 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "single_request.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
