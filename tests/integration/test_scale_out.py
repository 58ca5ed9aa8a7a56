"""Several `stablews serve` processes on one real `redis-server` (started by the tests on a free
loopback port): shared channels, an instance killed under load, Redis restarted with and
without its history, Redis unavailable."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from redis_server import RedisServer
from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import ServerProcess, get_json, hello_client, wait_for

KEY = "scale-out-test-key"
FAST = RecoveryPolicy(initial_delay=0.1, max_delay=0.5, jitter_max=0.1, max_retries=20, circuit_breaker_threshold=20)
# The servers' own link to Redis recovers fast too (the defaults wait seconds).
LINK = ("--initial-delay", "100ms", "--max-delay", "500ms", "--jitter-max", "100ms",
        "--circuit-breaker-timeout", "1s")


def instance(start_server: Callable[..., ServerProcess], redis_server: RedisServer, name: str,
             *flags: str) -> ServerProcess:
    return start_server(
        "--broker", redis_server.url, "--instance-id", name, "--demo-feed", "false", *LINK, *flags,
        env={"STABLEWS_API_KEY": KEY},
    )


async def ready(server: ServerProcess, timeout: float = 15.0) -> None:
    async def is_ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(server.http + "/readyz")).status_code == 200
        return False

    await wait_for(is_ready, timeout, f"{server.http} ready")


async def publish(http: httpx.AsyncClient, server: ServerProcess, channel: str, data: Any) -> httpx.Response:
    return await http.post(server.http + "/api/v1/publish", json={"channel": channel, "data": data},
                           headers={"X-API-Key": KEY})


class Received:
    """What one StableClient delivered to the application, and the resyncs it announced."""

    def __init__(self, client: StableClient) -> None:
        self.client = client
        self.positions: list[tuple[str, int]] = []
        self.data: list[Any] = []
        self.resyncs: list[dict[str, Any]] = []
        client.on("message", self._message)
        client.on("resync", lambda channel, info: self.resyncs.append(info))

    def _message(self, msg: dict[str, Any]) -> None:
        self.positions.append((msg["epoch"], msg["offset"]))
        self.data.append(msg["data"])

    def contiguous(self) -> bool:
        offsets = [o for _, o in self.positions]
        return offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True


@contextlib.asynccontextmanager
async def clients(urls: list[str], channel: str, n: int) -> AsyncIterator[list[Received]]:
    made = [Received(StableClient(urls=urls, channels=[channel], policy=FAST)) for _ in range(n)]
    try:
        for received in made:
            await received.client.connect()
        for received in made:
            await received.client.wait_connected(15)
        yield made
    finally:
        for received in made:
            await received.client.close()


async def test_a_publication_on_one_instance_reaches_subscribers_on_another(start_server, redis_server):
    a = instance(start_server, redis_server, "a")
    b = instance(start_server, redis_server, "b")
    await ready(a)
    await ready(b)
    on_b, _ = await hello_client(b.ws)
    on_a, _ = await hello_client(a.ws)
    for client in (on_a, on_b):
        await client.send({"type": "subscribe", "channel": "md.trades"})
        assert (await client.recv_type("subscribed"))["offset"] == 0
    async with httpx.AsyncClient(timeout=10) as http:
        answers = [(await publish(http, a if n % 2 else b, "md.trades", {"n": n})).json() for n in range(20)]
    assert [answer["offset"] for answer in answers] == list(range(1, 21))  # one sequence, whoever published
    for client in (on_a, on_b):
        got = [await client.recv_type("message") for _ in range(20)]
        assert [(m["epoch"], m["offset"], m["data"]["n"]) for m in got] == [
            (answers[0]["epoch"], n + 1, n) for n in range(20)
        ]
        await client.close()
    stats = await get_json(b.http + "/api/v1/websocket/stats", headers={"X-API-Key": KEY})
    assert stats["broker"]["type"] == "redis" and stats["broker"]["ready"] is True
    assert stats["broker"]["entries_read_total"] >= 20


async def test_clients_of_a_killed_instance_resume_on_another_with_nothing_lost_or_repeated(
    start_server, redis_server
):
    a = instance(start_server, redis_server, "a")
    b = instance(start_server, redis_server, "b")
    await ready(a)
    await ready(b)
    stop = asyncio.Event()
    acked: list[int] = []

    async def steady_load() -> None:  # 100 publications a second into A, all the while
        async with httpx.AsyncClient(timeout=10) as http:
            while not stop.is_set():
                acked.append((await publish(http, a, "md.ticks", len(acked))).json()["offset"])
                await asyncio.sleep(0.01)

    async with clients([b.ws, a.ws], "md.ticks", 20) as received:
        assert {r.client.server for r in received} == {"b"}
        load = asyncio.create_task(steady_load())
        try:
            await wait_for(lambda: all(len(r.positions) >= 20 for r in received), 15, "traffic on every client")
            b.proc.send_signal(signal.SIGKILL)
            b.wait(10)
            await wait_for(lambda: all(r.client.server == "a" and r.client.state == "connected" for r in received),
                           20, "every client resumed on A")
            moved_at = len(acked)
            await wait_for(lambda: len(acked) >= moved_at + 50, 15, "more publications after the failover")
        finally:
            stop.set()
            await load
        last = acked[-1]
        await wait_for(lambda: all(r.positions[-1][1] == last for r in received), 15, "every client at the end")
    for r in received:
        assert r.resyncs == []
        assert r.contiguous(), r.positions  # nothing lost
        assert len({p for p in r.positions}) == len(r.positions)  # nothing repeated
        assert len({epoch for epoch, _ in r.positions}) == 1
        stats = r.client.recovery_stats()
        assert stats["drops"] == 1 and stats["channels_resumed"] >= 1 and stats["channels_resynced"] == 0
        assert stats["failures"] == 0  # no attempt at the dead instance: the drop moved it to the next URL


async def test_redis_restarted_without_its_history_is_a_resync_never_a_silent_loss(start_server, redis_server):
    a = instance(start_server, redis_server, "a")
    await ready(a)
    async with httpx.AsyncClient(timeout=10) as http, clients([a.ws], "md.ticks", 3) as received:
        before = [(await publish(http, a, "md.ticks", n)).json() for n in range(5)]
        await wait_for(lambda: all(len(r.positions) == 5 for r in received), 10, "5 messages")
        connections = [r.client.connection_id for r in received]
        redis_server.kill()
        await wait_for(lambda: not_ready(a), 10, "readiness 0")
        refused = await publish(http, a, "md.ticks", "lost?")
        assert refused.status_code == 503 and "broker unavailable" in refused.json()["error"]
        health = await get_json(a.http + "/api/v1/websocket/health")
        assert health["status"] == "degraded" and any("broker unavailable" in r for r in health["reasons"])
        metrics = (await http.get(a.http + "/metrics")).text
        assert "stablews_broker_connected 0.0" in metrics and "stablews_ready 0.0" in metrics
        redis_server.start()  # empty: no persistence
        await ready(a)
        after = [(await publish(http, a, "md.ticks", n)).json() for n in range(3)]
        assert after[0]["epoch"] != before[0]["epoch"] and [p["offset"] for p in after] == [1, 2, 3]
        await wait_for(lambda: all(len(r.positions) == 8 for r in received), 10, "the new epoch's messages")
        # A late client resuming from the old history is told to resync, never replayed half of it.
        late, _ = await hello_client(
            a.ws, hello={"resume": {"md.ticks": {"epoch": before[0]["epoch"], "offset": 5}}}
        )
        subscribed = await late.recv_type("subscribed")
        assert subscribed["recovered"] is False and subscribed["epoch"] == after[0]["epoch"]
        await late.close()
        metrics = (await http.get(a.http + "/metrics")).text
    for r, connection in zip(received, connections, strict=True):
        assert r.client.connection_id == connection  # the connection stayed up through the outage
        assert r.positions == [(before[0]["epoch"], n) for n in range(1, 6)] + [
            (after[0]["epoch"], n) for n in range(1, 4)
        ]
        assert [info["reason"] for info in r.resyncs] == ["recovery_failed"]  # said before the new epoch
    assert 'stablews_stream_resets_total{reason="new_epoch"} 1.0' in metrics
    assert 'stablews_broker_reconnect_attempts_total{outcome="failure"}' in metrics


async def test_redis_restarted_with_its_history_is_no_resync_at_all(start_server, tmp_path):
    redis_server = RedisServer(tmp_path / "persistent", persistent=True)
    try:
        a = instance(start_server, redis_server, "a")
        await ready(a)
        async with httpx.AsyncClient(timeout=10) as http, clients([a.ws], "md.ticks", 3) as received:
            before = [(await publish(http, a, "md.ticks", n)).json() for n in range(5)]
            await wait_for(lambda: all(len(r.positions) == 5 for r in received), 10, "5 messages")
            redis_server.restart()
            await wait_for(lambda: publish_ok(http, a), 15, "publishing again")
            await wait_for(lambda: all(len(r.positions) == 6 for r in received), 10, "the 6th message")
        for r in received:
            assert r.resyncs == []
            assert r.positions == [(before[0]["epoch"], n) for n in range(1, 7)]
    finally:
        redis_server.stop()


async def test_while_redis_is_down_new_sockets_wait_and_subscribes_are_told_to_come_back(start_server, redis_server):
    a = instance(start_server, redis_server, "a")
    await ready(a)
    live, _ = await hello_client(a.ws)
    await live.send({"type": "subscribe", "channel": "one"})
    await live.recv_type("subscribed")
    redis_server.kill()
    await wait_for(lambda: not_ready(a), 10, "readiness 0")
    async with httpx.AsyncClient(timeout=10) as http:
        upgrade = await http.get(a.http + "/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        })
    assert upgrade.status_code == 503 and "broker unavailable" in upgrade.text
    await live.send({"type": "ping", "id": "still-there"})
    assert (await live.recv_type("pong"))["id"] == "still-there"  # the live connection is served
    await live.send({"type": "subscribe", "channel": "two"})
    error = await live.recv_type("error")
    assert (error["code"], error["channel"], error["ref"]) == ("unavailable", "two", "subscribe")
    advice = await live.recv_type("reconnect")
    assert advice["reason"] == "broker_unavailable" and advice["after_ms"] >= 0
    assert await live.wait_closed() == 1013
    drops = await get_json(a.http + "/api/v1/websocket/drops", headers={"X-API-Key": KEY})
    assert drops["drops"][0]["cause"] == "broker_unavailable"


async def not_ready(server: ServerProcess) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        with contextlib.suppress(httpx.HTTPError):
            return (await http.get(server.http + "/readyz")).status_code == 503
    return False


async def publish_ok(http: httpx.AsyncClient, server: ServerProcess) -> bool:
    return (await publish(http, server, "md.ticks", "after")).status_code == 200


async def test_the_demo_feed_runs_on_one_instance_and_moves_when_it_dies(start_server, redis_server):
    flags = ("--broker", redis_server.url, *LINK, "--lease-ttl", "1s", "--demo-feed-rate", "20")
    a = start_server(*flags, "--instance-id", "a", env={"STABLEWS_API_KEY": KEY})
    b = start_server(*flags, "--instance-id", "b", env={"STABLEWS_API_KEY": KEY})
    await ready(a)
    await ready(b)

    async def runners() -> list[str]:
        found = []
        for server, name in ((a, "a"), (b, "b")):
            with contextlib.suppress(httpx.HTTPError):
                stats = await get_json(server.http + "/api/v1/websocket/stats", headers={"X-API-Key": KEY})
                if stats["singletons"]["demo_feed"] == "running":
                    found.append(name)
        return found

    await wait_for(lambda: runners_are(runners, 1), 10, "the demo feed running on one instance")
    leader = (await runners())[0]
    standby = b if leader == "a" else a
    async with clients([standby.ws], "demo.ticker", 1) as (received,):
        await wait_for(lambda: len(received.positions) >= 10, 10, "demo messages")
        (a if leader == "a" else b).proc.send_signal(signal.SIGKILL)
        seen = len(received.positions)
        before = [d["seq"] for d in received.data[:seen]]
        await wait_for(lambda: len(received.positions) >= seen + 10, 10, "the feed going on from the other instance")
    assert await runners() == [("b" if leader == "a" else "a")]
    assert received.contiguous() and received.resyncs == []  # one stream, whoever publishes into it
    assert len({epoch for epoch, _ in received.positions}) == 1
    # One feed at a time: its sequence numbers follow each other (two feeds would interleave theirs).
    assert before == list(range(before[0], before[0] + len(before)))
    after = [d["seq"] for d in received.data[seen:]]
    restart = after.index(1)  # the new runner's feed starts its own sequence
    assert after[restart:] == list(range(1, len(after) - restart + 1))


async def runners_are(runners: Callable[[], Any], count: int) -> bool:
    found = await runners()
    return len(found) == count


async def test_an_upstream_is_relayed_once_and_moves_when_its_relay_dies(start_server, redis_server):
    upstream = start_server("--demo-feed-rate", "50")  # its own memory broker: a separate system
    flags = ("--upstreams", f"{upstream.ws}#demo.ticker>md.relayed", "--lease-ttl", "1s")
    a = instance(start_server, redis_server, "a", *flags)
    b = instance(start_server, redis_server, "b", *flags)
    await ready(a)
    await ready(b)

    async def relayers() -> list[ServerProcess]:
        found = []
        for server in (a, b):
            with contextlib.suppress(httpx.HTTPError):
                stats = await get_json(server.http + "/api/v1/websocket/stats", headers={"X-API-Key": KEY})
                if [u["state"] for u in stats["upstreams"]] == ["connected"]:
                    found.append(server)
        return found

    await wait_for(relayers, 15, "one instance relaying")
    (relaying,) = await relayers()
    other = b if relaying is a else a
    async with clients([other.ws], "md.relayed", 1) as (received,):
        await wait_for(lambda: len(received.data) >= 30, 15, "relayed messages")
        seqs = [d["seq"] for d in received.data]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # each upstream message once: one relay
        relaying.proc.send_signal(signal.SIGKILL)
        relaying.wait(10)
        seen = len(received.data)
        await wait_for(lambda: len(received.data) >= seen + 30, 15, "relaying again from the other instance")
        assert await relayers() == [other]
    # The new relay does not know where the old one stopped: the channel was reset (a resync), then
    # every upstream message once again.
    assert [info["reason"] for info in received.resyncs] == ["recovery_failed"]
    epochs = list(dict.fromkeys(epoch for epoch, _ in received.positions))
    assert len(epochs) == 2
    before, after = ([o for e, o in received.positions if e == epoch] for epoch in epochs)
    assert before == list(range(before[0], before[0] + len(before)))
    assert after == list(range(1, len(after) + 1))  # the reset stream, from its first message
    tail = [d["seq"] for d in received.data[-20:]]
    assert tail == list(range(tail[0], tail[0] + 20))


async def test_a_clients_pipelined_publishes_are_acknowledged_in_order(start_server, redis_server):
    a = instance(start_server, redis_server, "a", "--client-publish", "true")
    await ready(a)
    publisher, _ = await hello_client(a.ws)
    subscriber, _ = await hello_client(a.ws)
    await subscriber.send({"type": "subscribe", "channel": "md.orders"})
    await subscriber.recv_type("subscribed")
    for n in range(300):  # sent back to back, no ack awaited
        await publisher.send({"type": "publish", "channel": "md.orders", "data": n, "id": f"p{n}"})
    acks = [await publisher.recv_type("published") for _ in range(300)]
    assert [(ack["id"], ack["offset"]) for ack in acks] == [(f"p{n}", n + 1) for n in range(300)]
    got = [await subscriber.recv_type("message") for _ in range(300)]
    assert [(m["offset"], m["data"]) for m in got] == [(n + 1, n) for n in range(300)]
    for client in (publisher, subscriber):
        await client.close()
