"""An OTLP/HTTP receiver for the tests: takes what an OpenTelemetry exporter sends to
/v1/traces and /v1/metrics (binary protobuf, the default of OTLP/HTTP), decodes it with the
official OTLP protobuf definitions (PyPI's opentelemetry-proto, generated from
open-telemetry/opentelemetry-proto), and answers as a collector does (200 with an empty
Export*ServiceResponse; 415 for another content type, 400 for a body that does not decode).

GET /spans answers every span received, in arrival order, as JSON: name, kind, trace and span
ids (hex), the parent's span id, attributes, status, and the resource's service.name. GET
/metrics answers every data point received: the metric's name, its value, its kind (sum or
gauge), monotonic or not.

Usage: otlp-receiver.py PORT (0: a port of the system's choosing). Prints `ready PORT`.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

lock = threading.Lock()
spans = []
points = []


def value(v):
    """An AnyValue as JSON."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


def took_spans(body):
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    got = []
    for rs in request.resource_spans:
        service = attributes(rs.resource.attributes).get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                got.append({
                    "name": s.name,
                    "kind": s.kind,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "attributes": attributes(s.attributes),
                    "status": s.status.code,
                    "scope": ss.scope.name,
                    "service": service,
                })
    with lock:
        spans.extend(got)
    return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


def took_metrics(body):
    request = metrics_service_pb2.ExportMetricsServiceRequest()
    request.ParseFromString(body)
    got = []
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                data = getattr(m, kind)
                for p in data.data_points:
                    number = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                    got.append({
                        "name": m.name,
                        "kind": kind,
                        "monotonic": getattr(data, "is_monotonic", False),
                        "value": number,
                    })
    with lock:
        points.extend(got)
    return metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with lock:
            listed = {"/spans": list(spans), "/metrics": list(points)}.get(self.path)
        if listed is None:
            return self.answer(404, b"not found", "text/plain")
        self.answer(200, json.dumps(listed).encode(), "application/json")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        take = {"/v1/traces": took_spans, "/v1/metrics": took_metrics}.get(self.path)
        if take is None:
            return self.answer(404, b"not found", "text/plain")
        if self.headers.get("content-type") != "application/x-protobuf":
            return self.answer(415, b"OTLP/HTTP takes application/x-protobuf", "text/plain")
        try:
            reply = take(body)
        except DecodeError as e:
            return self.answer(400, str(e).encode(), "text/plain")
        self.answer(200, reply, "application/x-protobuf")


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print(f"ready {server.server_address[1]}", flush=True)
server.serve_forever()
