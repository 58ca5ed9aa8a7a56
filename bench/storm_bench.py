"""Reconnect-storm benchmark: a graceful restart of one `stablews serve` under N recovering clients.

A `redis-server` is started on a free loopback port (broker_bench.Redis), so a channel's stream
and its history outlive the server process. One `stablews serve --broker redis://...` runs on
127.0.0.1; N `StableClient`s (the project's client, default options) in `--processes` worker
processes (this script with --worker) subscribe to one channel, while a publisher posts
`--rate` publications a second to `POST /api/v1/publish` (retrying while the server is down)
and records each acknowledged offset. Once every client is receiving:

1. SIGTERM to the server: it drains (`reconnect` advice with `after_ms` spread over
   min(max_reconnect_delay, max(reconnect_delay, N / 1000)) s, then 1001) and exits;
2. a new `stablews serve` starts on the same port with the same broker, so the clients come
   back to the same URL and resume from their positions.

Reported, from the SIGTERM (time.monotonic(): CLOCK_MONOTONIC, one clock for every process):

- when each client resumed (its `recovered` event): the last one (target 15 s), p50, p99;
- lost (an offset skipped within an epoch, or an acknowledged one never received) and
  duplicated messages, and resyncs (`recovered: false`): all must be 0;
- the event-loop lag of the new server over its life up to the end of the storm (its
  `stablews_event_loop_lag_seconds` histogram on /metrics, p99 and the max from /stats), and of
  the old one during its drain (scraped on a keep-alive connection opened before the signal);
- the drain (signal -> exit) and the restart downtime (signal -> the new server listening),
  the CPU used by the server and the workers during the storm, the workers' own loop lag.

Clients not resumed `--deadline` seconds after the signal are a problem, as is any loss.

    python bench/storm_bench.py                      # 5,000 clients in 4 workers
    python bench/storm_bench.py --quick              # 200 clients in 2 workers, correctness only
    python bench/storm_bench.py --clients 2000 --processes 2 --output /tmp/storm.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

import core_bench
import figures
from benchlib import (
    BENCH_DIR,
    HOST,
    BenchError,
    Json,
    ServerProcess,
    WorkerProcess,
    emit,
    http_get_json,
    raise_nofile_limit,
    run_bench,
    service_revision,
    start_workers,
    stdin_reader,
    text_table,
)
from broker_bench import Redis

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "storm_bench.json"
CHANNEL = "bench.storm"
API_KEY = "storm-bench-key-0123456789abcdef"
TARGET_SECONDS = 15.0  # all clients resumed after the signal
LAG_TARGET_MS = 100.0
LAG_METRIC = "stablews_event_loop_lag_seconds"
WORKER_STREAM_LIMIT = 64 * 1024 * 1024  # a worker's `resumed` line holds one record per client
EXIT_GRACE = 30.0  # beyond shutdown_timeout, before the old server is killed
# stablews defaults (configuration.md): the shutdown spread of after_ms.
RECONNECT_DELAY = 1.0
MAX_RECONNECT_DELAY = 30.0


def documented_spread(clients: int) -> float:
    return min(MAX_RECONNECT_DELAY, max(RECONNECT_DELAY, clients / 1000))


@dataclass
class Options:
    clients: int = 5000
    processes: int = 4
    rate: float = 2.0  # publications a second: 10,000 deliveries/s at 5,000 clients, below saturation here
    settle: float = 2.0  # seconds of traffic to every client before the signal
    after: float = 2.0  # seconds of traffic after the last resume, before the final count
    deadline: float = 60.0  # seconds after the signal for every client to resume
    concurrency: int = 50  # initial connects in flight per worker
    shutdown_timeout: float = 10.0  # the server's drain deadline (its default)
    lag_interval: float = 0.1  # the server's loop-lag sampling period (default 0.5 s: too few samples)
    open_timeout: float = 10.0  # the client's handshake deadline per attempt (its default)
    python: str = sys.executable


# =================================================================== workers
#
# A worker runs `count` StableClients and answers commands on stdin with one JSON event on
# stdout each: ready (after the first connects), receiving, resumed, report, closed.


class Track:
    """What one client's application saw: positions, the drop, the resume."""

    __slots__ = ("attempts_mark", "connected_at", "count", "disconnected_at", "drops", "epoch", "epochs", "first",
                 "last", "missing", "recovered_at", "repeated", "resync_at")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.epochs = 0  # epoch changes seen
        self.first = 0
        self.last = 0
        self.count = 0
        self.missing = 0  # offsets skipped within an epoch
        self.repeated = 0  # offsets delivered again within an epoch
        self.drops = 0
        self.attempts_mark = 0
        self.disconnected_at: float | None = None
        self.connected_at: float | None = None
        self.recovered_at: float | None = None
        self.resync_at: float | None = None

    def on_message(self, msg: Json) -> None:
        epoch, offset = msg["epoch"], msg["offset"]
        if epoch != self.epoch:
            if self.epoch is not None:
                self.epochs += 1
            self.epoch, self.first, self.last = epoch, offset, offset
        elif offset == self.last + 1:
            self.last = offset
        elif offset <= self.last:
            self.repeated += 1
            return
        else:
            self.missing += offset - self.last - 1
            self.last = offset
        self.count += 1


