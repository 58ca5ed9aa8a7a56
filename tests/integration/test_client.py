"""The Python client against a real server process, and against a scripted
WebSocket server (real sockets) where a test needs the server to misbehave in
one exact way: a given close code, advice, silence, or no answer to a ping."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from stablews.client import ClientClosed, StableClient
from stablews.recovery import RecoveryPolicy
from support import ServerProcess, wait_for

FAST = RecoveryPolicy(initial_delay=0.02, max_delay=0.2, jitter_max=0.0, circuit_breaker_timeout=0.5)


# ------------------------------------------------------------ a scripted server


class Scripted:
    """A WebSocket server speaking just enough of the protocol; `behave` decides the rest."""

    def __init__(self, behave: Callable[[Scripted, ServerConnection, int], Awaitable[None]],
                 interval_ms: int = 30_000, timeout_ms: int = 10_000, answer_verify: bool = True) -> None:
        self.behave = behave
        self.interval_ms = interval_ms
        self.timeout_ms = timeout_ms
        self.answer_verify = answer_verify
        self.connections = 0
        self.opened_at: list[float] = []
        self.closed_at: list[float] = []
        self.hellos: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        self.connections += 1
        number = self.connections
        self.opened_at.append(loop.time())
        self.changed.set()
        try:
            hello = json.loads(await ws.recv())
            self.hellos.append(hello)
            await ws.send(json.dumps({
                "type": "welcome", "connection": f"c{number}", "server": "scripted", "trace_id": None,
                "heartbeat": {"interval_ms": self.interval_ms, "timeout_ms": self.timeout_ms}, "limits": {},
            }))
            while (ping := json.loads(await ws.recv()))["type"] != "ping":
                if ping["type"] == "subscribe":
                    await ws.send(json.dumps({"type": "subscribed", "channel": ping["channel"], "epoch": "s1",
                                              "offset": 0, "recovered": None, "replayed": 0}))
            if self.answer_verify:
                await ws.send(json.dumps({"type": "pong", "id": ping["id"]}))
            await self.behave(self, ws, number)
        except ConnectionClosed:
            pass  # the client went away: that is what several tests do on purpose
        finally:
            self.closed_at.append(loop.time())
            self.changed.set()

    async def wait_connections(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.connections < n:
                self.changed.clear()
                await self.changed.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scripted]:
        async with serve(self.handler, "127.0.0.1", 0) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


async def hold_open(script: Scripted, ws: ServerConnection, number: int) -> None:
    await ws.wait_closed()


def closes_first_with(code: int, advice_ms: int | None = None) -> Callable[..., Awaitable[None]]:
    async def behave(script: Scripted, ws: ServerConnection, number: int) -> None:
        if number == 1:
            if advice_ms is not None:
                await ws.send(json.dumps({"type": "reconnect", "reason": "shutdown", "after_ms": advice_ms}))
            await ws.close(code, "scripted")
        else:
            await ws.wait_closed()

    return behave


def record_states(client: StableClient) -> list[str]:
    states: list[str] = []
    client.on("state", states.append)
    return states


# ------------------------------------------------------------ close codes


@pytest.mark.parametrize("code", [1000, 1008, 1009, 4401])
async def test_final_close_codes_stop_the_client(code: int) -> None:
    script = Scripted(closes_first_with(code))
    async with script.running():
        client = StableClient(script.url, channels=["a"], policy=FAST)
        states = record_states(client)
        await client.connect()
        async with asyncio.timeout(10):
            await client.wait_closed()
        assert script.connections == 1  # the loop has ended: no second attempt can follow
        assert client.state == "closed" and states[-1] == "closed"
        assert client.last_close is not None and client.last_close["code"] == code
        if code == 1000:
            assert client.error is None
            assert [m async for m in client] == []  # the stream simply ends
        else:
            assert isinstance(client.error, ClientClosed) and client.error.code == code
            with pytest.raises(ClientClosed):
                await client.__anext__()
        await client.close()


@pytest.mark.parametrize("code", [1001, 1011, 1013, 4000, 4001, 4002, 4003, 4008])
async def test_other_close_codes_reconnect(code: int) -> None:
    script = Scripted(closes_first_with(code))
    async with script.running(), StableClient(script.url, channels=["a"], policy=FAST) as client:
        await script.wait_connections(2)
        await wait_for(lambda: client.state == "connected" and client.connection_id == "c2", 10)
        stats = client.recovery_stats()
        assert stats["drops"] == 1 and stats["successes"] == 2 and stats["last_close"]["code"] == code


async def test_reconnect_advice_sets_the_first_delay() -> None:
    script = Scripted(closes_first_with(1001, advice_ms=600))
    policy = RecoveryPolicy(initial_delay=0.02, max_delay=2.0, jitter_max=0.0)  # advice is capped at max_delay
    async with script.running(), StableClient(script.url, channels=["a"], policy=policy) as client:
        await script.wait_connections(2)
        waited = script.opened_at[1] - script.closed_at[0]
        assert waited >= 0.6 - 0.01  # the policy's own first delay is 20 ms: the advice governed
        await wait_for(lambda: client.state == "connected", 10)


async def test_connection_without_pong_is_never_reported_connected() -> None:
    script = Scripted(hold_open, answer_verify=False)
    async with script.running():
        client = StableClient(script.url, channels=["a"], policy=FAST, verify_timeout=0.3)
        states = record_states(client)
        async with client:
            await script.wait_connections(3)
            stats = client.recovery_stats()
        assert "connected" not in states
        assert stats["successes"] == 0 and stats["failures"] >= 2
        assert stats["last_close"]["reason"] == "no pong to the verifying ping"


async def test_silent_server_is_declared_dead_after_interval_plus_timeout() -> None:
    script = Scripted(hold_open, interval_ms=300, timeout_ms=200)  # silence bound 0.5 s
    async with script.running():
        dropped = asyncio.Event()
        async with StableClient(script.url, channels=["a"], policy=FAST) as client:
            client.on("disconnected", lambda info: dropped.set())
            await client.wait_connected(10)
            loop = asyncio.get_running_loop()
            verified_at = loop.time()
            async with asyncio.timeout(10):
                await dropped.wait()
            silent_for = loop.time() - verified_at
            assert silent_for >= 0.5 - 0.02, silent_for
            assert silent_for < 0.5 + 2.0, silent_for  # generous for a loaded 2-core machine
            assert client.last_close is not None and client.last_close["reason"] == "server silent for 0.5s"
            await script.wait_connections(2)


async def test_hello_resumes_every_held_position() -> None:
    script = Scripted(closes_first_with(4000))
    async with script.running():
        positions = {"a": ("e1", 7), "b": ("e2", 3)}
        async with StableClient(script.url, channels=["a", "b"], policy=FAST, positions=positions) as client:
            await script.wait_connections(2)
            await wait_for(lambda: len(script.hellos) == 2, 10)
            del client
    for hello in script.hellos:
        assert hello["resume"] == {"a": {"epoch": "e1", "offset": 7}, "b": {"epoch": "e2", "offset": 3}}


# ------------------------------------------------------------ against the real server


async def _publish(server: ServerProcess, channel: str, n: int, key: str = "k") -> list[int]:
    offsets = []
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        for i in range(n):
            reply = await http.post("/api/v1/publish", json={"channel": channel, "data": {"i": i}},
                                    headers={"X-API-Key": key})
            assert reply.status_code == 200, reply.text
            offsets.append(reply.json()["offset"])
    return offsets


async def test_stream_in_offset_order_with_ping_and_publish(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--api-key", "k", "--demo-feed", "false", "--client-publish", "true")
    async with StableClient(server.ws, channels=["orders"], policy=FAST) as client:
        await client.wait_connected(10)
        await wait_for(lambda: "orders" in client.positions, 10)
        sent = await _publish(server, "orders", 10)
        ack = await client.publish("orders", {"from": "client"})
        assert ack["type"] == "published" and ack["offset"] == sent[-1] + 1
        rtt = await client.ping()
        assert 0 < rtt < 5
        got = []
        async with asyncio.timeout(10):
            async for msg in client:
                got.append((msg["offset"], msg["data"]))
                if len(got) == 11:
                    break
    assert got == [(o, {"i": i}) for i, o in enumerate(sent)] + [(sent[-1] + 1, {"from": "client"})]
    stats = client.recovery_stats()
    assert stats["attempts"] == 1 and stats["successes"] == 1 and stats["success_rate"] == 1.0
    assert stats["circuit_state"] == "closed" and stats["state"] == "closed"


async def test_restart_with_memory_broker_resyncs_before_the_new_epoch(
    start_server: Callable[..., ServerProcess],
) -> None:
    flags = ("--demo-feed-rate", "50", "--reconnect-delay", "0.2s")
    server = start_server(*flags)
    order: list[tuple[str, Any, Any]] = []
    async with StableClient(server.ws, channels=["demo.ticker"], policy=FAST) as client:
        client.on("resync", lambda ch, info: order.append(("resync", info["reason"], info["current"]["epoch"])))
        drops: list[dict[str, Any]] = []
        client.on("disconnected", drops.append)
        async with asyncio.timeout(60):
            async for msg in client:
                order.append(("message", msg["epoch"], msg["offset"]))
                if len(order) == 20:
                    await asyncio.to_thread(server.stop)  # drain: reconnect advice, 1001
                    server = await asyncio.to_thread(start_server, "--port", str(server.port), *flags)
                latest_epoch = order[-1][1]
                if len(order) > 20 and latest_epoch != order[0][1] and sum(
                    1 for o in order if o[0] == "message" and o[1] == latest_epoch
                ) >= 10:
                    break
    resyncs = [i for i, o in enumerate(order) if o[0] == "resync"]
    assert len(resyncs) == 1
    first_epoch = order[0][1]
    old = [o[2] for o in order[: resyncs[0]] if o[0] == "message"]
    new = [o for o in order[resyncs[0] + 1:] if o[0] == "message"]
    assert all(o[0] == "message" and o[1] == first_epoch for o in order[: resyncs[0]])
    assert old == list(range(old[0], old[0] + len(old)))  # nothing lost or repeated before the restart
    new_epoch = order[resyncs[0]][2]
    assert new_epoch != first_epoch and all(o[1] == new_epoch for o in new)
    new_offsets = [o[2] for o in new]
    assert new_offsets == list(range(new_offsets[0], new_offsets[0] + len(new_offsets)))
    stats = client.recovery_stats()
    assert stats["channels_resynced"] == 1 and stats["drops"] == 1
    assert [(d["code"], d["reason"]) for d in drops] == [(1001, "shutdown")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_circuit_opens_half_opens_and_closes_on_a_real_port(start_server: Callable[..., ServerProcess]) -> None:
    port = _free_port()  # nothing listens here yet
    policy = RecoveryPolicy(initial_delay=0.02, max_delay=0.05, jitter_max=0.0, max_retries=10,
                            circuit_breaker_threshold=3, circuit_breaker_timeout=0.4)
    circuit: list[str] = []
    client = StableClient(f"ws://127.0.0.1:{port}/ws", channels=["demo.ticker"], policy=policy, open_timeout=2)
    client.on("circuit", circuit.append)
    async with client:
        # closed → open after 3 failures → half_open after 0.4 s → open again (the trial fails too)
        await wait_for(lambda: circuit[:3] == ["open", "half_open", "open"], 15)
        assert client.recovery_stats()["failures"] >= 4
        await asyncio.to_thread(start_server, "--port", str(port), "--demo-feed-rate", "20")
        await client.wait_connected(30)
        assert circuit[-1] == "closed" and circuit[-2] == "half_open"
        stats = client.recovery_stats()
        assert stats["circuit_state"] == "closed" and stats["successes"] == 1
        assert stats["circuit_opened_total"] >= 2
        async with asyncio.timeout(10):
            msg = await client.__anext__()
        assert msg["channel"] == "demo.ticker"


async def test_moves_to_the_next_url_when_one_is_dead(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "20")
    dead = f"ws://127.0.0.1:{_free_port()}/ws"
    async with StableClient(urls=[dead, server.ws], channels=["demo.ticker"], policy=FAST) as client:
        await client.wait_connected(10)
        assert client.url == server.ws
        stats = client.recovery_stats()
        assert stats["failures"] == 1 and stats["successes"] == 1


async def test_subscribe_and_unsubscribe_while_connected(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--api-key", "k", "--demo-feed", "false")
    async with StableClient(server.ws, channels=["a"], policy=FAST) as client:
        await client.wait_connected(10)
        await client.subscribe("b")
        await wait_for(lambda: {"a", "b"} <= set(client.positions), 10, "both subscriptions")
        await _publish(server, "b", 2)
        await client.unsubscribe("a")
        await _publish(server, "a", 1)  # not for us any more
        await _publish(server, "b", 1)
        got = []
        async with asyncio.timeout(10):
            async for msg in client:
                got.append((msg["channel"], msg["offset"]))
                if len(got) == 3:
                    break
        assert got == [("b", 1), ("b", 2), ("b", 3)]
        assert client.channels == ["b"] and "a" not in client.positions
