"""The flight recorder (GET /api/v1/websocket/drops) and the log line of an abnormal close: what an
on-call engineer reads to explain a drop, and the trace id that leads to its trace."""

from __future__ import annotations

import httpx

from support import Client, get_json, hello_client, wait_for

FAST_HEARTBEATS = ("--heartbeat-interval", "0.4s", "--heartbeat-timeout", "0.2s", "--max-missed-heartbeats", "2")


async def test_a_heartbeat_timeout_is_recorded_with_its_figures_and_trace(start_server) -> None:
    server = start_server(*FAST_HEARTBEATS, "--demo-feed-rate", "20")
    dropped, welcome = await hello_client(server.ws)
    healthy, _ = await hello_client(server.ws)
    await dropped.send({"type": "subscribe", "channel": "demo.ticker"})
    await wait_for(lambda: dropped.pings >= 1, 10, "an answered ping (an RTT figure)")
    dropped.answer_pings = False
    assert await dropped.wait_closed(10) == 4000
    await healthy.close()  # a normal close: not a drop

    async def recorded() -> list:
        return (await get_json(f"{server.http}/api/v1/websocket/drops"))["drops"]

    (drop,) = await wait_for(recorded, 10, "the drop to be recorded")
    assert drop["connection"] == welcome["connection"]
    assert drop["trace_id"] == welcome["trace_id"] and len(drop["span_id"]) == 16
    assert (drop["cause"], drop["code"], drop["initiator"]) == ("heartbeat_timeout", 4000, "server")
    assert drop["missed_heartbeats"] >= 2 and drop["missed_in_a_row"] == 2
    assert drop["last_rtt_ms"] is not None and drop["last_rtt_ms"] >= 0
    assert drop["duration_s"] > 0.4
    assert drop["messages_out"] > 0 and drop["messages_in"] >= 2  # hello, subscribe, pongs
    assert 0 <= drop["health_score"] < 100

    # The same close in the logs: one line with the cause, the figures and the trace.
    def log_line() -> list:
        return [e for e in server.logs() if e.get("msg") == "connection closed abnormally"]

    (line,) = await wait_for(log_line, 10, "the abnormal-close log line")
    assert line["trace_id"] == welcome["trace_id"] and line["span_id"] == drop["span_id"]
    assert line["cause"] == "heartbeat_timeout" and line["code"] == 4000 and line["connection"] == drop["connection"]


async def test_the_recorder_is_bounded_newest_first_and_filters(start_server) -> None:
    server = start_server("--flight-recorder-size", "3", "--hello-timeout", "0.3s", "--demo-feed", "false")
    for _ in range(5):  # five hello timeouts (4002), one after the other
        client = await Client.connect(server.ws)
        assert await client.wait_closed(10) == 4002
    report = await wait_for(
        lambda: _drops_if(server, lambda r: r["recorded_total"] == 5), 10, "five drops recorded"
    )
    assert report["kept"] == 3 and report["returned"] == 3
    times = [d["at"] for d in report["drops"]]
    assert times == sorted(times, reverse=True)  # newest first
    assert {d["cause"] for d in report["drops"]} == {"hello_timeout"}
    one = await get_json(f"{server.http}/api/v1/websocket/drops?limit=1")
    assert one["drops"] == report["drops"][:1]
    none = await get_json(f"{server.http}/api/v1/websocket/drops?cause=slow_consumer")
    assert none["drops"] == []
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        bad = (("limit=0", "between 1 and 3"), ("limit=x", "whole number"), ("cause=nope", "unknown cause"))
        for query, says in bad:
            reply = await http.get(f"/api/v1/websocket/drops?{query}")
            assert reply.status_code == 400 and says in reply.json()["error"], (query, reply.text)


async def test_drops_need_the_api_key_when_one_is_set(start_server) -> None:
    server = start_server("--demo-feed", "false", env={"STABLEWS_API_KEY": "k3y"})
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        assert (await http.get("/api/v1/websocket/drops")).status_code == 401
        assert (await http.get("/api/v1/websocket/drops", headers={"X-API-Key": "wrong"})).status_code == 401
        reply = await http.get("/api/v1/websocket/drops", headers={"X-API-Key": "k3y"})
        assert reply.status_code == 200 and reply.json()["drops"] == []


async def _drops_if(server, check) -> dict | None:
    report = await get_json(f"{server.http}/api/v1/websocket/drops")
    return report if check(report) else None
