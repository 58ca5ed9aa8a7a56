"""The local follower of a shared stream: fan-out, discontinuities, and joins stitched to the reading."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from stablews import protocol
from stablews.follower import Join, Step, StreamFollower, step


class Sub:
    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def messages(self) -> list[dict]:
        return [json.loads(f) for f in self.frames]


def frame(epoch: str, offset: int) -> str:
    return protocol.encode_publication("ch", epoch, offset, json.dumps(offset), 0)


def test_step_names_every_relation_to_a_position():
    assert step("e", 5, "e", 5, True) is Step.SEEN
    assert step("e", 5, "e", 3, True) is Step.SEEN
    assert step("e", 5, "e", 6, True) is Step.NEXT
    assert step("e", 5, "e", 8, True) is Step.GAP
    assert step("e", 5, "e", 6, False) is Step.GAP  # a bare position ahead: something was skipped
    assert step("e", 5, "f", 1, True) is Step.NEW_EPOCH
    assert step(None, 0, "e", 1, True) is Step.NEW_EPOCH


def test_publications_fan_out_in_order_and_repeats_are_dropped():
    follower = StreamFollower("ch")
    follower.position("e", 2, "1-0")
    a, b = Sub(), Sub()
    follower.subscribers.update({a, b})
    assert follower.advance("e", 3, frame("e", 3)) is Step.NEXT
    assert follower.advance("e", 3, frame("e", 3)) is Step.SEEN
    assert follower.advance("e", 4, frame("e", 4)) is Step.NEXT
    assert a.frames == b.frames == [frame("e", 3), frame("e", 4)]


def test_a_gap_is_announced_before_the_publication_after_it():
    follower = StreamFollower("ch")
    follower.position("e", 2, "1-0")
    a = Sub()
    follower.subscribers.add(a)
    assert follower.advance("e", 7, frame("e", 7)) is Step.GAP
    marker, message = a.messages()
    assert marker == {"type": "subscribed", "channel": "ch", "epoch": "e", "offset": 6, "recovered": False,
                      "replayed": 0}
    assert message["offset"] == 7


def test_a_new_epoch_without_a_publication_tells_subscribers_at_once():
    follower = StreamFollower("ch")
    follower.position("e", 9, "1-0")
    a = Sub()
    follower.subscribers.add(a)
    assert follower.advance("f", 0, None) is Step.NEW_EPOCH
    assert a.messages() == [{"type": "subscribed", "channel": "ch", "epoch": "f", "offset": 0, "recovered": False,
                             "replayed": 0}]
    assert follower.advance("f", 1, frame("f", 1)) is Step.NEXT  # the new stream continues plainly
    assert (follower.epoch, follower.top) == ("f", 1)


def test_a_join_gets_what_was_delivered_while_its_snapshot_was_out():
    follower = StreamFollower("ch")
    follower.position("e", 10, "1-0")
    old = Sub()
    follower.subscribers.add(old)
    new = Sub()
    join = follower.join(new)
    for offset in (11, 12, 13):  # read while the snapshot is in flight
        follower.advance("e", offset, frame("e", offset))
    assert new.frames == []  # nothing before the subscription is set up
    live = follower.settle(join, "e", 12)  # the snapshot saw 12 (its replay ends there)
    assert live == [frame("e", 13)]
    assert new in follower.subscribers and not follower.joins
    follower.advance("e", 14, frame("e", 14))
    assert new.frames == [frame("e", 14)]


def test_a_join_ahead_of_the_reading_waits_for_it_without_repeats():
    follower = StreamFollower("ch")
    follower.position("e", 10, "1-0")
    new = Sub()
    join = follower.join(new)
    assert follower.settle(join, "e", 15) == []  # the snapshot saw further than this instance has read
    assert new not in follower.subscribers
    for offset in range(11, 17):
        follower.advance("e", offset, frame("e", offset))
    assert new.frames == [frame("e", 16)]  # 11-15 came with its replay
    assert new in follower.subscribers and not follower.joins


def test_a_join_that_leaves_before_its_snapshot_is_never_subscribed():
    follower = StreamFollower("ch")
    follower.position("e", 1, "1-0")
    sub = Sub()
    join = follower.join(sub)
    follower.leave(sub)
    assert follower.settle(join, "e", 1) == []
    assert follower.empty


# Random interleavings of reading and joining: every subscriber sees each publication of the
# stream exactly once, in order, from the point its snapshot saw (somewhere between its join and
# its answer); the stream may be replaced (a new epoch) once, and a subscriber whose snapshot came
# before that is told before the first publication of the new epoch.
@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 10)), min_size=1, max_size=40),
    st.integers(0, 40),
)
def test_any_interleaving_of_reads_and_joins_loses_and_repeats_nothing(plan, renew_at):
    stream: list[tuple[str, int]] = []  # epoch e offsets 1.. then, from renew_at, epoch f offsets 1..
    epoch, top = "e", 0
    follower = StreamFollower("ch")
    follower.position("e", 0, "0-0")
    read = 0  # how much of `stream` the follower has read
    pending: list[tuple[Sub, Join, int]] = []  # joins whose snapshot is out, with the stream length at the join
    done: list[tuple[Sub, int, list[str]]] = []  # (sub, where its snapshot saw the stream, live frames)

    def answer(sub: Sub, join: Join, joined_at: int, pick: int) -> None:
        seen = joined_at + pick % (len(stream) - joined_at + 1)  # the snapshot ran after the join
        at = stream[seen - 1] if seen else ("e", 0)
        done.append((sub, seen, follower.settle(join, *at)))

    for publishes, action, pick in plan:
        for _ in range(publishes):
            if len(stream) == renew_at and epoch == "e":
                epoch, top = "f", 0
            top += 1
            stream.append((epoch, top))
        if action in (0, 1) and read < len(stream):  # the reader reads all, or one
            upto = len(stream) if action == 0 else read + 1
            for e, o in stream[read:upto]:
                follower.advance(e, o, frame(e, o))
            read = upto
        elif action == 2:
            sub = Sub()
            pending.append((sub, follower.join(sub), len(stream)))
        elif action == 3 and pending:  # the oldest snapshot comes back
            answer(*pending.pop(0), pick)
    for e, o in stream[read:]:
        follower.advance(e, o, frame(e, o))
    for sub, join, joined_at in pending:
        answer(sub, join, joined_at, 0)
    for sub, seen, live in done:
        got = [json.loads(f) for f in live + sub.frames]
        data = [(m["epoch"], m["offset"]) for m in got if m["type"] == "message"]
        assert data == stream[seen:]  # exactly what came after its snapshot, once, in order
        markers = [(m["epoch"], m["offset"]) for m in got if m["type"] == "subscribed"]
        crossed = seen < len(stream) and (stream[seen - 1][0] if seen else "e") != stream[-1][0]
        assert markers == ([("f", 0)] if crossed else [])
        assert sub in follower.subscribers
