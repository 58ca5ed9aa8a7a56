"""Traces on the wire: `stablews serve` as its own process, configured only by the standard
`OTEL_*` variables, exporting OTLP to a receiver in the test (tests/otlp_receiver.py); the
Python client in the test exporting its own spans to the same receiver.

One trace per connection, across the process boundary: the client's `ws.client.connect`
injects `traceparent`, the server's `ws.connection` is its child; a dropped connection's
resume links back to the dropped trace; the drain's spans leave before the process exits."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from faultproxy import FaultProxy
from otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, ReceivedSpan
from stablews import __version__
from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import ServerProcess, hello_client, wait_for

POLICY = RecoveryPolicy(initial_delay=0.05, max_delay=0.5, jitter_max=0.0, max_retries=20,
                        circuit_breaker_threshold=20)
ZERO_SPAN = "0" * 16


def otel_env(endpoint: str, protocol: str, delay_ms: int = 200) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": str(delay_ms),
        # Whatever the machine running the tests has set must not redirect these.
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "",
        "OTEL_TRACES_EXPORTER": "",
        "OTEL_SDK_DISABLED": "false",
        "OTEL_SERVICE_NAME": "",
        "OTEL_RESOURCE_ATTRIBUTES": "",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def client_provider(http_receiver: OtlpHttpReceiver) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "wire-test-client"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=http_receiver.traces_url), schedule_delay_millis=100)
    )
    yield provider
    provider.shutdown()


def children(receiver: OtlpHttpReceiver, root: ReceivedSpan) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for span in receiver.find(trace_id=root.trace_id, parent_span_id=root.span_id):
        out.setdefault(span.name, []).append(span)
    return out


def close_of(span: ReceivedSpan) -> tuple[Any, Any, Any]:
    a = span.attributes
    return a["stablews.close.cause"], a["stablews.close.code"], a["stablews.close.initiator"]


async def test_a_dropped_connection_and_its_resume_are_traced_end_to_end(
    start_server: Callable[..., ServerProcess], http_receiver: OtlpHttpReceiver, client_provider: TracerProvider
) -> None:
    receiver = http_receiver
    server = start_server("--demo-feed-rate", "50", "--instance-id", "wire-1",
                          env=otel_env(receiver.endpoint, "http/protobuf"))
    connected: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        client = StableClient(proxy.url("/ws"), channels=["demo.ticker"], policy=POLICY,
                              tracer_provider=client_provider)
        client.on("connected", connected.append)
        client.on("message", messages.append)
        async with client:
            await wait_for(lambda: connected and len(messages) >= 5, 20, "the first connection and messages")
            assert proxy.cut() >= 1  # a TCP reset to both ends: no close frame
            await wait_for(lambda: len(connected) >= 2 and client.resumed >= 1, 20, "the resume")
            count = len(messages)
            await wait_for(lambda: len(messages) >= count + 5, 20, "the stream after the resume")
        # closed with 1000: the second connection's root ends too
    await asyncio.to_thread(client_provider.force_flush)
    first, second = connected[0], connected[1]
    assert first["trace_id"] != second["trace_id"]

    # -- the dropped connection: one trace from the client's connect to the server's close
    (connect1,) = await receiver.wait_spans(name="ws.client.connect", trace_id=first["trace_id"])
    assert connect1.kind == "CLIENT" and connect1.parent_span_id is None
    assert connect1.resource["service.name"] == "wire-test-client"
    assert connect1.attributes["url.full"] == proxy.url("/ws") and connect1.attributes["stablews.attempt"] == 1
    assert connect1.attributes["stablews.connection.id"] == first["connection"]
    assert connect1.status == "UNSET"
    (root1,) = await receiver.wait_spans(name="ws.connection", trace_id=first["trace_id"], timeout=15)
    assert root1.kind == "SERVER" and root1.parent_span_id == connect1.span_id
    assert root1.resource["service.name"] == "stablews"
    assert root1.resource["service.instance.id"] == "wire-1" and root1.resource["service.version"] == __version__
    assert root1.scope == "stablews"
    a = root1.attributes
    assert a["network.protocol.name"] == "websocket" and a["url.path"] == "/ws"
    assert a["client.address"] == "127.0.0.1" and a["server.port"] == server.port
    assert a["stablews.connection.id"] == first["connection"] and a["stablews.instance"] == "wire-1"
    assert a["user_agent.original"].startswith("stablews-python/")
    cause, code, initiator = close_of(root1)
    assert (cause, initiator) == ("client_gone", "client") and code in (1005, 1006)
    assert root1.status == "ERROR" and a["error.type"] == "client_gone"
    assert a["stablews.messages.sent"] >= 5 and a["stablews.messages.received"] >= 2
    kids = children(receiver, root1)
    assert {"ws.handshake", "ws.subscribe", "ws.close"} <= set(kids), sorted(kids)
    assert all(s.kind == "INTERNAL" for spans in kids.values() for s in spans)
    assert kids["ws.handshake"][0].attributes["stablews.auth.result"] == "off"
    assert kids["ws.subscribe"][0].attributes["stablews.channel"] == "demo.ticker"
    assert close_of(kids["ws.close"][0]) == close_of(root1)

    # -- the reconnect episode: a trace of its own, linked to the dropped connection's connect
    (reconnect,) = await receiver.wait_spans(name="ws.client.reconnect")
    assert reconnect.trace_id == second["trace_id"] and reconnect.parent_span_id is None
    assert reconnect.attributes["stablews.reconnect.outcome"] == "recovered"
    assert reconnect.attributes["stablews.reconnect.attempts"] >= 1
    attempts = [e for e in reconnect.events if e[0] == "attempt"]
    assert attempts and attempts[0][1]["stablews.attempt"] == 1
    assert attempts[0][1]["stablews.delay_s"] == pytest.approx(POLICY.initial_delay, abs=0.01)
    assert [(link.trace_id, link.span_id) for link in reconnect.links] == [(connect1.trace_id, connect1.span_id)]

    # -- the resumed connection: its connect is the episode's child, the server's root the connect's
    (root2,) = await receiver.wait_spans(name="ws.connection", trace_id=second["trace_id"], timeout=15)
    (connect2,) = receiver.find(name="ws.client.connect", span_id=root2.parent_span_id)
    assert connect2.trace_id == second["trace_id"] and connect2.parent_span_id == reconnect.span_id
    assert close_of(root2) == ("normal", 1000, "client") and root2.status == "UNSET"
    assert root2.attributes["stablews.previous_trace_id"] == first["trace_id"]
    kids = children(receiver, root2)
    (recovery,) = kids["ws.recovery"]
    assert recovery.attributes["stablews.recovery.asked"] == 1
    assert recovery.attributes["stablews.recovery.recovered"] == 1
    (link,) = recovery.links
    assert link.trace_id == first["trace_id"] and link.attributes["stablews.link.type"] == "previous_connection"
    # The root itself when the server saw the drop before the resume (the usual order), else the trace only.
    assert link.span_id in (root1.span_id, ZERO_SPAN, None), link
    (subscribe,) = kids["ws.subscribe"]
    assert subscribe.attributes["stablews.resume.requested"] is True
    assert subscribe.attributes["stablews.resume.recovered"] is True


async def test_the_grpc_exporter_delivers(start_server: Callable[..., ServerProcess]) -> None:
    with OtlpGrpcReceiver() as receiver:
        server = start_server("--demo-feed", "false", env=otel_env(receiver.endpoint, "grpc"))
        client, welcome = await hello_client(server.ws)
        await client.send({"type": "subscribe", "channel": "grpc.test"})
        await client.recv_type("subscribed")
        await client.close()
        (root,) = await receiver.wait_spans(name="ws.connection", trace_id=welcome["trace_id"], timeout=15)
        await receiver.wait_spans(trace_id=welcome["trace_id"], parent_span_id=root.span_id, count=3)
        assert receiver.protocols == {"grpc"}
    assert root.kind == "SERVER" and root.parent_span_id is None
    assert close_of(root) == ("normal", 1000, "client")
    assert root.resource["service.name"] == "stablews"
    names = sorted(s.name for s in receiver.find(trace_id=welcome["trace_id"], parent_span_id=root.span_id))
    assert names == ["ws.close", "ws.handshake", "ws.subscribe"]


async def test_spans_are_flushed_when_sigterm_ends_the_process(
    start_server: Callable[..., ServerProcess], http_receiver: OtlpHttpReceiver
) -> None:
    receiver = http_receiver
    # A minute between scheduled exports: what arrives comes from the flush at shutdown.
    server = start_server("--demo-feed", "false", "--reconnect-delay", "0.05s",
                          env=otel_env(receiver.endpoint, "http/protobuf", delay_ms=60_000))
    client, welcome = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "sig"})
    await client.recv_type("subscribed")
    assert receiver.spans == []  # ws.handshake and ws.subscribe ended, and wait in the batch
    server.signal(signal.SIGTERM)
    assert await client.wait_closed(15) == 1001
    assert await asyncio.to_thread(server.wait, 30) == 0
    await client.close()

    # Exported before the process exited: nothing to wait for.
    (shutdown,) = receiver.find(name="ws.shutdown")
    assert shutdown.parent_span_id is None and shutdown.trace_id != welcome["trace_id"]
    assert shutdown.attributes["stablews.shutdown.connections_closed"] == 1
    assert shutdown.attributes["stablews.shutdown.connections_abandoned"] == 0
    assert shutdown.attributes["stablews.shutdown.drain_seconds"] >= 0
    (root,) = receiver.find(name="ws.connection", trace_id=welcome["trace_id"])
    assert close_of(root) == ("shutdown", 1001, "server") and root.status == "UNSET"
    names = sorted(s.name for s in receiver.find(trace_id=welcome["trace_id"], parent_span_id=root.span_id))
    assert names == ["ws.close", "ws.handshake", "ws.subscribe"]
