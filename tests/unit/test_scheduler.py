"""DeadlineScheduler with a fake clock: order, rescheduling, cancel, failures, bounds."""

from __future__ import annotations

import logging
import math
import random

from stablews.scheduler import RETRY_AFTER_FAILURE, DeadlineScheduler


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sched_due = math.inf

    def __repr__(self) -> str:
        return f"Item({self.name})"


class Recorder:
    """on_due that records (item, now) and returns whatever `next_due` says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.next_due: dict[str, float | None] = {}

    def __call__(self, item: Item, now: float) -> float | None:
        self.calls.append((item.name, now))
        return self.next_due.get(item.name)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make() -> tuple[DeadlineScheduler, Recorder, FakeClock]:
    recorder = Recorder()
    clock = FakeClock(1000.0)
    return DeadlineScheduler(recorder, clock=clock), recorder, clock


def test_items_are_checked_in_deadline_order():
    sched, rec, _ = make()
    items = {name: Item(name) for name in "abcde"}
    dues = {"a": 1005.0, "b": 1001.0, "c": 1003.0, "d": 1002.0, "e": 1004.0}
    for name, due in dues.items():
        sched.schedule(items[name], due)
    assert sched.next_due() == 1001.0
    assert sched.run_due(2000.0) == 5
    assert rec.names() == ["b", "d", "c", "e", "a"]


def test_nothing_is_checked_before_its_deadline():
    sched, rec, _ = make()
    a, b = Item("a"), Item("b")
    sched.schedule(a, 1010.0)
    sched.schedule(b, 1020.0)
    assert sched.run_due(1009.999) == 0
    assert rec.calls == []
    assert sched.run_due(1010.0) == 1
    assert rec.calls == [("a", 1010.0)]
    assert sched.run_due(1019.0) == 0
    assert sched.run_due(1020.5) == 1
    assert rec.calls == [("a", 1010.0), ("b", 1020.5)]


def test_run_due_uses_the_injected_clock():
    sched, rec, clock = make()
    a = Item("a")
    sched.schedule(a, 1010.0)
    clock.now = 1009.0
    assert sched.run_due() == 0
    clock.now = 1011.0
    assert sched.run_due() == 1
    assert rec.calls == [("a", 1011.0)]


def test_item_rescheduled_later_is_not_checked_early():
    sched, rec, _ = make()
    a = Item("a")
    rec.next_due["a"] = 1030.0
    sched.schedule(a, 1010.0)
    sched.run_due(1010.0)
    assert rec.calls == [("a", 1010.0)]
    assert sched.next_due() == 1030.0
    for t in (1015.0, 1020.0, 1029.99):
        assert sched.run_due(t) == 0
    assert rec.calls == [("a", 1010.0)]
    rec.next_due["a"] = None
    assert sched.run_due(1030.0) == 1
    assert rec.calls == [("a", 1010.0), ("a", 1030.0)]


def test_later_schedule_does_not_postpone_an_earlier_deadline():
    sched, rec, _ = make()
    a = Item("a")
    sched.schedule(a, 1010.0)
    sched.schedule(a, 1050.0)  # e.g. activity pushing an idle timeout back
    assert sched.run_due(1010.0) == 1
    assert rec.calls == [("a", 1010.0)]


def test_schedule_with_an_earlier_deadline_wins():
    sched, rec, _ = make()
    a = Item("a")
    sched.schedule(a, 1050.0)
    sched.schedule(a, 1010.0)
    assert sched.next_due() == 1010.0
    assert sched.run_due(1010.0) == 1
    assert rec.calls == [("a", 1010.0)]
    # the superseded entry at 1050 does not check the item again
    assert sched.run_due(1100.0) == 0
    assert rec.calls == [("a", 1010.0)]
    assert len(sched) == 0


def test_cancel_drops_the_item():
    sched, rec, _ = make()
    a, b = Item("a"), Item("b")
    sched.schedule(a, 1010.0)
    sched.schedule(b, 1020.0)
    sched.cancel(a)
    assert sched.run_due(2000.0) == 1
    assert rec.names() == ["b"]
    assert len(sched) == 0


def test_cancel_then_schedule_again():
    sched, rec, _ = make()
    a = Item("a")
    sched.schedule(a, 1010.0)
    sched.cancel(a)
    sched.schedule(a, 1030.0)
    assert sched.run_due(1020.0) == 0
    assert rec.calls == []
    assert sched.run_due(1030.0) == 1
    assert rec.calls == [("a", 1030.0)]


def test_on_due_that_raises_does_not_stop_other_items(caplog):
    calls: list[str] = []

    def on_due(item: Item, now: float) -> float | None:
        calls.append(item.name)
        if item.name == "bad":
            raise RuntimeError("boom")
        return now + 10.0

    sched = DeadlineScheduler(on_due, clock=FakeClock(0.0))
    good1, bad, good2 = Item("good1"), Item("bad"), Item("good2")
    sched.schedule(good1, 1.0)
    sched.schedule(bad, 2.0)
    sched.schedule(good2, 3.0)
    with caplog.at_level(logging.ERROR, logger="stablews.scheduler"):
        assert sched.run_due(5.0) == 3
    assert calls == ["good1", "bad", "good2"]
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    # the others keep their next deadlines; the failing item is retried, not lost
    calls.clear()
    assert sched.run_due(5.0 + RETRY_AFTER_FAILURE) == 1
    assert calls == ["bad"]
    calls.clear()
    assert sched.run_due(15.0) == 3  # the bad one again (it keeps failing), and both good ones
    assert sorted(calls) == ["bad", "good1", "good2"]


def test_returning_none_removes_the_item():
    sched, rec, _ = make()
    a = Item("a")
    sched.schedule(a, 1010.0)
    assert sched.run_due(1010.0) == 1
    assert len(sched) == 0
    assert sched.next_due() is None
    assert a.sched_due == math.inf
    assert sched.run_due(10**9) == 0
    assert rec.calls == [("a", 1010.0)]


def test_item_claiming_to_be_due_again_is_not_spun_on():
    def on_due(item: Item, now: float) -> float:
        calls.append(now)
        return now - 5.0  # already due

    calls: list[float] = []
    sched = DeadlineScheduler(on_due, clock=FakeClock(0.0))
    a = Item("a")
    sched.schedule(a, 1.0)
    assert sched.run_due(1.0) == 1
    assert calls == [1.0]
    assert sched.next_due() is not None and sched.next_due() > 1.0


def test_heap_stays_bounded_over_many_cycles():
    rng = random.Random(1234)
    interval = 10.0
    on_due_calls: dict[str, int] = {}

    def on_due(item: Item, now: float) -> float:
        on_due_calls[item.name] = on_due_calls.get(item.name, 0) + 1
        return now + interval

    clock = FakeClock(0.0)
    sched = DeadlineScheduler(on_due, clock=clock)
    items = [Item(str(i)) for i in range(50)]
    for item in items:
        sched.schedule(item, rng.uniform(0, interval))
    max_len = 0
    for step in range(2000):
        clock.now = step * 0.5
        for item in rng.sample(items, 10):
            # activity: later deadlines (ignored) and some earlier ones (pushed)
            if rng.random() < 0.5:
                sched.schedule(item, clock.now + interval * 3)
            else:
                sched.schedule(item, clock.now + rng.uniform(0.1, interval))
        sched.run_due()
        max_len = max(max_len, len(sched))
        live = [due for due, _, item in sched._heap if due == item.sched_due]
        assert len(live) <= len(items)
    # each item has one live entry; superseded entries are bounded by the
    # number of earlier reschedules within one interval, not by run time
    assert max_len <= len(items) * 4
    assert all(count > 50 for count in on_due_calls.values())


def test_one_live_entry_per_item_after_many_cycles():
    calls: list[tuple[str, float]] = []

    def on_due(item: Item, now: float) -> float:
        calls.append((item.name, now))
        return now + 5.0

    sched = DeadlineScheduler(on_due, clock=FakeClock(0.0))
    items = [Item(str(i)) for i in range(20)]
    for i, item in enumerate(items):
        sched.schedule(item, 1000.0 + i)
    for t in range(1000, 3000):
        sched.run_due(float(t))
        assert len(sched) == len(items)
    counts = {item.name: 0 for item in items}
    for name, _ in calls:
        counts[name] += 1
    # every item is checked once per period, never twice at the same time
    assert len(set(calls)) == len(calls)
    assert min(counts.values()) >= 390


def test_earlier_check_returning_the_existing_deadline_checks_once():
    # a fixed next deadline (e.g. the next ping) with an earlier check in
    # between (e.g. a pong deadline) that returns the same next deadline
    calls: list[float] = []

    def on_due(item: Item, now: float) -> float | None:
        calls.append(now)
        return 30.0 if now < 30.0 else None

    sched = DeadlineScheduler(on_due, clock=FakeClock(0.0))
    a = Item("a")
    sched.schedule(a, 30.0)
    sched.schedule(a, 5.0)
    assert sched.run_due(5.0) == 1
    assert sched.run_due(30.0) == 1
    assert calls == [5.0, 30.0]
    assert sched.run_due(100.0) == 0
    assert len(sched) == 0
