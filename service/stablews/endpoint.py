"""The ASGI WebSocket endpoint: handshake checks, accept, then the connection's loop."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .connection import Connection, Receive, Send
from .protocol import SUBPROTOCOL, CloseCause, ErrorCode

if TYPE_CHECKING:
    from .app import StableServer

_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def handshake_token(scope: MutableMapping[str, Any]) -> str | None:
    """`Authorization: Bearer <token>`, else the `token` query parameter (browsers cannot set headers)."""
    authorization = header(scope, b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    query = scope.get("query_string", b"")
    if query:
        values = parse_qs(query.decode("latin-1"), max_num_fields=20).get("token")
        if values:
            return values[0]
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
        if not server.broker.ready:  # nothing could be subscribed or published: come back later
            await _refuse(scope, send, 503, "broker unavailable: reconnect later\n")
            return
        origin = header(scope, b"origin")
        # Browsers always send Origin, so a request without it is no browser's: the check,
        # which keeps other sites' pages off the socket, has nothing to say about it.
        if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
            server.refused_origins += 1
            await _refuse(scope, send, 403, "origin not allowed\n")
            return
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in scope.get("subprotocols", ()) else None
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        manager = server.manager
        traceparent = header(scope, b"traceparent")
        conn = Connection(
            manager,
            server.broker,
            send,
            self.new_id(),
            client=scope.get("client"),
            server=scope.get("server"),
            user_agent=header(scope, b"user-agent"),
            trace_id=trace_id_from(traceparent),
            span_id=secrets.token_hex(8),  # the connection's own span; tracing, when on, replaces both
            trace_headers=None if traceparent is None else (traceparent, header(scope, b"tracestate")),
            subprotocol=subprotocol,
        )
        over_limit = len(manager.live) >= settings.max_connections
        address = conn.client_address
        per_address = settings.max_connections_per_address
        over_address = bool(per_address and address is not None and manager.per_address[address] >= per_address)
        manager.register(conn)
        if over_limit:
            conn.close(CloseCause.OVERLOADED)
        elif over_address:
            conn.refuse(ErrorCode.RATE_LIMITED, f"too many connections from {address} (limit {per_address})")
            conn.close(CloseCause.OVERLOADED)
        elif manager.auth.enabled:
            token = handshake_token(scope)
            if token is not None:
                conn.authenticate(token)  # a bad one is answered 4401; otherwise hello may still bring one
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
