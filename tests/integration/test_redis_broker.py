"""The Redis broker against a real `redis-server` (started by the tests on a free loopback port):
shared offsets, recovery by range reads, joins under load, epochs when history is lost, and the
link going down and coming back."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from redis_server import RedisServer
from stablews import protocol
from stablews.broker import BrokerUnavailable, MemoryBroker
from stablews.protocol import Position
from stablews.recovery import RecoveryPolicy
from stablews.redis_broker import RedisBroker
from support import wait_for

FAST = RecoveryPolicy(initial_delay=0.05, max_delay=0.2, jitter_max=0.05, circuit_breaker_threshold=3,
                      circuit_breaker_timeout=0.3, max_retries=3)


class Sub:
    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]

    def positions(self) -> list[tuple[str, int]]:
        return [(m["epoch"], m["offset"]) for m in self.messages() if m["type"] == "message"]


Factory = Callable[..., RedisBroker]


@pytest.fixture
async def make(redis_server: RedisServer) -> AsyncIterator[Factory]:
    """Brokers on the test's Redis (each its own instance), ready when returned; stopped at teardown."""
    made: list[RedisBroker] = []

    async def make_broker(**options: Any) -> RedisBroker:
        settings: dict[str, Any] = {
            "history_size": 100, "history_ttl": 600.0, "max_recovery_messages": 100, "key_ttl": 700.0,
            "instance_id": f"i{len(made)}", "policy": FAST, "timeout": 2.0,
        }
        settings.update(options)
        broker = RedisBroker(redis_server.url, **settings)
        made.append(broker)
        await broker.start()
        await wait_for(lambda: broker.ready, 10, "broker ready")
        return broker

    yield make_broker  # type: ignore[misc]
    for broker in made:
        await broker.stop()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


async def test_a_publication_on_one_instance_reaches_subscribers_on_another_in_offset_order(make):
    a, b = await make(), await make()
    here, there = Sub(), Sub()
    await a.subscribe("md.trades", here, None)
    await b.subscribe("md.trades", there, None)
    results = [await a.publish("md.trades", {"n": n}) for n in range(50)]
    assert [r.offset for r in results] == list(range(1, 51))
    await wait_for(lambda: len(there.frames) == 50 and len(here.frames) == 50, 10, "50 messages on both")
    assert there.frames == here.frames
    assert [m["offset"] for m in there.messages()] == list(range(1, 51))
    assert {m["epoch"] for m in there.messages()} == {results[0].epoch}
    # The frame is the memory broker's encoding of the same publication, byte for byte.
    first = there.messages()[0]
    assert there.frames[0] == protocol.encode_publication("md.trades", first["epoch"], 1, '{"n":0}', first["ts"])


async def test_offsets_are_assigned_once_for_all_instances(make):
    a, b = await make(), await make()
    done = await asyncio.gather(*(broker.publish("c", i) for i in range(100) for broker in (a, b)))
    assert sorted(r.offset for r in done) == list(range(1, 201))
    assert len({r.epoch for r in done}) == 1


async def test_publications_started_together_keep_their_order(make):
    broker = await make()
    futures = [broker.publish_nowait("c", n) for n in range(500)]  # one loop iteration: one write
    results = await asyncio.gather(*futures)
    assert [r.offset for r in results] == list(range(1, 501))
    assert broker.stats()["published_total"] == 500


async def test_publications_in_flight_when_redis_dies_each_get_an_answer(make, redis_server):
    broker = await make()
    futures = [broker.publish_nowait("c", n) for n in range(2000)]
    await asyncio.sleep(0)  # the first batch is written
    redis_server.kill()
    answers = await asyncio.gather(*futures, return_exceptions=True)
    published = [a.offset for a in answers if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, BaseException)]
    assert all(isinstance(a, BrokerUnavailable) for a in refused), {type(a) for a in refused}
    assert published == list(range(1, len(published) + 1))  # what got through, in order; the rest refused
    assert len(published) + len(refused) == 2000 and refused
    assert not broker.ready


