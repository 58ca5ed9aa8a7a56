"""The spans of real connections (observability.md, "Traces"): uvicorn in the test's loop
(support.InProcessServer), the server given an SDK provider that keeps every span in memory.

Span trees: a normal close, a continued client `traceparent`, a heartbeat timeout, a slow
consumer, a resume (ws.recovery and its link), the drain (ws.shutdown). Then the Python
client's own spans when it cannot connect (attempts, the circuit breaker, giving up), and
none at all without an SDK. (The client's spans of a drop and resume: test_tracing_wire.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from websockets.asyncio.client import connect

from stablews.app import StableServer, create_app
from stablews.client import StableClient
from stablews.config import Settings
from stablews.recovery import RecoveryPolicy
from support import Client, InProcessServer, hello_client, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Traced:
    """A server whose spans end up in `exporter`."""

    def __init__(self, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.server = StableServer(Settings(demo_feed=False, **settings), tracer_provider=provider)

    def spans(self, name: str | None = None, trace_id: str | None = None) -> list[ReadableSpan]:
        return [
            s for s in self.exporter.get_finished_spans()
            if (name is None or s.name == name) and (trace_id is None or _trace(s) == trace_id)
        ]

    async def root(self, trace_id: str, timeout: float = 10.0) -> ReadableSpan:
        """The ended ws.connection of a trace (it ends once the close is complete)."""
        (root,) = await wait_for(lambda: self.spans("ws.connection", trace_id), timeout, f"the root of {trace_id}")
        return root

    def children(self, root: ReadableSpan, name: str | None = None) -> list[ReadableSpan]:
        kids = [s for s in self.spans(name) if s.parent is not None and s.parent.span_id == root.context.span_id]
        for kid in kids:
            assert kid.context.trace_id == root.context.trace_id and kid.kind is SpanKind.INTERNAL
            assert root.start_time <= kid.start_time <= kid.end_time <= root.end_time, kid.name
        return kids


def _trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def _span(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


def _close(span: ReadableSpan) -> tuple[Any, Any, Any]:
    a = span.attributes
    return a["stablews.close.cause"], a["stablews.close.code"], a["stablews.close.initiator"]


async def test_a_normal_close_continues_the_clients_traceparent() -> None:
    traced = Traced()
    async with InProcessServer(create_app(traced.server)) as srv:
        client, welcome = await hello_client(
            srv.ws_url(), additional_headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=v1"},
            user_agent_header="tracing-test/1",
        )
        assert welcome["trace_id"] == TRACE  # the trace the client started
        await client.send({"type": "subscribe", "channel": "news"})
        await client.recv_type("subscribed")
        await client.close()
        root = await traced.root(TRACE)
        conn = traced.server.manager.get(welcome["connection"])
        assert conn is not None and conn.span_id == _span(root)  # what the logs and the drop records carry

    assert root.kind is SpanKind.SERVER
    assert root.parent is not None and format(root.parent.span_id, "016x") == PARENT and root.parent.is_remote
    assert root.context.trace_state.get("vendor") == "v1"
    attributes = dict(root.attributes)
    assert attributes["network.protocol.name"] == "websocket"
    assert attributes["client.address"] == "127.0.0.1" and isinstance(attributes["client.port"], int)
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == srv.port
    assert attributes["url.path"] == "/ws" and attributes["user_agent.original"] == "tracing-test/1"
    assert attributes["stablews.connection.id"] == welcome["connection"]
    assert attributes["stablews.instance"] == welcome["server"]
    assert _close(root) == ("normal", 1000, "client")
    assert attributes["stablews.messages.received"] == 2 and attributes["stablews.messages.sent"] >= 2
    assert attributes["stablews.heartbeat.missed"] == 0 and attributes["stablews.health.score"] > 0
    assert root.status.status_code is StatusCode.UNSET and "error.type" not in attributes

    names = sorted(s.name for s in traced.children(root))
    assert names == ["ws.close", "ws.handshake", "ws.subscribe"]
    (handshake,) = traced.children(root, "ws.handshake")
    assert handshake.attributes["stablews.auth.result"] == "off" and handshake.start_time == root.start_time
    (subscribe,) = traced.children(root, "ws.subscribe")
    assert dict(subscribe.attributes) == {
        "stablews.channel": "news", "stablews.resume.requested": False, "stablews.resume.replayed": 0,
    }
    assert subscribe.start_time >= handshake.end_time
    (close,) = traced.children(root, "ws.close")
    assert _close(close) == ("normal", 1000, "client")
    assert close.end_time == root.end_time


async def test_a_heartbeat_timeout() -> None:
    traced = Traced(heartbeat_interval=0.3, heartbeat_timeout=0.15, max_missed_heartbeats=2, heartbeat_span_ratio=1.0)
    async with InProcessServer(create_app(traced.server)) as srv:
        client, welcome = await hello_client(srv.ws_url())
        await wait_for(lambda: client.pings >= 2, 10, "answered pings")
        await wait_for(lambda: len(traced.spans("ws.heartbeat")) >= 2, 5, "two ok heartbeat spans")
        client.answer_pings = False
        assert await client.wait_closed(10) == 4000
        root = await traced.root(welcome["trace_id"])

    assert _close(root) == ("heartbeat_timeout", 4000, "server")
    assert root.status.status_code is StatusCode.ERROR and root.attributes["error.type"] == "heartbeat_timeout"
    assert root.attributes["stablews.heartbeat.missed"] == 2 and root.attributes["stablews.heartbeat.rtt_ms"] >= 0
    beats = sorted(traced.children(root, "ws.heartbeat"), key=lambda s: s.start_time)
    outcomes = [s.attributes["stablews.heartbeat.outcome"] for s in beats]
    assert outcomes[-2:] == ["missed", "missed"] and set(outcomes[:-2]) == {"ok"}, outcomes
    ids = [s.attributes["stablews.heartbeat.id"] for s in beats]
    assert ids == list(range(1, len(ids) + 1))
    for beat in beats:
        has_rtt = "stablews.heartbeat.rtt_ms" in beat.attributes
        assert has_rtt == (beat.attributes["stablews.heartbeat.outcome"] == "ok")
    missed = beats[-1]
    assert abs((missed.end_time - missed.start_time) / 1e9 - 0.15) < 0.01  # ping → its deadline
    (close,) = traced.children(root, "ws.close")
    assert close.start_time >= missed.end_time and _close(close) == ("heartbeat_timeout", 4000, "server")


async def test_a_slow_consumer() -> None:
    traced = Traced(send_queue_max=20, close_timeout=1.0, heartbeat_interval=30.0)
    async with InProcessServer(create_app(traced.server)) as srv:
        # A tiny receive buffer, and a client that stops reading once its small queue is full
        # (set before connect: a window shrunk after the handshake can stall loopback TCP).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", srv.port))
        slow = await connect(srv.ws_url(), sock=sock, compression=None, ping_interval=None, max_queue=1,
                             subprotocols=["stablews.v1"])  # type: ignore[list-item]
        await slow.send(json.dumps({"type": "hello"}))
        await slow.send(json.dumps({"type": "subscribe", "channel": "firehose"}))
        welcome = json.loads((await slow.recv()).split("\n")[0])
        conn = traced.server.manager.get(welcome["connection"])
        assert conn is not None
        payload = "x" * 2000
        async with asyncio.timeout(30):
            while conn.close_cause is None:
                await traced.server.publish("firehose", payload)
                await asyncio.sleep(0)  # let the flusher write: the socket fills, then the queue
        root = await traced.root(welcome["trace_id"], timeout=10)
        slow.transport.abort()

    assert _close(root) == ("slow_consumer", 4003, "server")
    assert root.status.status_code is StatusCode.ERROR and root.attributes["error.type"] == "slow_consumer"
    (close,) = traced.children(root, "ws.close")
    assert _close(close) == ("slow_consumer", 4003, "server")
    # The close frame waited behind a send the peer never read: abandoned after close_timeout.
    assert close.attributes.get("stablews.close.abandoned") is True
    assert (close.end_time - close.start_time) / 1e9 >= 1.0 - 0.05
    (subscribe,) = traced.children(root, "ws.subscribe")
    assert subscribe.attributes["stablews.channel"] == "firehose"


async def test_a_resume_links_to_the_dropped_connections_trace() -> None:
    traced = Traced()
    async with InProcessServer(create_app(traced.server)) as srv:
        first, first_welcome = await hello_client(srv.ws_url())
        await first.send({"type": "subscribe", "channel": "c"})
        subscribed = await first.recv_type("subscribed")
        for n in range(3):
            await traced.server.publish("c", {"n": n})
        held = [await first.recv_type("message") for _ in range(3)]
        first.abort()  # no close frame: client_gone
        dropped = await traced.root(first_welcome["trace_id"])

        resume = {"c": {"epoch": subscribed["epoch"], "offset": held[0]["offset"]}}
        second = await Client.connect(
            srv.ws_url(), hello={"resume": resume, "previous_trace_id": first_welcome["trace_id"]}
        )
        second_welcome = await second.recv_type("welcome")
        back = await second.recv_type("subscribed")
        assert back["recovered"] is True and back["replayed"] == 2
        await second.close()
        root = await traced.root(second_welcome["trace_id"])

    cause, code, initiator = _close(dropped)
    assert (cause, initiator) == ("client_gone", "client") and code in (1005, 1006)  # as uvicorn saw the drop
    assert dropped.status.status_code is StatusCode.ERROR and dropped.attributes["error.type"] == "client_gone"
    assert second_welcome["trace_id"] != first_welcome["trace_id"]
    assert root.attributes["stablews.previous_trace_id"] == first_welcome["trace_id"]
    (recovery,) = traced.children(root, "ws.recovery")
    assert {k: recovery.attributes[k] for k in
            ("stablews.recovery.asked", "stablews.recovery.recovered", "stablews.recovery.replayed")} == {
        "stablews.recovery.asked": 1, "stablews.recovery.recovered": 1, "stablews.recovery.replayed": 2}
    (link,) = recovery.links
    assert link.context.trace_id == dropped.context.trace_id
    assert link.context.span_id == dropped.context.span_id  # closed here: the root itself
    assert link.attributes["stablews.link.type"] == "previous_connection"
    (subscribe,) = traced.children(root, "ws.subscribe")
    assert dict(subscribe.attributes) == {
        "stablews.channel": "c", "stablews.resume.requested": True, "stablews.resume.recovered": True,
        "stablews.resume.replayed": 2,
    }
    (handshake,) = traced.children(root, "ws.handshake")
    assert handshake.end_time <= recovery.start_time <= subscribe.start_time <= subscribe.end_time <= recovery.end_time


async def test_the_drain_is_a_trace_of_its_own() -> None:
    traced = Traced(reconnect_delay=0.05)
    async with InProcessServer(create_app(traced.server)) as srv:
        client, welcome = await hello_client(srv.ws_url())
        summary = await traced.server.shutdown()
        assert await client.wait_closed(10) == 1001
        root = await traced.root(welcome["trace_id"])
    (shutdown,) = traced.spans("ws.shutdown")
    assert shutdown.parent is None and shutdown.kind is SpanKind.INTERNAL
    assert shutdown.context.trace_id != root.context.trace_id
    assert dict(shutdown.attributes) == {
        "stablews.instance": traced.server.settings.instance_id,
        "stablews.shutdown.connections_closed": 1,
        "stablews.shutdown.connections_abandoned": 0,
        "stablews.shutdown.messages_flushed": summary["messages_flushed"],
        "stablews.shutdown.drain_seconds": summary["drain_seconds"],
    }
    assert _close(root) == ("shutdown", 1001, "server")
    assert root.status.status_code is StatusCode.UNSET  # a drain is a normal close
    assert shutdown.end_time >= root.end_time


# ------------------------------------------------------------------ the client's episodes


def _refusing_url() -> str:
    """A loopback port nobody listens on (bound, then released): connects are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/ws?token=secret"


