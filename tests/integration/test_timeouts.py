"""Dead peers (4000), idle (4001), no hello (4002) and slow consumers (4003)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from support import Client, get_json, hello_client, wait_for

# A loaded 2-core machine can be late by this much on top of any bound.
MARGIN = 1.5


async def test_a_peer_that_stops_answering_pings_is_closed_4000_within_the_bound(start_server):
    interval, timeout, missed = 0.5, 0.25, 2
    server = start_server(
        "--heartbeat-interval", f"{interval}s", "--heartbeat-timeout", f"{timeout}s",
        "--max-missed-heartbeats", str(missed), "--demo-feed", "false",
    )
    client, _ = await hello_client(server.ws)
    await wait_for(lambda: client.pings >= 2, 5, "answered pings")  # alive while it answers
    client.answer_pings = False
    stopped = time.monotonic()
    code = await client.wait_closed(interval * missed + timeout + MARGIN + 2)
    elapsed = time.monotonic() - stopped
    assert code == 4000
    assert elapsed <= interval * missed + timeout + MARGIN, elapsed
    stats = await get_json(server.http + "/api/v1/websocket/stats")
    assert stats["connections"]["closed_by_cause"] == {"heartbeat_timeout": 1}
    assert stats["heartbeats"]["missed_total"] >= missed


async def test_a_silent_client_is_closed_4001_and_pongs_count_as_traffic(start_server):
    server = start_server(
        "--heartbeat-interval", "0.4s", "--heartbeat-timeout", "0.4s", "--max-missed-heartbeats", "100",
        "--connection-timeout", "1.5s", "--demo-feed", "false",
    )
    silent, _ = await hello_client(server.ws, answer_pings=False)
    answering, _ = await hello_client(server.ws)
    started = time.monotonic()
    assert await silent.wait_closed(1.5 + MARGIN + 2) == 4001
    assert time.monotonic() - started <= 1.5 + MARGIN
    await wait_for(lambda: answering.pings >= 6, 10, "pings past the idle timeout")
    assert not answering.closed.is_set()  # answering pings is traffic: never idle
    await answering.close()


async def test_no_hello_is_closed_4002(start_server):
    server = start_server("--hello-timeout", "0.5s", "--demo-feed", "false")
    client = await Client.connect(server.ws)  # connects, never says hello
    started = time.monotonic()
    assert await client.wait_closed(0.5 + MARGIN + 2) == 4002
    assert time.monotonic() - started <= 0.5 + MARGIN


async def test_messages_before_hello_are_refused(start_server):
    server = start_server("--demo-feed", "false")
    client = await Client.connect(server.ws)
    await client.send({"type": "subscribe", "channel": "a"})
    error = await client.recv_type("error")
    assert error["code"] == "bad_message" and "hello" in error["message"]
    await client.close()


async def test_a_client_that_never_reads_gets_4003_and_others_see_no_gap(start_server):
    server = start_server(
        "--send-queue-max", "20", "--close-timeout", "30s", "--client-publish", "true", "--demo-feed", "false",
        "--heartbeat-interval", "30s", "--rate-limit", "0",  # the publisher floods on purpose
    )
    # The slow client's socket has a tiny receive buffer, and the client stops
    # reading once its own small queue is full: the server's writes then block.
    # (Set before connect: a window shrunk after the handshake can stall loopback TCP.)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.connect(("127.0.0.1", server.port))
    slow = await connect(server.ws, sock=sock, compression=None, ping_interval=None, max_queue=1,
                         subprotocols=["stablews.v1"])  # type: ignore[list-item]
    await slow.send(json.dumps({"type": "hello"}))
    await slow.send(json.dumps({"type": "subscribe", "channel": "firehose"}))
    welcome = json.loads((await slow.recv()).split("\n")[0])
    slow_id = welcome["connection"]

    reader, _ = await hello_client(server.ws)
    await reader.send({"type": "subscribe", "channel": "firehose"})
    await reader.recv_type("subscribed")
    publisher, _ = await hello_client(server.ws)
    payload = "x" * 2000
    received: list[int] = []

    async def read_all() -> None:
        while True:
            message = await reader.recv(20)
            if message["type"] == "message":
                received.append(message["offset"])

    reading = asyncio.create_task(read_all())
    url = f"{server.http}/api/v1/websocket/connections/{slow_id}"
    sent = 0
    async with httpx.AsyncClient() as http:
        while sent < 5000:
            for _ in range(10):
                sent += 1
                await publisher.send({"type": "publish", "channel": "firehose", "data": payload})
            # Pace the publisher on the healthy reader: only the slow client falls behind.
            await wait_for(lambda target=sent: len(received) >= target, 20, "the reader to keep up")
            if (await http.get(url)).json()["state"] != "open":
                break
        view = (await http.get(url)).json()
    assert view["state"] in ("closing", "closed"), view
    assert view["close"]["cause"] == "slow_consumer" and view["close"]["code"] == 4003

    # Now read what the slow client was sent: the advice, then the close.
    last = None
    with contextlib.suppress(ConnectionClosed):  # iteration ends with the 4003 close
        async with asyncio.timeout(20):
            async for frame in slow:
                for line in frame.split("\n"):
                    last = json.loads(line)
    assert last is not None and last["type"] == "reconnect" and last["reason"] == "slow_consumer"
    assert last["after_ms"] >= 0
    assert slow.close_code == 4003

    # The reader, sharing the channel, got every offset once, in order.
    await wait_for(lambda: len(received) >= sent, 30, "the reader to catch up")
    assert received == list(range(1, sent + 1))
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    for c in (reader, publisher):
        await c.close()