async def test_recovery_replays_exactly_what_was_missed_or_nothing(make):
    a, b = await make(history_size=20, max_recovery_messages=10), await make(history_size=20)
    results = [await b.publish("c", n) for n in range(30)]
    epoch = results[0].epoch
    cases = {
        Position(epoch, 25): (True, list(range(26, 31))),  # 5 missed, in history
        Position(epoch, 30): (True, []),  # at the top
        Position(epoch, 15): (False, []),  # 15 missed: over max_recovery_messages (10)
        Position("other", 29): (False, []),  # another epoch
        Position(epoch, 31): (False, []),  # beyond the top
    }
    for since, (recovered, offsets) in cases.items():
        result = await a.subscribe("c", Sub(), since)
        assert result.recovered is recovered, since
        assert [json.loads(f)["offset"] for f in result.replay] == offsets, since
        assert (result.epoch, result.offset) == (epoch, 30)
    plain = await a.subscribe("c", Sub(), None)
    assert plain.recovered is None and plain.replay == []
    # More than history_size missed (20 kept): never a partial replay, even if Redis kept more.
    wide = await make(history_size=20, max_recovery_messages=100)
    assert (await wide.subscribe("c", Sub(), Position(epoch, 5))).recovered is False
    assert (await wide.subscribe("c", Sub(), Position(epoch, 10))).recovered is True


async def test_history_older_than_history_ttl_is_not_replayed(make):
    broker = await make(history_ttl=0.3, key_ttl=30.0)
    first = await broker.publish("c", "old")
    await asyncio.sleep(0.5)  # Redis's own clock ages the entry: no clock to inject here
    await broker.publish("c", "new")
    assert (await broker.subscribe("c", Sub(), Position(first.epoch, 1))).recovered is True  # only "new" missed
    assert (await broker.subscribe("c", Sub(), Position(first.epoch, 0))).recovered is False  # "old" expired


async def test_subscribers_joining_under_load_see_every_message_once_in_order(make):
    publisher, reader = await make(), await make()
    seed = Sub()
    await reader.subscribe("load", seed, None)  # the reader follows the stream from the start
    stop = asyncio.Event()
    published: list[int] = []

    async def publish() -> None:
        while not stop.is_set():
            published.append((await publisher.publish("load", len(published))).offset)

    task = asyncio.create_task(publish())
    rng = random.Random(7)
    joined: list[tuple[Sub, int, list[str], list[str]]] = []
    try:
        for _ in range(40):
            await asyncio.sleep(rng.uniform(0, 0.01))  # joins at random moments of the load
            sub = Sub()
            since = None
            if joined and rng.random() < 0.5:  # resume from a recent position
                top = max(1, (published or [1])[-1] - rng.randint(0, 30))
                since = Position(seed.positions()[0][0] if seed.frames else "", top)
            result = await reader.subscribe("load", sub, since)
            joined.append((sub, result.offset - len(result.replay), result.replay, result.live))
    finally:
        stop.set()
        await task
    last = published[-1]

    def offsets(sub: Sub, replay: list[str], live: list[str]) -> list[int]:
        return [json.loads(f)["offset"] for f in replay + live] + [o for _, o in sub.positions()]

    def reached(sub: Sub, start: int, replay: list[str], live: list[str]) -> int:
        return (offsets(sub, replay, live) or [start])[-1]

    await wait_for(lambda: all(reached(*j) == last for j in joined), 10, "every subscriber at the last offset")
    for sub, start, replay, live in joined:
        assert offsets(sub, replay, live) == list(range(start + 1, last + 1))
    assert sum(len(live) for *_, live in joined) + sum(len(s.frames) for s, *_ in joined) > 0


async def test_a_reset_tells_subscribers_on_every_instance(make):
    a, b = await make(), await make()
    here, there = Sub(), Sub()
    await a.subscribe("feed", here, None)
    await b.subscribe("feed", there, None)
    old = [await a.publish("feed", n) for n in range(3)][-1]
    epoch = await a.reset("feed")
    assert epoch != old.epoch
    marker = {"type": "subscribed", "channel": "feed", "epoch": epoch, "offset": 0, "recovered": False, "replayed": 0}
    await wait_for(lambda: here.messages()[-1:] == [marker] and there.messages()[-1:] == [marker], 10, "the marker")
    assert (await b.publish("feed", "x")).offset == 1
    assert (await a.subscribe("feed", Sub(), Position(old.epoch, old.offset))).recovered is False
    assert b.stats()["discontinuities"]["reset"] == 1


