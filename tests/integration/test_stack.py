"""End to end through the real stack: HTTP → gateway → Ray Serve → vLLM (CPU) → verdict."""

from __future__ import annotations

import asyncio
import re
import secrets
import time

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import ROOT, SECOND_MODEL, Stack
from testsupport.otlp_receiver import OtlpHttpReceiver

pytestmark = pytest.mark.stack

LISTING = {
    "item_id": "item-1001", "seller_id": "seller-42",
    "title": "Designer sneakers AAA replica 1:1 mirror quality",
    "description": "Same as the original, logo included. WhatsApp me to pay by bank transfer.",
    "locale": "en-US",
}
DECISIONS = {"allow", "block", "needs_review"}
CATEGORIES = {"none", "counterfeit", "prohibited_item", "misleading_claim", "off_platform_payment",
              "adult", "hate_harassment"}


def _assert_valid_verdict(body: dict) -> None:
    # A random-weight model under constrained decoding must still produce a valid verdict.
    assert body["fail_reason"] is None, body
    assert body["decision"] in DECISIONS
    assert body["category"] in CATEGORIES
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["prompt"]["name"] == "listing-moderation" and body["prompt"]["version"] >= 1
    assert body["model"] == "tiny-llama"
    assert body["usage"]["prompt_tokens"] > 100 and body["usage"]["completion_tokens"] > 0


def test_valid_listing_end_to_end(stack: Stack) -> None:
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", json=LISTING, timeout=60, headers=stack.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    _assert_valid_verdict(body)
    assert body["item_id"] == "item-1001"
    assert r.headers["x-request-id"] == body["request_id"]


def test_zh_cn_listing(stack: Stack) -> None:
    listing = {**LISTING, "item_id": "item-2002", "locale": "zh-CN",
               "title": "名牌运动鞋 高仿 一比一 原版品质", "description": "加微信私聊，转账更优惠"}
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", json=listing, timeout=60, headers=stack.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    _assert_valid_verdict(body)
    assert body["prompt"]["locale"] == "zh-CN"


def test_requests_without_a_key_are_denied(stack: Stack) -> None:
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", json=LISTING, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated"


def test_32_concurrent_requests(stack: Stack) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120, headers=stack.headers) as client:
            return await asyncio.gather(*[
                client.post("/v1/moderate", json={**LISTING, "item_id": f"item-{i}",
                                                   "seller_id": f"seller-{i % 7}",
                                                   "title": f"{LISTING['title']} #{i}"})
                for i in range(32)])

    started = time.perf_counter()
    responses = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    for body in bodies:
        _assert_valid_verdict(body)
    assert len({b["request_id"] for b in bodies}) == 32
    assert sorted(b["item_id"] for b in bodies) == sorted(f"item-{i}" for i in range(32))
    print(f"32 concurrent moderations in {elapsed:.2f}s")


@pytest.mark.parametrize(
    ("kwargs", "status", "kind"),
    [
        ({"content": b'{"item_id": "x", ', "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
        ({"json": {"item_id": "x", "seller_id": "s"}}, 422, "invalid_request"),
        ({"json": {**LISTING, "title": ["not", "a", "string"]}}, 422, "invalid_request"),
        ({"json": {**LISTING, "prompt": "no-such-prompt"}}, 404, "unknown_prompt"),
        ({"json": {**LISTING, "description": "x" * 70_000}}, 413, "body_too_large"),
        ({"json": {**LISTING, "title": "x" * 600}}, 422, "content_too_long"),
    ],
)
def test_bad_input_over_the_socket(stack: Stack, kwargs: dict, status: int, kind: str) -> None:
    kwargs = {**kwargs, "headers": {**stack.headers, **kwargs.get("headers", {})}}  # never mutate the param
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["type"] == kind


def test_serving_layer_speaks_openai_to_the_official_client(stack: Stack) -> None:
    """The Ray Serve app is a plain OpenAI-compatible server: the official client works, and
    vLLM's structured-output extension constrains a random model to the requested shape."""
    client = openai.OpenAI(base_url=stack.serving_url, api_key="unused", timeout=60, max_retries=0)
    regex = r'\{"decision":"(allow|block|needs_review)"\}'
    out = client.chat.completions.create(
        model="tiny-llama", max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "Is this listing allowed? Title: kids bicycle"}],
        extra_body={"structured_outputs": {"regex": regex}},
    )
    assert re.fullmatch(regex, out.choices[0].message.content or "")
    assert out.usage is not None and out.usage.completion_tokens > 0


