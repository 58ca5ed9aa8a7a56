"""Lifecycle hooks: how telemetry (or a test recorder) plugs into the core.

The core calls these at each step of a connection's life. Subclass
`LifecycleHooks` and override what you need; the defaults do nothing, so the
core never imports a telemetry library. A hook may keep per-connection state
in `conn.telemetry` (a dict, created on first use by whoever needs it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import SubscribeResult
    from .connection import Connection
    from .protocol import Position


class LifecycleHooks:
    def on_open(self, conn: Connection) -> None:
        """Accepted (before hello). A hook may set `conn.trace_id` and `conn.span_id` here:
        they go into `welcome`, the logs and the drop records."""

    def on_hello(self, conn: Connection) -> None:
        """`welcome` sent (`conn.auth_result` says how the token went)."""

    def on_subscribe(self, conn: Connection, channel: str, since: Position | None, result: SubscribeResult) -> None:
        """Subscribed (`since` is the position asked for, if any), with the recovery outcome."""

    def on_resume(self, conn: Connection, asked: int, recovered: int, replayed: int) -> None:
        """A `hello` with `resume` has been served (`conn.previous_trace_id` is the dropped connection's)."""

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        """A heartbeat ended: outcome ok, late or missed; rtt in seconds when a pong came."""

    def on_error(self, conn: Connection, code: str) -> None:
        """An `error` message was sent."""

    def on_closing(self, conn: Connection) -> None:
        """A server-initiated close started (`close_cause` and `close_code` are set), or a send failed."""

    def on_close(self, conn: Connection) -> None:
        """The connection is gone; its figures are final."""

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        """A stability event was emitted."""

    def on_sweep(self, live: Iterable[Connection], now: float) -> None:
        """The health sweep has scored every live connection (`health_score`, `health_state`)."""

    def on_delivery(self, latency: float, conn: Connection) -> None:
        """A flush pass wrote queued messages: `latency` from the oldest publication in the
        pass to the end of the writes; `conn` is one of the connections written."""

    def on_shutdown(self, summary: dict[str, Any]) -> None:
        """The drain has ended: connections_closed, connections_abandoned, messages_flushed,
        drain_seconds."""


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

    def _each(self, name: str, *args: Any) -> None:
        for h in self._hooks:
            try:
                getattr(h, name)(*args)
            except Exception:
                log.exception("hook %s of %s failed", name, type(h).__name__)

    def on_open(self, conn: Connection) -> None:
        self._each("on_open", conn)

    def on_hello(self, conn: Connection) -> None:
        self._each("on_hello", conn)

    def on_subscribe(self, conn: Connection, channel: str, since: Position | None, result: SubscribeResult) -> None:
        self._each("on_subscribe", conn, channel, since, result)

    def on_resume(self, conn: Connection, asked: int, recovered: int, replayed: int) -> None:
        self._each("on_resume", conn, asked, recovered, replayed)

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        self._each("on_heartbeat", conn, outcome, rtt)

    def on_error(self, conn: Connection, code: str) -> None:
        self._each("on_error", conn, code)

    def on_closing(self, conn: Connection) -> None:
        self._each("on_closing", conn)

    def on_close(self, conn: Connection) -> None:
        self._each("on_close", conn)

    def on_event(self, event: str, payload: dict[str, Any]) -> None:
        self._each("on_event", event, payload)

    def on_sweep(self, live: Iterable[Connection], now: float) -> None:
        self._each("on_sweep", live, now)

    def on_delivery(self, latency: float, conn: Connection) -> None:
        self._each("on_delivery", latency, conn)

    def on_shutdown(self, summary: dict[str, Any]) -> None:
        self._each("on_shutdown", summary)
