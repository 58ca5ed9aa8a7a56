"""Starting a send in place and finishing it in a task, as asyncio's own task would."""

from __future__ import annotations

import asyncio

import pytest

from stablews import outbound


async def test_a_send_that_does_not_wait_completes_in_place():
    done = []

    async def send() -> None:
        done.append(True)

    assert outbound.start(send()) is None
    assert done == [True]


async def test_a_send_that_waits_is_finished_by_a_task_with_its_result_order_kept():
    gate = asyncio.Event()
    steps: list[str] = []

    async def send() -> None:
        steps.append("start")
        await gate.wait()
        steps.append("after gate")
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # another future
        steps.append("end")

    coro = send()
    pending = outbound.start(coro)
    assert pending is not None and steps == ["start"]
    task = asyncio.create_task(outbound.finish(coro, pending))
    await asyncio.sleep(0.01)
    assert steps == ["start"]
    gate.set()
    await asyncio.wait_for(task, 5)
    assert steps == ["start", "after gate", "end"]


async def test_cancelling_the_task_cancels_the_send_inside():
    gate = asyncio.Event()
    seen: list[str] = []

    async def send() -> None:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    coro = send()
    task = asyncio.create_task(outbound.finish(coro, outbound.start(coro)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled inside"]
    assert not gate._waiters  # the Event forgot the waiter, as after a normal cancel


async def test_an_exception_after_waiting_reaches_the_task():
    async def send() -> None:
        await asyncio.sleep(0.001)
        raise ConnectionResetError("peer gone")

    coro = send()
    with pytest.raises(ConnectionResetError):
        await outbound.finish(coro, outbound.start(coro))


async def test_the_flusher_runs_each_marked_connection_once_per_iteration():
    flushed: list[str] = []

    class Conn:
        def __init__(self, name: str) -> None:
            self.name = name
            self.dirty = False

        def flush(self, now: float) -> None:
            flushed.append(self.name)

    flusher = outbound.Flusher(lambda: 0.0)
    a, b = Conn("a"), Conn("b")
    for conn in (a, b, a):
        if not conn.dirty:
            flusher.mark(conn)
    assert flushed == [] and a.dirty and b.dirty
    await asyncio.sleep(0)
    assert flushed == ["a", "b"] and not a.dirty and not b.dirty
