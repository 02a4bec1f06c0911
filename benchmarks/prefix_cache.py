"""Prefix-cache hit rate through the gateway, per prompt version (issue #4).

    .venv/bin/python benchmarks/prefix_cache.py [--policy-tokens 1000] [--items 96]
        [--concurrency 8] [--transport handle] [--out benchmarks/results]

Two prompts, each with a shared policy of about `--policy-tokens` tokens: the shipped
`listing-moderation` system prompt cut or repeated to that length, and a second prompt whose
policy has the same paragraphs in another order (so the two policies share no prefix and
compete for the same cache). Both run on the engine_throughput bench model (a random 4×256
Llama) behind `modgate up` with Ray Serve LLM and vLLM's prefix caching as configured.
Distinct listings from the sample dataset alternate between the two prompts, `--concurrency`
in flight, after one warm-up listing per prompt.

The figures are the gateway's own counters, per prompt version: `modgate_tokens_total` with
`kind="input"` and `kind="cached_input"` (the engine's cached-token count of every answer),
read before and after the timed listings:

- **hit rate** = cached input tokens / input tokens: the issue's figure (target > 90 %);
- **ceiling**: the most any prefix cache could give, the tokens every prompt of the version
  shares (the policy and the fixed text before the listing, found by tokenising each rendered
  prompt with the model's chat template) over all input tokens. The listing itself can never
  come from the cache, so a ~1,000-token policy with ~100-token listings caps the hit rate
  near 90 %;
- **prefix reuse** = cached tokens / shared tokens: how much of what could come from the
  cache did (below 100 % only by the engine's cache-block rounding or by evictions).

Writes `<out>/prefix_cache.json`; `benchmarks/make_results.py` turns it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from engine_throughput import (  # noqa: E402
    PROMPT,
    bench_prompt,
    bench_version,
    build_model,
    drive,
    gateway_stack,
    hit_rates,
    load_items,
    token_counts,
)
from run_locust import git_commit  # noqa: E402

SECOND = "listing-moderation-b"


def log(msg: str) -> None:
    print(f"[prefix_cache] {msg}", file=sys.stderr, flush=True)


def second_prompt(prompts_dir: Path) -> None:
    """A second prompt beside the first: the same policy paragraphs, rotated by half."""
    spec = yaml.safe_load((prompts_dir / PROMPT.name).read_text(encoding="utf-8"))
    paragraphs = spec["messages"][0]["content"].split("\n\n")
    half = len(paragraphs) // 2
    spec["messages"][0]["content"] = "\n\n".join(paragraphs[half:] + paragraphs[:half])
    spec["name"] = SECOND
    spec["description"] = "prefix_cache benchmark: the first prompt's policy, paragraphs rotated"
    (prompts_dir / f"{SECOND}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False),
                                               encoding="utf-8")


def shared_prefix(model_dir: Path, prompts_dir: Path, name: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Token counts of each rendered prompt of `name` and the prefix all of them share."""
    from transformers import AutoTokenizer

    from gateway.pipeline import ModerationPipeline

    version = bench_version(prompts_dir, name)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seqs = []
    for i, item in enumerate(items):
        chat = ModerationPipeline.build_chat(version, item, "en-US", request_id=str(i))[1]
        text = tok.apply_chat_template(chat.messages, tokenize=False, add_generation_prompt=True)
        seqs.append(tok.encode(text, add_special_tokens=False))
    common = len(os.path.commonprefix(seqs))  # works on any sequences, token lists included
    total = sum(len(s) for s in seqs)
    return {"shared_prefix_tokens": common, "prompt_tokens_mean": round(statistics.mean(len(s) for s in seqs), 1),
            "ceiling": round(common * len(seqs) / total, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy-tokens", type=int, default=1000, help="policy length in tokens (default 1000)")
    ap.add_argument("--items", type=int, default=96, help="timed listings, split between the two prompts")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--transport", choices=("handle", "http"), default="handle",
                    help="how the gateway reaches Ray Serve (default handle)")
    ap.add_argument("--target", type=float, default=0.9, help="hit rate to reach per version (default 0.9)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.items < 2 or args.concurrency < 1 or args.policy_tokens < 16:
        ap.error("--items must be 2 or more, --concurrency 1 or more, --policy-tokens 16 or more")

    model_dir = build_model(ROOT / "data" / "models" / "bench-llama-4x256")
    tmp = Path(tempfile.mkdtemp(prefix="modgate-prefix-bench-"))
    names = (PROMPT.stem, SECOND)
    try:
        prompts_dir, policy_tokens = bench_prompt(model_dir, args.policy_tokens, tmp / "prompts")
        second_prompt(prompts_dir)
        items = load_items(args.items, "pc")
        for i, item in enumerate(items):  # alternate: the two policies compete for the cache
            item["prompt"] = names[i % 2]
        warm = load_items(2, "pcw")
        for item, name in zip(warm, names, strict=True):
            item["prompt"] = name
        ceilings = {f"{n}@v1": shared_prefix(model_dir, prompts_dir, n, [i for i in items if i["prompt"] == n])
                    for n in names}
        log(f"policy {policy_tokens} tokens; {args.items} listings over {len(names)} prompts, "
            f"{args.concurrency} in flight, transport {args.transport}")
        with gateway_stack(args.transport, model_dir, prompts_dir, tmp, args.concurrency) as stack:
            key = stack.api_key()
            asyncio.run(drive(stack.url, key, warm, 1))
            before = token_counts(stack.url)
            run = asyncio.run(drive(stack.url, key, items, args.concurrency))
            versions = hit_rates(before, token_counts(stack.url))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for ref, v in versions.items():
        v.update(ceilings.get(ref, {}))
        shared = v.get("shared_prefix_tokens")
        n = sum(1 for i in items if f"{i['prompt']}@v1" == ref)
        v["listings"] = n
        v["prefix_reuse"] = (round(v["cached_input_tokens"] / (shared * n), 4) if shared and n else None)
        log(f"{ref}: hit rate {v['hit_rate']:.1%} (ceiling {v.get('ceiling', 0):.1%}, "
            f"prefix reuse {v['prefix_reuse'] or 0:.1%})")
    rates = [v["hit_rate"] for v in versions.values() if v.get("hit_rate") is not None]
    doc = {
        "benchmark": "prefix_cache",
        "command": "python benchmarks/prefix_cache.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus)",
        "model": "random Llama 4×256 (engine_throughput's bench model)",
        "transport": args.transport,
        "policy_tokens": policy_tokens,
        "items": args.items,
        "concurrency": args.concurrency,
        "statuses": run["statuses"],
        "target_hit_rate": args.target,
        "versions": versions,
        "meets_target": bool(rates) and len(rates) == len(names) and all(r > args.target for r in rates),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prefix_cache.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {path}")
    return 0 if run["statuses"].get("200") == args.items else 1


if __name__ == "__main__":
    sys.exit(main())
