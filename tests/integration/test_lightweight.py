"""Lightweight mode: an existing endpoint, unchanged on the wire, visible in the stats."""

from __future__ import annotations

import contextlib

import httpx
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from stablews.app import StableServer
from stablews.config import Settings
from stablews.lightweight import StabilityMiddleware, monitored
from support import InProcessServer, wait_for


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "close-please":
                await websocket.close(code=4321, reason="asked")
                return
            if message.get("text") == "boom":
                raise RuntimeError("endpoint failure")
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


def build(stable: StableServer) -> Starlette:
    app = Starlette(
        routes=[
            WebSocketRoute("/echo", monitored(stable)(echo)),
            WebSocketRoute("/plain", echo),
            *stable.routes(),
        ],
        lifespan=stable.lifespan,
    )
    return app


async def connections(srv: InProcessServer) -> list[dict]:
    async with httpx.AsyncClient() as http:
        return (await http.get(srv.http + "/api/v1/websocket/connections")).json()["connections"]


async def closed_view(srv: InProcessServer, conn_id: str) -> dict:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{srv.http}/api/v1/websocket/connections/{conn_id}")).json()


async def test_wrapped_echo_behaves_as_before_and_is_tracked():
    stable = StableServer(Settings(demo_feed=False))
    async with InProcessServer(build(stable)) as srv:
        async with connect(srv.ws_url("/echo"), compression=None) as ws:
            for text in ("hello", "ünïcode ✓", "x" * 5000):
                await ws.send(text)
                assert await ws.recv() == text
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            listed = await connections(srv)
            assert len(listed) == 1
            view = listed[0]
            assert view["mode"] == "passive" and view["state"] == "open"
            assert view["messages"]["received"] == 4 and view["messages"]["sent"] == 4
            assert view["messages"]["bytes_received"] == 5 + len("ünïcode ✓".encode()) + 5000 + 8
            conn_id = view["id"]
        await wait_for(lambda: conn_id not in stable.manager.live, 5, "close to be recorded")
        view = await closed_view(srv, conn_id)
        assert view["close"] == {"code": 1000, "cause": "normal", "initiator": "client", "at": view["close"]["at"]}
        assert view["duration_seconds"] > 0

        # An unwrapped route is untouched and untracked.
        async with connect(srv.ws_url("/plain"), compression=None) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            assert await connections(srv) == []


async def test_close_codes_and_errors_of_the_endpoint_are_recorded():
    stable = StableServer(Settings(demo_feed=False))
    async with InProcessServer(build(stable)) as srv:
        async with connect(srv.ws_url("/echo"), compression=None) as ws:
            await ws.send("close-please")
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4321  # the endpoint's own close, passed through
        async with connect(srv.ws_url("/echo"), compression=None) as ws:
            await ws.send("boom")
            with contextlib.suppress(ConnectionClosed):
                await ws.recv()
        await wait_for(lambda: not stable.manager.live, 5, "both closes recorded")
        stats = stable.stats()
        assert stats["connections"]["closed_by_cause"] == {"normal": 1, "error": 1}
        assert stats["errors"]["by_code"] == {"internal": 1}
        failed = stable.manager.closed[-1]
        assert failed.errors == 1 and failed.close_code == 1011 and failed.close_initiator == "server"
        asked = stable.manager.closed[-2]
        assert asked.close_code == 4321 and asked.close_initiator == "server"


async def test_middleware_tracks_only_the_paths_it_is_given():
    stable = StableServer(Settings(demo_feed=False))
    inner = Starlette(routes=[WebSocketRoute("/a", echo), WebSocketRoute("/b", echo), *stable.routes()],
                      lifespan=stable.lifespan)
    async with (
        InProcessServer(StabilityMiddleware(inner, stable, paths={"/a"})) as srv,
        connect(srv.ws_url("/a"), compression=None) as a,
        connect(srv.ws_url("/b"), compression=None) as b,
    ):
        await a.send("1")
        await b.send("2")
        assert (await a.recv(), await b.recv()) == ("1", "2")
        listed = await connections(srv)
        assert len(listed) == 1 and listed[0]["messages"]["received"] == 1
