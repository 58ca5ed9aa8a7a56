"""OpenTelemetry traces of connections (observability.md, "Traces").

One trace per connection: the root `ws.connection` (SERVER) from the upgrade to the close,
continuing the client's `traceparent` when it sent one, and short child spans, each ended
(and so handed to the exporter) as soon as its step ends: `ws.handshake`, `ws.subscribe`,
`ws.recovery`, `ws.heartbeat`, `ws.close`. The drain is a trace of its own: `ws.shutdown`.

Cost: without a configured exporter (`provider_from_environment` returns None) no hook is
added and nothing here is imported beyond this module. With one, no SDK span is held while a
connection lives (an SDK span costs kilobytes, and most connections idle for hours): at the
open the root's ids and the sampling decision are fixed (`conn.trace_id`, `conn.span_id`, a
`_Trace` of three slots in `conn.telemetry`), children name that root as their parent as soon
as their step ends, and the root itself is recorded at the close, with the open as its start
time and the ids fixed at the open. No span is ever made "current" (contextvars). A root the
sampler dropped gets no children at all.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..hooks import LifecycleHooks
from ..protocol import NORMAL_CAUSES

if TYPE_CHECKING:
    from ..broker import SubscribeResult
    from ..connection import Connection
    from ..protocol import Position

log = logging.getLogger("stablews.tracing")

TRACER_NAME = "stablews"
DEFAULT_SERVICE_NAME = "stablews"
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_PROTOCOL = "http/protobuf"

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32


class _Trace:
    """A connection's tracing state, in `conn.telemetry` from open to close."""

    __slots__ = ("parent", "step", "welcomed")

    def __init__(self, parent: Any) -> None:
        self.parent = parent  # the root's context as a parent for children; None: not sampled
        self.welcomed: float | None = None  # monotonic time of `welcome`: handshake end, recovery start
        self.step = 0.0  # monotonic end of the last handshake or subscribe: where the next subscribe starts


