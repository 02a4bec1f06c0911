"""Tracing and metrics: one trace per request with the right nesting, the caller's traceparent
honoured, nothing sensitive in spans or logs, Prometheus metrics per prompt version and arm,
and real OTLP export (HTTP and gRPC) to receivers on loopback."""

from __future__ import annotations

import logging
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.api.app import create_app
from gateway.config import GatewaySettings
from gateway.telemetry import TracingSettings, build_tracer_provider
from prompt_registry.keys import parse_key
from prompt_registry.sqlite_store import SqlitePromptStore
from serving.fake_backend import FakeBackend
from testsupport.otlp_receiver import OtlpHttpReceiver

ROOT = Path(__file__).resolve().parents[2]
SECRET_TITLE = "Rolex Daytona SECRET-LISTING-7f3a"
LISTING = {"item_id": "item-1", "seller_id": "seller-1", "title": SECRET_TITLE,
           "description": "call me at SECRET-DESC-91c2"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def key(caller_key: str) -> str:
    return caller_key


def _client(store: SqlitePromptStore, key: str, exporter: object, ratio: float = 1.0,
            backend: FakeBackend | None = None) -> TestClient:
    provider = build_tracer_provider(TracingSettings(sample_ratio=ratio), exporter=exporter)  # type: ignore[arg-type]
    app = create_app(GatewaySettings(), store, backend or FakeBackend(), tracer_provider=provider)
    return TestClient(app, headers={"authorization": f"Bearer {key}"})


def test_one_trace_per_request_with_correct_nesting(store: SqlitePromptStore, key: str) -> None:
    exporter = InMemorySpanExporter()
    with _client(store, key, exporter) as client:
        r = client.post("/v1/moderate", json=LISTING,
                        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert r.status_code == 200
    assert r.json()["trace_id"] == CALLER_TRACE
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/moderate", "auth", "prompt.resolve", "prompt.render",
                          "chat tiny-llama", "verdict.validate"}
    root = spans["POST /v1/moderate"]
    assert root.parent is not None and format(root.parent.span_id, "016x") == CALLER_SPAN
    for name, span in spans.items():
        assert format(span.context.trace_id, "032x") == CALLER_TRACE
        if name != "POST /v1/moderate":
            assert span.parent is not None and span.parent.span_id == root.context.span_id, name
    chat = spans["chat tiny-llama"].attributes
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.request.model"] == "tiny-llama"
    assert chat["gen_ai.usage.input_tokens"] > 0 and chat["prompt.version"] == 1
    assert chat["traffic.arm"] == "stable"
    assert root.attributes["moderation.decision"] == r.json()["decision"]


def test_no_listing_content_or_keys_in_spans_or_logs(store: SqlitePromptStore, key: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    backend = FakeBackend()
    backend.responder = lambda _r: "garbage"  # also exercise the warning log path
    caplog.set_level(logging.DEBUG)
    with _client(store, key, exporter, backend=backend) as client:
        client.post("/v1/moderate", json=LISTING)
        client.post("/v1/moderate", json=LISTING, headers={"authorization": f"Bearer {key}x"})
    dump = repr([(s.name, dict(s.attributes or {}), [e.attributes for e in s.events])
                 for s in exporter.get_finished_spans()]) + caplog.text
    secret_part = parse_key(key)[1]  # type: ignore[index]  # the secret may itself contain "_"
    assert len(secret_part) > 20
    for needle in ("SECRET-LISTING-7f3a", "SECRET-DESC-91c2", secret_part, "Bearer"):
        assert needle not in dump, needle


def test_sampling(store: SqlitePromptStore, key: str) -> None:
    exporter = InMemorySpanExporter()
    with _client(store, key, exporter, ratio=0.0) as client:
        r = client.post("/v1/moderate", json=LISTING)
        assert r.json()["trace_id"] is None and exporter.get_finished_spans() == ()
        # a caller that sampled its trace is honoured even at ratio 0
        r = client.post("/v1/moderate", json=LISTING,
                        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert r.json()["trace_id"] == CALLER_TRACE and len(exporter.get_finished_spans()) == 6


def test_prometheus_metrics_by_prompt_version_and_arm(store: SqlitePromptStore, key: str) -> None:
    backend = FakeBackend()
    with _client(store, key, InMemorySpanExporter(), backend=backend) as client:
        client.post("/v1/moderate", json=LISTING)
        backend.responder = lambda _r: "not json"
        client.post("/v1/moderate", json=LISTING)
        client.post("/v1/moderate", json={"title": "x"})
        text = client.get("/metrics").text
    assert 'modgate_verdict_failures_total{arm="stable",prompt="listing-moderation",reason="unparseable_output",version="1"} 1.0' in text
    assert 'modgate_requests_total{code="422",route="/v1/moderate"} 1.0' in text
    assert 'modgate_requests_total{code="200",route="/v1/moderate"} 2.0' in text
    for stage in ("auth", "prompt.resolve", "prompt.render", "backend", "verdict.validate", "total"):
        assert f'modgate_stage_seconds_count{{arm="stable",prompt="listing-moderation",stage="{stage}",version="1"}}' in text \
            or f'stage="{stage}"' in text, stage
    assert 'modgate_prompt_cache_age_seconds{label="production",prompt="listing-moderation"}' in text
    assert 'modgate_tokens_total{kind="input",prompt="listing-moderation",version="1"}' in text


def _wait(cond, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_otlp_http_export_to_a_real_receiver(store: SqlitePromptStore, key: str) -> None:
    receiver = OtlpHttpReceiver()
    try:
        settings = TracingSettings(exporter="otlp_http", endpoint=receiver.endpoint)
        app = create_app(GatewaySettings(), store, FakeBackend(), tracer_provider=build_tracer_provider(settings))
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            client.post("/v1/moderate", json=LISTING)
        # leaving the client runs the lifespan shutdown, which flushes the batch processor
        _wait(lambda: "chat tiny-llama" in receiver.names())
        assert "POST /v1/moderate" in receiver.names()
    finally:
        receiver.close()


def test_otlp_grpc_export_to_a_real_receiver(store: SqlitePromptStore, key: str) -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # type: ignore[no-untyped-def]
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = TracingSettings(exporter="otlp_grpc", endpoint=f"http://127.0.0.1:{port}")
        app = create_app(GatewaySettings(), store, FakeBackend(), tracer_provider=build_tracer_provider(settings))
        with TestClient(app, headers={"authorization": f"Bearer {key}"}) as client:
            client.post("/v1/moderate", json=LISTING)
        _wait(lambda: "verdict.validate" in {span.name for req in received for rs in req.resource_spans
                                             for ss in rs.scope_spans for span in ss.spans})
    finally:
        server.stop(0)


def test_a_failing_stage_records_like_start_as_current_span() -> None:
    """`stage` starts and activates its span by hand: a stage that raises must leave the same
    span as `start_as_current_span` would (the exception event, the ERROR status, ended, the
    parent current again), and a stage outside any sampled trace makes no span."""
    from opentelemetry import trace

    from gateway.telemetry import Metrics, stage

    exporter = InMemorySpanExporter()
    tracer = build_tracer_provider(TracingSettings(sample_ratio=1.0), exporter=exporter).get_tracer("t")
    metrics = Metrics()
    labels = {"prompt": "p", "version": "1", "arm": "stable"}
    with tracer.start_as_current_span("root") as root:
        with pytest.raises(ValueError), stage(tracer, metrics, "verdict.validate", labels, {"a": 1}):
            raise ValueError("bad verdict")
        assert trace.get_current_span() is root
        with pytest.raises(ValueError), tracer.start_as_current_span("reference", attributes={"a": 1}):
            raise ValueError("bad verdict")
    got = {s.name: s for s in exporter.get_finished_spans()}
    ours, ref = got["verdict.validate"], got["reference"]
    assert ours.parent is not None and ours.parent.span_id == root.get_span_context().span_id
    assert (ours.status.status_code, ours.status.description) == (ref.status.status_code, ref.status.description)
    assert [(e.name, e.attributes["exception.type"], e.attributes["exception.message"]) for e in ours.events] == \
        [(e.name, e.attributes["exception.type"], e.attributes["exception.message"]) for e in ref.events]
    assert ours.status.status_code.name == "ERROR" and ours.end_time is not None and dict(ours.attributes or {}) == {"a": 1}
    before = len(exporter.get_finished_spans())
    with stage(tracer, metrics, "auth", labels) as span:  # no current span: no child span
        assert not span.is_recording()
    assert len(exporter.get_finished_spans()) == before
    assert metrics.registry.get_sample_value("modgate_stage_seconds_count", {"stage": "verdict.validate", **labels}) == 1


class _TraceRecordingBackend(FakeBackend):
    """Records the W3C headers the HTTP backends would send with each model call (they send
    `serving.http_backend.trace_headers()` of the current context)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, str]] = []
        self.results: list = []  # type: ignore[type-arg]

    async def chat(self, request, *, timeout_s):  # type: ignore[no-untyped-def]
        from serving.http_backend import trace_headers

        self.sent.append(trace_headers())
        self.results.append(await super().chat(request, timeout_s=timeout_s))
        return self.results[-1]


def _traceparent(headers: dict[str, str]) -> tuple[str, str, int]:
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and int(trace_id, 16) and int(span_id, 16)
    return trace_id, span_id, int(flags, 16)


def test_the_model_call_carries_the_requests_trace_sampled_or_not(store: SqlitePromptStore, key: str) -> None:
    """The engine joins the gateway's trace: a sampled request sends its trace id and the chat
    span as parent with the sampled flag; an unsampled one (the ratio's, or a caller's unsampled
    traceparent) still sends a valid traceparent of its own trace with the flag clear, as the
    SDK makes it (random-trace-id flag 0x02 on a trace the gateway started)."""
    backend = _TraceRecordingBackend()
    exporter = InMemorySpanExporter()
    with _client(store, key, exporter, ratio=0.0, backend=backend) as client:
        assert client.post("/v1/moderate", json=LISTING).json()["trace_id"] is None
        client.post("/v1/moderate", json=LISTING)
        client.post("/v1/moderate", json=LISTING, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
    assert exporter.get_finished_spans() == ()
    (t1, s1, f1), (t2, _, f2), (t3, s3, f3) = (_traceparent(h) for h in backend.sent)
    assert f1 == f2 == 0x02 and t1 != t2  # a new trace per request, not sampled
    assert (t3, f3 & 1) == (CALLER_TRACE, 0) and s3 != CALLER_SPAN  # the caller's trace, our span

    backend, exporter = _TraceRecordingBackend(), InMemorySpanExporter()  # the first was shut down
    with _client(store, key, exporter, ratio=1.0, backend=backend) as client:
        body = client.post("/v1/moderate", json=LISTING).json()
    trace_id, span_id, flags = _traceparent(backend.sent[0])
    chat = next(s for s in exporter.get_finished_spans() if s.name.startswith("chat "))
    assert trace_id == body["trace_id"] == format(chat.context.trace_id, "032x")
    assert span_id == format(chat.context.span_id, "016x") and flags & 1


def test_the_sample_ratio_is_applied_once_per_trace(store: SqlitePromptStore, key: str) -> None:
    """At ratio 0.5 about half the requests are traced (whole traces of 6 spans): deciding
    at the root and again in the SDK would trace a quarter."""
    import random

    random.seed(20)
    exporter = InMemorySpanExporter()
    n = 120
    with _client(store, key, exporter, ratio=0.5) as client:
        traced = sum(client.post("/v1/moderate", json=LISTING).json()["trace_id"] is not None for _ in range(n))
    roots = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/moderate"]
    assert len(roots) == traced and len(exporter.get_finished_spans()) == 6 * traced
    assert 0.35 * n <= traced <= 0.65 * n, traced


def test_every_hot_path_metric_counts_each_moderation(store: SqlitePromptStore, key: str) -> None:
    """Each moderation moves each of its metrics, with the prompt version and arm as labels:
    a metric that stops being counted (or changes its labels) fails here."""
    backend = _TraceRecordingBackend()
    n = 3
    with _client(store, key, InMemorySpanExporter(), ratio=0.0, backend=backend) as client:
        answers = [client.post("/v1/moderate", json=LISTING).json() for _ in range(n)]
        registry = client.app.state.gateway.metrics.registry  # type: ignore[attr-defined]
    version = {"prompt": "listing-moderation", "version": "1", "arm": "stable"}
    get = registry.get_sample_value
    assert get("modgate_requests_total", {"route": "/v1/moderate", "code": "200"}) == n
    assert len({(a["decision"], a["category"]) for a in answers}) == 1
    assert get("modgate_verdicts_total", {**version, "decision": answers[0]["decision"],
                                          "category": answers[0]["category"] or "-"}) == n
    for kind, total in (("input", sum(r.prompt_tokens for r in backend.results)),
                        ("output", sum(r.completion_tokens for r in backend.results))):
        assert total > 0 and get("modgate_tokens_total", {"prompt": "listing-moderation", "version": "1",
                                                         "kind": kind}) == total, kind
    assert get("modgate_stage_seconds_count", {"stage": "auth", "prompt": "-", "version": "-", "arm": "-"}) == n
    assert get("modgate_stage_seconds_count", {"stage": "prompt.resolve", "prompt": "listing-moderation",
                                               "version": "-", "arm": "stable"}) == n
    for stage in ("prompt.render", "queue", "backend", "verdict.validate", "total"):
        assert get("modgate_stage_seconds_count", {"stage": stage, **version}) == n, stage
        assert get("modgate_stage_seconds_sum", {"stage": stage, **version}) > 0, stage
    assert get("modgate_inflight_requests", {"model": "tiny-llama"}) == 0


def test_the_hot_path_metric_calls_equal_prometheus_own() -> None:
    """`Metrics.count`, `gauge_add` and `observe_stage` change prometheus-client's values
    directly: the exposition must be exactly what `labels(...).inc()` / `.observe()` give,
    bucket boundaries included (a value equal to an upper bound is in that bucket)."""
    from prometheus_client import generate_latest

    from gateway.telemetry import Metrics

    fast, ref = Metrics(), Metrics()
    labels = {"prompt": "p", "version": "2", "arm": "canary"}
    for seconds in (0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.3, 30.0, 31.0, 1e9):
        fast.observe_stage(seconds, "backend", labels)
        ref.stage_seconds.labels(stage="backend", **labels).observe(seconds)
    fast.count(fast.verdicts, 1.0, "p", "2", "canary", "block", "scam")
    ref.verdicts.labels(prompt="p", version="2", arm="canary", decision="block", category="scam").inc()
    fast.count(fast.tokens, 17, "p", "2", "input")
    ref.tokens.labels(prompt="p", version="2", kind="input").inc(17)
    fast.count(fast.requests, 1.0, "/v1/moderate", "200")
    ref.requests.labels(route="/v1/moderate", code="200").inc()
    fast.gauge_add(fast.inflight, 1.0, "m")
    fast.gauge_add(fast.inflight, 1.0, "m")
    fast.gauge_add(fast.inflight, -1.0, "m")
    ref.inflight.labels(model="m").inc()
    with pytest.raises(ValueError):
        fast.count(fast.tokens, -1, "p", "2", "input")

    def exposition(m: Metrics) -> list[str]:
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]
    assert exposition(fast) == exposition(ref)
    assert 'modgate_stage_seconds_bucket{arm="canary",le="0.0005",prompt="p",stage="backend",version="2"} 3.0' \
        in exposition(fast)
