"""OTLP trace receivers for tests: what a collector would get, decoded into plain values.

    with OtlpHttpReceiver() as receiver:            # POST /v1/traces, application/x-protobuf
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        ...
        (root,) = await receiver.wait_spans(lambda s: s.name == "ws.connection", timeout=10)

    with OtlpGrpcReceiver() as receiver:            # TraceService/Export over gRPC (insecure)
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}

Both listen on 127.0.0.1 on a port the OS picks and serve from threads of their own, so a
test's event loop (and a blocking exporter in it) never stands in their way. Ids are lower-case
hex (trace 32 digits, span 16); a missing parent is None.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpGrpcReceiver", "OtlpHttpReceiver", "ReceivedLink", "ReceivedSpan", "SpanStore"]

_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUS = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


def decode_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return getattr(value, kind)


def decode_attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: decode_value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def _hex(raw: bytes) -> str | None:
    return raw.hex() if raw else None


def _link(link: trace_pb2.Span.Link) -> ReceivedLink:
    return ReceivedLink(_hex(link.trace_id), _hex(link.span_id), decode_attributes(link.attributes))


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str | None
    span_id: str | None
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: str  # SERVER, CLIENT, INTERNAL ...
    attributes: dict[str, Any]
    links: list[ReceivedLink]
    status: str  # UNSET, OK, ERROR
    status_message: str
    start_ns: int
    end_ns: int
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    trace_state: str = ""
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @property
    def duration(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class SpanStore:
    """The spans received so far, in arrival order; waits with deadlines."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.requests = 0
        self.protocols: set[str] = set()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def add_request(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = decode_attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=_hex(span.parent_span_id),
                            kind=_KINDS.get(span.kind, str(span.kind)),
                            attributes=decode_attributes(span.attributes),
                            links=[_link(link) for link in span.links],
                            status=_STATUS.get(span.status.code, str(span.status.code)),
                            status_message=span.status.message,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            events=[(e.name, decode_attributes(e.attributes)) for e in span.events],
                            trace_state=span.trace_state,
                            resource=resource,
                            scope=scope_spans.scope.name,
                        )
                    )
        with self._changed:
            self.requests += 1
            self.protocols.add(protocol)
            self._spans.extend(received)
            self._changed.notify_all()

    def find(self, predicate: Callable[[ReceivedSpan], bool] | None = None, **equal: Any) -> list[ReceivedSpan]:
        """Spans for which `predicate` holds and each named field equals the value given."""
        return [
            s for s in self.spans
            if (predicate is None or predicate(s)) and all(getattr(s, k) == v for k, v in equal.items())
        ]

    def wait(
        self,
        predicate: Callable[[ReceivedSpan], bool] | None = None,
        *,
        count: int = 1,
        timeout: float = 10.0,
        **equal: Any,
    ) -> list[ReceivedSpan]:
        """Block until at least `count` spans match (see find); AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self.find(predicate, **equal)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise AssertionError(
                        f"{len(found)} of {count} matching spans after {timeout}s ({equal or 'predicate'}); "
                        f"received {len(self._spans)} spans: {names}"
                    )
                self._changed.wait(left)

    async def wait_spans(
        self,
        predicate: Callable[[ReceivedSpan], bool] | None = None,
        *,
        count: int = 1,
        timeout: float = 10.0,
        **equal: Any,
    ) -> list[ReceivedSpan]:
        """`wait` for a test's event loop: the loop keeps running while the thread waits."""
        return await asyncio.to_thread(self.wait, predicate, count=count, timeout=timeout, **equal)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path.split("?")[0] != "/v1/traces":
            self._answer(404, b"", "text/plain")
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-protobuf":
            self._answer(415, b"only application/x-protobuf", "text/plain")
            return
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = trace_service_pb2.ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception:
            self._answer(400, b"bad protobuf", "text/plain")
            return
        self.server.store.add_request(request, "http/protobuf")
        self._answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    store: SpanStore


class OtlpHttpReceiver(SpanStore):
    """OTLP/HTTP (binary protobuf) on 127.0.0.1:<port>: POST /v1/traces."""

    def __init__(self) -> None:
        super().__init__()
        self._server = _HttpServer(("127.0.0.1", 0), _Handler)
        self._server.store = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT); the traces URL is traces_url."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return f"{self.endpoint}/v1/traces"

    def start(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpHttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OtlpGrpcReceiver(SpanStore):
    """OTLP/gRPC on 127.0.0.1:<port> (no TLS): opentelemetry.proto.collector.trace.v1.TraceService."""

    def __init__(self) -> None:
        super().__init__()
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        store = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
                store.add_request(request, "grpc")
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> OtlpGrpcReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