class LagSampler:
    """This worker's own event-loop lag: how late a 0.1 s sleep wakes up."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (due, lag)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            self.samples.append((due, time.monotonic() - due))

    def since(self, start: float) -> Json:
        lags = sorted(lag for due, lag in self.samples if due >= start)
        p99 = figures.percentile(lags, 0.99)
        return {"samples": len(lags), "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "max_ms": round(lags[-1] * 1000, 1) if lags else None}


async def worker_main(spec: Json) -> int:
    sys.path.insert(0, str(BENCH_DIR.parent / "service"))
    from stablews.client import ClientClosed, StableClient

    stdin = await stdin_reader()
    lag = LagSampler()
    clients: list[StableClient] = []
    tracks: list[Track] = []
    for _ in range(spec["count"]):
        client = StableClient(spec["url"], channels=[CHANNEL], name="storm_bench", open_timeout=spec["open_timeout"])
        track = Track()
        client.on("message", track.on_message)

        def dropped(info: Json, track: Track = track) -> None:
            track.drops += 1
            if track.disconnected_at is None:
                track.disconnected_at = time.monotonic()

        def connected(info: Json, track: Track = track) -> None:
            if track.disconnected_at is not None and track.connected_at is None:
                track.connected_at = time.monotonic()

        def recovered(channel: str, replayed: int, track: Track = track) -> None:
            if track.recovered_at is None:
                track.recovered_at = time.monotonic()

        def resynced(channel: str, info: Json, track: Track = track) -> None:
            if track.resync_at is None and track.disconnected_at is not None:
                track.resync_at = time.monotonic()

        client.on("disconnected", dropped)
        client.on("connected", connected)
        client.on("recovered", recovered)
        client.on("resync", resynced)
        clients.append(client)
        tracks.append(track)

    gate = asyncio.Semaphore(spec["concurrency"])
    failed: list[str] = []

    async def start(client: StableClient) -> None:
        async with gate:
            await client.connect()
            try:
                await client.wait_connected(60)
            except (TimeoutError, ClientClosed) as exc:
                failed.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    await asyncio.gather(*(start(c) for c in clients))
    emit({"event": "ready", "connected": len(clients) - len(failed), "failed": len(failed),
          "first_error": failed[0] if failed else None, "seconds": round(time.monotonic() - started, 3)})

    async def until(done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done():
            await asyncio.sleep(0.05)

    while line := await stdin.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "receiving":
            await until(lambda: all(t.count for t in tracks), cmd["timeout"])
            for client, track in zip(clients, tracks, strict=True):
                track.attempts_mark = client.recovery.attempts
            emit({"event": "receiving", "receiving": sum(1 for t in tracks if t.count)})
        elif cmd["cmd"] == "resumed":
            await until(lambda: all(t.recovered_at or t.resync_at for t in tracks), cmd["timeout"])
            stuck = [c.recovery_stats() for c, t in zip(clients, tracks, strict=True)
                     if not (t.recovered_at or t.resync_at)]
            emit({
                "event": "resumed",
                "recovered_at": [t.recovered_at for t in tracks],
                "resync_at": [t.resync_at for t in tracks],
                "disconnected_at": [t.disconnected_at for t in tracks],
                "connected_at": [t.connected_at for t in tracks],
                "attempts": [c.recovery.attempts - t.attempts_mark for c, t in zip(clients, tracks, strict=True)],
                "drops": [t.drops for t in tracks],
                "lag": lag.since(cmd["since"]),
                "stuck": [{k: s.get(k) for k in ("state", "attempts", "failures", "circuit_state", "last_close")}
                          for s in stuck[:5]],
            })
        elif cmd["cmd"] == "report":
            last, epoch = cmd["last"], cmd["epoch"]

            def level(t: Track, last: int = last, epoch: str = epoch) -> bool:
                return t.epoch == epoch and t.last >= last

            await until(lambda: all(level(t) for t in tracks), cmd["timeout"])
            # From its first publication on (it may have subscribed after offset 1), every offset to `last`.
            lost = sum(last if t.epoch != epoch else t.missing + max(0, last - t.last) for t in tracks)
            emit({
                "event": "report",
                "lost": lost,
                "duplicated": sum(t.repeated for t in tracks),
                "short": sum(1 for t in tracks if not level(t)),
                "epoch_changes": sum(t.epochs for t in tracks),
                "received": sum(t.count for t in tracks),
                "late_start": sum(1 for t in tracks if t.first > 1),
                "resyncs": sum(c.resynced for c in clients),
                "gaps": sum(c.gaps for c in clients),
                "duplicates_dropped": sum(c.duplicates_dropped for c in clients),
                "replayed": sum(c.replayed for c in clients),
                "states": dict(Counter(c.state for c in clients)),
            })
        elif cmd["cmd"] == "close":
            break
    # Stdin closed (the parent is gone) or `close`: a bounded close of every client.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    lag.task.cancel()
    emit({"event": "closed"})
    return 0


# =================================================================== servers and HTTP


@dataclass
class Server(ServerProcess):
    drained: Json | None = None
    notable: list[str] = field(default_factory=list)
    levels: Counter[str] = field(default_factory=Counter)

    def keep(self, line: str) -> None:
        entry: Any = None
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
        if not isinstance(entry, dict):
            return
        level = str(entry.get("level"))
        self.levels[level] += 1
        if entry.get("msg") == "drain finished":
            self.drained = entry
        if level not in ("info", "debug") and len(self.notable) < 20:
            self.notable.append(line[:300])

    def cpu_seconds(self) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.proc.pid).cpu_times()
            return float(times.user + times.system)
        return math.nan


async def start_server(opts: Options, broker: str, instance: str, port: int = 0) -> Server:
    """`stablews serve` on the broker; on `port` (retried while the old listener is still bound) or a free one."""
    flags = ["--broker", broker, "--instance-id", instance, "--event-loop-lag-interval", f"{opts.lag_interval:g}s",
             "--shutdown-timeout", f"{opts.shutdown_timeout:g}s"]
    if port:
        flags += ["--port", str(port)]  # after benchlib's --port 0: the last one wins
    env = {**os.environ, "STABLEWS_API_KEY": API_KEY}
    deadline = time.monotonic() + 10
    while True:
        try:
            return await Server.start("stablews", opts.python, flags, env=env, stdin=asyncio.subprocess.DEVNULL)
        except BenchError as exc:
            if not port or "address already in use" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (no client library: nothing to configure)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "",
                      timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body); OSError, TimeoutError or IncompleteReadError when the connection fails (then closed)."""
        try:
            async with asyncio.timeout(timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                assert self.reader is not None
                self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n{headers}"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await self.writer.drain()
                head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                answer = await self.reader.readexactly(int(fields.get("content-length", "0")))
                if fields.get("connection", "").lower() == "close":
                    self.close()
                return int(head[0].split(" ")[1]), answer
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


HTTP_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError)


