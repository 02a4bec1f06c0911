"""Moderation throughput through the gateway against the same vLLM engine called directly.

    .venv/bin/python benchmarks/engine_throughput.py [--items 128] [--concurrency 128,32]
        [--runs direct,vllm_server,gateway_vllm,gateway_http,gateway_handle]
    [--policy-tokens 3500] [--out benchmarks/results]

The workload is the one moderation traffic has: every request carries the same long policy
(the shipped `listing-moderation` system prompt, repeated until it is `--policy-tokens` long)
followed by one listing from `datasets/listings-sample.jsonl`, and asks for the verdict under
the same regex-constrained decoding the gateway uses. The model is a random 4-layer, 256-wide
Llama built locally (the shape issue #4's baseline used), so the engine does real prefill work.

Three runs, one after another, each on a freshly started engine with the same engine arguments
(`serving.ray_app.llm_config_kwargs`: prefix caching, priority scheduling, the CPU defaults):

1. **direct** — vLLM's offline `LLM.chat` over all items at once (the engine's own best case:
   every prompt queued up front, no server, no HTTP);
2. **vllm_server** — vLLM's own OpenAI server (`vllm.entrypoints.openai.api_server`, what
   `vllm serve` runs) driven directly with the same chat requests, at each `--concurrency`;
3. **gateway_vllm** — the gateway (`modgate up` with `serving.mode: http`) in front of that
   server, driven with `/v1/moderate`: the gateway's own cost, without Ray;
4. **gateway_http** / **gateway_handle** — `modgate up` with Ray Serve LLM (the default stack),
   the gateway reaching the replica over Ray Serve's HTTP app (`serving.transport: http`) or
   through deployment handles (`handle`, what the default `auto` is in `modgate up`).

Each run first sends `--warmup` items (not timed), so every run starts with the policy prefix
in the prefix cache; a server or stack is started once and then timed at each concurrency in
turn. Throughput = items / wall time of the timed batch.

**Which figure is the comparison.** The direct run hands the engine the whole batch at once, so
the like-for-like figure is the one with the whole batch in flight (`--concurrency` equal to
`--items`, the default's first value): the same prompts reach the same scheduler, and what
differs is only the serving path. Lower concurrencies are recorded beside it; there the engine
batches fewer prompts per step, which costs every server alike (vLLM's own included).

**Where the CPU went.** On this 2-core machine the gateway, Ray's processes and the engine
share the same cores, so the ratio includes the CPU the serving stack takes from the engine (on
a GPU node the engine does not compete for it). Each timed batch therefore also records the CPU
seconds each of the benchmark's own processes (everything it started: engine, servers, gateway,
Ray) used during it, by role (`cpu_s_by_role`), what all other processes of the machine used
(`cpu_s_outside`: other people's work on a shared machine) and the load average before and after.

Writes `<out>/engine_throughput.json`; `benchmarks/make_results.py` turns it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import yaml  # noqa: E402
from run_locust import git_commit  # noqa: E402

PROMPT = ROOT / "configs" / "prompts" / "listing-moderation.yaml"
DATASET = ROOT / "datasets" / "listings-sample.jsonl"
MODEL_NAME = "bench-llama"
MODEL_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}
RUNS = ("direct", "vllm_server", "gateway_vllm", "gateway_http", "gateway_handle")


def log(msg: str) -> None:
    print(f"[engine_throughput] {msg}", file=sys.stderr, flush=True)


def build_model(path: Path) -> Path:
    from serving.tiny_model import build_tiny_model, is_tiny_model_dir

    if not is_tiny_model_dir(path):
        log(f"building the random {MODEL_SHAPE} Llama in {path}")
        build_tiny_model(path, **MODEL_SHAPE)
    return path


def bench_prompt(model_dir: Path, policy_tokens: int, out_dir: Path) -> tuple[Path, int]:
    """The shipped prompt on the bench model, its system message repeated to `policy_tokens`."""
    from transformers import AutoTokenizer

    spec = yaml.safe_load(PROMPT.read_text(encoding="utf-8"))
    spec["model"] = MODEL_NAME
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    system = spec["messages"][0]["content"]
    paragraphs = [p for p in system.split("\n\n") if p.strip()]
    parts: list[str] = []
    while len(tok.encode("\n\n".join(parts))) < policy_tokens:  # whole paragraphs, in order
        parts.append(paragraphs[len(parts) % len(paragraphs)])
    if len(parts) > 1 and (policy_tokens - len(tok.encode("\n\n".join(parts[:-1])))
                           < len(tok.encode("\n\n".join(parts))) - policy_tokens):
        parts.pop()  # the last paragraph overshoots more than leaving it out falls short
    spec["messages"][0]["content"] = "\n\n".join(parts)
    spec.pop("locales", None)  # one locale: the en-US policy text for every item
    spec.pop("evaluation", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROMPT.name).write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False),
                                       encoding="utf-8")
    return out_dir, len(tok.encode(spec["messages"][0]["content"]))


def bench_version(prompts_dir: Path, name: str = PROMPT.stem) -> Any:
    """Prompt `name` from `prompts_dir` as the registry's version 1 of it."""
    from prompt_registry.loader import load_prompt_file
    from prompt_registry.models import PromptVersion

    spec = load_prompt_file(prompts_dir / f"{name}.yaml")
    return PromptVersion(spec=spec, version=1, content_hash=spec.content_hash(),
                         created_at=datetime.now(UTC), created_by="bench")


