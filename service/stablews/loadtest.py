"""`stablews loadtest`: many recovering clients, optional chaos, and a check that nothing was lost.

Every client is the project's `StableClient` (heartbeats, reconnect with backoff, resume), so
losses and duplicates are measured as an application would see them: per client and channel,
the offsets delivered within one epoch must be contiguous. A `resync` (the server could not
continue the stream: new epoch, history no longer covering the gap) is counted apart, not as loss.

Chaos, injected into the clients' live connections:

- drop: the TCP connection is aborted (no close frame); the server records `client_gone`;
- freeze: the client stops reading and answering heartbeats for a while; the server closes it
  4000 (`heartbeat_timeout`);
- stall: the same pause, for a consumer that does not keep up; the server closes it 4003
  (`slow_consumer`) when its send queue fills first (heavy traffic), else 4000.

Each time the client reconnects and resumes. Layout, so that a multi-process runner can reuse
the parts: `Options` (validated flags), `Tally` (mergeable figures), `Probe` (one client and
its checks), `Chaos`, `Publisher`, `LoadTest` (one process's run), `summary`/`render`.

Docs: docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .client import ClientClosed, RequestFailed, StableClient
from .config import Settings, parse_duration
from .protocol import valid_channel
from .recovery import RecoveryPolicy

PROG = "stablews loadtest"
DEFAULT_CHANNELS = ("demo.ticker",)
DEFAULT_RAMP = 5.0  # seconds; `--ramp auto` takes a tenth of a shorter run
PUBLISH_RATE_PER_CONNECTION = 400.0  # below the server's default rate_limit (500/s per connection)
PUBLISH_MAX_IN_FLIGHT = 256  # unacknowledged publishes per publisher connection
PUBLISH_TICK = 0.01  # seconds between publisher wake-ups
PAUSE_MARGIN = 1.0  # seconds added to the server's heartbeat bound for an `auto` freeze or stall
MIN_ROUND = 60.0  # seconds: with --duration 0, the freeze and stall plan is redrawn every round
CLOSE_DEADLINE = 10.0  # seconds for closing every client at the end
NO_CLOSE_FRAME = "1006"  # close code key for a connection lost without a close frame


class BadOption(Exception):
    """A flag with a value the load test cannot use: one line, exit 2."""


# ------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    clients: int = 50
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    publish_rate: float = 0.0
    payload_bytes: int = 64
    duration: float = 60.0  # 0: until interrupted
    ramp: float = 5.0  # `auto` on the command line: min(5 s, a tenth of the duration)
    drop_rate: float = 0.2
    freeze_ratio: float = 0.1
    freeze_seconds: float | None = None  # None: auto, from the server's heartbeat figures
    stall_ratio: float = 0.0
    stall_seconds: float | None = None
    token: str | None = None
    json: bool = False
    seed: int | None = None
    progress_interval: float = 5.0  # 0: no progress lines
    open_timeout: float = 10.0
    policy: RecoveryPolicy = field(default_factory=RecoveryPolicy)

    @property
    def forever(self) -> bool:
        return self.duration == 0

    @property
    def settle(self) -> float:
        """Seconds before the end in which no chaos starts, so the last victims can reconnect."""
        if self.forever:
            return 0.0
        reconnect = self.policy.initial_delay + self.policy.jitter_max + 1.0
        return min(self.duration / 4, reconnect)


def _number(flag: str, raw: Any, *, low: float = 0.0, high: float = math.inf, whole: bool = False) -> float:
    text = str(raw)
    try:
        value = float(int(text)) if whole else float(text)
        if not math.isfinite(value) or not low <= value <= high:
            raise ValueError
    except ValueError:
        bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        raise BadOption(f"{flag}: expected {'a whole number' if whole else 'a number'} {bounds}, "
                        f"got {text!r}") from None
    return value


def _duration(flag: str, raw: Any, *, zero_ok: bool = True, auto_ok: bool = False) -> float | None:
    text = str(raw)
    if auto_ok and text == "auto":
        return None
    try:
        value = parse_duration(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ValueError
    except ValueError:
        extra = " or auto" if auto_ok else ""
        kind = "a duration" if zero_ok else "a duration above 0"
        raise BadOption(f"{flag}: expected {kind} such as 500ms, 30s, 5m or a number of seconds{extra}, "
                        f"got {text!r}") from None
    return value


def _ramp(raw: Any, duration: float) -> float:
    given = _duration("--ramp", raw, auto_ok=True)
    if given is not None:
        return given
    return DEFAULT_RAMP if duration == 0 else min(DEFAULT_RAMP, duration / 10)


def parse_options(args: argparse.Namespace, settings: Settings | None = None) -> Options:
    """Validate the flags of `stablews loadtest` (raises BadOption)."""
    url = str(args.url)
    if not url.startswith(("ws://", "wss://")):
        raise BadOption(f"URL: expected a ws:// or wss:// URL, got {url!r}")
    channels = tuple(dict.fromkeys(c.strip() for c in str(args.channels).split(",") if c.strip()))
    if not channels:
        raise BadOption(f"--channels: expected a comma-separated list of channels, got {args.channels!r}")
    for channel in channels:
        if not valid_channel(channel):
            raise BadOption(f"--channels: {channel!r} is not a channel name (1-128 characters of letters, digits "
                            "and _ . : / -, starting with a letter or digit)")
    freeze_ratio = _number("--freeze-ratio", args.freeze_ratio, high=1.0)
    stall_ratio = _number("--stall-ratio", args.stall_ratio, high=1.0)
    if freeze_ratio + stall_ratio > 1.0:
        raise BadOption(f"--freeze-ratio + --stall-ratio: must not exceed 1, got {freeze_ratio:g} + {stall_ratio:g}")
    duration = _duration("--duration", args.duration) or 0.0
    seed = None
    if args.seed is not None:
        seed = int(_number("--seed", args.seed, whole=True))
    return Options(
        url=url,
        clients=int(_number("--clients", args.clients, low=1, high=100_000, whole=True)),
        channels=channels,
        publish_rate=_number("--publish-rate", args.publish_rate, high=1_000_000),
        payload_bytes=int(_number("--payload-bytes", args.payload_bytes, high=16 * 1024 * 1024, whole=True)),
        duration=duration,
        ramp=_ramp(args.ramp, duration),
        drop_rate=_number("--drop-rate", args.drop_rate, high=100_000),
        freeze_ratio=freeze_ratio,
        freeze_seconds=_duration("--freeze-seconds", args.freeze_seconds, zero_ok=False, auto_ok=True),
        stall_ratio=stall_ratio,
        stall_seconds=_duration("--stall-seconds", args.stall_seconds, zero_ok=False, auto_ok=True),
        token=args.token,
        json=bool(args.json),
        seed=seed,
        progress_interval=_duration("--progress-interval", args.progress_interval) or 0.0,
        open_timeout=_duration("--open-timeout", args.open_timeout, zero_ok=False) or 10.0,
        policy=RecoveryPolicy.from_settings(settings) if settings is not None else RecoveryPolicy(),
    )


# ------------------------------------------------------------ figures


class LatencyHistogram:
    """Log-scale buckets (1 % wide) from 0 to ~10^8 ms: fixed memory, mergeable, ~1 % precise quantiles."""

    UNIT_MS = 0.01
    GROWTH = 1.01
    BUCKETS = 2400

    __slots__ = ("count", "counts", "max")

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.count = 0
        self.max = 0.0

    def add(self, ms: float) -> None:
        ms = max(0.0, ms)  # a server clock ahead of ours
        index = int(math.log1p(ms / self.UNIT_MS) / math.log(self.GROWTH))
        self.counts[min(index, self.BUCKETS - 1)] += 1
        self.count += 1
        if ms > self.max:
            self.max = ms

    def merge(self, other: LatencyHistogram) -> None:
        for i, n in enumerate(other.counts):
            if n:
                self.counts[i] += n
        self.count += other.count
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-quantile (never above the max seen)."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.UNIT_MS * (self.GROWTH ** (i + 1) - 1), self.max)
        return self.max

    def summary(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 1)

        return {"count": self.count, "p50": r(self.quantile(0.5)), "p99": r(self.quantile(0.99)),
                "max": r(self.max) if self.count else None}


@dataclass
class Tally:
    """What the clients saw. Plain counters and a fixed histogram: bounded, and mergeable across processes."""

    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    gaps: int = 0
    resyncs: int = 0
    resumes: int = 0
    replayed: int = 0
    connects: int = 0
    reconnects: int = 0
    drops: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    chaos: Counter[str] = field(default_factory=Counter)
    published: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # every delivered message
    live_latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # not replayed, not held by chaos

    COUNTERS = ("delivered", "lost", "duplicated", "gaps", "resyncs", "resumes", "replayed", "connects",
                "reconnects", "drops")

    def merge(self, other: Tally) -> None:
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.close_codes.update(other.close_codes)
        self.chaos.update(other.chaos)
        self.published.update(other.published)
        self.latency.merge(other.latency)
        self.live_latency.merge(other.live_latency)


# ------------------------------------------------------------ one client


class Probe:
    """One StableClient and the checks on what it delivers: per channel, offsets contiguous within an epoch."""

    def __init__(self, index: int, client: StableClient, tally: Tally) -> None:
        self.index = index
        self.client = client
        self.tally = tally
        self.seen: dict[str, tuple[str, int]] = {}  # channel -> (epoch, last offset delivered)
        self.replaying: dict[str, int] = {}  # channel -> replayed messages still to come
        self.ever_connected = False
        self.paused: str | None = None  # "freeze" or "stall" while chaos holds it
        self.held = False  # this connection was paused: what it delivers now waited in buffers
        self.done = False  # the run ended: figures no longer change
        client.on("message", self._on_message)
        client.on("resync", self._on_resync)
        client.on("recovered", self._on_recovered)
        client.on("connected", self._on_connected)
        client.on("disconnected", self._on_disconnected)

    @property
    def connected(self) -> bool:
        return self.client.state == "connected"

    def _on_message(self, msg: dict[str, Any]) -> None:
        if self.done:
            return
        tally = self.tally
        channel, epoch, offset = msg.get("channel"), msg.get("epoch"), msg.get("offset")
        if not isinstance(channel, str) or not isinstance(epoch, str) or not isinstance(offset, int):
            return
        live = not self.held
        if self.replaying.get(channel):
            self.replaying[channel] -= 1
            live = False
        ts = msg.get("ts")
        if isinstance(ts, int | float):
            latency = time.time() * 1000 - ts
            tally.latency.add(latency)
            if live:
                tally.live_latency.add(latency)
        tally.delivered += 1
        last = self.seen.get(channel)
        if last is not None and last[0] == epoch:
            if offset <= last[1]:
                tally.duplicated += 1
                return
            if offset > last[1] + 1:
                tally.lost += offset - last[1] - 1
                tally.gaps += 1
        # First message, or a new epoch (the client announced it with a resync): a new stream starts here.
        self.seen[channel] = (epoch, offset)

    def _on_resync(self, channel: str, info: dict[str, Any]) -> None:
        if self.done:
            return
        reason = info.get("reason")
        current = info.get("current") or {}
        if reason == "gap":  # the message that follows shows the gap to _on_message: counted as loss there
            return
        self.tally.resyncs += 1
        epoch, offset = current.get("epoch"), current.get("offset")
        if isinstance(epoch, str) and isinstance(offset, int):
            # recovery_failed: the stream goes on after `offset`; new_epoch: the message at `offset` comes next.
            self.seen[channel] = (epoch, offset if reason == "recovery_failed" else offset - 1)

    def _on_recovered(self, channel: str, replayed: int) -> None:
        if not self.done:
            self.tally.resumes += 1
            self.tally.replayed += replayed
            self.replaying[channel] = replayed

    def _on_connected(self, info: dict[str, Any]) -> None:
        if self.done:
            return
        if self.ever_connected:
            self.tally.reconnects += 1
        else:
            self.ever_connected = True
            self.tally.connects += 1

    def _on_disconnected(self, info: dict[str, Any]) -> None:
        self.held = False  # the paused connection is gone
        if self.done:
            return
        code = info.get("code")
        self.tally.close_codes[NO_CLOSE_FRAME if code is None else str(code)] += 1
        if info.get("verified"):
            self.tally.drops += 1


# ------------------------------------------------------------ chaos


class Chaos:
    """Drops at --drop-rate across all clients; freezes and stalls of a share of the clients, once per round."""

    def __init__(self, test: LoadTest) -> None:
        self.test = test
        self.options = test.options
        self.rng = random.Random(test.rng.random())
        self.pause_seconds: dict[str, float] = {}
        self.notes: list[str] = []

    def tasks(self) -> list[asyncio.Task[None]]:
        out = []
        if self.options.drop_rate > 0:
            out.append(asyncio.create_task(self._drops(), name="loadtest-drops"))
        if self.options.freeze_ratio > 0 or self.options.stall_ratio > 0:
            out.append(asyncio.create_task(self._pauses(), name="loadtest-pauses"))
        return out

    def _victims(self) -> list[Probe]:
        """Clients chaos may pick: connected, and not on a connection a freeze or stall has held."""
        return [p for p in self.test.probes if p.connected and not p.held and not p.done]

    async def _drops(self) -> None:
        test, rate = self.test, self.options.drop_rate
        await test.sleep_until(self.options.ramp)
        while not test.stopping and test.elapsed() < test.chaos_end:
            await test.sleep(self.rng.uniform(0, 2 / rate))  # mean 1/rate, never a gap over 2/rate
            if test.stopping or test.elapsed() >= test.chaos_end:
                return
            victims = self._victims()
            transport = None
            if victims:
                transport = self.rng.choice(victims).client.transport
            if transport is None:
                test.tally.chaos["drops_missed"] += 1  # nobody connected at that moment
                continue
            transport.abort()
            test.tally.chaos["drops"] += 1

    def _auto_seconds(self) -> float:
        """How long a pause must last for the server to close the connection: its heartbeat bound
        (interval * max_missed_heartbeats + timeout, taken as 2 * (interval + timeout): exact enough for
        max_missed_heartbeats ≤ 2) plus a margin. From the welcome's heartbeat figures."""
        silence = max((p.client.silence for p in self.test.probes if p.ever_connected), default=None)
        assert silence is not None
        return 2 * silence + PAUSE_MARGIN

    async def _pauses(self) -> None:
        test, options = self.test, self.options
        await test.sleep_until(options.ramp)
        while not test.stopping and not any(p.ever_connected for p in test.probes):
            await test.sleep(0.1)
        if test.stopping:
            return
        auto = self._auto_seconds()
        plans = []
        for kind, ratio, given in (("freeze", options.freeze_ratio, options.freeze_seconds),
                                   ("stall", options.stall_ratio, options.stall_seconds)):
            if ratio > 0:
                seconds = auto if given is None else given
                self.pause_seconds[kind] = round(seconds, 3)
                plans.append((kind, max(1, round(ratio * options.clients)), seconds))
        longest = max(seconds for _, _, seconds in plans)
        round_length = max(MIN_ROUND, 3 * longest)
        start = max(options.ramp, test.elapsed())
        while not test.stopping:
            end = test.chaos_end if not options.forever else start + round_length
            taken: set[int] = set()  # a client is paused at most once per round
            runs = []
            for kind, count, seconds in plans:
                latest = end - seconds
                if latest < start:
                    self._note(f"no {kind}s in this run: a {kind} lasts {seconds:g}s and does not fit "
                               f"(chaos from {start:.1f}s to {end:.1f}s); give a longer --duration, a shorter "
                               f"--{kind}-seconds, or a server with shorter heartbeats")
                    test.tally.chaos[f"{kind}s_skipped"] += count
                    continue
                runs.extend(self._pause(kind, self.rng.uniform(start, latest), latest, seconds, taken)
                            for _ in range(count))
            if runs:
                await asyncio.gather(*runs)
            if not options.forever:
                return
            await test.sleep_until(end)
            start = end

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            self.test.say(f"note: {text}")

    async def _pause(self, kind: str, at: float, latest: float, seconds: float, taken: set[int]) -> None:
        """At `at`, pause a connected client not paused yet this round (waiting until `latest` for one)."""
        test = self.test
        await test.sleep_until(at)
        probe = None
        while not test.stopping:
            candidates = [p for p in self._victims() if p.index not in taken and p.client.transport is not None]
            if candidates:
                probe = self.rng.choice(candidates)
                break
            if test.elapsed() >= latest:
                break
            await test.sleep(0.05)  # everyone is reconnecting or already paused: wait for one
        if probe is None:
            test.tally.chaos[f"{kind}s_skipped"] += 1
            return
        taken.add(probe.index)
        client = probe.client
        probe.paused = kind
        probe.held = True
        client.pause_reading()
        test.tally.chaos[f"{kind}s"] += 1
        try:
            await test.sleep(seconds)
        finally:
            client.resume_reading()
            probe.paused = None