async def test_a_reset_in_the_same_millisecond_as_a_publication_still_reaches_every_reader(make):
    """The new stream's marker must sort after the old stream's last id, or a reader positioned
    there would never see it (automatic ids restart from the clock)."""
    a, b = await make(), await make()
    there = Sub()
    await b.subscribe("feed", there, None)
    for round_ in range(30):  # back to back: most rounds land in one millisecond
        await a.publish("feed", round_)
        epoch = await a.reset("feed")
        await wait_for(
            lambda epoch=epoch: [m["epoch"] for m in there.messages()[-1:]] == [epoch], 5, f"reset {round_} seen"
        )
    assert b.stats()["discontinuities"]["reset"] == 30


async def test_a_flushed_redis_is_a_new_epoch_found_by_the_sweep(make, redis_server):
    broker = await make()
    sub = Sub()
    await broker.subscribe("c", sub, None)
    old = [await broker.publish("c", n) for n in range(3)][-1]
    await wait_for(lambda: len(sub.frames) == 3, 10, "3 messages")
    raw(redis_server).flushall()
    broker.sweep()  # no publication needed: the check finds the history gone
    await wait_for(lambda: sub.messages()[-1]["type"] == "subscribed", 10, "the resync marker")
    marker = sub.messages()[-1]
    assert marker["epoch"] != old.epoch and marker["offset"] == 0 and marker["recovered"] is False
    after = await broker.publish("c", "after")
    assert (after.epoch, after.offset) == (marker["epoch"], 1)
    await wait_for(lambda: sub.positions()[-1] == (after.epoch, 1), 10, "the first message of the new epoch")


async def test_a_publication_into_a_flushed_redis_tells_other_instances_at_once(make, redis_server):
    a, b = await make(), await make()
    sub = Sub()
    await b.subscribe("c", sub, None)
    old = await a.publish("c", 1)
    await wait_for(lambda: len(sub.frames) == 1, 10, "1 message")
    raw(redis_server).flushall()
    new = await a.publish("c", 2)  # a new epoch, created by the publication
    assert new.epoch != old.epoch and new.offset == 1
    await wait_for(lambda: sub.positions()[-1:] == [(new.epoch, 1)], 10, "the new epoch's first message")
    kinds = [(m["type"], m["epoch"], m["offset"]) for m in sub.messages()]
    assert kinds == [("message", old.epoch, 1), ("subscribed", new.epoch, 0), ("message", new.epoch, 1)]


async def test_history_rolled_back_under_a_follower_is_a_new_epoch(make, redis_server):
    """Redis restored from an older snapshot: offsets this instance delivered would come again
    with other data. The check sees the top below its own and starts a new epoch for everyone."""
    broker = await make()
    sub = Sub()
    await broker.subscribe("c", sub, None)
    results = [await broker.publish("c", n) for n in range(10)]
    await wait_for(lambda: len(sub.frames) == 10, 10, "10 messages")
    meta, stream = broker.keys("c")
    client = raw(redis_server)
    ids = [entry_id for entry_id, _ in client.xrange(stream)][-4:]
    client.xdel(stream, *ids)
    client.hset(meta, "top", 6)  # as if the last 4 publications never happened
    broker.sweep()
    await wait_for(lambda: sub.messages()[-1]["type"] == "subscribed", 10, "the resync marker")
    assert sub.messages()[-1]["epoch"] != results[0].epoch
    assert (await broker.publish("c", "x")).epoch == sub.messages()[-1]["epoch"]


