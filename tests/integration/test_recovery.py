"""Recovery across drops: exactly the missed messages, then live ones; never partial."""

from __future__ import annotations

import asyncio

import pytest

from support import Client, hello_client, wait_for

OPTIONS = (
    "--heartbeat-interval", "2s", "--heartbeat-timeout", "1s", "--demo-feed", "false", "--client-publish", "true",
)


class Publisher:
    """Publishes `count` messages to `channel`, one every `period` seconds, counting acks."""

    def __init__(self, client: Client, channel: str, count: int, period: float) -> None:
        self.client, self.channel, self.count, self.period = client, channel, count, period
        self.acked = 0
        self.last_offset = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for i in range(1, self.count + 1):
            await self.client.send({"type": "publish", "channel": self.channel, "data": {"n": i}, "id": i})
            await asyncio.sleep(self.period)

    async def collect_acks(self) -> None:
        while self.acked < self.count:
            message = await self.client.recv(timeout=20)
            if message["type"] == "published":
                self.acked += 1
                self.last_offset = message["offset"]


async def read_until(client: Client, channel: str, offset: int, timeout: float = 20) -> list[dict]:
    out = []
    while not out or out[-1]["offset"] < offset:
        message = await client.recv(timeout)
        assert message["type"] == "message" and message["channel"] == channel, message
        out.append(message)
    return out


@pytest.mark.parametrize("via", ["hello_resume", "subscribe_since"])
async def test_abrupt_drop_then_resume_loses_and_repeats_nothing(start_server, via):
    server = start_server(*OPTIONS)
    pub_conn, _ = await hello_client(server.ws)
    sub, _ = await hello_client(server.ws)
    await sub.send({"type": "subscribe", "channel": "prices"})
    subscribed = await sub.recv_type("subscribed")
    epoch = subscribed["epoch"]

    publisher = Publisher(pub_conn, "prices", count=300, period=0.004)
    acks = asyncio.create_task(publisher.collect_acks())
    before = await read_until(sub, "prices", 60)
    position = before[-1]["offset"]  # the last message this client processed
    sub.abort()  # no close frame
    await wait_for(lambda: publisher.acked >= position + 40, 20, "publications while the client is away")

    if via == "hello_resume":
        back = await Client.connect(server.ws, hello={"resume": {"prices": {"epoch": epoch, "offset": position}}})
        await back.recv_type("welcome")
    else:
        back, _ = await hello_client(server.ws)
        await back.send({"type": "subscribe", "channel": "prices", "since": {"epoch": epoch, "offset": position}})
    resumed = await back.recv_type("subscribed")
    assert resumed["recovered"] is True
    assert resumed["epoch"] == epoch
    assert resumed["replayed"] == resumed["offset"] - position >= 40

    await asyncio.wait_for(acks, 30)
    after = await read_until(back, "prices", publisher.last_offset)
    offsets = [m["offset"] for m in before] + [m["offset"] for m in after]
    assert offsets == list(range(1, publisher.last_offset + 1))  # every offset once, in order
    assert [m["data"]["n"] for m in after] == list(range(position + 1, publisher.last_offset + 1))
    for client in (pub_conn, back):
        await client.close()


async def test_wrong_epoch_gives_recovered_false_and_no_replay(start_server):
    server = start_server(*OPTIONS)
    client, _ = await hello_client(server.ws)
    for i in range(5):
        await client.send({"type": "publish", "channel": "book", "data": i, "id": i})
    for _ in range(5):
        await client.recv_type("published")
    await client.send({"type": "subscribe", "channel": "book", "since": {"epoch": "not-the-epoch", "offset": 2}})
    subscribed = await client.recv_type("subscribed")
    assert subscribed["recovered"] is False and subscribed["replayed"] == 0 and subscribed["offset"] == 5
    await client.send({"type": "publish", "channel": "book", "data": "live", "id": "live"})
    message = await client.recv_type("message")  # the next thing is live, nothing replayed
    assert message["offset"] == 6 and message["data"] == "live"
    await client.close()


@pytest.mark.parametrize(
    ("flags", "published", "since"),
    [
        (("--history-size", "10"), 30, 1),  # the gap is older than the history
        (("--max-recovery-messages", "5"), 12, 4),  # more than a recovery may replay
        ((), 3, 7),  # a position ahead of the stream
    ],
)
async def test_recovery_is_all_or_nothing(start_server, flags, published, since):
    server = start_server(*OPTIONS, *flags)
    client, _ = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "book"})
    epoch = (await client.recv_type("subscribed"))["epoch"]
    for i in range(published):
        await client.send({"type": "publish", "channel": "book", "data": i, "id": i})
    for _ in range(2 * published):
        await client.recv()
    other, _ = await hello_client(server.ws)
    await other.send({"type": "subscribe", "channel": "book", "since": {"epoch": epoch, "offset": since}})
    subscribed = await other.recv_type("subscribed")
    assert subscribed["recovered"] is False and subscribed["replayed"] == 0
    assert subscribed["offset"] == published
    await other.send({"type": "ping", "id": 9})
    assert (await other.recv()) == {"type": "pong", "id": 9}  # nothing was replayed before it
    for c in (client, other):
        await c.close()


async def test_resume_within_history_when_nothing_was_missed(start_server):
    server = start_server(*OPTIONS)
    client, _ = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "book"})
    epoch = (await client.recv_type("subscribed"))["epoch"]
    await client.send({"type": "publish", "channel": "book", "data": 1, "id": 1})
    await client.recv_type("message")
    await client.recv_type("published")
    again = await Client.connect(server.ws, hello={"resume": {"book": {"epoch": epoch, "offset": 1}}})
    await again.recv_type("welcome")
    subscribed = await again.recv_type("subscribed")
    assert subscribed == {"type": "subscribed", "channel": "book", "epoch": epoch, "offset": 1,
                          "recovered": True, "replayed": 0}
    for c in (client, again):
        await c.close()
