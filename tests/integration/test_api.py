"""The HTTP API: publish with its answers, stats, connections and one connection's timeline."""

from __future__ import annotations

import httpx
import pytest

from support import hello_client, wait_for

KEY = "s3cret-key"


@pytest.fixture
def server(start_server):
    return start_server("--demo-feed", "false", "--max-message-bytes", "2KiB", env={"STABLEWS_API_KEY": KEY})


async def test_publish_answers_each_kind_of_bad_request(server):
    async with httpx.AsyncClient(base_url=server.http) as http:
        ok = {"X-API-Key": KEY}
        cases = [
            ({}, {"channel": "a", "data": 1}, 401),
            ({"X-API-Key": "wrong"}, {"channel": "a", "data": 1}, 401),
            (ok, b"{not json", 400),
            (ok, {"channel": "a"}, 400),
            (ok, {"channel": "no spaces", "data": 1}, 400),
            (ok, {"channel": "a", "data": "x" * 4096}, 413),
        ]
        for headers, body, status in cases:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            response = await http.post("/api/v1/publish", headers=headers, **kwargs)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]
        good = await http.post("/api/v1/publish", headers=ok, json={"channel": "a", "data": [1, 2]})
        assert good.status_code == 200 and good.json()["offset"] == 1


async def test_publish_is_off_without_an_api_key(start_server):
    server = start_server("--demo-feed", "false")
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.post("/api/v1/publish", json={"channel": "a", "data": 1})
    assert response.status_code == 403 and "api_key" in response.json()["error"]


async def test_connections_and_timeline_need_the_key_and_show_the_lifecycle(server):
    client, welcome = await hello_client(server.ws, hello={"client": "dash/1.2"})
    await client.send({"type": "subscribe", "channel": "demo.ticker"})
    await client.recv_type("subscribed")
    await client.send("oops")
    await client.recv_type("error")
    conn_id = welcome["connection"]
    async with httpx.AsyncClient(base_url=server.http, headers={"X-API-Key": KEY}) as http:
        assert (await http.get("/api/v1/websocket/connections", headers={"X-API-Key": ""})).status_code == 401
        listed = (await http.get("/api/v1/websocket/connections")).json()
        assert listed["total"] == 1
        view = listed["connections"][0]
        assert view["id"] == conn_id and view["client"]["name"] == "dash/1.2"
        assert view["channels"] == ["demo.ticker"] and view["errors"] == 1
        assert view["trace_id"] == welcome["trace_id"]
        assert (await http.get("/api/v1/websocket/connections", params={"limit": "0"})).status_code == 400

        await client.close()
        await wait_for(lambda: _closed(http, conn_id), 5, "the close to be recorded")
        detail = (await http.get(f"/api/v1/websocket/connections/{conn_id}")).json()
        events = [entry["event"] for entry in detail["timeline"]]
        assert events[:3] == ["open", "hello", "subscribe"]
        assert "error" in events and events[-1] == "closed"
        assert detail["close"]["cause"] == "normal" and detail["close"]["initiator"] == "client"
        assert (await http.get("/api/v1/websocket/connections/nope")).status_code == 404


async def _closed(http: httpx.AsyncClient, conn_id: str) -> bool:
    response = await http.get(f"/api/v1/websocket/connections/{conn_id}")
    return response.status_code == 200 and response.json()["state"] == "closed"


async def test_stats_healthz_readyz(server):
    client, _ = await hello_client(server.ws)
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).json() == {"ready": True}
        stats = (await http.get("/api/v1/websocket/stats")).json()
    assert stats["connections"]["active"] == 1 and stats["connections"]["opened_total"] == 1
    assert stats["ready"] is True and stats["draining"] is False
    assert stats["broker"]["type"] == "memory"
    assert {"resumes_requested", "recovered", "not_recovered", "messages_replayed"} <= set(stats["recovery"])
    assert {"interval_ms", "timeout_ms", "rtt_ms", "missed_total"} <= set(stats["heartbeats"])
    await client.close()


async def test_an_operator_can_close_a_connection_normally(server):
    client, welcome = await hello_client(server.ws)
    url = f"/api/v1/websocket/connections/{welcome['connection']}"
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.delete(url)).status_code == 401
        response = await http.delete(url, headers={"X-API-Key": KEY})
        assert response.status_code == 200 and response.json()["code"] == 1000
        assert (await http.delete("/api/v1/websocket/connections/nope", headers={"X-API-Key": KEY})).status_code == 404
    assert await client.wait_closed() == 1000
