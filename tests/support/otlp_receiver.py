"""OTLP trace receivers for tests: a real OTLP/HTTP (protobuf) server and a real OTLP/gRPC
server on free ports of 127.0.0.1. Both decode ``ExportTraceServiceRequest`` messages into
:class:`ReceivedSpan` records and count the export requests they got."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from support.http_peers import QuietHTTPServer

_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class ReceivedSpan(msgspec.Struct, frozen=True, kw_only=True):
    """One exported span; ids are lowercase hex, ``parent_span_id`` is "" for a root span,
    ``kind`` is ``PRODUCER``, ``CONSUMER``..., ``status`` is ``UNSET``, ``OK`` or ``ERROR``."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status: str


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_value(v) for v in value.array_value.values]
    if field == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, field)


def _attributes(pairs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        result[pair.key] = _value(pair.value)
    return result


def decode_spans(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an export request, with its resource's ``service.name``."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        status=Status.StatusCode.Name(span.status.code).removeprefix(
                            "STATUS_CODE_"
                        ),
                    )
                )
    return spans


class SpanSink:
    """What a receiver got: the spans and the number of export requests (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._requests = 0

    def record(self, request: ExportTraceServiceRequest) -> None:
        spans = decode_spans(request)
        with self._lock:
            self._requests += 1
            self._spans.extend(spans)

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)


class _ExportHandler(BaseHTTPRequestHandler):
    sink: SpanSink

    def do_POST(self) -> None:
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.sink.record(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what was received, not the access log."""


@contextmanager
def otlp_http_receiver() -> Iterator[tuple[str, SpanSink]]:
    """An OTLP/HTTP receiver; yields its endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``) and sink."""
    sink = SpanSink()
    handler = type("Handler", (_ExportHandler,), {"sink": sink})
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def otlp_grpc_receiver() -> Iterator[tuple[str, SpanSink]]:
    """An OTLP/gRPC receiver (plaintext); yields its endpoint and sink."""
    sink = SpanSink()

    def export(request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        sink.record(request)
        return ExportTraceServiceResponse()

    method = grpc.unary_unary_rpc_method_handler(
        export,
        request_deserializer=ExportTraceServiceRequest.FromString,
        response_serializer=ExportTraceServiceResponse.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_TRACE_SERVICE, {"Export": method}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        server.stop(grace=None).wait(10)
