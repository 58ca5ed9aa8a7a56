"""Limits and their answers: inbound rate (error rate_limited, then 4008),
connections per client address (1013), JSON nesting depth and number sizes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from support import Client, ServerProcess, get_json, hello_client, wait_for


async def test_a_flood_is_limited_then_closed_4008(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--rate-limit", "20", "--rate-limit-burst", "10", "--demo-feed", "false")
    flooder, _ = await hello_client(server.ws)
    bystander, _ = await hello_client(server.ws)
    for i in range(200):
        try:
            await flooder.send({"type": "ping", "id": i})
        except Exception:  # closed under our feet: that is the point
            break
    assert await flooder.wait_closed() == 4008
    answers = flooder.drained()
    pongs = [m for m in answers if m["type"] == "pong"]
    limited = [m for m in answers if m["type"] == "error" and m["code"] == "rate_limited"]
    # hello took one token: at most the rest of the burst (plus what refilled meanwhile) was answered
    assert 9 <= len(pongs) < 9 + 20, len(pongs)
    assert len(limited) == 1 and "4008" in limited[0]["message"]  # one error per stretch, not one per message
    assert [p["id"] for p in pongs] == list(range(len(pongs)))  # the first ones, in order
    # The other connection never noticed.
    await bystander.send({"type": "ping", "id": "ok"})
    assert (await bystander.recv_type("pong"))["id"] == "ok"
    stats = await get_json(f"{server.http}/api/v1/websocket/stats")
    assert stats["connections"]["closed_by_cause"]["rate_limited"] == 1
    assert stats["errors"]["by_code"]["rate_limited"] > 10
    await bystander.close()


async def test_a_sender_that_stays_over_the_rate_is_closed_4008(start_server: Callable[..., ServerProcess]) -> None:
    """Twice the rate, paced: every other message finds a token, but the drops never pause for a second, so
    the stretch goes on and the connection is closed once it has dropped more than a burst."""
    server = start_server("--rate-limit", "50", "--rate-limit-burst", "10", "--demo-feed", "false")
    client, _ = await hello_client(server.ws)
    sent = 0
    async with asyncio.timeout(30):  # 100/s for at most 20 s; at 50 dropped per second the close comes in < 1 s
        while client.close_code is None and sent < 2000:
            try:
                await client.send({"type": "ping", "id": sent})
            except Exception:  # closed under our feet: that is the point
                break
            sent += 1
            await asyncio.sleep(0.01)
    assert await client.wait_closed() == 4008
    answers = client.drained()
    limited = [m for m in answers if m["type"] == "error" and m["code"] == "rate_limited"]
    assert len(limited) == 1, limited  # one stretch, one error
    pongs = [m["id"] for m in answers if m["type"] == "pong"]
    assert pongs == sorted(pongs) and len(pongs) >= 9  # the burst, then some of the rest: in order
    assert sent - len(pongs) > 10  # more than a burst dropped before the close


async def test_a_short_burst_over_the_rate_recovers(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--rate-limit", "50", "--rate-limit-burst", "5", "--demo-feed", "false")
    client, _ = await hello_client(server.ws)
    for i in range(8):  # 4 tokens left after hello: 4 answered, up to 4 dropped (a close needs more than 5)
        await client.send({"type": "ping", "id": i})
    seen: list[dict] = []
    async with asyncio.timeout(10):
        while not any(m["type"] == "error" for m in seen):
            seen.append(await client.recv())
    assert seen[-1]["code"] == "rate_limited" and [m["type"] for m in seen[:-1]] == ["pong"] * (len(seen) - 1)
    await asyncio.sleep(0.3)  # the subject here is time itself: 0.3 s refills 15 tokens at 50/s (capped at 5)
    await client.send({"type": "ping", "id": "after"})
    got = []
    async with asyncio.timeout(10):
        while not got or got[-1].get("id") != "after":
            got.append(await client.recv())
    assert client.close_code is None  # still open
    assert [m["id"] for m in got if m["type"] == "pong"][-1] == "after"
    await client.close()


async def test_connections_per_address_are_limited_1013(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--max-connections-per-address", "3", "--demo-feed", "false")
    clients = [(await hello_client(server.ws))[0] for _ in range(3)]
    extra = await Client.connect(server.ws)
    error = await extra.recv_type("error")
    assert "too many connections from 127.0.0.1" in error["message"]
    advice = await extra.recv_type("reconnect")
    assert advice["reason"] == "overloaded"
    assert await extra.wait_closed() == 1013
    await clients[0].close()

    async def accepted() -> bool:  # the freed place is taken again
        probe, welcome = await hello_client(server.ws)
        await probe.close()
        return welcome["type"] == "welcome"

    await wait_for(lambda: _live(server, 2), 10)
    assert await accepted()
    for client in clients[1:]:
        await client.close()


async def _live(server: ServerProcess, n: int) -> bool:
    return (await get_json(f"{server.http}/api/v1/websocket/stats"))["connections"]["active"] == n


@pytest.mark.parametrize(
    ("data", "code", "needle"),
    [
        ("[" * 40 + "]" * 40, "bad_message", "nested deeper than 32"),
        ("1" * 40, "bad_message", "longer than 32"),
        ("1e999", "bad_message", "out of range"),
        ("NaN", "bad_json", "NaN"),
        ("-Infinity", "bad_json", "Infinity"),
    ],
)
async def test_json_depth_and_number_limits(start_server: Callable[..., ServerProcess], data: str, code: str,
                                            needle: str) -> None:
    server = start_server("--client-publish", "true", "--demo-feed", "false")
    client, _ = await hello_client(server.ws)
    await client.send(f'{{"type":"publish","channel":"a","data":{data},"id":"x"}}')
    error = await client.recv_type("error")
    assert error["code"] == code and needle in error["message"]
    nested = json.loads("[" * 30 + "]" * 30)  # within the limits: accepted
    await client.send({"type": "publish", "channel": "a", "data": nested, "id": "ok"})
    assert (await client.recv_type("published"))["id"] == "ok"
    await client.close()
