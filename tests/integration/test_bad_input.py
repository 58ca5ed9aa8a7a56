"""Bad input gets an `error` (or 1009 / 1008) and nobody else notices."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from websockets.exceptions import ConnectionClosed

from support import Client, get_json, hello_client, wait_for

OPTIONS = ("--heartbeat-interval", "2s", "--heartbeat-timeout", "1s", "--max-message-bytes", "1KiB",
           "--max-bad-messages", "5", "--demo-feed-rate", "40")


class Watcher:
    """A bystander subscribed to demo.ticker, recording offsets."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.offsets: list[int] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            message = await self.client.recv(30)
            if message["type"] == "message":
                self.offsets.append(message["offset"])

    async def stop_and_check(self) -> None:
        count = len(self.offsets)
        await wait_for(lambda: len(self.offsets) >= count + 5, 10, "more ticks for the bystander")
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        first = self.offsets[0]
        assert self.offsets == list(range(first, first + len(self.offsets)))  # no gap, no duplicate
        assert not self.client.closed.is_set()
        await self.client.close()


@pytest.fixture
async def bystander(start_server):
    server = start_server(*OPTIONS)
    client, _ = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "demo.ticker"})
    await client.recv_type("subscribed")
    watcher = Watcher(client)
    yield server
    await watcher.stop_and_check()


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("{not json", "bad_json", None),
        ('["a", "list"]', "bad_message", None),
        ('{"type": "teleport", "id": "t1"}', "bad_message", "t1"),
        ('{"type": "subscribe"}', "bad_message", "subscribe"),
        ('{"type": "subscribe", "channel": "bad channel!"}', "bad_message", "subscribe"),
        ('{"type": "subscribe", "channel": "a", "since": {"epoch": "e", "offset": -1}}', "bad_message", "subscribe"),
        ('{"type": "ping"}', "bad_message", "ping"),
        ('{"type": "unsubscribe", "channel": "never.joined"}', "not_subscribed", "unsubscribe"),
        ('{"type": "hello"}', "bad_message", "hello"),
    ],
)
async def test_bad_message_gets_error_and_the_connection_keeps_working(bystander, frame, code, ref):
    client, _ = await hello_client(bystander.ws)
    await client.send(frame)
    error = await client.recv_type("error")
    assert error["code"] == code
    assert error.get("ref") == ref
    assert error.get("channel") == ("never.joined" if code == "not_subscribed" else None)  # which channel, if any
    assert error["message"]
    await client.send({"type": "ping", "id": "still-there"})
    assert await client.recv_type("pong") == {"type": "pong", "id": "still-there"}
    stats = await get_json(bystander.http + "/api/v1/websocket/stats")
    assert stats["errors"]["by_code"][code] == 1
    await client.close()


async def test_binary_frames_are_refused(bystander):
    client, _ = await hello_client(bystander.ws)
    await client.ws.send(b"\x00\x01")
    assert (await client.recv_type("error"))["code"] == "bad_message"
    await client.close()


async def test_oversized_frame_gets_too_large_then_1009(bystander):
    client, _ = await hello_client(bystander.ws)
    await client.send({"type": "publish", "channel": "a", "data": "x" * 2048})
    error = await client.recv_type("error")
    assert error["code"] == "too_large"
    assert await client.wait_closed() == 1009


async def test_a_frame_far_over_the_limit_is_closed_1009_by_the_parser(bystander):
    client, _ = await hello_client(bystander.ws)
    with contextlib.suppress(ConnectionClosed):  # the server may close while the frame is still going out
        await client.ws.send("x" * (2 * 1024 * 1024))
    assert await client.wait_closed() == 1009
    stats = await get_json(bystander.http + "/api/v1/websocket/stats")
    assert stats["connections"]["closed_by_cause"].get("too_large") == 1


async def test_repeated_bad_input_is_closed_1008(bystander):
    client, _ = await hello_client(bystander.ws)
    for i in range(5):
        await client.send(f"garbage {i}")
    errors = [await client.recv_type("error") for _ in range(5)]
    assert [e["code"] for e in errors] == ["bad_json"] * 5
    assert await client.wait_closed() == 1008
    stats = await get_json(bystander.http + "/api/v1/websocket/stats")
    assert stats["connections"]["closed_by_cause"].get("policy_violation") == 1
