"""Lightweight mode: stability tracking for an existing WebSocket endpoint
that does not speak the stablews protocol.

Wrapping changes nothing the endpoint sends or receives. Each connection is
registered with the stability manager as a *passive* connection: activity,
message and byte counts, errors (exceptions out of the endpoint, failed
sends), the close code and who closed, and the duration all show in the
stats, the health sweep and `/api/v1/websocket/connections`. No heartbeats
are sent and nothing is closed by the manager.

    server = StableServer(settings)
    app = Starlette(routes=[
        WebSocketRoute("/echo", monitored(server)(echo)),   # one endpoint
        *server.routes(),                                   # the stats API (and /ws)
    ], lifespan=server.lifespan)
    app = StabilityMiddleware(app, server, paths={"/feed"})  # or at the ASGI level
"""

from __future__ import annotations

import functools
import itertools
import secrets
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import TYPE_CHECKING, Any

from starlette.routing import websocket_session
from starlette.websockets import WebSocket

from .connection import Connection, cause_of_peer_close
from .endpoint import header
from .protocol import CLOSE_CODE_FOR_CAUSE, CloseCause, ErrorCode, text_size

if TYPE_CHECKING:
    from .app import StableServer

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

_CAUSE_FOR_CODE = {int(code): cause for cause, code in CLOSE_CODE_FOR_CAUSE.items()}
_ids = itertools.count(1)
_prefix = "p" + secrets.token_hex(3)


def _cause_of_own_close(code: int) -> CloseCause:
    return _CAUSE_FOR_CODE.get(code, CloseCause.NORMAL if code < 1002 or code >= 3000 else CloseCause.ERROR)


def _size(message: MutableMapping[str, Any]) -> int:
    text = message.get("text")
    return text_size(text) if text is not None else len(message.get("bytes") or b"")


async def _noop_send(message: MutableMapping[str, Any]) -> None:  # passive connections never write
    return None


class StabilityMiddleware:
    """ASGI middleware: track every WebSocket connection (or those under `paths`)."""

    def __init__(self, app: ASGIApp, server: StableServer, paths: Collection[str] | None = None) -> None:
        self.app = app
        self.server = server
        self.paths = set(paths) if paths is not None else None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path")
        if (
            scope["type"] != "websocket"
            or path == self.server.settings.ws_path  # protocol connections are tracked already
            or (self.paths is not None and path not in self.paths)
        ):
            await self.app(scope, receive, send)
            return
        await track(self.app, self.server, scope, receive, send)


def monitored(server: StableServer) -> Callable[[Callable[[WebSocket], Awaitable[None]]], ASGIApp]:
    """Decorator for a Starlette WebSocket endpoint function `async def ep(websocket)`.

    The result is an ASGI app: use it as the endpoint of a `WebSocketRoute`."""

    def wrap(func: Callable[[WebSocket], Awaitable[None]]) -> ASGIApp:
        inner = websocket_session(func)

        @functools.wraps(func)
        async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            await track(inner, server, scope, receive, send)

        return _AsgiEndpoint(app)

    return wrap


class _AsgiEndpoint:
    """Starlette treats plain functions as request handlers; an object is an ASGI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def track(app: ASGIApp, server: StableServer, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Run `app` for one WebSocket with its traffic counted on a passive connection."""
    manager = server.manager
    conn: Connection | None = None
    peer_code: int | None = None

    async def tracked_receive() -> MutableMapping[str, Any]:
        nonlocal peer_code
        message = await receive()
        if conn is not None:
            kind = message["type"]
            if kind == "websocket.receive":
                conn.count_inbound(_size(message))
                conn.last_app_activity = conn.last_inbound
            elif kind == "websocket.disconnect":
                peer_code = message.get("code", 1005)
        return message

    async def tracked_send(message: MutableMapping[str, Any]) -> None:
        nonlocal conn
        kind = message["type"]
        if kind == "websocket.accept" and conn is None:
            conn = Connection(
                manager,
                None,
                _noop_send,
                f"{_prefix}-{next(_ids):x}",
                client=scope.get("client"),
                user_agent=header(scope, b"user-agent"),
                passive=True,
            )
            conn.note("endpoint", scope.get("path", ""))
            manager.register(conn)
        try:
            await send(message)
        except Exception:
            if conn is not None:
                conn.record_error(ErrorCode.INTERNAL)
            raise
        if conn is None:
            return
        if kind == "websocket.send":
            size = _size(message)
            now = manager.clock()
            conn.last_app_activity = now
            conn.messages_out += 1
            conn.frames_out += 1
            conn.bytes_out += size
            manager.messages_out += 1
            manager.frames_out += 1
            manager.bytes_out += size
        elif kind == "websocket.close" and conn.close_cause is None and peer_code is None:
            code = int(message.get("code", 1000))
            conn.close_cause = _cause_of_own_close(code)
            conn.close_code = code
            conn.close_initiator = "server"

    try:
        await app(scope, tracked_receive, tracked_send)
    except Exception:
        if conn is not None:
            conn.record_error(ErrorCode.INTERNAL)
            if conn.close_cause is None:
                conn.close_cause, conn.close_code, conn.close_initiator = CloseCause.ERROR, 1011, "server"
        raise
    finally:
        if conn is not None:
            code = peer_code if peer_code is not None else (conn.close_code or 1006)
            if conn.close_cause is None:
                conn.close_cause = cause_of_peer_close(code)
                conn.close_code = code
                conn.close_initiator = "client"
            conn.finish(code)