# ------------------------------------------------------------ the tool's own publishing


class Publisher:
    """Publishes --publish-rate messages/s over the socket, round robin over the channels, on as many
    connections as the server's per-connection rate limit needs."""

    def __init__(self, test: LoadTest) -> None:
        self.test = test
        self.options = test.options
        self.clients: list[StableClient] = []
        self.seq = 0

    def tasks(self) -> list[asyncio.Task[None]]:
        options = self.options
        if options.publish_rate <= 0:
            return []
        count = max(1, math.ceil(options.publish_rate / PUBLISH_RATE_PER_CONNECTION))
        out = []
        for i in range(count):
            client = StableClient(options.url, token=options.token, policy=options.policy,
                                  open_timeout=options.open_timeout, name="stablews-loadtest-publisher",
                                  rng=random.Random(self.test.rng.random()))
            self.clients.append(client)
            out.append(asyncio.create_task(self._run(client, options.publish_rate / count), name=f"publisher-{i}"))
        return out

    async def _run(self, client: StableClient, rate: float) -> None:
        test, tally = self.test, self.test.tally
        loop = asyncio.get_running_loop()
        pad = "x" * self.options.payload_bytes
        channels = self.options.channels
        in_flight: set[asyncio.Task[None]] = set()
        await client.connect()
        started, sent = loop.time(), 0
        try:
            while not test.stopping:
                await test.sleep(max(PUBLISH_TICK, 1 / rate))
                due = int((loop.time() - started) * rate) - sent
                if due > rate:  # fell more than a second behind (loop stalled): no burst to catch up
                    started, sent, due = loop.time(), 0, 0
                for _ in range(max(0, due)):
                    sent += 1
                    if client.state != "connected" or len(in_flight) >= PUBLISH_MAX_IN_FLIGHT:
                        tally.published["skipped"] += 1
                        continue
                    self.seq += 1
                    channel = channels[self.seq % len(channels)]
                    data = {"seq": self.seq, "pad": pad} if pad else {"seq": self.seq}
                    task = asyncio.create_task(self._one(client, channel, data))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            for task in list(in_flight):
                task.cancel()

    async def _one(self, client: StableClient, channel: str, data: Any) -> None:
        tally = self.test.tally
        try:
            await client.publish(channel, data, timeout=10.0)
            tally.published["acknowledged"] += 1
        except RequestFailed as exc:
            tally.published["errors"] += 1
            if exc.code == "forbidden":
                self.test.fail(f"the server refuses publishes from clients ({exc}): start it with "
                               "--client-publish (and a token with a publish grant when auth is on), or give "
                               "--publish-rate 0", status=2)
        except (ClientClosed, TimeoutError):
            tally.published["errors"] += 1

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)


