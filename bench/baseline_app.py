"""The bare Starlette WebSocket app that core_bench.py measures stablews against.

Endpoints:

- `/ws`: accept, then await `receive()` until the peer goes (what an idle
  connection costs with nothing on top of Starlette and uvicorn);
- `/pub`: every text frame received is sent to every `/ws` connection with a
  plain `for ws in clients: await ws.send_text(text)` loop, then acknowledged
  to the publisher with one small frame;
- `GET /count`: `{"connections": <live /ws connections>}`.

It runs under uvicorn with the settings stablews uses (server.py:
`uvicorn_config`) and prints `{"msg": "listening", "port": N}` on stderr once
it accepts connections, like stablews's own log line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

ACK = '{"type":"published"}'
# stablews: max(4 * max_message_bytes, 1 MiB) with the default 64 KiB limit.
WS_MAX_SIZE = 1024 * 1024

clients: set[WebSocket] = set()


async def ws_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    clients.add(websocket)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    finally:
        clients.discard(websocket)


async def pub_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            for ws in tuple(clients):  # a copy: a client may leave while we await
                try:
                    await ws.send_text(text)
                except (OSError, RuntimeError, WebSocketDisconnect):
                    clients.discard(ws)
            await websocket.send_text(ACK)
    except WebSocketDisconnect:
        pass


async def count(request: Request) -> JSONResponse:
    return JSONResponse({"connections": len(clients)})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield


app = Starlette(
    routes=[WebSocketRoute("/ws", ws_endpoint), WebSocketRoute("/pub", pub_endpoint), Route("/count", count)],
    lifespan=lifespan,
)


class ReportingServer(uvicorn.Server):
    """Prints the port it listens on (port 0 asks the OS for a free one)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
                print(json.dumps({"level": "info", "msg": "listening", "port": port}), file=sys.stderr, flush=True)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(asgi_app: Any, description: str, argv: Sequence[str] | None = None) -> int:
    """Run a bench server app under uvicorn as every one of them runs: the same protocol implementation,
    no pings, no compression, on the port given (0: a free one, reported on stderr)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stderr)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    config = uvicorn.Config(
        asgi_app,
        host=args.host,
        port=args.port,
        ws="websockets-sansio",
        ws_max_size=WS_MAX_SIZE,
        ws_ping_interval=None,
        ws_per_message_deflate=False,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = ReportingServer(config)
    server.run()
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    return serve(app, "Bare Starlette WebSocket baseline for bench/core_bench.py.", argv)


if __name__ == "__main__":
    sys.exit(main())
