"""Channels as streams with epoch and offset, bounded history, local fan-out.

`Broker` is the small interface every broker implements; `MemoryBroker` is
the embedded default. A publication is encoded once, into the exact `message`
frame every subscriber receives.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import protocol
from .protocol import Position
from .recovery import Recovery


class Subscriber(Protocol):
    def deliver(self, frame: str) -> None:
        """Queue one encoded `message` frame. Must not block, and must not
        change any channel's subscriber set while it runs (fan-out iterates it)."""


class Publication:
    __slots__ = ("frame", "mono", "offset", "ts_ms")

    def __init__(self, offset: int, ts_ms: int, frame: str, mono: float) -> None:
        self.offset = offset
        self.ts_ms = ts_ms
        self.frame = frame
        self.mono = mono


@dataclass(frozen=True, slots=True)
class PublishResult:
    channel: str
    epoch: str
    offset: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    epoch: str
    offset: int  # top of the stream once the replay is delivered
    recovered: bool | None  # None: no position was given
    replay: list[str]  # encoded `message` frames, in offset order
    # Frames that went live while the subscription was being set up (a broker outside the
    # process): queued after the replay, before anything delivered later.
    live: list[str] = field(default_factory=list)


class BrokerUnavailable(Exception):
    """The broker cannot serve the request right now (publish or subscribe)."""


class Broker(ABC):
    """What the connection layer needs from a broker.

    `subscribe` registers the subscriber and returns the replay atomically:
    no live publication of that channel reaches the subscriber before the
    call returns, and none after `result.offset` is missing from the replay
    and `result.live`. `publish` and `subscribe` raise `BrokerUnavailable`
    when the broker cannot serve them (publish also raises ValueError for
    data that is not plain JSON).
    """

    @abstractmethod
    async def publish(self, channel: str, data: Any) -> PublishResult: ...

    @abstractmethod
    def publish_nowait(self, channel: str, data: Any) -> PublishResult | asyncio.Future[PublishResult]:
        """Start a publication without waiting: its result at once (an embedded broker), or a
        future of it (a broker outside the process: publications started in one loop iteration
        travel together, in order). Bad data and an unavailable broker raise here; a later
        failure is a BrokerUnavailable on the future."""

    @abstractmethod
    async def subscribe(
        self, channel: str, subscriber: Subscriber, since: Position | None
    ) -> SubscribeResult: ...

    @abstractmethod
    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None: ...

    @abstractmethod
    async def reset(self, channel: str) -> str:
        """Drop the channel's history and give it a new epoch (its source lost
        continuity). Every subscriber is told at once with an unrequested
        `subscribed` (`recovered: false`), so it resynchronises. Returns the epoch."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    def sweep(self) -> None:  # noqa: B027 - optional housekeeping
        """Drop what has expired (called by the health sweep)."""

    # The recovery of the broker's own connection (a broker outside the process), for stats,
    # metrics and the circuit-breaker views.
    recovery: Recovery | None = None

    @property
    def ready(self) -> bool:
        return True

    def why_unavailable(self) -> str:
        """Why `ready` is False, in a few words."""
        return "unavailable"

    # Several instances share a broker outside the process: what must run once (a feed, a relay)
    # runs where its lease is held. An embedded broker has one instance: the lease is always held.
    shared = False

    async def claim(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew the lease `name` for `holder` for `ttl` seconds; False while another holds it."""
        return True

    async def release(self, name: str, holder: str) -> None:  # noqa: B027 - nothing to release here
        """Give the lease up at once (a graceful stop), if `holder` has it."""

    async def start(self) -> None:  # noqa: B027
        pass

    async def stop(self) -> None:  # noqa: B027
        pass


def new_epoch() -> str:
    return secrets.token_hex(6)


def encode_data(data: Any) -> str:
    """A publication's `data` as JSON, once; ValueError when it is not plain JSON."""
    try:
        return protocol.encode_json(data)  # NaN and Infinity raise ValueError
    except RecursionError:
        raise ValueError("data is nested too deeply") from None


class Stream:
    __slots__ = ("epoch", "history", "name", "subscribers", "top")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.top = 0
        self.history: deque[Publication] = deque()
        self.subscribers: set[Subscriber] = set()


