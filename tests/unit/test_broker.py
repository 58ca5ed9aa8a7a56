"""MemoryBroker with injected clocks: offsets, epochs, fan-out, recovery, sweep."""

from __future__ import annotations

import json

import pytest

from stablews.broker import MemoryBroker
from stablews.protocol import Position


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Collector:
    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def offsets(self) -> list[int]:
        return [json.loads(f)["offset"] for f in self.frames]


def make_broker(history_size=100, history_ttl=60.0, max_recovery_messages=50, clock=None, wall=None) -> MemoryBroker:
    return MemoryBroker(
        history_size=history_size,
        history_ttl=history_ttl,
        max_recovery_messages=max_recovery_messages,
        clock=clock or FakeClock(),
        wall_clock=wall or (lambda: 1_700_000_000.0),
    )


def publish_many(broker: MemoryBroker, channel: str, n: int) -> list:
    return [broker.publish_now(channel, {"n": i}) for i in range(1, n + 1)]


# ------------------------------------------------------------ offsets, epochs


def test_offsets_are_consecutive_from_1_per_channel():
    broker = make_broker()
    a = [broker.publish_now("a", i).offset for i in range(5)]
    b = [broker.publish_now("b", i).offset for i in range(3)]
    a += [broker.publish_now("a", "more").offset]
    assert a == [1, 2, 3, 4, 5, 6]
    assert b == [1, 2, 3]


def test_publish_result():
    broker = make_broker(wall=lambda: 1_700_000_000.123)
    result = broker.publish_now("c", {"x": 1})
    assert result.channel == "c"
    assert result.offset == 1
    assert result.ts_ms == 1_700_000_000_123
    assert isinstance(result.epoch, str) and result.epoch


async def test_async_publish_matches_publish_now():
    broker = make_broker()
    first = await broker.publish("c", 1)
    second = broker.publish_now("c", 2)
    assert (first.offset, second.offset) == (1, 2)
    assert first.epoch == second.epoch


def test_epoch_is_stable_within_a_channel():
    broker = make_broker()
    epochs = {broker.publish_now("c", i).epoch for i in range(10)}
    assert len(epochs) == 1


def test_epochs_differ_per_channel():
    broker = make_broker()
    epochs = {broker.publish_now(f"ch{i}", 0).epoch for i in range(20)}
    assert len(epochs) == 20


def test_new_broker_has_new_epochs():
    first = make_broker().publish_now("c", 1)
    second = make_broker().publish_now("c", 1)
    assert first.offset == second.offset == 1
    assert first.epoch != second.epoch


def test_nan_data_is_rejected_without_taking_an_offset():
    broker = make_broker()
    with pytest.raises(ValueError):
        broker.publish_now("c", float("nan"))
    assert broker.publish_now("c", 1).offset == 1


# ------------------------------------------------------------ fan-out


async def test_subscriber_receives_exact_frames_in_order():
    broker = make_broker(wall=lambda: 1_700_000_000.5)
    sub = Collector()
    result = await broker.subscribe("demo.ticker", sub, None)
    assert result.recovered is None
    assert result.replay == []
    assert result.offset == 0
    published = [broker.publish_now("demo.ticker", {"price": p}) for p in (1.5, 2, "x")]
    assert [json.loads(f) for f in sub.frames] == [
        {
            "type": "message",
            "channel": "demo.ticker",
            "epoch": result.epoch,
            "offset": i,
            "data": data,
            "ts": 1_700_000_000_500,
        }
        for i, data in enumerate([{"price": 1.5}, {"price": 2}, {"price": "x"}], start=1)
    ]
    assert [p.epoch for p in published] == [result.epoch] * 3


async def test_subscriber_only_gets_its_channels():
    broker = make_broker()
    a, b = Collector(), Collector()
    await broker.subscribe("a", a, None)
    await broker.subscribe("b", b, None)
    broker.publish_now("a", 1)
    broker.publish_now("b", 2)
    broker.publish_now("c", 3)
    assert [json.loads(f)["data"] for f in a.frames] == [1]
    assert [json.loads(f)["data"] for f in b.frames] == [2]


async def test_publication_frame_is_encoded_once_for_all_subscribers():
    broker = make_broker()
    subs = [Collector() for _ in range(5)]
    for sub in subs:
        await broker.subscribe("c", sub, None)
    broker.publish_now("c", {"big": list(range(100))})
    first = subs[0].frames[0]
    assert all(len(sub.frames) == 1 and sub.frames[0] is first for sub in subs)
    # the replayed frame is the very same object too
    late = Collector()
    result = await broker.subscribe("c", late, Position(broker.streams["c"].epoch, 0))
    assert result.replay[0] is first


async def test_unsubscribe_stops_delivery():
    broker = make_broker()
    sub = Collector()
    await broker.subscribe("c", sub, None)
    broker.publish_now("c", 1)
    broker.unsubscribe("c", sub)
    broker.publish_now("c", 2)
    assert sub.offsets() == [1]
    broker.unsubscribe("never-existed", sub)  # no error


