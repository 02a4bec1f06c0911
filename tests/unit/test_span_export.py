"""The direct OTLP encoder gives the stock OpenTelemetry encoder's bytes for every kind of span
data, and the exporter delivers them to a real OTLP/HTTP receiver (and fails, retries and
shuts down like the stock one)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as stock_encode
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway.span_export import OtlpHttpSpanExporter, encode_spans
from testsupport.otlp_receiver import OtlpHttpReceiver


def _spans(resource: Resource | None = None, scope: str = "modgate.gateway",
           scope_version: str | None = None) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "modgate-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer(scope, scope_version, schema_url="https://opentelemetry.io/schemas/1.21.0")
    remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "x1"), ("b", "2")]))
    with tracer.start_as_current_span("POST /v1/moderate", context=set_span_in_context(NonRecordingSpan(remote)),
                                      kind=SpanKind.SERVER, attributes={"modgate.request_id": "r-1"}) as root:
        with tracer.start_as_current_span("auth"):
            pass
        with tracer.start_as_current_span("chat tiny-llama", kind=SpanKind.CLIENT, attributes={
                "gen_ai.request.max_tokens": 64, "gen_ai.request.temperature": 0.0, "b": True, "f": False,
                "neg": -5, "big": 2**63 - 1, "small": -(2**63), "zero": 0, "empty": "", "uni": "héllo 中文 ✓",
                "reasons": ["stop", ""], "ints": [1, -2, 300], "floats": [0.5, -1e300], "bools": [True, False],
                "long": "x" * 300}) as chat:
            chat.set_attribute("gen_ai.response.model", "tiny-llama")
            chat.add_event("retry", {"attempt": 2, "why": "timeout"})
            chat.add_event("")
        try:
            with tracer.start_as_current_span("verdict.validate"):
                raise ValueError("boom ü")
        except ValueError:
            pass
        root.set_status(Status(StatusCode.ERROR, "bad thing"))
    with tracer.start_as_current_span("shadow evaluation", links=[Link(remote, {"link.kind": "shadow_of"}),
                                                                  Link(root.get_span_context())],
                                      kind=SpanKind.PRODUCER) as shadow:
        shadow.set_status(Status(StatusCode.OK))
    with tracer.start_as_current_span("consumer", kind=SpanKind.CONSUMER):
        pass
    return list(memory.get_finished_spans())


def test_bytes_equal_the_stock_encoder() -> None:
    spans = _spans()
    assert any(s.events for s in spans) and any(s.links for s in spans)
    assert encode_spans(spans) == stock_encode(spans).SerializeToString()


def test_groups_resources_and_scopes_like_the_stock_encoder() -> None:
    a = _spans(Resource.create({"service.name": "a", "k": 1}), "s1", "1.0")
    b = _spans(Resource.create({"service.name": "b"}), "s2")
    a_again = _spans(Resource.create({"service.name": "a", "k": 1}), "s1", "1.0")  # equal, not identical
    mixed = [a[0], b[0], a[1], a_again[0], b[1], *a[2:], *a_again[1:]]
    assert encode_spans(mixed) == stock_encode(mixed).SerializeToString()
    msg = trace_service_pb2.ExportTraceServiceRequest.FromString(encode_spans(mixed))
    assert [len(rs.scope_spans) for rs in msg.resource_spans] == [1, 1]
    assert encode_spans([]) == stock_encode([]).SerializeToString()


def test_an_attribute_the_stock_encoder_refuses_is_left_out_the_same_way() -> None:
    span = _spans()[0]
    span._attributes = {"ok": 1, "huge": 2**64, "odd": object()}  # type: ignore[attr-defined]  # as a buggy instrumentation could
    assert encode_spans([span]) == stock_encode([span]).SerializeToString()
    msg = trace_service_pb2.ExportTraceServiceRequest.FromString(encode_spans([span]))
    assert [kv.key for kv in msg.resource_spans[0].scope_spans[0].spans[0].attributes] == ["ok"]


def test_a_real_receiver_gets_every_span() -> None:
    receiver = OtlpHttpReceiver()
    exporter = OtlpHttpSpanExporter(receiver.endpoint)
    try:
        spans = _spans()
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans[:2]) is SpanExportResult.SUCCESS  # the kept-alive connection again
        got = receiver.spans()
        assert [s["name"] for s in got] == [s.name for s in spans] + [s.name for s in spans[:2]]
        assert {s["service"] for s in got} == {"modgate-gateway"}
    finally:
        exporter.shutdown()
        receiver.close()


class _Flaky:
    """An OTLP endpoint that answers the given statuses in turn, then 200."""

    def __init__(self, statuses: list[int], retry_after: str | None = None) -> None:
        self.statuses, self.calls = list(statuses), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                outer.calls += 1
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_transient_failures_are_retried_and_others_are_not() -> None:
    flaky = _Flaky([503, 429], retry_after="0")
    exporter = OtlpHttpSpanExporter(flaky.endpoint, timeout_s=5)
    assert exporter.export(_spans()[:1]) is SpanExportResult.SUCCESS
    assert flaky.calls == 3
    refused = _Flaky([400])
    exporter = OtlpHttpSpanExporter(refused.endpoint, timeout_s=5)
    assert exporter.export(_spans()[:1]) is SpanExportResult.FAILURE
    assert refused.calls == 1
    for f in (flaky, refused):
        f.server.shutdown()


def test_shutdown_cuts_a_retry_wait_short() -> None:
    down = _Flaky([503] * 100)  # always unavailable; backoff starts at 1 s
    exporter = OtlpHttpSpanExporter(down.endpoint, timeout_s=60)
    result: list[SpanExportResult] = []
    t = threading.Thread(target=lambda: result.append(exporter.export(_spans()[:1])))
    t.start()
    while down.calls == 0:
        time.sleep(0.01)
    exporter.shutdown()
    t.join(30)
    assert result == [SpanExportResult.FAILURE] and down.calls == 1
    assert exporter.export(_spans()[:1]) is SpanExportResult.FAILURE  # after shutdown
    down.server.shutdown()


def test_endpoint_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        OtlpHttpSpanExporter("otel-collector:4318")