class Publisher:
    """`rate` publications a second to POST /api/v1/publish, each retried until acknowledged (the server may be
    down); after a stall the pace resumes from now (no burst to catch up)."""

    def __init__(self, port: int, rate: float) -> None:
        self.http = Http(port)
        self.interval = 1 / rate
        self.acks: list[tuple[float, int, str]] = []  # (monotonic time, offset, epoch)
        self.failures = 0  # attempts without an answer (refused, cut) or not 200
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        headers = f"X-API-Key: {API_KEY}\r\nContent-Type: application/json\r\n"
        seq = 0
        next_at = time.monotonic()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), max(0.0, next_at - time.monotonic()))
                return
            body = json.dumps({"channel": CHANNEL, "data": {"seq": seq}}).encode()
            while not self.stopping.is_set():
                try:
                    status, answer = await self.http.request("POST", "/api/v1/publish", body, headers)
                    if status == 200:
                        reply = json.loads(answer)
                        self.acks.append((time.monotonic(), int(reply["offset"]), str(reply["epoch"])))
                        break
                except HTTP_ERRORS:
                    pass
                self.failures += 1
                await asyncio.sleep(0.05)
            seq += 1
            next_at = max(next_at + self.interval, time.monotonic())

    async def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)
        self.http.close()


def lag_buckets(exposition: str) -> list[tuple[float, float]]:
    """The cumulative (upper bound, count) buckets of the loop-lag histogram, +Inf last."""
    out = []
    for line in exposition.splitlines():
        if line.startswith(LAG_METRIC + "_bucket{"):
            labels, _, rest = line.partition("} ")
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            out.append((math.inf if bound == "+Inf" else float(bound), float(rest.split()[0])))
    return sorted(out)