async def test_subscribe_reports_top_of_stream():
    broker = make_broker()
    publish_many(broker, "c", 4)
    result = await broker.subscribe("c", Collector(), None)
    assert result.offset == 4
    assert result.recovered is None


# ------------------------------------------------------------ recovery


async def test_recovery_replays_exactly_the_missed_frames_in_order():
    broker = make_broker()
    first = Collector()
    sub_result = await broker.subscribe("c", first, None)
    publish_many(broker, "c", 10)
    epoch = sub_result.epoch
    # a client that processed up to offset 6 comes back
    again = Collector()
    result = await broker.subscribe("c", again, Position(epoch, 6))
    assert result.recovered is True
    assert result.epoch == epoch
    assert result.offset == 10
    assert result.replay == first.frames[6:]
    assert [json.loads(f)["offset"] for f in result.replay] == [7, 8, 9, 10]
    # live messages continue after the replay
    broker.publish_now("c", "live")
    assert again.offsets() == [11]


async def test_recovery_from_offset_zero_replays_everything():
    broker = make_broker()
    results = publish_many(broker, "c", 3)
    result = await broker.subscribe("c", Collector(), Position(results[0].epoch, 0))
    assert result.recovered is True
    assert [json.loads(f)["offset"] for f in result.replay] == [1, 2, 3]


async def test_recovery_at_top_is_recovered_with_nothing_replayed():
    broker = make_broker()
    results = publish_many(broker, "c", 5)
    result = await broker.subscribe("c", Collector(), Position(results[-1].epoch, 5))
    assert result.recovered is True
    assert result.replay == []
    assert result.offset == 5


async def test_recovery_at_top_of_empty_stream():
    broker = make_broker()
    first = await broker.subscribe("c", Collector(), None)
    result = await broker.subscribe("c", Collector(), Position(first.epoch, 0))
    assert result.recovered is True
    assert result.replay == []


async def test_wrong_epoch_is_not_recovered():
    broker = make_broker()
    publish_many(broker, "c", 5)
    result = await broker.subscribe("c", Collector(), Position("other-epoch", 3))
    assert result.recovered is False
    assert result.replay == []
    assert result.offset == 5


async def test_position_from_previous_broker_is_not_recovered():
    old = make_broker()
    old_epoch = publish_many(old, "c", 5)[-1].epoch
    new = make_broker()
    publish_many(new, "c", 5)
    result = await new.subscribe("c", Collector(), Position(old_epoch, 3))
    assert result.recovered is False
    assert result.replay == []


async def test_offset_beyond_top_is_not_recovered():
    broker = make_broker()
    epoch = publish_many(broker, "c", 5)[-1].epoch
    result = await broker.subscribe("c", Collector(), Position(epoch, 6))
    assert result.recovered is False
    assert result.replay == []


async def test_gap_older_than_history_size_is_not_recovered():
    broker = make_broker(history_size=5, max_recovery_messages=100)
    epoch = publish_many(broker, "c", 10)[-1].epoch
    # history holds 6..10: from 5 everything is there, from 4 offset 5 is gone
    ok = await broker.subscribe("c", Collector(), Position(epoch, 5))
    assert ok.recovered is True
    assert [json.loads(f)["offset"] for f in ok.replay] == [6, 7, 8, 9, 10]
    gone = await broker.subscribe("c", Collector(), Position(epoch, 4))
    assert gone.recovered is False
    assert gone.replay == []


async def test_more_than_max_recovery_messages_is_not_recovered():
    broker = make_broker(history_size=100, max_recovery_messages=3)
    epoch = publish_many(broker, "c", 10)[-1].epoch
    ok = await broker.subscribe("c", Collector(), Position(epoch, 7))
    assert ok.recovered is True
    assert len(ok.replay) == 3
    too_many = await broker.subscribe("c", Collector(), Position(epoch, 6))
    assert too_many.recovered is False
    assert too_many.replay == []


async def test_zero_history_size_never_recovers_a_gap():
    broker = make_broker(history_size=0)
    epoch = publish_many(broker, "c", 3)[-1].epoch
    result = await broker.subscribe("c", Collector(), Position(epoch, 2))
    assert result.recovered is False
    assert result.replay == []
    at_top = await broker.subscribe("c", Collector(), Position(epoch, 3))
    assert at_top.recovered is True


async def test_expired_history_is_not_recovered():
    clock = FakeClock(100.0)
    broker = make_broker(history_ttl=60.0, clock=clock)
    epoch = publish_many(broker, "c", 3)[-1].epoch  # at t=100
    clock.now = 130.0
    broker.publish_now("c", "later")  # offset 4 at t=130
    clock.now = 160.0  # offsets 1-3 are exactly ttl old: still kept
    ok = await broker.subscribe("c", Collector(), Position(epoch, 0))
    assert ok.recovered is True
    assert len(ok.replay) == 4
    clock.now = 175.0  # offsets 1-3 expired, offset 4 still there
    gone = await broker.subscribe("c", Collector(), Position(epoch, 2))
    assert gone.recovered is False
    assert gone.replay == []
    partial_ok = await broker.subscribe("c", Collector(), Position(epoch, 3))
    assert partial_ok.recovered is True
    assert [json.loads(f)["offset"] for f in partial_ok.replay] == [4]