class _PresetIds:
    """The tracer's id generator, able to hand out ids fixed in advance: the root span of a
    connection is created at its close with the ids its children already name."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        if self.trace_id:
            value, self.trace_id = self.trace_id, 0
            return value
        return int(self.generator.generate_trace_id())

    def generate_span_id(self) -> int:
        if self.span_id:
            value, self.span_id = self.span_id, 0
            return value
        return int(self.generator.generate_span_id())

    def is_trace_id_random(self) -> bool:
        return bool(getattr(self.generator, "is_trace_id_random", lambda: True)())


# ------------------------------------------------------------------ the provider


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def exporters_from_environment(env: Mapping[str, str]) -> list[str]:
    """The span exporters the `OTEL_*` variables ask for: [] (no tracing), "otlp", "console".

    `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: none. `OTEL_TRACES_EXPORTER` unset:
    OTLP when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), otherwise none: unlike the SDK's own default, nothing
    is exported (nor traced) unless asked for."""
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return []
    names = [n.strip().lower() for n in (env.get("OTEL_TRACES_EXPORTER") or "").split(",") if n.strip()]
    if "none" in names:
        return []
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint and endpoint.strip() else []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log.warning(
            "OTEL_TRACES_EXPORTER: %s not supported (otlp, console or none): ignored", ", ".join(unknown)
        )
    return [n for n in dict.fromkeys(names) if n in EXPORTERS]


def otlp_protocol(env: Mapping[str, str]) -> str:
    """`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`: grpc or
    http/protobuf (the default, as in the specification). Anything else (http/json has no
    Python exporter) is logged and http/protobuf is used."""
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    value = raw.strip().lower() or DEFAULT_PROTOCOL
    if value not in PROTOCOLS:
        log.warning("OTLP protocol %r not supported (grpc or http/protobuf): using %s", raw, DEFAULT_PROTOCOL)
        value = DEFAULT_PROTOCOL
    return value


def provider_from_environment(settings: Any, environ: Mapping[str, str] | None = None) -> Any:
    """An SDK `TracerProvider` exporting what the `OTEL_*` variables configure, or None
    (nothing configured: no SDK object is made, and the server does not trace).

    The SDK reads its own variables from the process environment, as everywhere: the endpoint
    and headers, `OTEL_TRACES_SAMPLER`(`_ARG`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    `OTEL_BSP_*`. `environ` (tests) replaces the process environment for the decision, the
    protocol, and the OTLP endpoint and headers. The resource gets `service.name` "stablews"
    unless one is configured, `service.instance.id` (the instance id) and `service.version`."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    exporters = exporters_from_environment(env)
    if not exporters:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=_resource(settings, env if environ is not None else None))
    for name in exporters:
        exporter = _otlp_exporter(env, explicit=environ is not None) if name == "otlp" else ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _resource(settings: Any, env: Mapping[str, str] | None) -> Any:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {"service.version": __version__}
    instance = getattr(settings, "instance_id", None)
    if instance:
        attributes["service.instance.id"] = instance
    resource = Resource.create(attributes)  # with OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    if env is not None and (env.get("OTEL_SERVICE_NAME") or "").strip():
        resource = resource.merge(Resource({"service.name": env["OTEL_SERVICE_NAME"].strip()}))
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def _otlp_exporter(env: Mapping[str, str], *, explicit: bool) -> Any:
    protocol = otlp_protocol(env)
    kwargs: dict[str, Any] = {}
    if explicit:  # a given mapping, not the process environment the exporter reads itself
        from opentelemetry.util.re import parse_env_headers

        traces = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
        base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
        if traces:
            kwargs["endpoint"] = traces
        elif base:
            kwargs["endpoint"] = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
        headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
        if headers:
            kwargs["headers"] = dict(parse_env_headers(headers, liberal=True))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(**kwargs)


# ------------------------------------------------------------------ the hooks


def _hex_trace_id(value: int) -> str:
    return format(value, "032x")


def valid_trace_id(value: Any) -> str | None:
    """`value` as a W3C trace id (32 lower-case hex digits, not all zero), or None."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    if len(value) != 32 or not _TRACE_ID.fullmatch(value) or value == _ZERO_TRACE:
        return None
    return value


class ConnectionTracing(LifecycleHooks):
    """The lifecycle hooks that trace connections (tracer `stablews`).

    Recovery links: `hello.previous_trace_id` names the dropped connection's trace, not a span
    in it (the client cannot know the server's span ids). `ws.recovery` links to that trace's
    root `ws.connection` when this instance closed it recently (a bounded map, trace id → root
    span id, of the last `flight_recorder_size` abnormal closes); otherwise (another instance,
    or a drop this instance has not seen yet) to the trace with an all-zero span id, which the
    OpenTelemetry specification allows for a link that has attributes, and that trace UIs
    follow by trace id. Either link carries `stablews.link.type` = previous_connection.

    Heartbeats: every late or missed one is a `ws.heartbeat` span; ok ones at
    `heartbeat_span_ratio`, decided by a credit counter (exact ratio, no random draw)."""

    def __init__(self, server: Any, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.server = server
        self.provider = provider
        settings = server.settings
        self.manager = server.manager
        self.tracer = provider.get_tracer(TRACER_NAME, __version__)
        # The SDK tracer draws ids from its generator at span creation: the preset lets the root,
        # recorded at the close, keep the ids fixed at the open.
        self._ids = _PresetIds(self.tracer.id_generator)
        self.tracer.id_generator = self._ids
        self.instance = settings.instance_id
        self.ws_path = settings.ws_path
        self.heartbeat_ratio = float(settings.heartbeat_span_ratio)
        self._heartbeat_credit = 0.0
        self._recent_size = max(1, int(getattr(settings, "flight_recorder_size", 1000)))
        self._recent_roots: dict[str, int] = {}  # trace id → root span id, recent abnormal closes
        self._propagator = TraceContextTextMapPropagator()
        self._get_span_context = trace.get_current_span
        self._set_span_in_context = trace.set_span_in_context
        self._NonRecordingSpan = NonRecordingSpan
        self._Context = Context
        self._Link = Link
        self._SpanContext = SpanContext
        self._sampled_flags = TraceFlags(TraceFlags.SAMPLED)
        self._Status = Status
        self._error = StatusCode.ERROR
        self._server_kind = SpanKind.SERVER
        self._internal = SpanKind.INTERNAL
        self._flushed = False

    # -------------------------------------------------------------- helpers

    @staticmethod
    def _ns(conn: Connection, mono: float) -> int:
        """A stamp of the core's monotonic clock as span time (ns since the epoch): the wall-clock
        time of the connection's open plus the monotonic time since, so that a step never
        starts before the connection, and a wall-clock step (NTP) does not bend durations."""
        return int(conn.opened_wall * 1e9) + int((mono - conn.opened_mono) * 1e9)

    @staticmethod
    def _state(conn: Connection) -> _Trace | None:
        state = conn.telemetry
        return state if isinstance(state, _Trace) else None

    def _parent_context(self, conn: Connection) -> Any:
        """The client's trace context (traceparent, tracestate), or an empty one: a new trace."""
        parent = self._Context()
        headers = conn.trace_headers
        if headers is not None:
            carrier = {"traceparent": headers[0]}
            if headers[1]:
                carrier["tracestate"] = headers[1]
            parent = self._propagator.extract(carrier, context=parent)
        return parent

    def _child(
        self,
        conn: Connection,
        parent: Any,
        name: str,
        start_mono: float,
        end_mono: float,
        attributes: dict[str, Any],
        *,
        links: list[Any] | None = None,
        error: str | None = None,
    ) -> None:
        """A child span of the root for a step that has already ended: handed to the exporter now."""
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=self._internal,
            attributes=attributes,
            links=links,
            start_time=self._ns(conn, start_mono),
        )
        if error is not None:
            span.set_attribute("error.type", error)
            span.set_status(self._Status(self._error))
        span.end(end_time=self._ns(conn, max(end_mono, start_mono)))

    # -------------------------------------------------------------- hooks

    def on_open(self, conn: Connection) -> None:
        """Fix the root's ids and the sampling decision; record nothing yet."""
        parent = self._parent_context(conn)
        parent_ids = self._get_span_context(parent).get_span_context()
        trace_id = parent_ids.trace_id if parent_ids.is_valid else self._ids.generator.generate_trace_id()
        span_id = self._ids.generator.generate_span_id()
        decision = self.tracer.sampler.should_sample(parent, trace_id, "ws.connection", self._server_kind)
        conn.trace_id = _hex_trace_id(trace_id)
        conn.span_id = format(span_id, "016x")
        children = None
        if decision.decision.is_recording():
            root = self._SpanContext(trace_id, span_id, is_remote=False, trace_flags=self._sampled_flags)
            children = self._set_span_in_context(self._NonRecordingSpan(root))
        conn.telemetry = _Trace(children)

    def on_hello(self, conn: Connection) -> None:
        state = self._state(conn)
        if state is None:
            return
        now = self.manager.clock()
        state.welcomed = state.step = now
        if state.parent is not None:
            self._child(
                conn, state.parent, "ws.handshake", conn.opened_mono, now, {"stablews.auth.result": conn.auth_result}
            )

    def on_subscribe(self, conn: Connection, channel: str, since: Position | None, result: SubscribeResult) -> None:
        state = self._state(conn)
        if state is None or state.parent is None:
            return
        attributes: dict[str, Any] = {
            "stablews.channel": channel,
            "stablews.resume.requested": since is not None,
            "stablews.resume.replayed": len(result.replay),
        }
        if result.recovered is not None:
            attributes["stablews.resume.recovered"] = result.recovered
        # The subscribe was received at last_inbound (messages are handled one at a time); the
        # channels of a hello's resume are subscribed one after the other, after `welcome`.
        now = self.manager.clock()
        start = max(conn.last_inbound, state.step)
        state.step = now
        self._child(conn, state.parent, "ws.subscribe", min(start, now), now, attributes)

    def on_resume(self, conn: Connection, asked: int, recovered: int, replayed: int) -> None:
        state = self._state(conn)
        if state is None or state.parent is None:
            return
        now = self.manager.clock()
        start = state.welcomed if state.welcomed is not None else conn.last_inbound
        attributes: dict[str, Any] = {
            "stablews.recovery.asked": asked,
            "stablews.recovery.recovered": recovered,
            "stablews.recovery.replayed": replayed,
        }
        links = None
        previous = valid_trace_id(conn.previous_trace_id)
        if previous is not None:
            attributes["stablews.previous_trace_id"] = previous
            links = [self._previous_link(previous)]
        self._child(conn, state.parent, "ws.recovery", start, now, attributes, links=links)

    def _previous_link(self, trace_id: str) -> Any:
        span_id = self._recent_roots.get(trace_id, 0)
        context = self._SpanContext(int(trace_id, 16), span_id, is_remote=True)
        return self._Link(
            context,
            {"stablews.link.type": "previous_connection", "stablews.link.span_known": bool(span_id)},
        )

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        if outcome == "ok":
            ratio = self.heartbeat_ratio
            if ratio < 1.0:
                if ratio <= 0.0:
                    return
                credit = self._heartbeat_credit + ratio
                if credit < 1.0:
                    self._heartbeat_credit = credit
                    return
                self._heartbeat_credit = credit - 1.0
        state = self._state(conn)
        if state is None or state.parent is None:
            return
        now = self.manager.clock()
        start = conn.ping_sent_at
        end = now
        if outcome == "missed" and conn.pong_deadline < now:
            end = conn.pong_deadline  # no pong by the deadline: that is when it was missed
        attributes: dict[str, Any] = {
            "stablews.heartbeat.id": conn.ping_seq,
            "stablews.heartbeat.outcome": outcome,
            "stablews.heartbeat.missed_in_a_row": conn.missed_in_a_row,
        }
        if rtt is not None:
            attributes["stablews.heartbeat.rtt_ms"] = round(rtt * 1000, 3)
        self._child(conn, state.parent, "ws.heartbeat", start, end, attributes)

    def on_close(self, conn: Connection) -> None:
        state = self._state(conn)
        if state is None:
            return
        conn.telemetry = None
        if state.parent is None or conn.trace_id is None or conn.span_id is None:
            return  # not sampled: nothing to record
        cause = str(conn.close_cause)
        abnormal = conn.close_cause not in NORMAL_CAUSES
        closed = conn.closed_mono if conn.closed_mono is not None else self.manager.clock()
        if state.welcomed is None and not conn.passive:  # never got to `welcome`
            self._child(
                conn, state.parent, "ws.handshake", conn.opened_mono,
                conn.closing_mono if conn.closing_mono is not None else closed,
                {"stablews.auth.result": conn.auth_result}, error=cause,
            )
        close_attributes: dict[str, Any] = {
            "stablews.close.code": conn.close_code or 0,
            "stablews.close.cause": cause,
            "stablews.close.initiator": conn.close_initiator or "unknown",
        }
        if conn.abandoned:
            close_attributes["stablews.close.abandoned"] = True
        start = conn.closing_mono if conn.closing_mono is not None else closed
        self._child(conn, state.parent, "ws.close", start, closed, close_attributes)
        root = self._record_root(conn, close_attributes)
        if abnormal:
            root.set_attribute("error.type", cause)
            root.set_status(self._Status(self._error, f"closed {conn.close_code}: {cause}"))
        root.end(end_time=self._ns(conn, closed))
        if abnormal:
            recent = self._recent_roots
            recent[conn.trace_id] = int(conn.span_id, 16)
            if len(recent) > self._recent_size:
                del recent[next(iter(recent))]

    def _record_root(self, conn: Connection, close_attributes: dict[str, Any]) -> Any:
        """The root `ws.connection`, created now with the ids fixed at the open and the open as its start."""
        attributes: dict[str, Any] = {
            "network.protocol.name": "websocket",
            "stablews.connection.id": conn.id,
            "stablews.instance": self.instance,
            **close_attributes,
            "stablews.messages.sent": conn.messages_out,
            "stablews.messages.received": conn.messages_in,
            "stablews.heartbeat.missed": conn.hb_missed,
            "stablews.health.score": float(conn.health_score),
        }
        if conn.client_address is not None:
            attributes["client.address"] = conn.client_address
        if conn.client_port is not None:
            attributes["client.port"] = conn.client_port
        if conn.server_address is not None:
            attributes["server.address"] = conn.server_address
        if conn.server_port is not None:
            attributes["server.port"] = conn.server_port
        if conn.passive:
            attributes["stablews.mode"] = "passive"
        else:
            attributes["url.path"] = self.ws_path
        if conn.user_agent:
            attributes["user_agent.original"] = conn.user_agent
        if conn.client_name:
            attributes["stablews.client.name"] = conn.client_name
        previous = valid_trace_id(conn.previous_trace_id)
        if previous is not None:
            attributes["stablews.previous_trace_id"] = previous
        if conn.rtt_last is not None:
            attributes["stablews.heartbeat.rtt_ms"] = round(conn.rtt_last * 1000, 3)
        ids = self._ids
        ids.trace_id, ids.span_id = int(conn.trace_id or "0", 16), int(conn.span_id or "0", 16)
        try:
            return self.tracer.start_span(
                "ws.connection",
                context=self._parent_context(conn),
                kind=self._server_kind,
                attributes=attributes,
                start_time=int(conn.opened_wall * 1e9),
            )
        finally:
            ids.trace_id = ids.span_id = 0  # unused (a parent gave the trace id): never leak into another span

    def on_shutdown(self, summary: dict[str, Any]) -> None:
        wall = self.manager.wall()
        drain = float(summary.get("drain_seconds") or 0.0)
        span = self.tracer.start_span(
            "ws.shutdown",
            context=self._Context(),  # a trace of its own
            kind=self._internal,
            attributes={
                "stablews.instance": self.instance,
                "stablews.shutdown.connections_closed": int(summary.get("connections_closed", 0)),
                "stablews.shutdown.connections_abandoned": int(summary.get("connections_abandoned", 0)),
                "stablews.shutdown.messages_flushed": int(summary.get("messages_flushed", 0)),
                "stablews.shutdown.drain_seconds": drain,
            },
            start_time=int((wall - drain) * 1e9),
        )
        span.end(end_time=int(wall * 1e9))

    # -------------------------------------------------------------- the end

    def shutdown(self) -> None:
        """Export what is pending, then stop the provider (called once, after the drain, off the loop)."""
        if self._flushed:
            return
        self._flushed = True
        flush = getattr(self.provider, "force_flush", None)
        if flush is not None:
            try:
                flush()
            except Exception:
                log.exception("flushing the spans failed")
        stop = getattr(self.provider, "shutdown", None)
        if stop is not None:
            try:
                stop()
            except Exception:
                log.exception("stopping the tracer provider failed")
