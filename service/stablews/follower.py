"""Following a shared stream locally: where this instance is in it, who listens here, and
subscribers joining it mid-stream without a message lost or repeated.

A broker outside the process (Redis) holds a channel's stream; each instance reads it once
and fans it out to its own subscribers. `StreamFollower` is that local copy's position,
without I/O. Events arrive in stream order through `advance(epoch, offset, frame)`: a
publication (its encoded `message` frame) or a bare position (frame None: the stream was reset
or replaced). Offsets are consecutive within an epoch; anything else is a discontinuity, and
the subscribers are told of it with an unrequested `subscribed` (`recovered: false`) before the
next publication, so a loss is never silent (docs/protocol.md, "Stream resets").

Joining takes a snapshot of the shared stream (its epoch, top and the replay) while the
follower goes on delivering, so the two must be stitched together:

1. `join(subscriber)` registers the joiner before the snapshot is asked for; from then on
   every event is kept for it;
2. `settle(join, epoch, top)` gives the snapshot's position: the kept events after it become
   the joiner's first live frames (returned, to be queued after the replay), and the joiner
   becomes an ordinary subscriber once the follower's position equals its own. Until then
   (the follower has not yet read as far as the snapshot saw) events reach it deduplicated
   against its own position.
"""

from __future__ import annotations

from enum import IntEnum

from . import protocol
from .broker import Subscriber


class Step(IntEnum):
    """How an event relates to a position."""

    SEEN = 0  # at or before the position: already delivered
    NEXT = 1  # the next publication
    GAP = 2  # same epoch, offsets skipped
    NEW_EPOCH = 3  # another epoch: the history before it is gone


def step(at_epoch: str | None, at_offset: int, epoch: str, offset: int, has_frame: bool) -> Step:
    if epoch == at_epoch:
        if offset <= at_offset:
            return Step.SEEN
        return Step.NEXT if has_frame and offset == at_offset + 1 else Step.GAP
    return Step.NEW_EPOCH


class Join:
    """A subscriber between `join` and becoming an ordinary subscriber."""

    __slots__ = ("epoch", "kept", "offset", "origin", "subscriber")

    def __init__(self, subscriber: Subscriber, origin: str | None) -> None:
        self.subscriber = subscriber
        # The follower's epoch when the join began. The snapshot is no older; when it is newer,
        # events of this epoch still to be read here came before it (see `settle`).
        self.origin = origin
        self.epoch: str | None = None
        self.offset = 0
        # Events since the join, until the snapshot's position is known (then None).
        self.kept: list[tuple[str, int, str | None]] | None = []

    def take(self, channel: str, epoch: str, offset: int, frame: str | None, out: list[str]) -> None:
        """Add what this event means for the joiner (after its own position) to `out`."""
        if epoch == self.origin:
            return  # the snapshot saw a newer epoch than this one: all of it came before
        how = step(self.epoch, self.offset, epoch, offset, frame is not None)
        if how is Step.SEEN:
            return
        if how is not Step.NEXT:
            out.append(protocol.subscribed(channel, epoch, offset - 1 if frame is not None else offset, False, 0))
        if frame is not None:
            out.append(frame)
        self.epoch, self.offset = epoch, offset


class StreamFollower:
    """This instance's position in one channel's shared stream, and its local subscribers."""

    __slots__ = ("channel", "epoch", "joins", "key", "last_id", "subscribers", "top")

    def __init__(self, channel: str, key: str = "") -> None:
        self.channel = channel
        self.key = key  # the shared stream's name (for the broker)
        self.epoch: str | None = None  # None until positioned by the first snapshot
        self.top = 0
        self.last_id = "0-0"  # the broker's id of the last entry read
        self.subscribers: set[Subscriber] = set()
        self.joins: list[Join] = []

    @property
    def positioned(self) -> bool:
        return self.epoch is not None

    @property
    def empty(self) -> bool:
        return not self.subscribers and not self.joins

    def position(self, epoch: str, top: int, last_id: str) -> None:
        """Where reading starts: the first snapshot's view of the stream."""
        self.epoch, self.top, self.last_id = epoch, top, last_id
        for join in self.joins:
            if join.origin is None:
                join.origin = epoch

    def advance(self, epoch: str, offset: int, frame: str | None) -> Step:
        """One event in stream order; SEEN when it was already seen (nothing delivered), GAP or
        NEW_EPOCH when the subscribers were told to resync first."""
        how = step(self.epoch, self.top, epoch, offset, frame is not None)
        if how is Step.SEEN:
            return how
        subscribers = self.subscribers
        if how is not Step.NEXT:
            marker = protocol.subscribed(
                self.channel, epoch, offset - 1 if frame is not None else offset, False, 0
            )
            for subscriber in subscribers:
                subscriber.deliver(marker)
        self.epoch, self.top = epoch, offset
        if frame is not None:
            for subscriber in subscribers:
                subscriber.deliver(frame)
        if self.joins:
            self._feed_joins(epoch, offset, frame)
        return how

    def _feed_joins(self, epoch: str, offset: int, frame: str | None) -> None:
        for join in list(self.joins):
            if join.kept is not None:
                join.kept.append((epoch, offset, frame))
                continue
            out: list[str] = []
            join.take(self.channel, epoch, offset, frame, out)
            for item in out:
                join.subscriber.deliver(item)
            self._promote_if_level(join)

    def join(self, subscriber: Subscriber) -> Join:
        join = Join(subscriber, self.epoch)
        self.joins.append(join)
        return join

    def settle(self, join: Join, epoch: str, top: int) -> list[str]:
        """The joiner's snapshot saw (epoch, top): the frames to queue after its replay (in
        order). It becomes an ordinary subscriber as soon as it is level with the follower."""
        if join not in self.joins:
            return []  # left before its snapshot came back
        kept, join.kept = join.kept or [], None
        join.epoch, join.offset = epoch, top
        if join.origin == epoch:
            join.origin = None  # nothing older to skip: SEEN covers the snapshot's own epoch
        out: list[str] = []
        for event in kept:
            join.take(self.channel, *event, out)
        if join.epoch == self.epoch and join.offset < self.top:
            # Behind what was delivered here, with nothing kept to fill the hole (the broker
            # should make this impossible): say so rather than lose it silently.
            out.append(protocol.subscribed(self.channel, self.epoch, self.top, False, 0))
            join.offset = self.top
        self._promote_if_level(join)
        return out

    def _promote_if_level(self, join: Join) -> None:
        if join.epoch == self.epoch and join.offset == self.top:
            self.joins.remove(join)
            self.subscribers.add(join.subscriber)

    def leave(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        for join in self.joins:
            if join.subscriber is subscriber:
                self.joins.remove(join)
                break

    def cancel(self, join: Join) -> None:
        if join in self.joins:
            self.joins.remove(join)