async def test_recovery_is_never_partial():
    clock = FakeClock(0.0)
    broker = make_broker(history_size=4, history_ttl=10.0, max_recovery_messages=100, clock=clock)
    epoch = ""
    for t in range(20):
        clock.now = float(t)
        epoch = broker.publish_now("c", t).epoch
    for since in range(0, 21):
        sub = Collector()
        result = await broker.subscribe("c", sub, Position(epoch, since))
        offsets = [json.loads(f)["offset"] for f in result.replay]
        if result.recovered:
            assert offsets == list(range(since + 1, 21))
        else:
            assert offsets == []
        assert sub.frames == []


# ------------------------------------------------------------ sweep


async def test_sweep_forgets_streams_with_no_history_and_no_subscribers():
    clock = FakeClock(100.0)
    broker = make_broker(history_ttl=60.0, clock=clock)
    old_epoch = publish_many(broker, "idle", 3)[-1].epoch
    sub = Collector()
    listened = await broker.subscribe("listened", sub, None)
    publish_many(broker, "listened", 2)
    broker.sweep()
    assert set(broker.streams) == {"idle", "listened"}  # history still fresh
    clock.now = 200.0
    broker.sweep()
    assert set(broker.streams) == {"listened"}  # has a subscriber
    assert len(broker.streams["listened"].history) == 0  # expired, but a subscriber keeps the stream
    # a later subscriber of the forgotten channel sees a new epoch, from offset 0
    late = await broker.subscribe("idle", Collector(), Position(old_epoch, 3))
    assert late.recovered is False
    assert late.epoch != old_epoch
    assert late.offset == 0
    assert broker.publish_now("idle", "again").offset == 1
    # the listened channel keeps its epoch
    assert broker.publish_now("listened", "x").epoch == listened.epoch


async def test_sweep_keeps_stream_with_history_but_no_subscribers():
    broker = make_broker()
    epoch = publish_many(broker, "c", 2)[-1].epoch
    broker.sweep()
    result = await broker.subscribe("c", Collector(), Position(epoch, 1))
    assert result.recovered is True
    assert len(result.replay) == 1


async def test_sweep_after_unsubscribe():
    broker = make_broker(history_size=0)
    sub = Collector()
    await broker.subscribe("c", sub, None)
    broker.sweep()
    assert "c" in broker.streams
    broker.unsubscribe("c", sub)
    broker.sweep()
    assert "c" not in broker.streams


async def test_stats():
    broker = make_broker()
    await broker.subscribe("a", Collector(), None)
    await broker.subscribe("a", Collector(), None)
    publish_many(broker, "a", 3)
    publish_many(broker, "b", 2)
    stats = broker.stats()
    assert stats["channels"] == 2
    assert stats["subscriptions"] == 2
    assert stats["history_messages"] == 5
    assert stats["published_total"] == 5


async def test_publication_frames_are_valid_utf8():
    # "\udc00" is what json.loads makes of the JSON escape \udc00 (valid JSON
    # syntax) in a client publish or POST /api/v1/publish. The frame every
    # subscriber receives must be sendable as a UTF-8 text frame, or the data
    # must be refused with ValueError like NaN is.
    broker = make_broker()
    sub = Collector()
    await broker.subscribe("c", sub, None)
    try:
        broker.publish_now("c", {"text": "\udc00x"})
    except ValueError:
        assert sub.frames == []
        return
    for frame in sub.frames:
        frame.encode("utf-8")


# ------------------------------------------------------------ reset (a relayed source lost continuity)


async def test_reset_starts_a_new_epoch_and_tells_every_subscriber():
    broker = make_broker()
    a, b, other = Collector(), Collector(), Collector()
    await broker.subscribe("feed", a, None)
    await broker.subscribe("feed", b, None)
    await broker.subscribe("other", other, None)
    old = publish_many(broker, "feed", 3)[-1]
    epoch = await broker.reset("feed")
    assert epoch != old.epoch
    for sub in (a, b):
        assert json.loads(sub.frames[-1]) == {
            "type": "subscribed", "channel": "feed", "epoch": epoch, "offset": 0, "recovered": False, "replayed": 0,
        }
    assert other.frames == []
    assert broker.publish_now("feed", "x").offset == 1  # the new stream starts at 1
    late = Collector()
    result = await broker.subscribe("feed", late, Position(old.epoch, old.offset))
    assert result.recovered is False and result.replay == []  # the old history is gone, never half-replayed
    assert broker.stats()["resets_total"] == 1