def _client_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_a_client_that_cannot_connect_records_its_attempts_and_the_breaker() -> None:
    provider, exporter = _client_provider()
    policy = RecoveryPolicy(initial_delay=0.01, max_delay=0.02, jitter_max=0.0, max_retries=50,
                            circuit_breaker_threshold=3, circuit_breaker_timeout=0.1)
    client = StableClient(_refusing_url(), policy=policy, tracer_provider=provider)
    changes: list[str] = []
    client.on("circuit", changes.append)
    await client.connect()
    await wait_for(lambda: "half_open" in changes and changes.count("open") >= 2, 10, "the breaker to cycle")
    await client.close()

    connects = [s for s in exporter.get_finished_spans() if s.name == "ws.client.connect"]
    (episode,) = [s for s in exporter.get_finished_spans() if s.name == "ws.client.reconnect"]
    assert len(connects) >= 4
    for span in connects:
        assert span.kind is SpanKind.CLIENT and span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == "connect_failed"
        assert span.attributes["url.full"].endswith("/ws?token=REDACTED")
    first, *later = sorted(connects, key=lambda s: s.start_time)
    assert first.parent is None and first.attributes["stablews.attempt"] == 1
    for span in later:  # the episode's attempts are its children, in its trace
        assert span.parent is not None and span.parent.span_id == episode.context.span_id
        assert span.context.trace_id == episode.context.trace_id
    assert [s.attributes["stablews.attempt"] for s in later] == list(range(2, len(later) + 2))
    events = [(e.name, dict(e.attributes)) for e in episode.events]
    attempts = [a for name, a in events if name == "attempt"]
    assert [a["stablews.attempt"] for a in attempts] == list(range(2, len(later) + 2))
    assert all(a["stablews.delay_s"] > 0 for a in attempts)
    assert [a["stablews.attempt"] for name, a in events if name == "attempt_failed"][:2] == [1, 2]
    transitions = [(a["stablews.circuit.from"], a["stablews.circuit.to"]) for name, a in events
                   if name == "circuit_breaker"]
    assert transitions[:3] == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]
    assert episode.parent is None and episode.links == ()  # nothing was ever connected
    assert episode.attributes["stablews.reconnect.outcome"] == "closed"
    assert episode.status.status_code is StatusCode.UNSET


