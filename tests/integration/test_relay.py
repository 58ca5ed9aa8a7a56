"""Upstream relays: a server (B) relaying channels of an upstream (another
stablews process A, or a plain JSON feed served by the test) to its own clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from faultproxy import FaultProxy
from stablews import auth
from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import ServerProcess, get_json, wait_for

FAST = RecoveryPolicy(initial_delay=0.02, max_delay=0.2, jitter_max=0.0)
RELAY_RECOVERY = ("--initial-delay", "50ms", "--jitter-max", "50ms", "--max-delay", "300ms",
                  "--circuit-breaker-threshold", "3", "--circuit-breaker-timeout", "500ms")


class Recorder:
    """What one local client saw, in delivery order."""

    def __init__(self, client: StableClient) -> None:
        self.items: list[tuple[Any, ...]] = []
        client.on("message", lambda m: self.items.append(("message", m["channel"], m["epoch"], m["offset"], m["data"])))
        client.on("resync", lambda ch, info: self.items.append(("resync", ch, info["reason"])))

    def messages(self, channel: str | None = None) -> list[tuple[Any, ...]]:
        return [i for i in self.items if i[0] == "message" and (channel is None or i[1] == channel)]

    def resyncs(self) -> list[tuple[Any, ...]]:
        return [i for i in self.items if i[0] == "resync"]


def assert_contiguous_per_epoch(messages: list[tuple[Any, ...]]) -> None:
    """Within each epoch, offsets go up by exactly one: nothing lost, nothing repeated."""
    by_epoch: dict[str, list[int]] = {}
    for _, _, epoch, offset, _ in messages:
        by_epoch.setdefault(epoch, []).append(offset)
    for epoch, offsets in by_epoch.items():
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), (epoch, offsets)


async def test_relay_survives_its_upstream_being_killed_and_restarted(
    start_server: Callable[..., ServerProcess],
) -> None:
    upstream = start_server("--demo-feed-rate", "50")
    relay = start_server("--demo-feed", "false", "--upstreams", f"{upstream.ws}#demo.ticker>relay.ticker",
                         *RELAY_RECOVERY)
    events_url = f"{relay.http}/api/v1/websocket/stats"
    async with StableClient(relay.ws, channels=["relay.ticker"], policy=FAST) as client:
        seen = Recorder(client)
        await wait_for(lambda: len(seen.messages()) >= 20, 20, "relayed messages")
        upstream.proc.kill()  # SIGKILL: no drain, no advice
        upstream.wait(10)

        async def circuit_opened() -> bool:
            stats = await get_json(events_url)
            return stats["events"]["circuit_breaker_opened"] >= 1 and stats["upstreams"][0]["state"] != "connected"

        await wait_for(circuit_opened, 20, "the relay's circuit to open")
        stats = await get_json(events_url)
        assert stats["circuit_breakers"] == {upstream.ws: "open"} or stats["circuit_breakers"][upstream.ws] in (
            "open", "half_open")
        health = await get_json(f"{relay.http}/api/v1/websocket/health")
        assert health["status"] == "degraded" and any("circuit" in r for r in health["reasons"])
        assert client.state == "connected"  # the relay's own clients never noticed the upstream's fall

        before = len(seen.messages())
        await asyncio.to_thread(start_server, "--port", str(upstream.port), "--demo-feed-rate", "50")
        await wait_for(lambda: len(seen.messages()) >= before + 20, 30, "messages after the upstream returned")

    # The restarted upstream has a new epoch: the relay cannot resume, so the local
    # channel is reset and the local client is told to resynchronise before new data.
    assert len(seen.resyncs()) == 1
    cut = seen.items.index(seen.resyncs()[0])
    old = [i for i in seen.items[:cut] if i[0] == "message"]
    new = [i for i in seen.items[cut + 1:] if i[0] == "message"]
    assert {i[2] for i in old} != {i[2] for i in new} and len({i[2] for i in new}) == 1
    assert_contiguous_per_epoch(old)
    assert_contiguous_per_epoch(new)
    assert new[0][3] == 1  # the reset local stream starts again at offset 1
    stats = await get_json(events_url)
    upstream_stats = stats["upstreams"][0]
    assert upstream_stats["state"] == "connected" and upstream_stats["channel_resets"] == 1
    assert upstream_stats["recovery"]["successes"] >= 2 and upstream_stats["recovery"]["circuit_state"] == "closed"
    assert stats["events"]["connection_recovered"] >= 1
    assert stats["recovery"]["upstreams"][upstream.ws]["circuit_opened_total"] >= 1
    assert stats["circuit_breakers"] == {upstream.ws: "closed"}


async def test_relay_resumes_across_cut_upstream_links_without_loss(
    start_server: Callable[..., ServerProcess],
) -> None:
    upstream = start_server("--demo-feed-rate", "50")
    async with FaultProxy("127.0.0.1", upstream.port) as proxy:
        relay = start_server("--demo-feed", "false", "--upstreams", f"{proxy.url('/ws')}#demo.ticker>relay.ticker",
                             *RELAY_RECOVERY)
        async with StableClient(relay.ws, channels=["relay.ticker"], policy=FAST) as client:
            seen = Recorder(client)
            await wait_for(lambda: len(seen.messages()) >= 10, 20, "relayed messages")
            for n in range(5):
                accepted = proxy.accepted_total
                assert proxy.cut() == 1  # the relay's upstream link; the local client is not behind the proxy
                await proxy.wait_until(lambda a=accepted: proxy.accepted_total > a, 10)
                count = len(seen.messages())
                await wait_for(lambda c=count: len(seen.messages()) >= c + 10, 20, f"messages after cut {n + 1}")
        stats = await get_json(f"{relay.http}/api/v1/websocket/stats")
    # The relay resumed from its position each time: the local stream has no gap, no repeat, no resync.
    assert seen.resyncs() == []
    assert_contiguous_per_epoch(seen.messages())
    assert len({m[2] for m in seen.messages()}) == 1
    data_seq = [m[4]["seq"] for m in seen.messages()]
    assert data_seq == list(range(data_seq[0], data_seq[0] + len(data_seq)))  # the upstream's own sequence, too
    recovery = stats["upstreams"][0]["recovery"]
    assert recovery["drops"] == 5 and recovery["channels_resumed"] == 5 and recovery["channels_resynced"] == 0
    assert stats["events"]["connection_recovered"] >= 5


async def test_pooling_shares_one_upstream_connection(start_server: Callable[..., ServerProcess]) -> None:
    upstream = start_server("--demo-feed-rate", "20")
    entries = f"{upstream.ws}#demo.ticker>r1,{upstream.ws}#demo.ticker>r2"
    for pooling, connections in (("true", 1), ("false", 2)):
        relay = start_server("--demo-feed", "false", "--upstreams", entries,
                             "--enable-connection-pooling", pooling, *RELAY_RECOVERY)
        async with StableClient(relay.ws, channels=["r1", "r2"], policy=FAST) as client:
            seen = Recorder(client)
            await wait_for(lambda s=seen: len(s.messages("r1")) >= 5 and len(s.messages("r2")) >= 5, 20)
            stats = await get_json(f"{upstream.http}/api/v1/websocket/stats")
            assert stats["connections"]["active"] == connections, pooling
            relay_stats = await get_json(f"{relay.http}/api/v1/websocket/stats")
            assert len(relay_stats["upstreams"]) == connections
        relay.stop()
        # Both local channels carry the same data in the same order.
        r1 = [i[4] for i in seen.messages("r1")]
        r2 = [i[4] for i in seen.messages("r2")]
        common = min(len(r1), len(r2))
        assert r1[:common] == r2[:common] or r1[-common:] == r2[-common:]


class JsonFeed:
    """A plain JSON WebSocket feed: sends what the test queues to every connection."""

    def __init__(self) -> None:
        self.connections: set[ServerConnection] = set()
        self.accepted = 0
        self.changed = asyncio.Event()
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.add(ws)
        self.accepted += 1
        self.changed.set()
        try:
            await ws.wait_closed()
        finally:
            self.connections.discard(ws)

    async def send(self, *objects: Any) -> None:
        for ws in list(self.connections):
            with contextlib.suppress(ConnectionClosed):
                await ws.send("\n".join(json.dumps(o) for o in objects))

    async def wait_accepted(self, n: int) -> None:
        async with asyncio.timeout(15):
            while self.accepted < n or not self.connections:
                self.changed.clear()
                await self.changed.wait()


async def test_plain_json_feed_is_routed_and_a_lost_feed_means_resync(
    start_server: Callable[..., ServerProcess],
) -> None:
    feed = JsonFeed()
    async with serve(feed.handler, "127.0.0.1", 0) as listener:
        port = listener.sockets[0].getsockname()[1]
        relay = start_server("--demo-feed", "false", *RELAY_RECOVERY, "--upstreams",
                             f"json+ws://127.0.0.1:{port}/feed#type=trade>md.trades;*>md.other")
        async with StableClient(relay.ws, channels=["md.trades", "md.other"], policy=FAST) as client:
            seen = Recorder(client)
            await feed.wait_accepted(1)
            await client.wait_connected(10)
            await wait_for(lambda: {"md.trades", "md.other"} <= set(client.positions), 10)
            await feed.send({"type": "trade", "px": 1}, {"type": "quote", "px": 2}, {"type": "trade", "px": 3})
            await feed.send("not an object but JSON")
            await wait_for(lambda: len(seen.messages()) == 4, 10, "routed feed messages")
            trades = [i[4] for i in seen.messages("md.trades")]
            assert trades == [{"type": "trade", "px": 1}, {"type": "trade", "px": 3}]
            assert [i[4] for i in seen.messages("md.other")] == [{"type": "quote", "px": 2}, "not an object but JSON"]

            for ws in list(feed.connections):  # the feed drops the relay
                await ws.close(1011, "feed restarting")
            await feed.wait_accepted(2)
            await wait_for(lambda: len(seen.resyncs()) == 2, 10, "resync of both relayed channels")
            await feed.send({"type": "trade", "px": 4})
            await wait_for(lambda: len(seen.messages("md.trades")) == 3, 10)

    # What the feed sent while the relay was away cannot be known: both channels were reset.
    assert sorted(r[1] for r in seen.resyncs()) == ["md.other", "md.trades"]
    trades = seen.messages("md.trades")
    assert trades[-1][3] == 1 and trades[-1][2] != trades[0][2]  # a new epoch, from offset 1
    stats = await get_json(f"{relay.http}/api/v1/websocket/stats")
    feed_stats = stats["upstreams"][0]
    assert feed_stats["kind"] == "json" and feed_stats["messages_relayed"] == 5
    assert feed_stats["channel_resets"] == 2 and feed_stats["recovery"]["successes"] == 2


async def test_a_relay_closed_for_good_upstream_shows_in_health(start_server: Callable[..., ServerProcess]) -> None:
    upstream = start_server("--demo-feed-rate", "20", "--api-key", "k")
    relay = start_server("--demo-feed", "false", "--upstreams", f"{upstream.ws}#demo.ticker", *RELAY_RECOVERY)
    headers = {"X-API-Key": "k"}

    async def relay_connection() -> str | None:
        listed = await get_json(f"{upstream.http}/api/v1/websocket/connections", headers=headers)
        return listed["connections"][0]["id"] if listed["connections"] else None

    conn_id = await wait_for(relay_connection, 20, "the relay's connection on the upstream")
    health = await get_json(f"{relay.http}/api/v1/websocket/health")
    assert health["status"] == "healthy"
    async with httpx.AsyncClient(timeout=10) as http:  # an operator closes it with 1000: "do not come back"
        reply = await http.delete(f"{upstream.http}/api/v1/websocket/connections/{conn_id}", headers=headers)
        assert reply.status_code == 200

    async def stopped() -> bool:
        return (await get_json(f"{relay.http}/api/v1/websocket/stats"))["upstreams"][0]["state"] == "closed"

    await wait_for(stopped, 20, "the relay to stop")
    health = await get_json(f"{relay.http}/api/v1/websocket/health")
    assert health["status"] == "degraded"
    assert health["reasons"] == [f"upstream {upstream.ws} stopped: disconnected: 1000 normal"]


async def test_a_relay_follows_an_upstream_that_requires_a_token(start_server: Callable[..., ServerProcess]) -> None:
    secret = "relay-test-secret-0123456789abcdefghij"
    upstream = start_server("--demo-feed-rate", "50", env={"STABLEWS_AUTH_SECRET": secret})
    token = auth.issue(secret, subject="relay-eu", channels=["demo.>"], ttl=3600)
    relay = start_server("--demo-feed", "false", *RELAY_RECOVERY,
                         "--upstreams", f"{upstream.ws}?token={token}#demo.ticker>relay.ticker")
    client = StableClient(relay.ws, channels=["relay.ticker"])
    async with client:
        got = []
        async with asyncio.timeout(20):
            async for message in client:
                got.append(message)
                if len(got) == 5:
                    break
    assert [m["channel"] for m in got] == ["relay.ticker"] * 5
    stats = await get_json(f"{relay.http}/api/v1/websocket/stats")
    (upstream_stats,) = stats["upstreams"]
    assert upstream_stats["url"] == upstream.ws and token not in json.dumps(stats)  # the token is not shown
    assert upstream_stats["state"] == "connected"


async def test_a_relay_whose_token_is_refused_stops_and_health_says_why(
    start_server: Callable[..., ServerProcess],
) -> None:
    secret = "relay-test-secret-0123456789abcdefghij"
    upstream = start_server("--demo-feed-rate", "20", env={"STABLEWS_AUTH_SECRET": secret})
    forged = auth.issue("another-secret-entirely-0123456789abcdef", subject="relay-eu", channels=[">"], ttl=3600)
    relay = start_server("--demo-feed", "false", *RELAY_RECOVERY,
                         "--upstreams", f"{upstream.ws}?token={forged}#demo.ticker")

    async def stopped() -> dict[str, Any] | None:
        (entry,) = (await get_json(f"{relay.http}/api/v1/websocket/stats"))["upstreams"]
        return entry if entry["state"] == "closed" else None

    entry = await wait_for(stopped, 20, "the relay to stop")
    assert "4401" in json.dumps(entry) and forged not in json.dumps(entry)
    health = await get_json(f"{relay.http}/api/v1/websocket/health")
    assert health["status"] == "degraded"
    assert health["reasons"] == [f"upstream {upstream.ws} stopped: disconnected: 4401 unauthorized"]
