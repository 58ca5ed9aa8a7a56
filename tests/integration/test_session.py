"""hello/welcome, subscribe, publications with consecutive offsets, publish, ping/pong."""

from __future__ import annotations

import httpx

from support import Client, hello_client

FAST = ("--heartbeat-interval", "2s", "--heartbeat-timeout", "1s")


async def test_welcome_carries_the_configured_heartbeat_and_limits(start_server):
    server = start_server(*FAST, "--max-message-bytes", "32KiB", "--instance-id", "edge-7")
    client, welcome = await hello_client(server.ws)
    assert client.ws.subprotocol == "stablews.v1"
    assert welcome["heartbeat"] == {"interval_ms": 2000, "timeout_ms": 1000}
    assert welcome["limits"]["max_message_bytes"] == 32 * 1024
    assert welcome["server"] == "edge-7"
    assert len(welcome["trace_id"]) == 32
    assert welcome["connection"]
    await client.close()


async def test_demo_ticker_offsets_are_consecutive(start_server):
    server = start_server(*FAST, "--demo-feed-rate", "50")
    client, _ = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "demo.ticker"})
    subscribed = await client.recv_type("subscribed")
    assert subscribed["recovered"] is None and subscribed["replayed"] == 0
    offsets = []
    for _ in range(20):
        message = await client.recv_type("message")
        assert message["channel"] == "demo.ticker"
        assert message["epoch"] == subscribed["epoch"]
        assert {"symbol", "price", "seq"} <= set(message["data"])
        offsets.append(message["offset"])
    first = subscribed["offset"] + 1
    assert offsets == list(range(first, first + 20))
    await client.close()


async def test_a_client_without_subprotocol_is_accepted_as_v1(start_server):
    server = start_server(*FAST)
    client = await Client.connect(server.ws, subprotocol=None, hello={})
    assert client.ws.subprotocol is None
    assert (await client.recv())["type"] == "welcome"
    await client.close()


async def test_client_ping_gets_pong_and_publish_is_acknowledged(start_server):
    server = start_server(*FAST, "--client-publish", "true", "--demo-feed", "false")
    client, _ = await hello_client(server.ws)
    await client.send({"type": "ping", "id": "p-1"})
    assert await client.recv_type("pong") == {"type": "pong", "id": "p-1"}
    await client.send({"type": "subscribe", "channel": "orders.eu"})
    await client.recv_type("subscribed")
    await client.send({"type": "publish", "channel": "orders.eu", "data": {"qty": 3}, "id": 41})
    message = await client.recv_type("message")
    assert message["data"] == {"qty": 3} and message["offset"] == 1
    assert await client.recv_type("published") == {"type": "published", "id": 41, "channel": "orders.eu", "offset": 1}
    await client.send({"type": "unsubscribe", "channel": "orders.eu"})
    unsubscribed = await client.recv_type("unsubscribed")
    assert unsubscribed == {"type": "unsubscribed", "channel": "orders.eu", "reason": "client"}
    await client.close()


async def test_publish_is_refused_when_client_publish_is_off(start_server):
    server = start_server(*FAST)
    client, _ = await hello_client(server.ws)
    await client.send({"type": "publish", "channel": "x", "data": 1, "id": "a"})
    error = await client.recv_type("error")
    assert error["code"] == "forbidden" and error["ref"] == "a" and error["channel"] == "x"
    await client.send({"type": "ping", "id": 1})
    assert (await client.recv_type("pong"))["id"] == 1
    await client.close()


async def test_http_publish_reaches_subscribers(start_server):
    server = start_server(*FAST, "--demo-feed", "false", env={"STABLEWS_API_KEY": "k3y"})
    client, _ = await hello_client(server.ws)
    await client.send({"type": "subscribe", "channel": "alerts"})
    subscribed = await client.recv_type("subscribed")
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.post("/api/v1/publish", json={"channel": "alerts", "data": {"a": 1}},
                                   headers={"X-API-Key": "k3y"})
    assert response.status_code == 200
    assert response.json() == {"channel": "alerts", "epoch": subscribed["epoch"], "offset": 1}
    message = await client.recv_type("message")
    assert message["data"] == {"a": 1} and message["offset"] == 1
    await client.close()


async def test_past_max_connections_a_client_is_advised_and_closed_1013(start_server):
    server = start_server(*FAST, "--max-connections", "2", "--demo-feed", "false")
    first, _ = await hello_client(server.ws)
    second, _ = await hello_client(server.ws)
    third = await Client.connect(server.ws)
    advice = await third.recv_type("reconnect")
    assert advice["reason"] == "overloaded" and advice["after_ms"] >= 0
    assert await third.wait_closed() == 1013
    await first.send({"type": "ping", "id": 1})
    assert (await first.recv_type("pong"))["id"] == 1  # the others are untouched
    for c in (first, second):
        await c.close()
