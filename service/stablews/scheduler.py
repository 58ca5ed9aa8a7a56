"""One deadline scheduler for every connection: a heap and a single timer.

Each item has at most one live heap entry (its earliest deadline). When the
entry comes due the scheduler calls `on_due(item, now)`, which does whatever
is due and returns the item's next deadline (or None when it needs no more
checks). Deadlines that move later (activity pushing an idle timeout back)
never touch the heap: the entry fires, finds nothing due yet and is pushed
again. No task or timer exists per connection.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("stablews.scheduler")

RETRY_AFTER_FAILURE = 1.0  # seconds before an item whose check raised is checked again


class Schedulable(Protocol):
    sched_due: float  # due time of the item's live heap entry, inf when none


class DeadlineScheduler:
    def __init__(
        self,
        on_due: Callable[[Any, float], float | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_due = on_due
        self.clock = clock
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")
        self._running = False

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, item: Schedulable, due: float) -> None:
        """Make sure `item` is checked no later than `due`."""
        if due >= item.sched_due:
            return  # its live entry fires earlier and will reschedule
        item.sched_due = due
        heapq.heappush(self._heap, (due, next(self._seq), item))
        if due < self._armed_for and not self._running:
            self._arm()

    def cancel(self, item: Schedulable) -> None:
        item.sched_due = float("inf")  # its entry becomes stale and is dropped when popped

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float | None = None) -> int:
        """Process every entry due at `now`; return how many items were checked."""
        if now is None:
            now = self.clock()
        heap = self._heap
        checked = 0
        while heap and heap[0][0] <= now:
            due, _, item = heapq.heappop(heap)
            if due != item.sched_due:
                continue  # stale: superseded or cancelled
            item.sched_due = float("inf")
            checked += 1
            try:
                next_due = self._on_due(item, now)
            except Exception:  # one bad item must not stop the others' deadlines, nor lose its own
                log.exception("deadline check failed")
                next_due = now + RETRY_AFTER_FAILURE
            if next_due is not None:
                # Never spin on an item that claims to be due again.
                self.schedule(item, max(next_due, now + 1e-3))
        return checked

    # ------------------------------------------------------- event loop glue

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._loop = None
        self._armed_for = float("inf")

    def _arm(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._heap[0][0] if self._heap else float("inf")
        self._armed_for = due
        if due != float("inf"):
            self._timer = self._loop.call_later(max(0.0, due - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_for = float("inf")
        self._running = True
        try:
            self.run_due()
        finally:
            self._running = False
        self._arm()
