"""The ASGI WebSocket endpoint: handshake checks, accept, then the connection's loop."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from .connection import Connection, Receive, Send
from .protocol import SUBPROTOCOL, CloseCause

if TYPE_CHECKING:
    from .app import StableServer

_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def trace_id_from(traceparent: str | None) -> str:
    """The W3C trace id the connection continues, or a new one."""
    if traceparent:
        match = _TRACEPARENT_RE.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return secrets.token_hex(16)


class WebSocketEndpoint:
    """ASGI app for the protocol's socket path."""

    def __init__(self, server: StableServer) -> None:
        self.server = server
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids):x}"

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        server = self.server
        settings = server.settings
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        if server.draining:
            await _refuse(scope, send, 503, "draining: reconnect to another instance\n")
            return
        origin = header(scope, b"origin")
        if settings.allowed_origins and origin not in settings.allowed_origins:
            server.refused_origins += 1
            await _refuse(scope, send, 403, "origin not allowed\n")
            return
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in scope.get("subprotocols", ()) else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        manager = server.manager
        conn = Connection(
            manager,
            server.broker,
            send,
            self.new_id(),
            client=scope.get("client"),
            user_agent=header(scope, b"user-agent"),
            trace_id=trace_id_from(header(scope, b"traceparent")),
            subprotocol=subprotocol,
        )
        over_limit = len(manager.live) >= settings.max_connections
        manager.register(conn)
        if over_limit:
            conn.close(CloseCause.OVERLOADED)
        await conn.run(receive)


async def _refuse(scope: MutableMapping[str, Any], send: Send, status: int, body: str) -> None:
    """Answer the upgrade with an HTTP status (plain 403 where the server lacks the extension)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body.encode()})
    else:
        await send({"type": "websocket.close", "code": 1008})
