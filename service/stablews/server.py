"""Running the app under uvicorn with our drain in front of uvicorn's shutdown.

uvicorn, left alone, answers SIGTERM by closing every WebSocket with 1012 at
once and then re-raising the signal (exit status 143/130). We drain first
(readiness 0, `reconnect` advice, flush, 1001), then let uvicorn finish, and
exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import FrameType

import uvicorn

from .app import StableServer, create_app
from .config import Settings

log = logging.getLogger("stablews.server")

# At most this long after the drain, upgrades that arrived before the listener closed get their 503.
UPGRADE_ANSWER_WAIT = 1.0


class StableUvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stable: StableServer) -> None:
        super().__init__(config)
        self.stable = stable

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now", extra={"signal": signal.Signals(sig).name})
            os._exit(1)
        log.info("signal received: draining", extra={"signal": signal.Signals(sig).name})
        self.stable.draining = True  # readiness goes to 0 at once
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info(
                    "listening",
                    extra={"url": f"http://{host}:{port}", "ws_url": f"ws://{host}:{port}{self.stable.settings.ws_path}",
                           "port": port},
                )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new sockets while draining
        await self.stable.drain()
        await self._answer_pending_upgrades(UPGRADE_ANSWER_WAIT)
        await super().shutdown(sockets)

    async def _answer_pending_upgrades(self, timeout: float) -> None:
        """Let the endpoint answer (503) the upgrades that came in before the listener closed.

        uvicorn's shutdown answers a WebSocket handshake the app has not answered yet with
        HTTP 500, and the app's own 503 then fails with "Exception in ASGI application". The
        endpoint answers in the first step of its task, so this takes a loop iteration or two."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.sleep(0)
        while any(_upgrade_pending(c) for c in self.server_state.connections) and loop.time() < deadline:
            await asyncio.sleep(0.005)


def _upgrade_pending(protocol: object) -> bool:
    """A WebSocket handshake received but not answered by the app yet (uvicorn's websockets-sansio)."""
    return (
        getattr(protocol, "handshake_initiated", False)
        and not getattr(protocol, "handshake_complete", True)
        and getattr(protocol, "initial_response", None) is None
    )


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        # Frames past max_message_bytes get an `error` and 1009 from us; far
        # larger ones are refused by the parser before they are buffered.
        ws_max_size=max(4 * settings.max_message_bytes, 1024 * 1024),
        ws_ping_interval=None,  # heartbeats are the protocol's own
        ws_per_message_deflate=settings.per_message_deflate,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1.0, settings.close_timeout),
    )


def run(settings: Settings) -> int:
    stable = StableServer(settings)
    stable.drain_on_signal = False  # StableUvicorn drains before uvicorn's shutdown itself
    server = StableUvicorn(uvicorn_config(create_app(stable), settings), stable)
    server.run()
    return 0 if server.started else 1
