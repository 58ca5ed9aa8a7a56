"""Getting frames onto sockets without a task per connection.

Fan-out appends to each subscriber's queue and marks it dirty; once per
event-loop iteration the `Flusher` writes every dirty connection's backlog as
one frame. The ASGI `send` is started in place (`start`): on a socket that
takes the data it completes at once, and no task is created. Only a send that
has to wait (the peer's socket is full) becomes a task, which then drains
that connection's queue until it is empty.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

log = logging.getLogger("stablews.outbound")


class Flushable(Protocol):
    dirty: bool

    def flush(self, now: float) -> None: ...


class Flusher:
    """Runs `flush()` of every connection marked since the last loop iteration.

    `report(latency, conn)`, when set (telemetry sets it to the hooks' `on_delivery`),
    hears after each pass how long its oldest mark waited (publication to the end of
    the writes): one sample a pass, not one a message or a connection. Unset, the
    flusher reads no extra clock."""

    __slots__ = ("_clock", "_dirty", "_first_mark", "_loop", "_scheduled", "report")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._dirty: list[Flushable] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.report: Callable[[float, Any], None] | None = None
        self._first_mark = 0.0

    def mark(self, conn: Flushable) -> None:
        conn.dirty = True
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._run)
            if self.report is not None:
                self._first_mark = self._clock()

    def _run(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        now = self._clock()  # one reading for the whole batch
        for conn in dirty:
            conn.dirty = False
            try:
                conn.flush(now)
            except Exception:  # one connection's bug must not stall everyone else's output
                log.exception("flush failed")
        if self.report is not None and dirty:
            self.report(self._clock() - self._first_mark, dirty[0])


def start(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run the first step of `coro` now. Returns None when it completed (its
    result is not needed), else what it is waiting on: hand that and the
    coroutine to `finish`. Exceptions of the first step propagate."""
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return _Pending(_received(pending))


def _received(yielded: Any) -> Any:
    """What a task does on receiving a future from its coroutine: take over the
    blocking flag, so that awaiting the same future again (in `finish`) is allowed."""
    if getattr(yielded, "_asyncio_future_blocking", False):
        yielded._asyncio_future_blocking = False
    return yielded


class _Pending:
    __slots__ = ("awaiting",)

    def __init__(self, awaiting: Any) -> None:
        self.awaiting = awaiting


async def finish(coro: Coroutine[Any, Any, Any], pending: _Pending) -> None:
    """Drive a started coroutine to its end from inside a task, as the task
    itself would have: wait for what it yielded, then resume it."""
    awaiting = pending.awaiting
    while True:
        try:
            if awaiting is None:  # a bare yield (sleep(0)): give the loop one turn
                await asyncio.sleep(0)
            else:
                await awaiting
        except BaseException as exc:
            try:
                awaiting = _received(coro.throw(exc))
            except StopIteration:
                return
            continue
        try:
            awaiting = _received(coro.send(None))
        except StopIteration:
            return


def abort_transport(send: Callable[..., Any]) -> bool:
    """Drop the TCP connection behind an ASGI `send` at once, unsent data and all.

    ASGI has no abort: a close waits until the peer has read what is buffered,
    which a peer that stopped reading never does. Under uvicorn the `send` is a
    method of the protocol object, which holds the transport; elsewhere this
    does nothing (False) and the server's transport closes the socket when it can."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not isinstance(transport, asyncio.BaseTransport) or abort is None:
        return False
    abort()
    return True