def bucket_delta(after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
                 ) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


def lag_summary(buckets: Sequence[tuple[float, float]]) -> Json:
    p50, p99 = figures.histogram_quantile(buckets, 0.5), figures.histogram_quantile(buckets, 0.99)
    return {"samples": int(buckets[-1][1]) if buckets else 0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "buckets": [["+Inf" if math.isinf(b) else b, c] for b, c in buckets]}


async def scrape_lag(port: int) -> list[tuple[float, float]]:
    status, body = await Http(port).request("GET", "/metrics", headers="Connection: close\r\n", timeout=10)
    if status != 200:
        raise BenchError(f"GET /metrics: {status}")
    return lag_buckets(body.decode())


class DrainScraper:
    """/metrics of the old server during its drain: its listener is closed at the signal, so the scrapes go on one
    keep-alive connection opened before it, every `interval` seconds until the connection ends."""

    def __init__(self, port: int, interval: float = 0.1) -> None:
        self.http = Http(port)
        self.interval = interval
        self.before: list[tuple[float, float]] = []
        self.last: list[tuple[float, float]] = []
        self.last_at: float | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        status, body = await self.http.request("GET", "/metrics")
        self.before = self.last = lag_buckets(body.decode()) if status == 200 else []

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(*HTTP_ERRORS):
            while True:
                await asyncio.sleep(self.interval)
                status, body = await self.http.request("GET", "/metrics", timeout=2)
                if status == 200:
                    self.last, self.last_at = lag_buckets(body.decode()), time.monotonic()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.http.close()


# =================================================================== one run


