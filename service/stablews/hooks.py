"""Lifecycle hooks: how telemetry (or a test recorder) plugs into the core.

The core calls these at each step of a connection's life. Subclass
`LifecycleHooks` and override what you need; the defaults do nothing, so the
core never imports a telemetry library.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import SubscribeResult
    from .connection import Connection


class LifecycleHooks:
    def on_open(self, conn: Connection) -> None:
        """Accepted (before hello)."""

    def on_hello(self, conn: Connection) -> None:
        """`welcome` sent."""

    def on_subscribe(self, conn: Connection, channel: str, result: SubscribeResult) -> None:
        """Subscribed, with the recovery outcome."""

    def on_resume(self, conn: Connection, asked: int, recovered: int, replayed: int) -> None:
        """A `hello` with `resume` has been served."""

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        """A heartbeat ended: outcome ok, late or missed; rtt in seconds when a pong came."""

    def on_error(self, conn: Connection, code: str) -> None:
        """An `error` message was sent."""

    def on_close(self, conn: Connection) -> None:
        """The connection is gone; its figures are final."""

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        """A stability event was emitted."""

    def on_shutdown(self, connections: int, drain_seconds: float) -> None:
        """The drain has ended."""


log = logging.getLogger("stablews.hooks")


class HookSet(LifecycleHooks):
    """Calls every registered hook object in order. A hook that raises is
    logged and skipped: telemetry must never break a connection."""

    def __init__(self) -> None:
        self._hooks: list[LifecycleHooks] = []

    def add(self, hooks: LifecycleHooks) -> None:
        self._hooks.append(hooks)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def on_open(self, conn: Connection) -> None:
        for h in self._hooks:
            try:
                h.on_open(conn)
            except Exception:
                log.exception("hook failed")

    def on_hello(self, conn: Connection) -> None:
        for h in self._hooks:
            try:
                h.on_hello(conn)
            except Exception:
                log.exception("hook failed")

    def on_subscribe(self, conn: Connection, channel: str, result: SubscribeResult) -> None:
        for h in self._hooks:
            try:
                h.on_subscribe(conn, channel, result)
            except Exception:
                log.exception("hook failed")

    def on_resume(self, conn: Connection, asked: int, recovered: int, replayed: int) -> None:
        for h in self._hooks:
            try:
                h.on_resume(conn, asked, recovered, replayed)
            except Exception:
                log.exception("hook failed")

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        for h in self._hooks:
            try:
                h.on_heartbeat(conn, outcome, rtt)
            except Exception:
                log.exception("hook failed")

    def on_error(self, conn: Connection, code: str) -> None:
        for h in self._hooks:
            try:
                h.on_error(conn, code)
            except Exception:
                log.exception("hook failed")

    def on_close(self, conn: Connection) -> None:
        for h in self._hooks:
            try:
                h.on_close(conn)
            except Exception:
                log.exception("hook failed")

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        for h in self._hooks:
            try:
                h.on_event(event, payload)
            except Exception:
                log.exception("hook failed")

    def on_shutdown(self, connections: int, drain_seconds: float) -> None:
        for h in self._hooks:
            try:
                h.on_shutdown(connections, drain_seconds)
            except Exception:
                log.exception("hook failed")
