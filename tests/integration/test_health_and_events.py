"""The health endpoint and the stability events follow the connections, and come back."""

from __future__ import annotations

import httpx

from stablews.app import StableServer, create_app
from stablews.config import Settings
from support import Client, InProcessServer, get_json, hello_client, wait_for

FLAGS = (
    "--heartbeat-interval", "0.3s", "--heartbeat-timeout", "0.2s", "--max-missed-heartbeats", "50",
    "--health-check-interval", "0.2s", "--demo-feed", "false",
)


async def health(server) -> tuple[int, dict]:
    async with httpx.AsyncClient() as http:
        response = await http.get(server.http + "/api/v1/websocket/health")
        return response.status_code, response.json()


async def test_health_turns_degraded_then_unhealthy_and_back(start_server):
    server = start_server(*FLAGS)
    clients = [(await hello_client(server.ws))[0] for _ in range(4)]
    await wait_for(lambda: all(c.pings >= 1 for c in clients), 10, "first heartbeats")
    status, body = await health(server)
    assert (status, body["status"]) == (200, "healthy")
    assert body["connections"]["total"] == 4

    clients[0].answer_pings = False  # 1 of 4 stops answering: 25% unhealthy -> degraded

    async def status_is(wanted: str, unhealthy: int | None = None) -> bool:
        body = (await health(server))[1]
        return body["status"] == wanted and unhealthy in (None, body["connections"]["unhealthy"])

    await wait_for(lambda: status_is("degraded", 1), 10, "degraded")
    status, body = await health(server)
    assert status == 200 and body["reasons"]

    for c in clients[1:3]:
        c.answer_pings = False  # 3 of 4 -> unhealthy, HTTP 503
    await wait_for(lambda: status_is("unhealthy", 3), 10, "unhealthy")
    status, body = await health(server)
    assert status == 503 and body["status"] == "unhealthy"

    async def events_at_least(name: str, wanted: int) -> bool:
        return (await get_json(server.http + "/api/v1/websocket/stats"))["events"][name] >= wanted

    # The endpoint scores live; the events come from the next sweep.
    await wait_for(lambda: events_at_least("unhealthy_connection", 3), 10, "an event per unhealthy connection")

    for c in clients:
        c.answer_pings = True
    await wait_for(lambda: status_is("healthy"), 15, "healthy again")
    assert (await health(server))[0] == 200
    stats = await get_json(server.http + "/api/v1/websocket/stats")
    assert stats["connections"]["unhealthy"] == 0
    assert stats["events"]["unhealthy_connection"] >= 3
    # The sweep saw the fleet go bad and come back (it may skip "degraded" on a loaded machine).
    await wait_for(lambda: events_at_least("stability_alert", 2), 10, "alert raised and resolved")
    for c in clients:
        await c.close()


async def test_manager_events_reach_subscribers():
    settings = Settings(
        heartbeat_interval=0.3, heartbeat_timeout=0.2, max_missed_heartbeats=50, health_check_interval=0.2,
        stale_connection_threshold=1.0, demo_feed=False, client_publish=True,
    )
    stable = StableServer(settings)
    seen: dict[str, list[dict]] = {}
    for event in ("unhealthy_connection", "stale_connection", "stability_alert", "connection_recovered"):
        stable.manager.on(event, lambda payload, event=event: seen.setdefault(event, []).append(payload))

    async with InProcessServer(create_app(stable)) as srv:
        quiet, welcome = await hello_client(srv.ws_url(), answer_pings=False)
        await wait_for(lambda: "unhealthy_connection" in seen, 10, "unhealthy_connection")
        assert seen["unhealthy_connection"][0]["connection"] == welcome["connection"]
        assert seen["unhealthy_connection"][0]["missed_in_a_row"] >= 1
        await wait_for(lambda: "stability_alert" in seen, 10, "stability_alert")
        assert seen["stability_alert"][0]["status"] in ("degraded", "unhealthy")
        await quiet.close()

        # A connection with heartbeats but no application traffic goes stale.
        idle, _ = await hello_client(srv.ws_url())
        await wait_for(lambda: "stale_connection" in seen, 10, "stale_connection")
        await idle.close()

        # A resume of every channel asked for is a recovered connection.
        pub, _ = await hello_client(srv.ws_url())
        await pub.send({"type": "subscribe", "channel": "c"})
        epoch = (await pub.recv_type("subscribed"))["epoch"]
        back = await Client.connect(srv.ws_url(), hello={"resume": {"c": {"epoch": epoch, "offset": 0}},
                                                         "previous_trace_id": "ab" * 16})
        await back.recv_type("welcome")
        await back.recv_type("subscribed")
        await wait_for(lambda: "connection_recovered" in seen, 5, "connection_recovered")
        assert seen["connection_recovered"][0]["previous_trace_id"] == "ab" * 16
        assert stable.recovery_stats()["recovered"] == 1
        for c in (pub, back):
            await c.close()
