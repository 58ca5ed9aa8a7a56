"""A python-socketio server for bench/core_bench.py (`--kinds socketio`).

A plain `socketio.AsyncServer(async_mode="asgi")` wrapped in `socketio.ASGIApp`, with Socket.IO's
defaults (Engine.IO pings every 25 s, 20 s to answer), under uvicorn with the bare app's settings
(bench/baseline_app.py). Endpoints:

- `/socket.io/`: Socket.IO; a `join` event puts the client into the room named by its argument and
  is acknowledged with `"joined"`;
- `/pub` (a Starlette WebSocket endpoint, reached through `other_asgi_app`): every text frame
  received is a JSON object, emitted as a `message` event to the room `bench`, then acknowledged to
  the publisher with the bare app's `{"type":"published"}`;
- `GET /count`: `{"connections": <connected Socket.IO clients>}`.

It prints `{"msg": "listening", "port": N}` on stderr once it accepts connections, like the others.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from baseline_app import ACK, serve

ROOM = "bench"  # core_bench's fan-out channel

sio = socketio.AsyncServer(async_mode="asgi")
connected = 0


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
    global connected
    connected += 1


@sio.event
async def disconnect(sid: str, reason: str) -> None:
    global connected
    connected -= 1


@sio.event
async def join(sid: str, room: str) -> str:
    await sio.enter_room(sid, room)
    return "joined"  # the return value is the ack


async def pub_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            await sio.emit("message", data, room=ROOM)
            await websocket.send_text(ACK)
    except WebSocketDisconnect:
        pass


async def count(request: Request) -> JSONResponse:
    return JSONResponse({"connections": connected})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield


# ASGIApp hands lifespan and every path outside /socket.io/ to the Starlette app.
app = socketio.ASGIApp(
    sio,
    other_asgi_app=Starlette(
        routes=[WebSocketRoute("/pub", pub_endpoint), Route("/count", count)],
        lifespan=lifespan,
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    return serve(app, "python-socketio server for bench/core_bench.py.", argv)


if __name__ == "__main__":
    sys.exit(main())
