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

Each time the client reconnects and resumes.

Large N: with `--processes` above 1 the main process only coordinates. It starts worker processes
(`stablews loadtest URL --worker`, the spec on stdin), each running its share of the clients,
of the publish rate and of the drop rate, and merges what they send back as JSON lines on
their stdout: progress figures, then their `Outcome` (a `Tally` and a few counts). Several URLs:
each client gets them all (the client moves to the next one on failure), its first one
round robin over the clients, so the load is spread over the instances.

Layout: `Options` (validated flags), `Tally` (mergeable, serialisable figures), `Probe` (one
client and its checks), `Chaos`, `Publisher`, `LoadTest` (one process's run), `Outcome` (its end
state), `Coordinator` and `run_worker` (several processes), `summary`/`render`.

Docs: docs/loadtest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
CLIENTS_PER_PROCESS = 2000  # `--processes auto`: one process per this many clients (one loop stays responsive)
MAX_PROCESSES = 256
FD_MARGIN = 64  # open files a process needs besides its clients' sockets (stdio, pipes, epoll, DNS)
WORKER_START_DEADLINE = 30.0  # seconds for every worker to start (imports, under load) and say it is ready
WORKER_REPORT_INTERVAL = 1.0  # longest gap between a worker's progress figures
STOP_DEADLINE = CLOSE_DEADLINE + 10.0  # seconds for a worker to stop, close its clients and send its figures
READ_LIMIT = 16 * 1024 * 1024  # longest JSON line read from a worker


class BadOption(Exception):
    """A flag with a value the load test cannot use: one line, exit 2."""


# ------------------------------------------------------------ options