async def test_redis_down_refuses_publishes_and_subscribes_then_recovers_on_its_own(make, redis_server):
    events: list[tuple[str, dict[str, Any]]] = []
    broker = await make(on_event=lambda event, payload: events.append((event, payload)))
    sub = Sub()
    await broker.subscribe("c", sub, None)
    old = await broker.publish("c", "before")
    await wait_for(lambda: len(sub.frames) == 1, 10, "1 message")
    redis_server.kill()
    with pytest.raises(BrokerUnavailable):
        await broker.publish("c", "during")
    assert not broker.ready
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("c", Sub(), None)
    with pytest.raises(ValueError):  # bad data stays the caller's error, whatever the broker's state
        await broker.publish("c", float("nan"))
    await wait_for(lambda: broker.recovery.circuit_state == "open", 10, "the circuit open")
    assert any(event == "circuit_breaker_opened" and payload["broker"] == "redis" for event, payload in events)
    redis_server.start()  # nothing persisted: the history is gone
    await wait_for(lambda: broker.ready, 15, "ready again")
    assert any(event == "connection_recovered" for event, _ in events)
    # Its subscriber was told before anything of the new epoch.
    await wait_for(lambda: sub.messages()[-1]["type"] == "subscribed", 10, "the resync marker")
    new = await broker.publish("c", "after")
    assert new.epoch != old.epoch and new.offset == 1
    await wait_for(lambda: sub.positions()[-1:] == [(new.epoch, 1)], 10, "the new epoch's message")
    stats = broker.stats()
    assert stats["publish_failures_total"] >= 1 and stats["recovery"]["failures"] >= 1
    assert stats["discontinuities"]["new_epoch"] == 1


async def test_redis_restarted_with_its_history_is_no_loss_and_no_resync(tmp_path):
    server = RedisServer(tmp_path / "persistent", persistent=True)
    broker = RedisBroker(server.url, history_size=100, history_ttl=600.0, max_recovery_messages=100, key_ttl=700.0,
                         policy=FAST, timeout=2.0, instance_id="persistent")
    try:
        await broker.start()
        await wait_for(lambda: broker.ready, 10, "broker ready")
        sub = Sub()
        await broker.subscribe("c", sub, None)
        first = [await broker.publish("c", n) for n in range(5)]
        await wait_for(lambda: len(sub.frames) == 5, 10, "5 messages")
        server.restart()
        later = [await publish_retrying(broker, "c", n) for n in range(5, 8)]
        await wait_for(lambda: len(sub.frames) == 8, 10, "8 messages")
        assert [m["type"] for m in sub.messages()] == ["message"] * 8  # no resync marker
        assert sub.positions() == [(first[0].epoch, n) for n in range(1, 9)]
        assert {r.epoch for r in later} == {first[0].epoch}
        assert (await broker.subscribe("c", Sub(), Position(first[0].epoch, 2))).recovered is True
        assert broker.recovery.stats()["episodes"] >= 1  # the restart was noticed and recovered from
    finally:
        await broker.stop()
        server.stop()


async def publish_retrying(broker: RedisBroker, channel: str, data: Any):
    """Publish once the broker takes it (it may not have seen the restart yet)."""
    for _ in range(200):
        try:
            return await broker.publish(channel, data)
        except BrokerUnavailable:
            await wait_for(lambda: broker.ready, 15, "ready again")
    raise AssertionError("never published")


async def test_the_redis_and_memory_brokers_answer_a_resume_alike(make):
    """The recovery contract of protocol.md, asked of both brokers with the same history."""
    redis_broker = await make(history_size=10, max_recovery_messages=5)
    memory = MemoryBroker(10, 600.0, 5)
    for broker in (redis_broker, memory):
        for n in range(12):
            await broker.publish("c", n)
    answers = []
    for broker in (redis_broker, memory):
        epoch = (await broker.subscribe("c", Sub(), None)).epoch
        row = []
        for offset in range(0, 14):
            result = await broker.subscribe("c", Sub(), Position(epoch, offset))
            row.append((result.recovered, [json.loads(f)["data"] for f in result.replay]))
        answers.append(row)
    assert answers[0] == answers[1]


async def test_a_burst_of_resumes_waits_for_redis_connections_without_taking_redis_for_gone(make):
    # 2,000 resumes at once (a reconnect storm) share the 32 pooled connections: most wait far
    # longer than the 0.25 s broker timeout for one. That is load: every resume gets its replay and
    # the broker stays ready.
    broker = await make(timeout=0.25)
    first = await broker.publish("storm", 0)
    for n in range(1, 100):
        await broker.publish("storm", n)
    subs = [Sub() for _ in range(2000)]
    since = Position(first.epoch, first.offset)
    results = await asyncio.gather(*(broker.subscribe("storm", sub, since) for sub in subs), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} resumes failed, first: {failed[0]!r}"
    assert broker.ready
    assert all(r.recovered is True and len(r.replay) == 99 for r in results)  # type: ignore[union-attr]
