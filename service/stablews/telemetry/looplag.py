"""Event-loop lag: how late a timer fires. One timer for the whole process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLagMonitor:
    """Every `interval` seconds, measures how much later than asked a `call_later` callback
    ran: the time a ready callback waits for the loop (a blocking call, a long fan-out
    pass, a CPU-starved process). `report(lag)` gets each sample."""

    def __init__(
        self, interval: float, report: Callable[[float], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._report = report
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.last = 0.0
        self.max = 0.0
        self.samples = 0

    def start(self) -> None:
        if self.interval > 0 and self._handle is None:
            self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = self._clock() + self.interval
        self._handle = loop.call_later(self.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        lag = max(0.0, self._clock() - self._due)
        self.last = lag
        self.max = max(self.max, lag)
        self.samples += 1
        self._report(lag)
        self._schedule(loop)