def cpu_of(procs: Sequence[asyncio.subprocess.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def run_storm(opts: Options) -> Json:
    """One graceful restart under `opts.clients` clients; the raw results (BenchError when it could not run)."""
    raise_nofile_limit()
    redis = Redis()
    servers: list[Server] = []
    workers: list[WorkerProcess] = []
    publisher: Publisher | None = None
    scraper: DrainScraper | None = None
    raw: Json = {"spread_bound_seconds": documented_spread(opts.clients)}
    try:
        old = await start_server(opts, redis.url, "before")
        servers.append(old)
        port = old.port
        spec = {"url": old.ws_url, "concurrency": opts.concurrency, "open_timeout": opts.open_timeout}
        opened = time.monotonic()
        workers = await start_workers(opts.python, SCRIPT, "stablews", opts.clients, opts.processes, spec,
                                      limit=WORKER_STREAM_LIMIT)
        ready = await asyncio.gather(*(w.event("ready", 180) for w in workers))
        failed = sum(r["failed"] for r in ready)
        if failed:
            first = next(r["first_error"] for r in ready if r["failed"])
            raise BenchError(f"{failed} of {opts.clients} clients did not connect; first error: {first}")
        raw["connect_seconds"] = round(time.monotonic() - opened, 3)
        active = (await http_get_json(port, "/api/v1/websocket/stats"))["connections"]["active"]
        if active != opts.clients:
            raise BenchError(f"the server has {active} connections, not {opts.clients}")

        publisher = Publisher(port, opts.rate)
        for w in workers:
            await w.command({"cmd": "receiving", "timeout": 30})
        receiving = sum(r["receiving"] for r in await asyncio.gather(*(w.event("receiving", 60) for w in workers)))
        if receiving != opts.clients:
            raise BenchError(f"{receiving} of {opts.clients} clients received a publication within 30 s")
        await asyncio.sleep(opts.settle)
        scraper = DrainScraper(port)
        await scraper.open()

        # The restart.
        cpu_before = (old.cpu_seconds(), cpu_of([w.proc for w in workers]))
        reaped_before = children_cpu()
        signalled = time.monotonic()
        old.proc.send_signal(signal.SIGTERM)
        scraper.start()
        for w in workers:  # the workers wait for their clients' resumes meanwhile
            await w.command({"cmd": "resumed", "since": signalled, "timeout": opts.deadline})
        bound = opts.shutdown_timeout + EXIT_GRACE
        try:
            async with asyncio.timeout(bound):
                raw["old_exit_status"] = await old.proc.wait()
        except TimeoutError:
            await old.kill()
            raise BenchError(f"the server was still running {bound:g}s after SIGTERM (killed)") from None
        exited = time.monotonic()
        # psutil cannot see a reaped process: its total comes from the children's rusage, the only one reaped since.
        old_cpu = children_cpu() - reaped_before
        await old.join_reader()
        await scraper.stop()
        new = await start_server(opts, redis.url, "after", port)
        servers.append(new)
        listening = time.monotonic()
        cpu_new_start = new.cpu_seconds()

        reports = await asyncio.gather(*(w.event("resumed", opts.deadline + 60) for w in workers))
        storm_end = time.monotonic()
        cpu_after = (new.cpu_seconds(), cpu_of([w.proc for w in workers]))
        new_lag = await scrape_lag(port)
        new_stats = await http_get_json(port, "/api/v1/websocket/stats")
        await asyncio.sleep(opts.after)
        await publisher.stop()
        acks = publisher.acks
        if not acks:
            raise BenchError("no publication was acknowledged")
        last_offset, epoch = acks[-1][1], acks[-1][2]
        for w in workers:
            await w.command({"cmd": "report", "last": last_offset, "epoch": epoch, "timeout": 30})
        finals = await asyncio.gather(*(w.event("report", 60) for w in workers))

        def joined(key: str) -> list[Any]:
            return [x for r in reports for x in r[key]]

        def since_signal(values: list[float | None]) -> list[float]:
            return sorted(v - signalled for v in values if v is not None)

        resumed = since_signal(joined("recovered_at"))
        resynced = since_signal(joined("resync_at"))
        either = sorted(resumed + resynced)
        attempts = Counter(joined("attempts"))
        drain_lag = bucket_delta(scraper.last, scraper.before) if scraper.last_at is not None else []
        old_drained = old.drained or {}
        raw.update({
            "clients": opts.clients,
            "resumed": len(resumed),
            "resynced_clients": len(resynced),
            "not_resumed": opts.clients - len(either),
            "resume_all_seconds": rounded(either[-1]) if len(either) == opts.clients else None,
            "resume_p50_seconds": rounded(figures.percentile(either, 0.5)),
            "resume_p99_seconds": rounded(figures.percentile(either, 0.99)),
            "resume_first_seconds": rounded(either[0]) if either else None,
            "resume_seconds": [round(x, 4) for x in either],
            "reconnected_seconds": [round(x, 4) for x in since_signal(joined("connected_at"))],
            "disconnected_seconds": {"first": rounded(min(since_signal(joined("disconnected_at")), default=None)),
                                     "last": rounded(max(since_signal(joined("disconnected_at")), default=None))},
            "attempts_per_client": {str(k): v for k, v in sorted(attempts.items())},
            "clients_dropped_again": sum(1 for d in joined("drops") if d > 1),
            "drain_seconds": round(exited - signalled, 3),
            "drain_log": {k: old_drained.get(k) for k in ("connections_closed", "connections_abandoned",
                                                           "messages_flushed", "drain_seconds")},
            "restart_downtime_seconds": round(listening - signalled, 3),
            "new_server_start_seconds": round(listening - exited, 3),
            "storm_seconds": round(storm_end - signalled, 3),
            "cpu_seconds": {
                "old_server_drain": rounded(old_cpu - cpu_before[0]),  # what it used from the signal to its exit
                "new_server_storm": rounded(cpu_after[0] - cpu_new_start),
                "workers_storm": rounded(cpu_after[1] - cpu_before[1]),
            },
            "new_server_lag": lag_summary(new_lag),
            "new_server_lag_max_ms": new_stats.get("telemetry", {}).get("event_loop_lag", {}).get("max_ms"),
            "new_server_recovery": {k: new_stats.get("recovery", {}).get(k) for k in (
                "resumes_requested", "recovered", "not_recovered", "messages_replayed")},
            "old_server_drain_lag": lag_summary(drain_lag) if drain_lag else None,
            "worker_lag": [r["lag"] for r in reports],
            "stuck": [s for r in reports for s in r["stuck"]][:10],
            "published": len(acks),
            "last_offset": last_offset,
            "publish_failures": publisher.failures,
            "acks": [[round(t - signalled, 3), offset] for t, offset, _ in acks],
            "lost": sum(f["lost"] for f in finals),
            "duplicated": sum(f["duplicated"] for f in finals),
            "short_clients": sum(f["short"] for f in finals),
            "resyncs": sum(f["resyncs"] for f in finals),
            "epoch_changes": sum(f["epoch_changes"] for f in finals),
            "epochs_acknowledged": len({e for _, _, e in acks}),
            "gaps": sum(f["gaps"] for f in finals),
            "duplicates_dropped_by_client": sum(f["duplicates_dropped"] for f in finals),
            "replayed": sum(f["replayed"] for f in finals),
            "received": sum(f["received"] for f in finals),
            "late_start_clients": sum(f["late_start"] for f in finals),
            "client_states": dict(sum((Counter(f["states"]) for f in finals), Counter())),
            "server_log_levels": {"old": dict(old.levels), "new": dict(new.levels)},
            "server_notable": (old.notable + new.notable)[:20],
        })
    finally:
        if publisher is not None:
            await publisher.stop()
        if scraper is not None:
            await scraper.stop()
        await asyncio.gather(*(w.close(60) for w in workers), return_exceptions=True)
        for server in servers:
            with contextlib.suppress(Exception):
                await stop_server(server)
        redis.stop()
    return raw


async def stop_server(server: Server, timeout: float = 20.0) -> None:
    if server.proc.returncode is None:
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.proc.wait(), timeout)
    await server.kill()


# =================================================================== the report


def build_report(raw: Json, opts: Options, quick: bool) -> figures.Report:
    n = opts.clients
    report = figures.Report("storm", f"Reconnect storm: graceful restart under {n:,} clients (Redis broker)")
    lag = raw["new_server_lag"]
    # The bucket interpolation can land above the largest sample: no quantile exceeds the max.
    lag_p99, lag_max = lag["p99_ms"], raw["new_server_lag_max_ms"]
    if lag_p99 is not None and lag_max is not None:
        lag_p99 = min(lag_p99, lag_max)
    drain_lag = raw["old_server_drain_lag"] or {}
    report.figures = [
        figures.Figure("storm.resume_all_seconds", f"all {n:,} clients resumed after SIGTERM", "s",
                       raw["resume_all_seconds"], TARGET_SECONDS, "target", "lower", f"<= {TARGET_SECONDS:g}",
                       "value"),
        figures.Figure("storm.lost", "messages lost", "messages", raw["lost"], None, "", "lower", "<= 0", "value"),
        figures.Figure("storm.duplicated", "messages duplicated", "messages", raw["duplicated"], None, "", "lower",
                       "<= 0", "value"),
        figures.Figure("storm.resyncs", "resyncs (recovered: false)", "resyncs", raw["resyncs"], None, "", "lower",
                       "<= 0", "value"),
        figures.Figure("storm.loop_lag_p99_ms", "new server event-loop lag p99 during the storm", "ms",
                       lag_p99, LAG_TARGET_MS, "target", "lower", f"<= {LAG_TARGET_MS:g}", "value"),
        figures.Figure("storm.loop_lag_max_ms", "new server event-loop lag max", "ms", raw["new_server_lag_max_ms"],
                       None, "", "lower"),
        figures.Figure("storm.resume_p50_seconds", "per-client resume p50", "s", raw["resume_p50_seconds"], None, "",
                       "lower"),
        figures.Figure("storm.resume_p99_seconds", "per-client resume p99", "s", raw["resume_p99_seconds"], None, "",
                       "lower"),
        figures.Figure("storm.drain_seconds", "old server SIGTERM -> exit", "s", raw["drain_seconds"], None, "",
                       "lower"),
        figures.Figure("storm.restart_downtime_seconds", "SIGTERM -> new server listening", "s",
                       raw["restart_downtime_seconds"], None, "", "lower"),
        figures.Figure("storm.drain_loop_lag_p99_ms", "old server event-loop lag p99 during its drain", "ms",
                       drain_lag.get("p99_ms"), None, "", "lower"),
    ]
    report.series["resume_seconds"] = raw["resume_seconds"]
    report.series["acks"] = raw["acks"]
    if raw["not_resumed"]:
        report.problem(f"{raw['not_resumed']} of {n} clients did not resume within {opts.deadline:g}s of SIGTERM"
                       f" (first stuck: {raw['stuck'][:1]})")
    for key, what in (("lost", "messages lost"), ("duplicated", "messages duplicated"),
                      ("resyncs", "resyncs (recovered: false) with the Redis broker"),
                      ("epoch_changes", "epoch changes seen by clients"),
                      ("short_clients", "clients missing the last acknowledged offset at the end")):
        if raw[key]:
            report.problem(f"{raw[key]} {what}")
    if raw["epochs_acknowledged"] != 1:
        report.problem(f"publications acknowledged in {raw['epochs_acknowledged']} epochs")
    if raw["old_exit_status"] != 0:
        report.problem(f"the old server exited with status {raw['old_exit_status']} after SIGTERM (0 expected)")
    abandoned = raw["drain_log"].get("connections_abandoned")
    if abandoned:
        report.notes.append(f"{abandoned} connections abandoned by the drain (peer not reading in time)")
    if raw["clients_dropped_again"]:
        report.notes.append(f"{raw['clients_dropped_again']} clients dropped more than once")
    spread = raw["spread_bound_seconds"]
    report.notes.append(
        f"after_ms spread bound {spread:g}s; drain {raw['drain_seconds']}s, downtime {raw['restart_downtime_seconds']}s"
        f" (new server start {raw['new_server_start_seconds']}s); attempts per client {raw['attempts_per_client']}; "
        f"CPU s during the storm: {raw['cpu_seconds']}; worker loop lag {raw['worker_lag']}")
    report.notes.append(f"server loop lag sampled every {opts.lag_interval:g}s; {raw['published']} publications at "
                        f"{opts.rate:g}/s, {raw['replayed']} messages replayed to resuming clients")
    if quick:
        report.notes.append("quick run: the timing figures are not meaningful, only correctness is checked")
    return report


async def measure(quick: bool, python: str = sys.executable, **overrides: Any) -> figures.Report:
    """The storm measure of the suite. `overrides`: any field of `Options` (clients, processes, rate, ...)."""
    base = Options(clients=200, processes=2) if quick else Options()
    opts = dataclasses.replace(base, python=python, **overrides)
    started = time.monotonic()
    try:
        raw = await run_storm(opts)
    except BenchError as exc:
        report = figures.Report("storm", f"Reconnect storm under {opts.clients:,} clients")
        report.problem(f"not measured: {exc}")
        report.seconds = time.monotonic() - started
        return report
    report = build_report(raw, opts, quick)
    report.raw = {"options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "python"},
                  "machine": core_bench.machine(), "revision": service_revision(), **raw}
    report.seconds = time.monotonic() - started
    return report


def table(report: figures.Report) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:,.4g}"

    rows = [["figure", "value", "unit", "target", "met"]]
    for f in report.figures:
        rows.append([f.label, cell(f.value), f.unit, f.goal or "", {True: "yes", False: "NO", None: ""}[f.met]])
    lines = [report.title, "", text_table(rows), ""]
    lines += [f"problem: {p}" for p in report.problems] or ["correct: nothing lost, repeated or resynced; "
                                                            "every client resumed"]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("clients", args.clients), ("processes", args.processes), ("rate", args.rate),
                                   ("deadline", args.deadline)) if v is not None}
    report = await measure(args.quick, args.python, **overrides)
    print(table(report))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    print(f"\nwrote {args.output} ({report.seconds:.1f}s)")
    return 0 if report.correct else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A graceful restart of stablews under N recovering clients.")
    parser.add_argument("--clients", type=int, help="clients (default 5000; quick 200)")
    parser.add_argument("--processes", type=int, help="client worker processes (default 4; quick 2)")
    parser.add_argument("--rate", type=float, help="publications a second (default 2)")
    parser.add_argument("--deadline", type=float, help="seconds after SIGTERM for every client to resume (default 60)")
    parser.add_argument("--quick", action="store_true", help="200 clients, correctness only")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report (default %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the servers and workers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    if args.worker:
        return asyncio.run(worker_main(json.loads(args.worker)))
    return run_bench("storm_bench", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
