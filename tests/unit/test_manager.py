"""The stability manager's registry: bounded closed records, counters, event subscription."""

from __future__ import annotations

import pytest

from stablews.config import Settings
from stablews.connection import Connection
from stablews.stability import StabilityManager


class Clocks:
    def __init__(self) -> None:
        self.mono = 50.0
        self.wall = 1.7e9


async def _nowhere(message: dict) -> None:
    return None


def manager_with(clocks: Clocks, **options: object) -> StabilityManager:
    settings = Settings(**{"demo_feed": False, **options})  # type: ignore[arg-type]
    return StabilityManager(settings, clock=lambda: clocks.mono, wall=lambda: clocks.wall)


def open_and_close(manager: StabilityManager, conn_id: str, code: int = 1000) -> Connection:
    conn = Connection(manager, None, _nowhere, conn_id, client=("127.0.0.1", 5000))
    manager.register(conn)
    conn.finish(code)
    return conn


def test_closed_records_are_bounded_by_count():
    clocks = Clocks()
    manager = manager_with(clocks, closed_records_max=3)
    for i in range(10):
        open_and_close(manager, f"c{i}")
    assert [c.id for c in manager.closed] == ["c7", "c8", "c9"]
    assert manager.get("c9") is not None and manager.get("c1") is None
    assert manager.opened_total == 10 and manager.closed_by_cause == {"normal": 10}
    assert not manager.live


def test_closed_records_older_than_the_stale_threshold_are_dropped_by_the_sweep():
    clocks = Clocks()
    manager = manager_with(clocks, stale_connection_threshold=60.0)
    open_and_close(manager, "old", code=1006)
    clocks.wall += 30
    open_and_close(manager, "recent")
    clocks.wall += 40  # "old" is now 70 s old, "recent" 40 s
    manager.sweep()
    assert [c.id for c in manager.closed] == ["recent"]
    assert manager.closed_by_cause == {"client_gone": 1, "normal": 1}  # totals survive pruning


def test_unknown_events_are_refused_and_unsubscribe_works():
    manager = manager_with(Clocks())
    with pytest.raises(ValueError, match="unknown event"):
        manager.on("connection_exploded", lambda payload: None)
    seen: list[dict] = []
    off = manager.on("stability_alert", seen.append)
    manager.emit("stability_alert", {"status": "degraded"})
    off()
    manager.emit("stability_alert", {"status": "healthy"})
    assert [p["status"] for p in seen] == ["degraded"]
    assert seen[0]["event"] == "stability_alert"


def test_a_failing_listener_does_not_stop_the_others():
    manager = manager_with(Clocks())
    seen: list[str] = []

    def broken(payload: dict) -> None:
        raise RuntimeError("listener bug")

    manager.on("stale_connection", broken)
    manager.on("stale_connection", lambda payload: seen.append(payload["connection"]))
    manager.emit("stale_connection", {"connection": "c1"})
    assert seen == ["c1"]