def load_items(n: int, tag: str) -> list[dict[str, Any]]:
    """`n` en-US listings from the sample dataset, each title prefixed with `[<tag>-<i>]`, so
    no two timed items anywhere in the benchmark share anything past the policy prefix (a
    repeated listing, or the same listing timed again at another concurrency, would find its
    whole prompt in the prefix cache and flatter that run)."""
    from gateway.quality.evaluation.dataset import read_dataset

    dataset, problems = read_dataset(DATASET)
    if dataset is None:
        raise SystemExit(f"{DATASET}: {problems}")
    rows = [r for r in dataset.rows if r.locale == "en-US"]
    items = [r.variables() for r in (rows * (n // len(rows) + 1))[:n]]
    for i, item in enumerate(items):
        item["item_id"] = f"{item['item_id']}-{tag}-{i}"
        item["title"] = f"[{tag}-{i}] {item['title']}"
        item["seller_id"] = item.get("seller_id") or f"seller-{i % 17}"
    return items


OUTSIDE = "outside the benchmark (other users of the machine)"


def cpu_snapshot() -> dict[str, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process on the machine, by pid:start. Only
    this process and its descendants (the engine, the servers, the stack and every Ray process
    it starts) get a role; everything else is `OUTSIDE`: on a shared machine other people's
    work must not be counted as the serving path's."""
    import psutil
    from soak import role_of

    me = os.getpid()
    ours = {me} | {p.pid for p in psutil.Process(me).children(recursive=True)}
    snap: dict[str, tuple[str, float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time", "cpu_times"]):
        info = p.info
        times = info.get("cpu_times")
        if times is None:
            continue
        if info["pid"] == me:
            role = "this process (the benchmark client; LLM.chat's front end in the direct run)"
        elif info["pid"] in ours:
            cmdline = info.get("cmdline") or []
            # `modgate up` started as `python -m gateway.cli.main up` (no installed script)
            role = ("gateway (modgate up)" if "gateway.cli.main" in cmdline and "up" in cmdline
                    else role_of(cmdline, info.get("name") or ""))
        else:
            role = OUTSIDE
        snap[f"{info['pid']}:{info['create_time']}"] = (role, times.user + times.system)
    return snap


def cpu_delta(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]],
              wall_s: float, load_before: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """CPU seconds per role of the benchmark's own processes between two snapshots (processes
    that appeared count from zero), the engine's share of them, what every other process of
    the machine used meanwhile (`cpu_s_outside`) and the load averages before and after."""
    by_role: dict[str, float] = {}
    outside = 0.0
    for key, (role, cpu) in after.items():
        used = cpu - before.get(key, (role, 0.0))[1]
        if used <= 0.005:
            continue
        if role == OUTSIDE:
            outside += used
        else:
            by_role[role] = by_role.get(role, 0.0) + used
    total = sum(by_role.values())
    engine = sum(v for k, v in by_role.items() if k.startswith("vLLM EngineCore") or k.startswith("vLLM worker"))
    ordered = dict(sorted(((k, round(v, 2)) for k, v in by_role.items()), key=lambda kv: -kv[1]))
    load = {"loadavg_1m_before": round(load_before[0], 2)} if load_before is not None else {}
    return {"cpu_s_by_role": ordered, "cpu_s_total": round(total, 2),
            "cpu_s_engine": round(engine, 2),
            "cpu_s_outside": round(outside, 2),
            "cpu_capacity_s": round(wall_s * (os.cpu_count() or 1), 2),
            "engine_share_of_cpu_used": round(engine / total, 3) if total else None,
            **load, "loadavg_1m_after": round(os.getloadavg()[0], 2)}


def engine_kwargs(model_dir: Path) -> dict[str, Any]:
    from serving.config import ModelConfig
    from serving.ray_app import llm_config_kwargs

    model = ModelConfig(name=MODEL_NAME, source=str(model_dir))
    kwargs = dict(llm_config_kwargs(model, str(model_dir))["engine_kwargs"])
    kwargs.pop("enable_prompt_tokens_details", None)  # an OpenAI-server option, not an engine one
    return kwargs


# --- 1. the engine called directly -----------------------------------------------------------


def run_direct(model_dir: Path, prompts_dir: Path, warm: list[dict[str, Any]],
               timed: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs in a child process (`--direct-child`) so its engine is gone before the stack starts."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from gateway.pipeline import ModerationPipeline

    version = bench_version(prompts_dir)

    def render(items: list[dict[str, Any]]) -> list[Any]:
        return [ModerationPipeline.build_chat(version, item, "en-US", request_id=str(i))[1]
                for i, item in enumerate(items)]

    chats, warm_chats = render(timed), render(warm)
    c0 = chats[0]
    params = SamplingParams(max_tokens=c0.max_tokens, temperature=c0.temperature,
                            seed=c0.seed, structured_outputs=StructuredOutputsParams(regex=c0.regex))
    kwargs = engine_kwargs(model_dir)
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), **kwargs)
    started = time.perf_counter() - t0
    llm.chat([c.messages for c in warm_chats], params, use_tqdm=False)
    load, before = os.getloadavg(), cpu_snapshot()
    t0 = time.perf_counter()
    outs = llm.chat([c.messages for c in chats], params, use_tqdm=False, priority=[0] * len(chats))
    wall = time.perf_counter() - t0
    cpu = cpu_delta(before, cpu_snapshot(), wall, load)
    parsed = sum(1 for o in outs if o.outputs and o.outputs[0].text.startswith('{"decision"'))
    cached = [o.num_cached_tokens or 0 for o in outs]
    prompt_tokens = [len(o.prompt_token_ids or []) for o in outs]
    return {"items": len(chats), "wall_s": round(wall, 3), "items_per_s": round(len(chats) / wall, 2),
            "engine_start_s": round(started, 1), "verdicts_parsed": parsed,
            "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1),
            "prefix_cache_hit_rate": round(sum(cached) / max(1, sum(prompt_tokens)), 3),
            "engine_kwargs": kwargs, **cpu}


# --- 2/3. through the gateway ----------------------------------------------------------------


async def drive(url: str, key: str, items: list[dict[str, Any]], concurrency: int,
                path: str = "/v1/moderate") -> dict[str, Any]:
    """POST each item to `url + path` with `concurrency` in flight. `/v1/moderate` answers
    carry the verdict; OpenAI chat completions (the engine's server) carry the text."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    decisions: dict[str, int] = {}
    cached = prompt = 0
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal cached, prompt
        while not queue.empty():
            item = queue.get_nowait()
            t = time.perf_counter()
            async with session.post(f"{url}{path}", json=item,
                                    headers={"authorization": f"Bearer {key}"}) as resp:
                body = await resp.json(content_type=None)
            latencies.append((time.perf_counter() - t) * 1000.0)
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
            if resp.status == 200:
                if "decision" in body:
                    decision = body["decision"]
                else:
                    text = body["choices"][0]["message"]["content"] or ""
                    decision = json.loads(text)["decision"] if text.startswith("{") else "unparsed"
                decisions[decision] = decisions.get(decision, 0) + 1
                prompt += body["usage"]["prompt_tokens"]

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=max(100, concurrency))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        load, before = os.getloadavg(), cpu_snapshot()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = cpu_delta(before, cpu_snapshot(), wall, load)
    latencies.sort()
    return {"concurrency": concurrency,
            "items": len(items), "wall_s": round(wall, 3), "items_per_s": round(len(items) / wall, 2),
            "p50_ms": round(latencies[len(latencies) // 2], 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "statuses": statuses, "decisions": decisions,
            "prompt_tokens_mean": round(prompt / max(1, statuses.get("200", 0)), 1), **cpu}


@contextlib.contextmanager
def gateway_stack(transport: str, model_dir: Path, prompts_dir: Path, tmp: Path, in_flight: int,
                  base_url: str | None = None) -> Iterator[Any]:
    """`modgate up` on the bench model, started and stopped around the block: Ray Serve with
    `transport`, or (with `base_url`) only the gateway in front of an OpenAI-compatible server
    already running there. Yields the `run_locust.Stack` (with `start_s` set)."""
    from run_locust import Stack

    base = yaml.safe_load((ROOT / "configs" / "modgate.yaml").read_text(encoding="utf-8"))
    base["serving"]["transport"] = transport
    if base_url is not None:
        base["serving"].update(mode="http", base_url=base_url)
    base["serving"]["models"] = [{
        "name": MODEL_NAME, "source": f"tiny:{model_dir}",
        "engine_kwargs": {k: v for k, v in engine_kwargs(model_dir).items()
                          if k in ("max_model_len", "gpu_memory_utilization")},
        "deployment": {"min_replicas": 1, "max_replicas": 1,
                       "max_ongoing_requests": max(64, in_flight)}}]
    base["gateway"]["max_inflight_per_model"] = max(64, in_flight)
    base["tracing"] = {"exporter": "none", "sample_ratio": 0.1}
    cfg_path = tmp / f"bench-{transport}.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    stack = Stack(cfg_path, timeout_s=600, keep_log=None, prompts_dir=prompts_dir)
    t0 = time.perf_counter()
    stack.start()
    try:
        stack.start_s = round(time.perf_counter() - t0, 1)
        yield stack
    finally:
        stack.stop()


def token_counts(gateway_url: str) -> dict[tuple[str, str, str], float]:
    """The gateway's `modgate_tokens_total` counters: (prompt, version, kind) -> tokens."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str, str], float] = {}
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "modgate_tokens_total":
                lb = sample.labels
                out[(lb["prompt"], lb["version"], lb["kind"])] = sample.value
    return out


def hit_rates(before: dict[tuple[str, str, str], float],
              after: dict[tuple[str, str, str], float]) -> dict[str, dict[str, Any]]:
    """Prefix-cache hit rate per prompt version between two `token_counts` readings, as the
    gateway reports it: cached input tokens / input tokens."""
    per: dict[str, dict[str, float]] = {}
    for (prompt, version, kind), value in after.items():
        delta = value - before.get((prompt, version, kind), 0.0)
        per.setdefault(f"{prompt}@v{version}", {})[kind] = delta
    return {ref: {"input_tokens": int(v.get("input", 0)), "cached_input_tokens": int(v.get("cached_input", 0)),
                  "hit_rate": round(v.get("cached_input", 0) / v["input"], 4) if v.get("input") else None}
            for ref, v in sorted(per.items()) if v.get("input")}


def run_gateway(transport: str, model_dir: Path, prompts_dir: Path, warm: list[dict[str, Any]],
                timed: dict[int, list[dict[str, Any]]], tmp: Path,
                base_url: str | None = None) -> list[dict[str, Any]]:
    with gateway_stack(transport, model_dir, prompts_dir, tmp, max(timed), base_url) as stack:
        key = stack.api_key()
        asyncio.run(drive(stack.url, key, warm, len(warm)))
        results = []
        for c, items in timed.items():
            before = token_counts(stack.url)
            result = asyncio.run(drive(stack.url, key, items, c))
            result["prefix_cache"] = hit_rates(before, token_counts(stack.url))
            result["stack_start_s"] = stack.start_s
            results.append(result)
        return results


class VllmServer:
    """vLLM's own OpenAI server on the bench model, with the same engine arguments."""

    def __init__(self, model_dir: Path, tmp: Path) -> None:
        from run_locust import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
        for key, value in engine_kwargs(model_dir).items():
            flag = "--" + key.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        self.log_path = tmp / "vllm-server.log"
        self.args = args

    def __enter__(self) -> VllmServer:
        import httpx

        log("starting " + " ".join(self.args[1:4]) + " ...")
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("vLLM server exited:\n" + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError("vLLM server not ready after 600 s")

    def __exit__(self, *exc: object) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def chat_bodies(prompts_dir: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The exact OpenAI request bodies the gateway sends for `items`."""
    from gateway.pipeline import ModerationPipeline
    from serving.http_backend import build_chat_body

    version = bench_version(prompts_dir)
    return [build_chat_body(ModerationPipeline.build_chat(version, item, "en-US", request_id=str(i))[1])
            for i, item in enumerate(items)]


def run_vllm(model_dir: Path, prompts_dir: Path, warm: list[dict[str, Any]],
             timed: dict[int, list[dict[str, Any]]], tmp: Path, with_gateway: bool) -> list[dict[str, Any]]:
    with VllmServer(model_dir, tmp) as server:
        if not with_gateway:
            asyncio.run(drive(server.url, "none", chat_bodies(prompts_dir, warm), len(warm),
                              "/v1/chat/completions"))
            return [asyncio.run(drive(server.url, "none", chat_bodies(prompts_dir, items), c,
                                      "/v1/chat/completions"))
                    for c, items in timed.items()]
        return run_gateway("http", model_dir, prompts_dir, warm, timed, tmp,
                           base_url=f"{server.url}/v1")


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=128, help="timed items per run (default 128)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed items before each run (default 8)")
    ap.add_argument("--concurrency", default="128,32",
                    help="requests in flight through the servers, comma-separated; each server or "
                         "stack is timed at each in turn (default %(default)s: the whole default "
                         "batch, which is what the direct run gets, then 32)")
    ap.add_argument("--policy-tokens", type=int, default=3500,
                    help="length of the shared policy prefix in tokens (default 3500)")
    ap.add_argument("--runs", default=",".join(RUNS),
                    help="which runs, comma-separated, in order (default: all: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--direct-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: expected comma-separated whole numbers, got {args.concurrency!r}")
    if not concurrencies or min(concurrencies) < 1:
        ap.error("--concurrency: give at least one number, each 1 or more")

    model_dir = build_model(ROOT / "data" / "models" / "bench-llama-4x256")
    # Distinct listings for the warm-up and for each timed pass; the direct run gets the first
    # pass's, so it and the like-for-like server figure see the very same prompts.
    warm = load_items(args.warmup, "w")
    timed = {c: load_items(args.items, f"p{k}") for k, c in enumerate(dict.fromkeys(concurrencies))}

    if args.direct_child is not None:  # the child: run the engine directly, print JSON
        result = run_direct(model_dir, args.direct_child, warm, load_items(args.items, "p0"))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    runs_wanted = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs_wanted if r not in RUNS]
    if bad:
        ap.error(f"--runs: unknown run(s) {bad}; choose from {', '.join(RUNS)}")
    tmp = Path(tempfile.mkdtemp(prefix="modgate-engine-bench-"))
    rows: list[dict[str, Any]] = []  # one per run and concurrency
    try:
        prompts_dir, policy_tokens = bench_prompt(model_dir, args.policy_tokens, tmp / "prompts")
        log(f"policy prefix: {policy_tokens} tokens; {args.items} timed items, {args.warmup} warm-up, "
            f"{', '.join(map(str, concurrencies))} in flight")
        for name in runs_wanted:
            log(f"run {name}")
            if name == "direct":
                proc = subprocess.run([sys.executable, __file__, "--items", str(args.items), "--warmup",
                                       str(args.warmup), "--direct-child", str(prompts_dir)],
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    log(proc.stderr[-4000:])
                    raise SystemExit("the direct engine run failed")
                got = [json.loads(line[len("RESULT "):]) | {"concurrency": args.items}]
            elif name in ("vllm_server", "gateway_vllm"):
                got = run_vllm(model_dir, prompts_dir, warm, timed, tmp,
                               with_gateway=name == "gateway_vllm")
            else:
                got = run_gateway(name.removeprefix("gateway_"), model_dir, prompts_dir, warm, timed, tmp)
            direct = next((r for r in rows if r["run"] == "direct"), None)
            for r in got:
                r = {"run": name, **r}
                if direct is not None and name != "direct":
                    r["ratio_to_direct"] = round(r["items_per_s"] / direct["items_per_s"], 3)
                server = next((s for s in rows if s["run"] == "vllm_server"
                               and s["concurrency"] == r["concurrency"]), None)
                if name == "gateway_vllm" and server is not None:
                    r["ratio_to_vllm_server"] = round(r["items_per_s"] / server["items_per_s"], 3)
                rows.append(r)
                log(f"{name} at {r['concurrency']} in flight: {r['items_per_s']} items/s" + (
                    f" ({100 * r['ratio_to_direct']:.1f} % of direct)" if "ratio_to_direct" in r else "")
                    + f"; CPU by role {r['cpu_s_by_role']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "benchmark": "engine_throughput",
        "command": "python benchmarks/engine_throughput.py " + " ".join(sys.argv[1:]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{platform.machine()} python {platform.python_version()} ({os.cpu_count()} cpus); "
                   "engine, Ray and gateway share the machine",
        "model": {"name": MODEL_NAME, **MODEL_SHAPE, "weights": "random"},
        "policy_tokens": policy_tokens, "items": args.items, "warmup": args.warmup,
        "concurrency": concurrencies, "same_batch_concurrency": args.items, "target_ratio": 0.95,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "engine_throughput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
