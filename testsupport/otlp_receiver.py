"""A real OTLP/HTTP trace receiver on loopback for tests (protobuf, like a collector)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class OtlpHttpReceiver:
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                msg = trace_service_pb2.ExportTraceServiceRequest()
                msg.ParseFromString(body)
                receiver.requests.append(msg)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()
                self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self) -> list[dict[str, Any]]:
        out = []
        for req in list(self.requests):
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes
                                if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append({"name": span.name, "service": service, "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                                    "attributes": {a.key: a.value for a in span.attributes}})
        return out

    def names(self) -> set[str]:
        return {s["name"] for s in self.spans()}

    def close(self) -> None:
        self._server.shutdown()


def main() -> None:
    """`python -m testsupport.otlp_receiver`: a receiver in a process of its own (benchmarks run
    it there so that its decoding is not counted as the gateway's CPU). Prints its endpoint on
    the first line; keeps only the latest second's requests."""
    import time

    receiver = OtlpHttpReceiver()
    print(receiver.endpoint, flush=True)
    while True:
        time.sleep(1)
        receiver.requests.clear()


if __name__ == "__main__":
    main()