async def test_a_client_that_gives_up_ends_its_episode_in_error() -> None:
    provider, exporter = _client_provider()
    policy = RecoveryPolicy(initial_delay=0.01, max_delay=0.02, jitter_max=0.0, max_retries=2,
                            enable_circuit_breaker=False)
    client = StableClient(_refusing_url(), policy=policy, tracer_provider=provider)
    await client.connect()
    await client.wait_closed()
    assert client.error is not None and "gave up" in str(client.error)
    (episode,) = [s for s in exporter.get_finished_spans() if s.name == "ws.client.reconnect"]
    assert episode.attributes["stablews.reconnect.outcome"] == "gave_up"
    assert episode.status.status_code is StatusCode.ERROR


async def test_no_sdk_no_spans_and_no_traceparent() -> None:
    traced = Traced()
    seen: list[Any] = []
    async with InProcessServer(create_app(traced.server)) as srv:
        async with StableClient(srv.ws_url(), channels=["quiet"]) as client:  # the global provider: none set
            client.on("connected", seen.append)
            await client.wait_connected(10)
        (root,) = await wait_for(lambda: traced.spans("ws.connection"), 10, "the server's root")
    assert root.parent is None  # no traceparent came: a trace of the server's own
    assert seen and seen[0]["trace_id"] == _trace(root)
