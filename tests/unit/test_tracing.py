"""Tracing without sockets: which `OTEL_*` settings make a tracer provider, and what the
hooks record for a connection driven by hand (observability.md, "Traces")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from stablews import __version__
from stablews.app import StableServer
from stablews.config import Settings
from stablews.connection import Connection
from stablews.hooks import LifecycleHooks
from stablews.protocol import CloseCause
from stablews.telemetry.tracing import (
    ConnectionTracing,
    exporters_from_environment,
    otlp_protocol,
    provider_from_environment,
    valid_trace_id,
)

ENDPOINT = "http://127.0.0.1:9"  # never contacted: nothing is exported in these tests


# ------------------------------------------------------------------ the environment


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, []),  # no exporter: no tracing
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console, zipkin"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, []),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "console"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, ["otlp"]),
    ],
)
def test_which_exporters_the_environment_asks_for(env: dict[str, str], expected: list[str]) -> None:
    assert exporters_from_environment(env) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
         "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": " GRPC "}, "grpc"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf"),  # no Python exporter: the default
    ],
)
def test_the_otlp_protocol(env: dict[str, str], expected: str) -> None:
    assert otlp_protocol(env) == expected


def _processors(provider: Any) -> list[Any]:
    return list(provider._active_span_processor._span_processors)  # SDK internals: what was configured


def _exporter(processor: Any) -> Any:
    assert isinstance(processor, BatchSpanProcessor)
    return processor._batch_processor._exporter


@pytest.fixture
def providers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for provider in made:
        provider.shutdown()


def test_nothing_configured_makes_no_provider() -> None:
    assert provider_from_environment(Settings(), {}) is None
    assert provider_from_environment(Settings(), {"OTEL_TRACES_EXPORTER": "none"}) is None


def test_an_otlp_endpoint_makes_a_batching_http_exporter(providers: list[Any]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    settings = Settings(instance_id="edge-7")
    provider = provider_from_environment(settings, {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT + "/"})
    providers.append(provider)
    assert isinstance(provider, TracerProvider)
    (processor,) = _processors(provider)
    exporter = _exporter(processor)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == ENDPOINT + "/v1/traces"
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "stablews"
    assert attributes["service.instance.id"] == "edge-7"
    assert attributes["service.version"] == __version__

    traces = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT + "/custom", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
              "OTEL_SERVICE_NAME": "edge"}
    provider = provider_from_environment(settings, traces)
    providers.append(provider)
    exporter = _exporter(_processors(provider)[0])
    assert exporter._endpoint == ENDPOINT + "/custom"  # the traces endpoint is used as given
    assert provider.resource.attributes["service.name"] == "edge"


def test_grpc_and_console_exporters(providers: list[Any]) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = provider_from_environment(
        Settings(),
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
         "OTEL_TRACES_EXPORTER": "otlp,console"},
    )
    providers.append(provider)
    grpc_processor, console_processor = _processors(provider)
    exporter = _exporter(grpc_processor)
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "127.0.0.1:9" and exporter._insecure
    assert isinstance(_exporter(console_processor), ConsoleSpanExporter)


def test_the_process_environment_is_read_when_none_is_given(monkeypatch, providers: list[Any]) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    provider = provider_from_environment(Settings())
    providers.append(provider)
    assert _exporter(_processors(provider)[0])._endpoint == ENDPOINT + "/v1/traces"
    assert provider.resource.attributes["service.name"] == "from-env"


def test_valid_trace_ids() -> None:
    assert valid_trace_id("ab" * 16) == "ab" * 16
    assert valid_trace_id(" AB" + "ab" * 15 + "ab ") is None  # 33 characters
    assert valid_trace_id("AB" * 16) == "ab" * 16
    for bad in (None, 7, "", "0" * 32, "g" * 32, "ab" * 15, "ab" * 17):
        assert valid_trace_id(bad) is None


# ------------------------------------------------------------------ the hooks, by hand


class CurrentSpanProbe(LifecycleHooks):
    """Runs after tracing: no span may be left current by a hook."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def _look(self, *args: Any) -> None:
        self.seen.append(trace.get_current_span())

    on_open = on_hello = on_heartbeat = on_resume = on_close = _look  # type: ignore[assignment]


async def _noop_send(message: Any) -> None:
    return None