class MemoryBroker(Broker):
    """History lives in this process: a restart is a new epoch for every channel."""

    def __init__(
        self,
        history_size: int,
        history_ttl: float,
        max_recovery_messages: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_recovery_messages = max_recovery_messages
        self._clock = clock
        self._wall = wall_clock
        self.streams: dict[str, Stream] = {}
        self.published_total = 0
        self.resets_total = 0

    def _stream(self, channel: str) -> Stream:
        stream = self.streams.get(channel)
        if stream is None:
            stream = self.streams[channel] = Stream(channel, new_epoch())
        return stream

    def _expire(self, stream: Stream, now: float) -> None:
        history = stream.history
        cutoff = now - self.history_ttl
        while history and history[0].mono < cutoff:
            history.popleft()

    def publish_now(self, channel: str, data: Any) -> PublishResult:
        """Synchronous publish: assign the offset, keep history, fan out."""
        data_json = encode_data(data)
        stream = self._stream(channel)
        now = self._clock()
        ts_ms = int(self._wall() * 1000)
        stream.top = offset = stream.top + 1
        frame = protocol.encode_publication(channel, stream.epoch, offset, data_json, ts_ms)
        if self.history_size:
            history = stream.history
            history.append(Publication(offset, ts_ms, frame, now))
            if len(history) > self.history_size:
                history.popleft()
            if history[0].mono < now - self.history_ttl:
                self._expire(stream, now)
        self.published_total += 1
        for subscriber in stream.subscribers:
            subscriber.deliver(frame)
        return PublishResult(channel, stream.epoch, offset, ts_ms)

    async def publish(self, channel: str, data: Any) -> PublishResult:
        return self.publish_now(channel, data)

    def publish_nowait(self, channel: str, data: Any) -> PublishResult:
        return self.publish_now(channel, data)

    def recover(self, stream: Stream, since: Position) -> list[str] | None:
        """The frames after `since`, or None when recovery is impossible (never partial)."""
        if since.epoch != stream.epoch or since.offset > stream.top:
            return None
        missing = stream.top - since.offset
        if missing == 0:
            return []
        if missing > self.max_recovery_messages:
            return None
        self._expire(stream, self._clock())
        history = stream.history
        if len(history) < missing:
            return None
        start = len(history) - missing
        # Offsets in history are consecutive, so the slice is exactly what is missing.
        return [history[i].frame for i in range(start, len(history))]

    async def subscribe(
        self, channel: str, subscriber: Subscriber, since: Position | None
    ) -> SubscribeResult:
        stream = self._stream(channel)
        recovered: bool | None = None
        replay: list[str] = []
        if since is not None:
            frames = self.recover(stream, since)
            recovered = frames is not None
            replay = frames or []
        stream.subscribers.add(subscriber)
        return SubscribeResult(stream.epoch, stream.top, recovered, replay)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        stream = self.streams.get(channel)
        if stream is not None:
            stream.subscribers.discard(subscriber)

    async def reset(self, channel: str) -> str:
        stream = self._stream(channel)
        stream.epoch = new_epoch()
        stream.top = 0
        stream.history.clear()
        self.resets_total += 1
        frame = protocol.subscribed(channel, stream.epoch, 0, False, 0)
        for subscriber in stream.subscribers:
            subscriber.deliver(frame)
        return stream.epoch

    def sweep(self) -> None:
        now = self._clock()
        for name in list(self.streams):
            stream = self.streams[name]
            self._expire(stream, now)
            # Nothing to recover and nobody listening: forget the stream. A
            # later subscriber gets a new epoch, which is the truth: history is gone.
            if not stream.history and not stream.subscribers:
                del self.streams[name]

    def stats(self) -> dict[str, Any]:
        return {
            "type": "memory",
            "ready": True,
            "channels": len(self.streams),
            "subscriptions": sum(len(s.subscribers) for s in self.streams.values()),
            "history_messages": sum(len(s.history) for s in self.streams.values()),
            "published_total": self.published_total,
            "resets_total": self.resets_total,
        }