@dataclass(frozen=True, slots=True)
class Options:
    url: str  # the first of `urls`
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
    urls: tuple[str, ...] = ()  # every server URL; () means (url,)
    processes: int | None = 1  # None: auto (plan_processes)
    first_client: int = 0  # in a worker: the run-wide index of its first client (spreads the URLs)

    def __post_init__(self) -> None:
        if not self.urls:
            object.__setattr__(self, "urls", (self.url,))

    def urls_for(self, index: int) -> list[str]:
        """The URLs of the run's client `index`: all of them, starting round robin, so the first
        connections are spread evenly over the instances and a failure moves on to the next."""
        k = (self.first_client + index) % len(self.urls)
        return [*self.urls[k:], *self.urls[:k]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Options:
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        data["urls"] = tuple(data["urls"])
        data["policy"] = RecoveryPolicy(**data["policy"])
        return cls(**data)

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


def _urls(raw: Any) -> tuple[str, ...]:
    """URL arguments, repeated and/or comma-separated; the same URL twice counts once."""
    given = [raw] if isinstance(raw, str) else list(raw or [])
    urls = tuple(dict.fromkeys(u.strip() for text in given for u in str(text).split(",") if u.strip()))
    if not urls:
        raise BadOption(f"URL: expected a ws:// or wss:// URL, got {','.join(map(str, given))!r}")
    for url in urls:
        if not url.startswith(("ws://", "wss://")):
            raise BadOption(f"URL: expected a ws:// or wss:// URL, got {url!r}")
    return urls


def _processes(raw: Any, clients: int) -> int | None:
    text = str(raw)
    if text == "auto":
        return None
    try:
        value = int(text)
        if not 1 <= value <= MAX_PROCESSES:
            raise ValueError
    except ValueError:
        raise BadOption(f"--processes: expected a whole number from 1 to {MAX_PROCESSES} or auto, "
                        f"got {text!r}") from None
    if value > clients:
        raise BadOption(f"--processes: {value} processes for {clients} client(s): give at most --clients")
    return value


def parse_options(args: argparse.Namespace, settings: Settings | None = None) -> Options:
    """Validate the flags of `stablews loadtest` (raises BadOption)."""
    urls = _urls(args.url)
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
    clients = int(_number("--clients", args.clients, low=1, high=100_000, whole=True))
    return Options(
        url=urls[0],
        urls=urls,
        processes=_processes(getattr(args, "processes", "1"), clients),
        clients=clients,
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

    def to_json(self) -> dict[str, Any]:
        """Sparse: only the buckets in use, as [index, count] pairs (a worker's figures on a pipe)."""
        return {"count": self.count, "max": self.max, "buckets": [[i, n] for i, n in enumerate(self.counts) if n]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyHistogram:
        out = cls()
        for i, n in data["buckets"]:
            out.counts[min(max(int(i), 0), cls.BUCKETS - 1)] += int(n)
        out.count = int(data["count"])
        out.max = float(data["max"])
        return out


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

    def to_json(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.COUNTERS},
                "close_codes": dict(self.close_codes), "chaos": dict(self.chaos), "published": dict(self.published),
                "latency": self.latency.to_json(), "live_latency": self.live_latency.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        return cls(**{name: int(data[name]) for name in cls.COUNTERS},
                   close_codes=Counter(data["close_codes"]), chaos=Counter(data["chaos"]),
                   published=Counter(data["published"]), latency=LatencyHistogram.from_json(data["latency"]),
                   live_latency=LatencyHistogram.from_json(data["live_latency"]))


@dataclass
class Outcome:
    """One process's end state: the Tally and what the summary needs beyond it. Mergeable and
    serialisable, so a run over several processes ends with the same summary as one over one."""

    tally: Tally = field(default_factory=Tally)
    elapsed: float = 0.0  # seconds of measurement
    clients: int = 0
    clients_connected: int = 0  # reached a verified connection at least once
    clients_stopped: int = 0  # stopped for good
    stop_reason: str | None = None  # why the first of them stopped
    connected_in: float | None = None  # seconds until the last client first connected; None: not all did
    duplicates_filtered: int = 0
    pause_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    failure: str | None = None
    failure_status: int = 1

    def merge(self, other: Outcome) -> None:
        self.tally.merge(other.tally)
        self.elapsed = max(self.elapsed, other.elapsed)  # the workers start together (a barrier)
        all_in = self.clients_connected == self.clients and other.clients_connected == other.clients
        self.connected_in = (max(self.connected_in or 0.0, other.connected_in or 0.0) if all_in else None)
        self.clients += other.clients
        self.clients_connected += other.clients_connected
        self.clients_stopped += other.clients_stopped
        self.stop_reason = self.stop_reason or other.stop_reason
        self.duplicates_filtered += other.duplicates_filtered
        for kind, seconds in other.pause_seconds.items():
            self.pause_seconds[kind] = max(seconds, self.pause_seconds.get(kind, 0.0))
        self.interrupted = self.interrupted or other.interrupted
        if self.failure is None and other.failure is not None:
            self.failure, self.failure_status = other.failure, other.failure_status

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tally"},
                "tally": self.tally.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        data = dict(data)
        return cls(**{**data, "tally": Tally.from_json(data["tally"])})


# ------------------------------------------------------------ one client


class Probe:
    """One StableClient and the checks on what it delivers: per channel, offsets contiguous within an epoch."""

    def __init__(self, index: int, client: StableClient, tally: Tally,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.client = client
        self.tally = tally
        self.clock = clock
        self.first_connected: float | None = None  # clock() at the first verified connection
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
            self.first_connected = self.clock()
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
        count = publishers(options.publish_rate)
        out = []
        for i in range(count):
            client = StableClient(urls=options.urls_for(i), token=options.token, policy=options.policy,
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
    """One process's run: the clients, the publisher, the chaos, progress lines; `run()` returns the summary.

    In a worker, `report` takes the progress figures (the main process prints the lines) and
    `options` is the worker's share."""

    def __init__(self, options: Options, say: Callable[[str], None],
                 report: Callable[[dict[str, int]], None] | None = None) -> None:
        self.options = options
        self.say = say
        self.report = report
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
        self._started = self._loop.time()  # a worker waits for its start signal after it was made
        for i in range(options.clients):
            client = StableClient(urls=options.urls_for(i), channels=options.channels, token=options.token,
                                  policy=options.policy, open_timeout=options.open_timeout,
                                  name="stablews-loadtest", rng=random.Random(self.rng.random()))
            self.probes.append(Probe(i, client, self.tally, clock=self.elapsed))
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

    async def run_outcome(self) -> Outcome:
        await self.run()
        return self.outcome()

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

    def figures(self) -> dict[str, int]:
        """The running figures of a progress line."""
        tally = self.tally
        return {"connected": sum(1 for p in self.probes if p.connected), "clients": len(self.probes),
                "delivered": tally.delivered, "drops": tally.drops, "reconnects": tally.reconnects,
                "resumes": tally.resumes, "resyncs": tally.resyncs, "lost": tally.lost,
                "duplicated": tally.duplicated, "paused": sum(1 for p in self.probes if p.paused)}

    async def _progress(self) -> None:
        interval = self.options.progress_interval
        if self.report is not None:  # a worker: figures to the main process, often enough for its lines
            interval = min(WORKER_REPORT_INTERVAL, interval / 2)
        last_t, last_delivered = self.elapsed(), 0
        while not self.stopping:
            await self.sleep(interval)
            if self.stopping:
                return
            figures = self.figures()
            if self.report is not None:
                self.report(figures)
                continue
            now = self.elapsed()
            rate = (figures["delivered"] - last_delivered) / max(now - last_t, 1e-9)
            last_t, last_delivered = now, figures["delivered"]
            self.say(progress_line(now, figures, rate))

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

    def outcome(self) -> Outcome:
        clients = [p.client for p in self.probes]
        stopped = [c.error for c in clients if c.error is not None]
        firsts = [p.first_connected for p in self.probes]
        return Outcome(
            tally=self.tally,
            elapsed=self.stopped_at if self.stopped_at is not None else self.elapsed(),
            clients=len(self.probes),
            clients_connected=sum(1 for p in self.probes if p.ever_connected),
            clients_stopped=len(stopped),
            stop_reason=str(stopped[0]) if stopped else None,
            connected_in=max(firsts) if firsts and None not in firsts else None,  # type: ignore[type-var]
            duplicates_filtered=sum(c.duplicates_dropped for c in clients),
            pause_seconds=dict(self.chaos.pause_seconds),
            interrupted=self.interrupted,
            failure=self.failure,
            failure_status=self.failure_status,
        )

    def summary(self) -> dict[str, Any]:
        return summary(self.options, self.outcome())


# ------------------------------------------------------------ output


def progress_line(now: float, f: dict[str, int], rate: float) -> str:
    return (f"t={now:.0f}s connected={f['connected']}/{f['clients']} msgs/s={rate:.1f} drops={f['drops']} "
            f"reconnects={f['reconnects']} resumes={f['resumes']} resyncs={f['resyncs']} lost={f['lost']} "
            f"duplicated={f['duplicated']} paused={f['paused']}")


def summary(options: Options, outcome: Outcome, processes: int = 1,
            workers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The summary of a run, from its (merged) outcome."""
    tally, elapsed = outcome.tally, outcome.elapsed
    failure = outcome.failure
    ok = tally.lost == 0 and tally.duplicated == 0 and tally.connects > 0 and failure is None
    chaos = {"drops": tally.chaos["drops"], "freezes": tally.chaos["freezes"], "stalls": tally.chaos["stalls"]}
    skipped = {k: v for k, v in tally.chaos.items() if k.endswith(("_skipped", "_missed")) and v}
    every_one = outcome.clients == options.clients  # a worker that died sent no figures
    body: dict[str, Any] = {
        "url": options.url,
        "urls": list(options.urls),
        "clients": options.clients,
        "processes": processes,
        "channels": list(options.channels),
        "seed": options.seed,
        "elapsed_seconds": round(elapsed, 3),
        "interrupted": outcome.interrupted,
        "clients_connected": outcome.clients_connected,
        "clients_stopped": outcome.clients_stopped,
        "connected_in_seconds": (round(outcome.connected_in, 3)
                                 if outcome.connected_in is not None and every_one else None),
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
        "duplicates_filtered": outcome.duplicates_filtered,
        "close_codes": dict(sorted(tally.close_codes.items())),
        "chaos": {**chaos, "skipped": skipped, "pause_seconds": dict(outcome.pause_seconds)},
        "published": {"rate": options.publish_rate, "acknowledged": tally.published["acknowledged"],
                      "errors": tally.published["errors"], "skipped": tally.published["skipped"]},
    }
    if workers is not None:
        body["workers"] = workers
    body["ok"] = ok
    if failure:
        body["failure"] = failure
    elif outcome.clients_stopped:
        body["failure"] = f"{outcome.clients_stopped} client(s) stopped: {outcome.stop_reason}"
    return body


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def render(summary: dict[str, Any]) -> str:
    s = summary
    lat, live = s["latency_ms"], s["live_latency_ms"]
    chaos = s["chaos"]
    skipped = ", ".join(f"{v} {k.rsplit('_', 1)[0]}" for k, v in chaos["skipped"].items())
    codes = ", ".join(f"{code}: {n}" for code, n in s["close_codes"].items()) or "none"
    published = s["published"]
    urls = ",".join(s.get("urls") or [s["url"]])
    processes = s.get("processes", 1)
    within = s.get("connected_in_seconds")
    lines = [
        f"stablews loadtest: {urls}, {s['clients']} clients on {','.join(s['channels'])}, "
        f"{s['elapsed_seconds']:.1f}s" + (f", {processes} processes" if processes > 1 else "")
        + (f" (seed {s['seed']})" if s["seed"] is not None else ""),
        f"delivered     {_n(s['delivered'])} messages, {_n(s['delivered_per_second'])}/s",
        f"latency       p50 {_n(lat['p50'])} ms, p99 {_n(lat['p99'])} ms, max {_n(lat['max'])} ms "
        f"(live only: p50 {_n(live['p50'])} ms, p99 {_n(live['p99'])} ms, max {_n(live['max'])} ms)",
        f"lost          {_n(s['lost'])}" + (f" (in {s['gaps']} gaps)" if s["gaps"] else ""),
        f"duplicated    {_n(s['duplicated'])}",
        f"connections   {s['clients_connected']}/{s['clients']} clients connected"
        + (f" (all within {within:.1f}s)" if within is not None else "") + f", {_n(s['drops'])} drops, "
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


def _banner(options: Options, processes: int) -> str:
    what = "until interrupted" if options.forever else f"for {options.duration:g}s"
    spread = f" in {processes} processes" if processes > 1 else ""
    return (f"{options.clients} clients on {','.join(options.channels)} at {', '.join(options.urls)} {what}{spread} "
            f"(drop rate {options.drop_rate:g}/s, freeze ratio {options.freeze_ratio:g}, "
            f"stall ratio {options.stall_ratio:g}, publish rate {options.publish_rate:g}/s)")


# ------------------------------------------------------------ processes and open files


def raise_open_files() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every client holds a socket); return the limit in force."""
    try:
        import resource
    except ImportError:  # no such limit on this platform
        return sys.maxsize
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. an unlimited hard limit the kernel caps lower
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def publishers(rate: float) -> int:
    """Publisher connections for `rate` messages/s: each stays under the server's per-connection rate limit."""
    return max(1, math.ceil(rate / PUBLISH_RATE_PER_CONNECTION)) if rate > 0 else 0


def plan_processes(options: Options, open_files: int, cpus: int) -> int:
    """How many processes run the clients (raises BadOption when a share cannot fit).

    auto: one process up to CLIENTS_PER_PROCESS clients, else one per CLIENTS_PER_PROCESS clients
    up to the CPU count (more processes than CPUs only share them); and in any case enough
    processes for each share's sockets to fit the open-file limit."""
    n = options.clients
    extra = FD_MARGIN + publishers(options.publish_rate)
    room = open_files - extra  # sockets one process can give its clients
    if options.processes is None:
        wanted = 1 if n <= CLIENTS_PER_PROCESS else min(cpus, math.ceil(n / CLIENTS_PER_PROCESS))
        processes = min(n, max(wanted, math.ceil(n / room) if room > 0 else MAX_PROCESSES + 1))
    else:
        processes = options.processes
    share = math.ceil(n / processes)
    if share > room or processes > MAX_PROCESSES:
        need = math.ceil(n / room) if room > 0 else MAX_PROCESSES + 1
        hint = (f"give --processes {need} or more, or raise the hard limit (ulimit -Hn)" if need <= MAX_PROCESSES
                else "raise the hard limit (ulimit -Hn)")
        raise BadOption(f"--clients {n}: {share:,} clients in one process need about {share + extra:,} open files, "
                        f"and a process may open {open_files:,} (RLIMIT_NOFILE, raised to its hard limit); {hint}")
    return processes


def worker_seed(seed: int, index: int) -> int:
    """A worker's seed: the same --seed gives each worker the same choices again, and the workers different ones."""
    digest = hashlib.sha256(f"stablews-loadtest:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def shares(options: Options, processes: int, seed: int) -> list[Options]:
    """Each worker's part of the run: a contiguous run of the clients, and an even part of the publish
    and drop rates (so the totals are as asked). Freeze and stall ratios apply within each worker."""
    out, first = [], 0
    for i in range(processes):
        count = options.clients // processes + (1 if i < options.clients % processes else 0)
        out.append(dataclasses.replace(options, clients=count, first_client=first, processes=1,
                                       publish_rate=options.publish_rate / processes,
                                       drop_rate=options.drop_rate / processes, seed=worker_seed(seed, i)))
        first += count
    return out


def _port_note(options: Options) -> str | None:
    """Connections to one address and port each take a local port: beyond the range, connects fail."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    ports = high - low + 1
    per_url = math.ceil((options.clients + publishers(options.publish_rate)) / len(options.urls))
    if per_url <= ports:
        return None
    return (f"note: {per_url:,} connections to one URL need as many local ports, and net.ipv4.ip_local_port_range "
            f"gives {ports:,}: the rest will fail to connect; give more URLs (instances or addresses) or widen "
            "the range")


# ------------------------------------------------------------ one process


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
        _say(_banner(options, 1))
        return await test.run(), test
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


# ------------------------------------------------------------ several processes


@dataclass
class Worker:
    """The main process's view of one worker process."""

    index: int
    options: Options  # its share
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    figures: dict[str, int] = field(default_factory=dict)  # its latest progress figures
    outcome: Outcome | None = None
    exit_status: int | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=5))

    def describe(self, of: int) -> str:
        first = self.options.first_client
        return f"worker {self.index + 1} of {of} (clients {first}-{first + self.options.clients - 1})"


def _exit_text(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
        return f"killed by signal {-status}"
    return f"exit status {status}"


class Coordinator:
    """The main process of a run over several processes. It starts the workers, starts their clocks
    together once all are ready, prints the merged progress lines, stops them all on a signal, a
    failure or a death, and merges their outcomes into one summary.

    Worker protocol. stdin: the spec (one JSON line), then `start`, then `stop`; its end (the main
    process is gone) also stops the worker. stdout: JSON lines `ready`, `progress`, `say`, then
    `result` with the worker's Outcome."""

    def __init__(self, options: Options, processes: int, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        seed = options.seed if options.seed is not None else random.SystemRandom().getrandbits(63)
        self.workers = [Worker(i, share) for i, share in enumerate(shares(options, processes, seed))]
        self.interrupted = False
        self.failure: str | None = None
        self.failure_status = 1
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # something changed: a message, an exit, a stop
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._said: set[str] = set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def fail(self, message: str, status: int = 1) -> None:
        if self.failure is None:
            self.failure, self.failure_status = message, status
        self.stop()

    async def _changed(self) -> None:
        await self._wake.wait()
        self._wake.clear()  # the caller checks its condition again: nothing set after this is missed

    async def run(self) -> dict[str, Any]:
        followers: list[asyncio.Task[None]] = []
        progress: asyncio.Task[None] | None = None
        try:
            for worker in self.workers:
                await self._spawn(worker)
                followers.append(asyncio.create_task(self._follow(worker), name=f"loadtest-worker-{worker.index}"))
            if await self._until_ready():
                self._started = self._loop.time()
                for worker in self.workers:
                    await self._send(worker, "start")
                if self.options.progress_interval > 0:
                    progress = asyncio.create_task(self._progress(), name="loadtest-progress")
                await self._until_done(followers)
            if progress is not None:
                progress.cancel()
            await self._stop_all(followers)
        finally:
            if progress is not None:
                progress.cancel()
            for worker in self.workers:  # only after an error here: every worker has ended by now
                if worker.proc is not None and worker.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.kill()
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, *([progress] if progress else []), return_exceptions=True)
        return self.summary()

    async def _spawn(self, worker: Worker) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where `stablews` is imported from here
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stablews", "loadtest", self.options.url, "--worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=READ_LIMIT, env=env,
            start_new_session=True,  # a Ctrl-C reaches only this process, which then stops the workers in order
        )
        spec = {"options": worker.options.to_json(), "worker": worker.index, "workers": len(self.workers)}
        await self._send(worker, json.dumps(spec, separators=(",", ":")))

    async def _send(self, worker: Worker, line: str) -> None:
        stdin = worker.proc.stdin if worker.proc is not None else None
        if stdin is None or stdin.is_closing():
            return
        try:
            stdin.write(line.encode() + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it has ended: _follow says why

    async def _follow(self, worker: Worker) -> None:
        """Read a worker's messages until it ends; a worker that ends without its figures fails the run."""
        proc = worker.proc
        assert proc is not None and proc.stdout is not None
        errors = asyncio.create_task(self._stderr(worker))
        try:
            async for raw in proc.stdout:
                try:
                    message = json.loads(raw)
                except ValueError:  # not ours (something printed to stdout): keep it for a post-mortem
                    worker.stderr_tail.append(raw.decode(errors="replace").rstrip())
                    continue
                self._handle(worker, message)
        except (ValueError, asyncio.LimitOverrunError) as exc:  # a line beyond READ_LIMIT
            self.fail(f"{worker.describe(len(self.workers))} sent an unreadable line ({exc}); stopped")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        worker.exit_status = await proc.wait()
        await errors
        if worker.outcome is None:
            last = next((line for line in reversed(worker.stderr_tail) if line.strip()), None)
            self.fail(f"{worker.describe(len(self.workers))} died ({_exit_text(worker.exit_status)}) before "
                      f"sending its figures; the summary covers the other workers"
                      + (f"; its last line: {last}" if last else ""))
        self._wake.set()

    async def _stderr(self, worker: Worker) -> None:
        """Pass a worker's own stderr on (warnings, a traceback), and keep its last lines."""
        proc = worker.proc
        assert proc is not None and proc.stderr is not None
        with contextlib.suppress(ValueError, asyncio.LimitOverrunError):
            async for raw in proc.stderr:
                text = raw.decode(errors="replace").rstrip()
                if text:
                    worker.stderr_tail.append(text)
                    self.say(f"worker {worker.index + 1}: {text}")

    def _handle(self, worker: Worker, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            worker.ready = True
        elif kind == "progress":
            worker.figures = message["figures"]
        elif kind == "say":
            text = str(message["text"])
            if text not in self._said:  # every worker notes the same things: say each once
                self._said.add(text)
                self.say(text)
        elif kind == "result":
            worker.outcome = Outcome.from_json(message["outcome"])
            if worker.outcome.failure is not None:  # e.g. publishes refused: the run is over for all
                self.fail(worker.outcome.failure, worker.outcome.failure_status)
        self._wake.set()

    async def _until_ready(self) -> bool:
        """Wait until every worker is ready (or the run stops): a barrier, so their clocks start together."""
        try:
            async with asyncio.timeout(WORKER_START_DEADLINE):
                while not self._stop.is_set() and not all(w.ready for w in self.workers):
                    await self._changed()
        except TimeoutError:
            late = next(w for w in self.workers if not w.ready)
            self.fail(f"{late.describe(len(self.workers))} did not start within {WORKER_START_DEADLINE:g}s")
        return not self._stop.is_set()

    async def _until_done(self, followers: list[asyncio.Task[None]]) -> None:
        deadline = None if self.options.forever else self.options.duration + STOP_DEADLINE
        try:
            async with asyncio.timeout(deadline):
                while not self._stop.is_set() and not all(task.done() for task in followers):
                    await self._changed()
        except TimeoutError:
            late = next(w for w in self.workers if w.outcome is None)
            self.fail(f"{late.describe(len(self.workers))} did not finish within {deadline:g}s")

    async def _stop_all(self, followers: list[asyncio.Task[None]]) -> None:
        """Ask every worker still running to stop; kill those that have not sent their figures in time."""
        for worker in self.workers:
            if worker.outcome is None:
                await self._send(worker, "stop")
        pending = [task for task in followers if not task.done()]
        if pending:
            _, pending_set = await asyncio.wait(pending, timeout=STOP_DEADLINE)
            if pending_set:
                for worker in self.workers:
                    if worker.outcome is None and worker.proc is not None and worker.proc.returncode is None:
                        self.fail(f"{worker.describe(len(self.workers))} did not stop within {STOP_DEADLINE:g}s: "
                                  "killed")
                        with contextlib.suppress(ProcessLookupError):
                            worker.proc.kill()
                await asyncio.wait(pending_set, timeout=5.0)

    async def _progress(self) -> None:
        interval = self.options.progress_interval
        last_t, last_delivered = 0.0, 0
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time() - self._started
            names = ("connected", "delivered", "drops", "reconnects", "resumes", "resyncs", "lost", "duplicated",
                     "paused")
            figures = {name: sum(w.figures.get(name, 0) for w in self.workers) for name in names}
            figures["clients"] = self.options.clients
            rate = (figures["delivered"] - last_delivered) / max(now - last_t, 1e-9)
            last_t, last_delivered = now, figures["delivered"]
            self.say(progress_line(now, figures, rate))

    def summary(self) -> dict[str, Any]:
        merged = Outcome()
        entries = []
        for worker in self.workers:
            outcome = worker.outcome
            entry: dict[str, Any] = {"worker": worker.index + 1, "clients": worker.options.clients,
                                     "first_client": worker.options.first_client,
                                     "pid": worker.proc.pid if worker.proc is not None else None,
                                     "reported": outcome is not None}
            if outcome is not None:
                merged.merge(outcome)
                tally = outcome.tally
                entry.update({"clients_connected": outcome.clients_connected, "delivered": tally.delivered,
                              "lost": tally.lost, "duplicated": tally.duplicated, "drops": tally.drops,
                              "reconnects": tally.reconnects, "resumes": tally.resumes,
                              "elapsed_seconds": round(outcome.elapsed, 3)})
            else:
                entry["exit_status"] = worker.exit_status
            entries.append(entry)
        merged.interrupted = merged.interrupted or self.interrupted
        if self.failure is not None:  # the first failure in time, whichever process it came from
            merged.failure, merged.failure_status = self.failure, self.failure_status
        return summary(self.options, merged, processes=len(self.workers), workers=entries)


async def _run_many(options: Options, processes: int) -> tuple[dict[str, Any], Coordinator]:
    coordinator = Coordinator(options, processes, _say)
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        coordinator.interrupted = True
        coordinator.stop()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, interrupted)
    try:
        _say(_banner(options, processes))
        return await coordinator.run(), coordinator
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


class _Pipe:
    """A worker's JSON lines to the main process, on its stdout."""

    def __init__(self) -> None:
        self.broken = False
        self.on_broken: Callable[[], None] | None = None

    def send(self, message: dict[str, Any]) -> None:
        if self.broken:
            return
        try:
            sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
            sys.stdout.flush()
        except OSError:  # the main process is gone: nobody to report to
            self.broken = True
            with contextlib.suppress(OSError):  # so that the interpreter's last flush stays quiet
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            if self.on_broken is not None:
                self.on_broken()


def run_worker() -> int:
    """A worker process (`stablews loadtest URL --worker`, started by a Coordinator)."""
    raise_open_files()  # the parent's raised limit is inherited; raise again in case another process started this
    return asyncio.run(_worker())


async def _worker() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        options = Options.from_json(json.loads(await reader.readline())["options"])
    except (ValueError, KeyError, TypeError):
        print(f"{PROG}: --worker is for the tool's own worker processes: no spec on stdin", file=sys.stderr)
        return 2
    pipe = _Pipe()
    go = asyncio.Event()
    halted = False  # stopped before the start
    test: LoadTest | None = None

    def halt(interrupt: bool) -> None:
        nonlocal halted
        if test is None:
            halted = True
        else:
            test.interrupted = test.interrupted or interrupt
            test.stop()
        go.set()

    async def control() -> None:
        while True:
            line = (await reader.readline()).strip()
            if line == b"start":
                go.set()
                continue
            halt(False)  # `stop`, or the end of stdin: the main process stops the run, or is gone
            return

    pipe.on_broken = lambda: halt(False)
    for sig in (signal.SIGINT, signal.SIGTERM):  # sent to this process directly: stop and report
        loop.add_signal_handler(sig, halt, True)
    controller = asyncio.create_task(control(), name="loadtest-control")
    pipe.send({"type": "ready"})
    await go.wait()
    if halted:
        outcome = Outcome(clients=options.clients)
    else:
        test = LoadTest(options, lambda text: pipe.send({"type": "say", "text": text}),
                        report=lambda figures: pipe.send({"type": "progress", "figures": figures}))
        outcome = await test.run_outcome()
    pipe.send({"type": "result", "outcome": outcome.to_json()})
    controller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await controller
    return 0


def run_loadtest(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """`stablews loadtest`: 0 when nothing was lost or duplicated, 1 otherwise, 2 for a bad option."""
    if getattr(args, "worker", False):
        return run_worker()
    try:
        options = parse_options(args, settings)
        open_files = raise_open_files()
        processes = plan_processes(options, open_files, cpu_count())
    except BadOption as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    note = _port_note(options)
    if note:
        _say(note)
    runner: LoadTest | Coordinator
    if processes == 1:
        summary_, runner = asyncio.run(_main(options))
    else:
        summary_, runner = asyncio.run(_run_many(options, processes))
    if options.json:
        print(json.dumps(summary_, separators=(",", ":")), flush=True)
    else:
        print(render(summary_), flush=True)
    if runner.failure is not None:
        _say(runner.failure)
        return runner.failure_status
    return 0 if summary_["ok"] else 1