class Rig:
    def __init__(self, provider: TracerProvider | None = None, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        if provider is None:
            provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.server = StableServer(Settings(demo_feed=False, **settings), tracer_provider=provider)
        tracing = self.server.telemetry.tracing
        assert isinstance(tracing, ConnectionTracing)
        self.tracing = tracing
        self.probe = CurrentSpanProbe()
        self.server.manager.hooks.add(self.probe)
        self._ids = 0

    def open(self, **kw: Any) -> Connection:
        self._ids += 1
        conn = Connection(self.server.manager, self.server.broker, _noop_send, f"c{self._ids}",
                          client=("127.0.0.1", 40000 + self._ids), server=("127.0.0.1", 8000), **kw)
        self.server.manager.register(conn)
        return conn

    def spans(self, name: str | None = None) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


async def test_a_connection_driven_by_hand_gives_the_span_tree() -> None:
    rig = Rig()
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    conn = rig.open(user_agent="probe/1", trace_headers=(f"00-{parent_trace}-{parent_span}-01", "vendor=x"))
    assert conn.trace_id == parent_trace  # continued, and the span id is the root's
    assert conn.telemetry is not None and not rig.spans()
    conn.hello_done = True
    conn.manager.hooks.on_hello(conn)
    conn.close(CloseCause.POLICY_VIOLATION)
    conn.finish(1006)

    (root,) = rig.spans("ws.connection")
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == parent_trace
    assert format(root.parent.span_id, "016x") == parent_span and root.parent.is_remote
    assert format(root.context.span_id, "016x") == conn.span_id
    assert root.context.trace_state.get("vendor") == "x"
    assert dict(root.attributes) | {"stablews.health.score": 0} == {
        "network.protocol.name": "websocket",
        "client.address": "127.0.0.1", "client.port": 40001,
        "server.address": "127.0.0.1", "server.port": 8000,
        "url.path": "/ws", "user_agent.original": "probe/1",
        "stablews.connection.id": "c1", "stablews.instance": rig.server.settings.instance_id,
        "stablews.close.code": 1008, "stablews.close.cause": "policy_violation", "stablews.close.initiator": "server",
        "stablews.messages.sent": 0, "stablews.messages.received": 0, "stablews.heartbeat.missed": 0,
        "stablews.health.score": 0, "error.type": "policy_violation",
    }
    assert root.status.status_code is StatusCode.ERROR
    assert root.start_time == int(conn.opened_wall * 1e9)
    assert abs(root.end_time - conn.closed_wall * 1e9) < 5e6  # from the monotonic clock: within 5 ms
    handshake, close = rig.spans("ws.handshake"), rig.spans("ws.close")
    for (child,) in (handshake, close):
        assert child.parent.span_id == root.context.span_id and child.kind is SpanKind.INTERNAL
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    assert handshake[0].attributes["stablews.auth.result"] == "off"
    assert dict(close[0].attributes) == {
        "stablews.close.code": 1008, "stablews.close.cause": "policy_violation", "stablews.close.initiator": "server",
    }
    assert conn.telemetry is None  # the state is dropped with the root
    assert rig.probe.seen and all(span is trace.INVALID_SPAN for span in rig.probe.seen)


async def test_no_hello_gives_a_failed_handshake_and_a_new_trace_for_a_bad_traceparent() -> None:
    rig = Rig()
    conn = rig.open(trace_headers=("00-zz-nonsense-01", None))
    conn.close(CloseCause.HELLO_TIMEOUT)
    conn.finish(1006)
    (root,) = rig.spans("ws.connection")
    assert root.parent is None and format(root.context.trace_id, "032x") == conn.trace_id
    (handshake,) = rig.spans("ws.handshake")
    assert handshake.status.status_code is StatusCode.ERROR
    assert handshake.attributes["error.type"] == "hello_timeout"


async def test_ok_heartbeats_are_recorded_at_the_ratio_and_late_and_missed_ones_always() -> None:
    rig = Rig(heartbeat_span_ratio=0.25)
    conn = rig.open()
    manager = rig.server.manager
    for seq in range(1, 101):
        conn.ping_seq = seq
        conn.ping_sent_at = manager.clock()
        manager.heartbeat_ok(conn, 0.002)
    ok = rig.spans("ws.heartbeat")
    assert len(ok) == 25  # a credit counter: exactly the ratio
    assert {s.attributes["stablews.heartbeat.outcome"] for s in ok} == {"ok"}
    assert all(s.attributes["stablews.heartbeat.rtt_ms"] == 2.0 for s in ok)
    conn.pong_deadline = manager.clock()
    manager.heartbeat_missed(conn, "missed", None)
    manager.heartbeat_missed(conn, "late", 0.5)
    manager.heartbeat_late(conn, 0.7)
    outcomes = [s.attributes["stablews.heartbeat.outcome"] for s in rig.spans("ws.heartbeat")[25:]]
    assert outcomes == ["missed", "late", "late"]
    missed = rig.spans("ws.heartbeat")[25]
    assert "stablews.heartbeat.rtt_ms" not in missed.attributes
    assert missed.attributes["stablews.heartbeat.id"] == 100

    for ratio, expected in ((0.0, 0), (1.0, 10)):
        rig = Rig(heartbeat_span_ratio=ratio)
        conn = rig.open()
        for _ in range(10):
            rig.server.manager.heartbeat_ok(conn, 0.001)
        assert len(rig.spans("ws.heartbeat")) == expected


async def test_recovery_links_to_the_previous_connections_trace() -> None:
    rig = Rig()
    dropped = rig.open()
    dropped.finish(1006)  # client_gone: this instance remembers the root
    (dropped_root,) = rig.spans("ws.connection")

    known, unknown, invalid = rig.open(), rig.open(), rig.open()
    for conn, previous in ((known, dropped.trace_id), (unknown, "cd" * 16), (invalid, "not-a-trace-id")):
        conn.hello_done = True
        conn.previous_trace_id = previous
        conn.manager.hooks.on_hello(conn)
        conn.manager.hooks.on_resume(conn, 2, 1, 5)
    recoveries = {s.parent.span_id: s for s in rig.spans("ws.recovery")}
    assert len(recoveries) == 3

    def recovery_of(conn: Connection) -> Any:
        return recoveries[int(conn.span_id, 16)]

    span = recovery_of(known)
    assert {k: span.attributes[k] for k in ("stablews.recovery.asked", "stablews.recovery.recovered",
                                           "stablews.recovery.replayed")} == {
        "stablews.recovery.asked": 2, "stablews.recovery.recovered": 1, "stablews.recovery.replayed": 5}
    (link,) = span.links
    assert link.context.trace_id == dropped_root.context.trace_id
    assert link.context.span_id == dropped_root.context.span_id
    assert link.attributes["stablews.link.type"] == "previous_connection"

    (link,) = recovery_of(unknown).links  # not seen here: the trace, with no span id
    assert format(link.context.trace_id, "032x") == "cd" * 16 and link.context.span_id == 0
    assert link.attributes["stablews.link.span_known"] is False
    assert recovery_of(invalid).links == ()
    assert "stablews.previous_trace_id" not in recovery_of(invalid).attributes


async def test_a_root_the_sampler_drops_has_ids_and_no_children() -> None:
    rig = Rig(TracerProvider(sampler=ALWAYS_OFF), heartbeat_span_ratio=1.0)
    conn = rig.open()
    assert conn.trace_id is not None and len(conn.trace_id) == 32 and int(conn.trace_id, 16)
    assert conn.span_id is not None and len(conn.span_id) == 16
    conn.hello_done = True
    conn.manager.hooks.on_hello(conn)
    rig.server.manager.heartbeat_ok(conn, 0.001)
    conn.finish(1000)
    assert rig.spans() == []


async def test_shutdown_span_is_a_trace_of_its_own_and_shutdown_flushes() -> None:
    rig = Rig()
    rig.tracing.on_shutdown(
        {"connections_closed": 3, "connections_abandoned": 1, "messages_flushed": 42, "drain_seconds": 0.25}
    )
    (span,) = rig.spans("ws.shutdown")
    assert span.parent is None
    assert dict(span.attributes) == {
        "stablews.instance": rig.server.settings.instance_id,
        "stablews.shutdown.connections_closed": 3, "stablews.shutdown.connections_abandoned": 1,
        "stablews.shutdown.messages_flushed": 42, "stablews.shutdown.drain_seconds": 0.25,
    }
    assert abs((span.end_time - span.start_time) / 1e9 - 0.25) < 0.01
    rig.tracing.shutdown()
    rig.tracing.shutdown()  # once is enough; twice is harmless