# ------------------------------------------------------------ the run


class LoadTest:
    """One process's run: the clients, the publisher, the chaos, progress lines; `run()` returns the summary."""

    def __init__(self, options: Options, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.rng = random.Random(options.seed)
        self.tally = Tally()
        self.probes: list[Probe] = []
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self.stopped_at: float | None = None
        self.failure: str | None = None  # why the run ended early
        self.failure_status = 1  # the exit status it calls for
        self.interrupted = False
        self.chaos_end = math.inf if options.forever else options.duration - options.settle
        self.chaos = Chaos(self)
        self.publisher = Publisher(self)

    # time, relative to the start of the run

    def elapsed(self) -> float:
        return self._loop.time() - self._started

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, cut short when the run stops."""
        if seconds > 0 and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._stop.wait()

    async def sleep_until(self, at: float) -> None:
        await self.sleep(at - self.elapsed())

    def stop(self) -> None:
        self._stop.set()

    def fail(self, message: str, status: int = 1) -> None:
        if self.failure is None:
            self.failure, self.failure_status = message, status
        self._stop.set()

    # the run

    async def run(self) -> dict[str, Any]:
        options = self.options
        for i in range(options.clients):
            client = StableClient(options.url, channels=options.channels, token=options.token, policy=options.policy,
                                  open_timeout=options.open_timeout, name="stablews-loadtest",
                                  rng=random.Random(self.rng.random()))
            self.probes.append(Probe(i, client, self.tally))
        chaos, publisher = self.chaos, self.publisher
        tasks = [asyncio.create_task(self._start_clients(), name="loadtest-ramp"),
                 asyncio.create_task(self._watch(), name="loadtest-watch"),
                 *publisher.tasks(), *chaos.tasks()]
        if options.progress_interval > 0:
            tasks.append(asyncio.create_task(self._progress(), name="loadtest-progress"))
        try:
            if options.forever:
                await self._stop.wait()
            else:
                await self.sleep(options.duration)
        finally:
            self._stop.set()
            self.stopped_at = self.elapsed()
            for probe in self.probes:
                probe.done = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_all(publisher)
        return self.summary()

    async def _start_clients(self) -> None:
        count = len(self.probes)
        for i, probe in enumerate(self.probes):
            await self.sleep_until(self.options.ramp * i / count)
            if self.stopping:
                return
            await probe.client.connect()

    async def _watch(self) -> None:
        """End the run when every client has stopped for good (e.g. 4401, 1008): nothing more to measure."""
        while not self.stopping:
            await self.sleep(0.5)
            errors = [p.client.error for p in self.probes]
            if errors and all(e is not None for e in errors):
                self.fail(f"every client stopped: {errors[0]}")

    async def _progress(self) -> None:
        interval = self.options.progress_interval
        last_t, last_delivered = self.elapsed(), 0
        while not self.stopping:
            await self.sleep(interval)
            if self.stopping:
                return
            now, tally = self.elapsed(), self.tally
            rate = (tally.delivered - last_delivered) / max(now - last_t, 1e-9)
            last_t, last_delivered = now, tally.delivered
            connected = sum(1 for p in self.probes if p.connected)
            paused = sum(1 for p in self.probes if p.paused)
            self.say(f"t={now:.0f}s connected={connected}/{len(self.probes)} msgs/s={rate:.1f} "
                     f"drops={tally.drops} reconnects={tally.reconnects} resumes={tally.resumes} "
                     f"resyncs={tally.resyncs} lost={tally.lost} duplicated={tally.duplicated} paused={paused}")

    async def _close_all(self, publisher: Publisher) -> None:
        clients = [p.client for p in self.probes]
        for client in clients:
            client.resume_reading()
        closing = asyncio.gather(*(c.close() for c in clients), publisher.close(), return_exceptions=True)
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await closing
        except TimeoutError:
            for client in clients + publisher.clients:
                transport = client.transport
                if transport is not None:
                    transport.abort()

    def summary(self) -> dict[str, Any]:
        options, tally = self.options, self.tally
        elapsed = self.stopped_at if self.stopped_at is not None else self.elapsed()
        clients = [p.client for p in self.probes]
        stopped = [c.error for c in clients if c.error is not None]
        ok = tally.lost == 0 and tally.duplicated == 0 and tally.connects > 0 and self.failure is None
        chaos = {"drops": tally.chaos["drops"], "freezes": tally.chaos["freezes"], "stalls": tally.chaos["stalls"]}
        skipped = {k: v for k, v in tally.chaos.items() if k.endswith(("_skipped", "_missed")) and v}
        body: dict[str, Any] = {
            "url": options.url,
            "clients": options.clients,
            "channels": list(options.channels),
            "seed": options.seed,
            "elapsed_seconds": round(elapsed, 3),
            "interrupted": self.interrupted,
            "clients_connected": sum(1 for p in self.probes if p.ever_connected),
            "clients_stopped": len(stopped),
            "delivered": tally.delivered,
            "delivered_per_second": round(tally.delivered / elapsed, 1) if elapsed > 0 else 0.0,
            "latency_ms": tally.latency.summary(),
            "live_latency_ms": tally.live_latency.summary(),
            "lost": tally.lost,
            "duplicated": tally.duplicated,
            "gaps": tally.gaps,
            "drops": tally.drops,
            "reconnects": tally.reconnects,
            "resumes": tally.resumes,
            "replayed": tally.replayed,
            "resyncs": tally.resyncs,
            "duplicates_filtered": sum(c.duplicates_dropped for c in clients),
            "close_codes": dict(sorted(tally.close_codes.items())),
            "chaos": {**chaos, "skipped": skipped, "pause_seconds": dict(self.chaos.pause_seconds)},
            "published": {"rate": options.publish_rate, "acknowledged": tally.published["acknowledged"],
                          "errors": tally.published["errors"], "skipped": tally.published["skipped"]},
            "ok": ok,
        }
        if self.failure:
            body["failure"] = self.failure
        elif stopped:
            body["failure"] = f"{len(stopped)} client(s) stopped: {stopped[0]}"
        return body


# ------------------------------------------------------------ output


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def render(summary: dict[str, Any]) -> str:
    s = summary
    lat, live = s["latency_ms"], s["live_latency_ms"]
    chaos = s["chaos"]
    skipped = ", ".join(f"{v} {k.rsplit('_', 1)[0]}" for k, v in chaos["skipped"].items())
    codes = ", ".join(f"{code}: {n}" for code, n in s["close_codes"].items()) or "none"
    published = s["published"]
    lines = [
        f"stablews loadtest: {s['url']}, {s['clients']} clients on {','.join(s['channels'])}, "
        f"{s['elapsed_seconds']:.1f}s" + (f" (seed {s['seed']})" if s["seed"] is not None else ""),
        f"delivered     {_n(s['delivered'])} messages, {_n(s['delivered_per_second'])}/s",
        f"latency       p50 {_n(lat['p50'])} ms, p99 {_n(lat['p99'])} ms, max {_n(lat['max'])} ms "
        f"(live only: p50 {_n(live['p50'])} ms, p99 {_n(live['p99'])} ms, max {_n(live['max'])} ms)",
        f"lost          {_n(s['lost'])}" + (f" (in {s['gaps']} gaps)" if s["gaps"] else ""),
        f"duplicated    {_n(s['duplicated'])}",
        f"connections   {s['clients_connected']}/{s['clients']} clients connected, {_n(s['drops'])} drops, "
        f"{_n(s['reconnects'])} reconnects",
        f"recovery      {_n(s['resumes'])} resumes ({_n(s['replayed'])} messages replayed), "
        f"{_n(s['resyncs'])} resyncs",
        f"chaos         {chaos['drops']} drops, {chaos['freezes']} freezes, {chaos['stalls']} stalls"
        + (f" (not done: {skipped})" if skipped else ""),
        f"close codes   {codes}",
    ]
    if published["rate"]:
        lines.append(f"published     {_n(published['acknowledged'])} acknowledged at {published['rate']:g}/s, "
                     f"{published['errors']} errors, {published['skipped']} skipped")
    verdict = "OK: nothing lost or duplicated" if s["ok"] else "FAILED: " + (
        s.get("failure") or ("no client connected" if not s["clients_connected"] else "messages lost or duplicated")
    )
    lines.append(f"result        {verdict}")
    return "\n".join(lines)


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


async def _main(options: Options) -> tuple[dict[str, Any], LoadTest]:
    test = LoadTest(options, _say)
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        test.interrupted = True
        test.stop()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, interrupted)
    try:
        what = "until interrupted" if options.forever else f"for {options.duration:g}s"
        _say(f"{options.clients} clients on {','.join(options.channels)} at {options.url} {what} "
             f"(drop rate {options.drop_rate:g}/s, freeze ratio {options.freeze_ratio:g}, "
             f"stall ratio {options.stall_ratio:g}, publish rate {options.publish_rate:g}/s)")
        return await test.run(), test
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def run_loadtest(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """`stablews loadtest`: 0 when nothing was lost or duplicated, 1 otherwise, 2 for a bad option."""
    try:
        options = parse_options(args, settings)
    except BadOption as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    summary, test = asyncio.run(_main(options))
    if options.json:
        print(json.dumps(summary, separators=(",", ":")), flush=True)
    else:
        print(render(summary), flush=True)
    if test.failure is not None:
        _say(test.failure)
        return test.failure_status
    return 0 if summary["ok"] else 1
