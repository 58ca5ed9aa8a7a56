"""The event-loop lag monitor: how late its timer fired, on an injected clock."""

from __future__ import annotations

import asyncio
import time

from stablews.telemetry.looplag import LoopLagMonitor


class FakeHandle:
    def cancel(self) -> None:
        pass


class FakeLoop:
    def __init__(self) -> None:
        self.scheduled: list[tuple[float, object]] = []

    def call_later(self, delay: float, callback: object, *args: object) -> FakeHandle:
        self.scheduled.append((delay, callback))
        return FakeHandle()


def test_lag_is_how_late_the_timer_ran() -> None:
    now = [100.0]
    seen: list[float] = []
    monitor = LoopLagMonitor(0.5, seen.append, clock=lambda: now[0])
    loop = FakeLoop()
    monitor._schedule(loop)  # type: ignore[arg-type]
    assert loop.scheduled[-1][0] == 0.5
    now[0] = 100.5 + 0.3  # the loop was busy: the timer ran 300 ms late
    monitor._tick(loop)  # type: ignore[arg-type]
    now[0] = 100.8 + 0.5  # on time
    monitor._tick(loop)  # type: ignore[arg-type]
    assert [round(x, 6) for x in seen] == [0.3, 0.0]
    assert (round(monitor.last, 6), round(monitor.max, 6), monitor.samples) == (0.0, 0.3, 2)
    assert len(loop.scheduled) == 3  # each tick schedules the next: one timer at a time


async def test_a_blocked_loop_shows_as_lag() -> None:
    seen: list[float] = []
    monitor = LoopLagMonitor(0.05, seen.append)
    monitor.start()
    try:
        time.sleep(0.3)  # the subject: a callback that blocks the loop for 300 ms
        async with asyncio.timeout(5):
            while not seen:
                await asyncio.sleep(0.01)
        assert seen[0] >= 0.2
    finally:
        monitor.stop()


def test_interval_zero_is_off() -> None:
    monitor = LoopLagMonitor(0.0, lambda lag: None)
    monitor.start()  # no running loop needed: nothing is scheduled
    assert monitor.samples == 0