@pytest.mark.destructive
def test_engine_killed_mid_run_never_yields_allow(stack: Stack) -> None:
    """Kill the vLLM engine process while traffic flows. Every answer must be a validated verdict
    or an explicit retryable JSON error — never an `allow` produced by the failure — and the
    gateway itself must stay up."""
    engines = stack.engine_processes()
    assert engines, f"no vLLM engine process found under the stack:\n{stack.log_tail()}"
    results: list[tuple[float, int, dict]] = []
    kill_at: list[float] = []

    async def traffic(client: httpx.AsyncClient, worker: int, stop: float) -> None:
        i = 0
        while time.monotonic() < stop:
            r = await client.post("/v1/moderate", json={**LISTING, "item_id": f"kill-{worker}-{i}"})
            results.append((time.monotonic(), r.status_code, r.json()))
            i += 1

    async def killer() -> None:
        await asyncio.sleep(1.5)
        kill_at.append(time.monotonic())
        for p in engines:
            p.kill()

    async def run() -> None:
        stop = time.monotonic() + 12.0
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30, headers=stack.headers) as client:
            await asyncio.gather(killer(), *[traffic(client, w, stop) for w in range(4)])

    asyncio.run(run())
    assert kill_at
    after = [(code, body) for t, code, body in results if t > kill_at[0]]
    assert after, "no request completed after the kill"
    for code, body in [(c, b) for _, c, b in results]:
        if code == 200:
            _assert_valid_verdict(body)
        else:
            assert code in (502, 503, 504), (code, body)
            assert body["error"]["type"].startswith("model_") and body["error"]["retryable"] is True
    assert any(code != 200 for code, _ in after), "killing the engine changed nothing"
    assert httpx.get(f"{stack.gateway_url}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{stack.gateway_url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"


def _gateway_client(stack: Stack) -> openai.OpenAI:
    key = stack.headers["authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=key, timeout=60, max_retries=0)


def test_openai_client_against_the_gateway(stack: Stack) -> None:
    """Any OpenAI client can use the gateway: raw messages, registry prompts, streaming and
    the moderation endpoint, all through the real engine."""
    client = _gateway_client(stack)
    assert [m.id for m in client.models.list().data] == ["tiny-llama", SECOND_MODEL]
    raw = client.chat.completions.create(model="tiny-llama", max_tokens=8,
                                         messages=[{"role": "user", "content": "hello"}])
    assert raw.choices[0].message.content is not None and raw.usage.completion_tokens > 0
    via_prompt = client.chat.completions.create(
        model="ignored", messages=[],
        extra_body={"prompt": {"name": "listing-moderation", "label": "production",
                               "variables": {"title": LISTING["title"], "description": LISTING["description"],
                                             "locale": "en-US"}}})
    extra = via_prompt.model_extra["modgate"]
    assert extra["prompt"]["version"] >= 1 and extra["verdict"]["fail_reason"] is None
    chunks = list(client.chat.completions.create(
        model="ignored", messages=[], stream=True,
        extra_body={"prompt": {"name": "listing-moderation", "label": "production",
                               "variables": {"title": "kids bicycle", "description": "", "locale": "en-US"}}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith('{"decision":"')
    mod = client.moderations.create(input=["AAA replica sneakers", "kids bicycle"])
    assert len(mod.results) == 2
    for result in mod.results:
        assert isinstance(result.flagged, bool)
        assert set(result.categories.model_dump()) >= {"counterfeit"} or result.model_extra


def test_one_trace_from_the_caller_into_the_engine(stack: Stack, otlp: OtlpHttpReceiver) -> None:
    """A caller's traceparent → gateway spans → the vLLM engine's own `llm_request` span, as a
    child of the gateway's `chat` span (the context crosses the HTTP hop and Ray Serve)."""
    caller_trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)  # unique per stack
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", json={**LISTING, "item_id": "traced-1"}, timeout=60,
                   headers={**stack.headers, "traceparent": f"00-{caller_trace}-{caller_span}-01"})
    assert r.status_code == 200 and r.json()["trace_id"] == caller_trace
    deadline = time.monotonic() + 60
    while True:
        spans = [s for s in otlp.spans() if s["trace_id"] == caller_trace]
        names = {s["name"] for s in spans}
        if {"POST /v1/moderate", "chat tiny-llama", "llm_request"} <= names:
            break
        assert time.monotonic() < deadline, f"spans seen for the trace: {sorted(names)}"
        time.sleep(0.5)
    by_name = {s["name"]: s for s in spans}
    root, chat, engine = by_name["POST /v1/moderate"], by_name["chat tiny-llama"], by_name["llm_request"]
    assert root["parent_span_id"] == caller_span
    assert chat["parent_span_id"] == root["span_id"]
    assert engine["parent_span_id"] == chat["span_id"]
    assert "gen_ai.usage.prompt_tokens" in engine["attributes"] or "gen_ai.usage.input_tokens" in engine["attributes"]


def test_shared_policy_prefix_is_served_from_the_prefix_cache(stack: Stack) -> None:
    """Requests of one prompt version share the policy text as a byte-identical prefix; the
    engine reports the cached prompt tokens and the gateway counts them per version."""
    for i in range(4):
        r = httpx.post(f"{stack.gateway_url}/v1/moderate", timeout=60, headers=stack.headers,
                       json={**LISTING, "item_id": f"prefix-{i}", "title": f"item {i} {'x' * i}"})
        assert r.status_code == 200
    metrics = httpx.get(f"{stack.gateway_url}/metrics", timeout=10).text
    values = {}
    for line in metrics.splitlines():
        if line.startswith("modgate_tokens_total{") and 'prompt="listing-moderation"' in line:
            kind = line.split('kind="')[1].split('"')[0]
            values[kind] = values.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    assert values.get("input", 0) > 0
    hit_rate = values.get("cached_input", 0) / values["input"]
    print(f"prefix-cache hit rate over the session: {hit_rate:.1%}")
    assert hit_rate > 0.5


def test_a_prompt_version_runs_on_the_model_it_names(stack: Stack) -> None:
    """Two models from one config, each its own Ray Serve deployment and engine: a prompt
    version names its model and the gateway sends it there; the default prompt stays put."""
    served = httpx.get(f"{stack.serving_url}/models", timeout=10).json()
    assert {"tiny-llama", SECOND_MODEL} <= {m["id"] for m in served["data"]}
    listed = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10, headers=stack.headers).json()
    assert {"tiny-llama", SECOND_MODEL} <= {m["id"] for m in listed["data"]}

    spec = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    spec.update(name="listing-moderation-b", model=SECOND_MODEL)
    spec.pop("evaluation", None)
    r = httpx.post(f"{stack.gateway_url}/v1/prompts", timeout=30, content=yaml.safe_dump(spec),
                   headers={**stack.admin_headers, "content-type": "application/yaml"})
    assert r.status_code in (200, 201), r.text
    version = r.json()["version"]

    # pinning a version needs `moderate:pin` (or admin), not only `moderate`
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", timeout=60, headers=stack.admin_headers,
                   json={**LISTING, "item_id": "two-models-1", "prompt": "listing-moderation-b",
                         "prompt_version": version})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == SECOND_MODEL and body["fail_reason"] is None
    assert body["prompt"] == {**body["prompt"], "name": "listing-moderation-b", "version": version}
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", timeout=60, headers=stack.headers,
                   json={**LISTING, "item_id": "two-models-2"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama"


def test_a_cascade_escalates_to_the_second_engine(stack: Stack) -> None:
    """A version whose first model cannot finish a verdict (max_tokens 8: truncated, so
    needs_review) escalates to the second engine, which answers a valid one; the decision log
    keeps both answers."""
    from gateway.quality.decisions import read_segments

    spec = yaml.safe_load((ROOT / "configs" / "prompts" / "listing-moderation.yaml").read_text())
    spec.pop("evaluation", None)
    spec.update(name="listing-cascade", sampling={"temperature": 0.0, "max_tokens": 8},
                cascade={"model": SECOND_MODEL, "sampling": {"temperature": 0.0, "max_tokens": 96}})
    r = httpx.post(f"{stack.gateway_url}/v1/prompts", timeout=30, content=yaml.safe_dump(spec),
                   headers={**stack.admin_headers, "content-type": "application/yaml"})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{stack.gateway_url}/v1/moderate", timeout=60, headers=stack.admin_headers,
                   json={**LISTING, "item_id": "cascade-1", "prompt": "listing-cascade",
                         "prompt_version": r.json()["version"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == SECOND_MODEL and body["fail_reason"] is None, body
    deadline = time.monotonic() + 30  # a guard only: the decision log is written in the background
    while True:
        records = [d for d in read_segments(stack.data_dir / "decisions") if d.item_id == "cascade-1"]
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (record,) = records
    assert (record.escalation, record.first_model, record.first_fail_reason) == (
        "needs_review", "tiny-llama", "truncated_output")
    assert (record.model, record.decision) == (SECOND_MODEL, body["decision"])


def test_the_local_ray_cluster_runs_lean(stack: Stack) -> None:
    """`modgate up` starts Ray with less background work (serving/config.py RayClusterConfig:
    no Ray metrics pipeline, a 0.5 s Serve control loop), so on a CPU machine the engine keeps
    the cores: every process of the cluster, the Serve controller included, inherits it."""
    # This stack's controller: another cluster's on the machine (an orphan of an earlier run,
    # say) runs with other settings and says nothing about this one.
    controllers = stack.ray_processes_where(lambda p: p.cmdline()[0].startswith("ray::ServeController"))
    assert controllers, "no Serve controller process found"
    env = controllers[0].environ()
    assert env.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "0.5"
    assert env.get("RAY_enable_metrics_collection") == "0"
    assert env.get("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS") == "10000"
    assert env.get("RAY_num_workers_soft_limit") == "0"


def test_the_stack_runs_its_own_ray_cluster(stack: Stack) -> None:
    """`modgate up` without `serving.ray.address` starts a cluster of its own under its
    RAY_TMPDIR: one GCS, a child of `modgate up`, though the directory names another cluster in
    ray_current_cluster (the conftest's stale address file, which ray.init() used to join)."""
    import psutil

    gcs = stack.ray_processes_where(lambda p: p.name() == "gcs_server")
    assert len(gcs) == 1, gcs
    assert gcs[0].pid in {p.pid for p in psutil.Process(stack.process.pid).children(recursive=True)}
    assert f"--log_dir={stack.ray_tmpdir}/ray/session_" in " ".join(gcs[0].cmdline())


def test_the_default_transport_is_deployment_handles(stack: Stack) -> None:
    """`serving.transport: auto` (the shipped config): `modgate up` with one gateway process
    calls the models through Ray Serve deployment handles; `http` goes through the proxy."""
    r = httpx.get(f"{stack.gateway_url}/readyz", headers=stack.headers, timeout=30)
    assert r.status_code == 200, r.text
    backend = r.json()["checks"]["backend"]
    assert backend.get("transport") == ("handle" if stack.transport == "auto" else None), backend


def test_cpu_engines_run_on_tcmalloc(stack: Stack) -> None:
    """vLLM's CPU engine wants tcmalloc preloaded; on glibc malloc its resident memory kept
    growing under steady load (benchmarks/soak.py). scripts/bootstrap installs it and
    serving/ray_app.py preloads it into every CPU model's processes."""
    from serving.ray_app import _system_tcmalloc

    assert _system_tcmalloc() is not None, "libtcmalloc-minimal4 is missing: run ./scripts/bootstrap"
    engines = stack.engine_processes()
    assert engines
    for p in engines:
        maps = open(f"/proc/{p.pid}/maps").read()
        assert "libtcmalloc" in maps, f"engine process {p.pid} runs without tcmalloc"


def test_calibrated_probabilities_from_the_real_engine(stack: Stack) -> None:
    """vLLM returns token log-probabilities for the constrained verdict; the gateway turns them
    into probabilities of the decision and category beside the model's confidence. The engine
    masks forbidden tokens before computing them (vLLM 0.32 `raw_logprobs`): every alternative
    with mass at a decision position can begin an allowed decision."""
    from gateway.pipeline import ModerationPipeline
    from gateway.verdict import TOP_LOGPROBS, parse_verdict
    from prompt_registry import PromptVersion
    from prompt_registry.loader import load_prompt_file
    from serving.http_backend import OpenAIHttpBackend

    r = httpx.post(f"{stack.gateway_url}/v1/moderate", json={**LISTING, "item_id": "item-cal-1"},
                   timeout=60, headers=stack.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    _assert_valid_verdict(body)
    assert body["decided_by"] == "model"
    assert 0.0 < body["decision_probability"] <= 1.0 and 0.0 < body["category_probability"] <= 1.0

    spec = load_prompt_file(ROOT / "configs" / "prompts" / "listing-moderation.yaml")
    version = PromptVersion.model_validate({"spec": spec, "version": 1, "content_hash": spec.content_hash(),
                                            "created_at": "2026-01-01T00:00:00Z"})
    variables = {k: LISTING[k] for k in ("title", "description", "locale")}
    _, chat = ModerationPipeline.build_chat(version, variables, "en-US", request_id="cal-direct")
    assert chat.top_logprobs == TOP_LOGPROBS

    async def call():  # type: ignore[no-untyped-def]
        backend = OpenAIHttpBackend(stack.serving_url)
        try:
            return await backend.chat(chat, timeout_s=60)
        finally:
            await backend.aclose()
    result = asyncio.run(call())
    assert result.logprobs is not None
    assert "".join(t.token for t in result.logprobs).startswith(result.text)  # then the stop token
    verdict = parse_verdict(result.text, result.finish_reason, spec.verdict, logprobs=result.logprobs)
    assert verdict.fail_reason is None
    scores = verdict.decision_scores
    assert scores is not None and verdict.category_scores is not None
    assert sum(scores.attributed.values()) + scores.unresolved == pytest.approx(1.0, abs=1e-6)
    # the first token that reaches into the decision value: only allowed beginnings carry mass
    head = '{"decision":"'
    offset = 0
    for tok in result.logprobs:
        start, offset = offset, offset + len(tok.token)
        if offset > len(head):
            before = result.text[:start]
            with_mass = [(alt, lp) for alt, lp in tok.top if lp > -9000]  # masked: -inf, sent as -9999
            assert with_mass
            for alt, logprob in with_mass:
                cand = before + alt
                assert any(cand[:n] == full[:n] for d in spec.verdict.decisions
                           for full in [head + d + '"'] for n in [min(len(cand), len(full))]), (alt, logprob)
            break
