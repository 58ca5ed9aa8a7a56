"""Heartbeat, idle, hello and close deadlines of one connection, on a fake clock.

The real scheduler drives a real Connection; only time is simulated, and the
socket is a list that collects what would be sent.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from stablews.broker import MemoryBroker
from stablews.config import Settings
from stablews.connection import Connection, State
from stablews.protocol import CloseCause
from stablews.stability import StabilityManager


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **options: object) -> None:
        self.clock = FakeClock()
        self.settings = Settings(**{"demo_feed": False, **options})  # type: ignore[arg-type]
        self.manager = StabilityManager(self.settings, clock=self.clock, wall=lambda: 1.7e9 + self.clock.now)
        self.broker = MemoryBroker(100, 60, 100, clock=self.clock)
        self.sent: list[dict] = []
        self.conn = Connection(self.manager, self.broker, self._send, "c1")
        self.manager.register(self.conn)

    async def _send(self, message: dict) -> None:
        if message["type"] == "websocket.send":
            self.sent.extend(json.loads(line) for line in message["text"].split("\n"))
        else:
            self.sent.append({"type": "<close>", "code": message["code"]})

    async def advance(self, seconds: float, step: float = 0.05) -> None:
        """Move time forward in small steps, running what is due and letting writers flush."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + step)
            self.manager.scheduler.run_due()
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    async def hello(self) -> None:
        await self.conn.on_text('{"type":"hello"}')
        await asyncio.sleep(0)

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.sent if m["type"] == kind]

    async def pong_last(self) -> None:
        await self.conn.on_text(json.dumps({"type": "pong", "id": self.of_type("ping")[-1]["id"]}))


async def test_pings_every_interval_after_welcome_and_rtt_is_measured():
    h = Harness(heartbeat_interval=10.0, heartbeat_timeout=3.0)
    await h.hello()
    await h.advance(9.9)
    assert h.of_type("ping") == []
    await h.advance(0.2)
    assert [p["id"] for p in h.of_type("ping")] == [1]
    await h.advance(0.25)
    await h.pong_last()
    assert h.conn.rtt_last == pytest.approx(0.25, abs=0.06)
    assert h.conn.hb_ok == 1 and h.conn.missed_in_a_row == 0
    await h.advance(10)
    assert [p["id"] for p in h.of_type("ping")] == [1, 2]


async def test_missed_heartbeats_close_4000_at_the_bound():
    interval, timeout, missed = 10.0, 3.0, 2
    h = Harness(heartbeat_interval=interval, heartbeat_timeout=timeout, max_missed_heartbeats=missed)
    await h.hello()
    await h.advance(interval * missed + timeout - 0.2)
    assert h.conn.state is State.OPEN and h.conn.missed_in_a_row == 1
    await h.advance(0.3)
    assert h.conn.state is not State.OPEN
    assert h.conn.close_code == 4000 and str(h.conn.close_cause) == "heartbeat_timeout"
    assert h.of_type("<close>") == [{"type": "<close>", "code": 4000}]
    assert h.manager.heartbeats_missed == 2


async def test_a_late_pong_counts_as_missed_but_is_measured():
    h = Harness(heartbeat_interval=10.0, heartbeat_timeout=3.0, max_missed_heartbeats=3)
    await h.hello()
    await h.advance(10.05)
    await h.advance(4)  # past the 3 s deadline: the scheduler counts the miss
    assert h.conn.missed_in_a_row == 1
    await h.pong_last()
    assert h.conn.missed_in_a_row == 1  # still missed
    assert h.conn.rtt_last == pytest.approx(4, abs=0.1)
    await h.advance(6.1)
    await h.pong_last()  # in time: the run of misses ends
    assert h.conn.missed_in_a_row == 0 and h.conn.hb_ok == 1


async def test_a_pong_for_an_old_ping_is_ignored():
    h = Harness(heartbeat_interval=10.0, heartbeat_timeout=3.0)
    await h.hello()
    await h.advance(10.05)
    await h.conn.on_text('{"type":"pong","id":999}')
    assert h.conn.hb_ok == 0 and h.conn.ping_in_flight


async def test_idle_closes_4001_and_any_inbound_frame_resets_it():
    h = Harness(heartbeat_interval=30.0, heartbeat_timeout=10.0, connection_timeout=5.0)
    await h.hello()
    await h.advance(4)
    await h.conn.on_text('{"type":"ping","id":"x"}')  # traffic, not application traffic
    await h.advance(4)
    assert h.conn.state is State.OPEN
    await h.advance(1.2)
    assert h.conn.close_code == 4001


async def test_no_hello_closes_4002():
    h = Harness(hello_timeout=2.0)
    await h.advance(1.9)
    assert h.conn.state is State.OPEN
    await h.advance(0.2)
    assert h.conn.close_code == 4002 and h.of_type("<close>")


async def test_a_close_stuck_past_its_deadline_is_abandoned():
    h = Harness(close_timeout=1.0)
    blocked = asyncio.Event()

    async def never(message: dict) -> None:
        await blocked.wait()  # a peer that never reads

    h.conn.send = never
    await h.hello()
    h.conn.close(CloseCause.SLOW_CONSUMER)
    await h.advance(0.9)
    assert not h.conn.abandoned
    await h.advance(0.2)
    assert h.conn.abandoned


async def test_one_heap_entry_per_connection_over_many_cycles():
    h = Harness(heartbeat_interval=1.0, heartbeat_timeout=0.5)
    await h.hello()
    for _ in range(50):
        await h.advance(0.3, step=0.1)
        if h.of_type("ping") and h.conn.ping_in_flight:
            await h.pong_last()
    assert len(h.manager.scheduler) <= 2
    assert h.conn.hb_sent >= 14 and h.conn.missed_in_a_row == 0
