"""Core benchmark: stablews against a bare Starlette WebSocket endpoint (and python-socketio).

The servers (`--kinds`, default bare,stablews) run as their own processes on
127.0.0.1 (a free port from the OS) under the same uvicorn settings:
ws="websockets-sansio", no permessage-deflate, no uvicorn pings, lifespan on,
uvicorn logging at warning. The bare baseline is bench/baseline_app.py; the
`socketio` kind is bench/socketio_app.py, a python-socketio ASGI server with
Socket.IO's defaults (so its own Engine.IO ping every 25 s, answered by the
clients). Clients run in separate worker processes (this script with
--worker) using asyncio and `websockets`; socketio clients speak Engine.IO v4 /
Socket.IO v5 over the websocket transport only.

1. Idle memory per connection: RSS of the server after a warm-up, then with
   `--connections` open connections (stablews: hello + subscribe to one channel,
   pings answered; socketio: connect to `/` + join one room, pings answered;
   bare: connect only), settled; (after - before) / N.
2. Fan-out: one publisher sends `--messages` messages of about
   `--payload-bytes` bytes of JSON to `--subscribers` subscribers, all
   pipelined (or at most `--publish-window` awaiting their ack); delivered
   messages/s = messages received by all subscribers / (last receipt - first
   send). Every subscriber must get offsets 1..N exactly once, in order. The
   bare app's `/pub` sends each frame on with a plain loop over its clients;
   socketio's `/pub` emits each payload (`seq` 1..N, which stands for the
   offset) as a `message` event to the room with `sio.emit`.

Each measurement runs `--repeat` times (fresh server and clients each time,
the kinds interleaved); the table shows medians and the ratios stablews/bare
(against the goals) and stablews/socketio. Receipt and send times come from
time.monotonic(), which on Linux is CLOCK_MONOTONIC: one clock for every
process on the machine.

    python bench/core_bench.py              # 5,000 connections, 1,000 subscribers, 3 runs
    python bench/core_bench.py --quick      # 200 connections, 100 subscribers, 1 run
    python bench/core_bench.py --kinds bare,stablews,socketio
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchlib import (
    BENCH_DIR,
    HOST,
    KINDS,
    SERVER_KINDS,
    SUBPROTOCOL,
    BenchError,
    ClientWorker,
    Json,
    ServerProcess,
    WorkerProcess,
    dumps,
    emit,
    frame_messages,
    http_get_json,
    pong,
    raise_nofile_limit,
    run_bench,
    service_revision,
    split_frame,
    start_workers,
    stdin_reader,
    text_table,
    wait_until,
    workers_ready,
)

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "core_bench.json"

IDLE_CHANNEL = "bench.idle"
FANOUT_CHANNEL = "bench"
CLIENT_MAX_SIZE = 64 * 1024 * 1024
MEMORY_GOAL = 1.10  # stablews/bare bytes per idle connection, at most
FANOUT_GOAL = 1.0  # stablews/bare delivered messages/s, at least


# =================================================================== workers
#
# A worker opens `count` client connections, prints {"event": "ready", ...} on
# stdout, then obeys one JSON command per stdin line:
#   {"cmd": "expect", "messages": N, "timeout": T, "quiet": Q}
#       wait until every connection got N messages (or T seconds pass, or no
#       message comes for Q seconds), print {"event": "done", ...};
#   {"cmd": "close"}  (or EOF: the parent is gone)
#       close every connection, print {"event": "closed", ...} and exit.


class ClientSub:
    __slots__ = ("complete", "count", "last", "order_errors", "ws")

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.count = 0
        self.last = 0
        self.order_errors = 0
        self.complete = False


class Worker(ClientWorker):
    client = "core_bench"
    max_size = CLIENT_MAX_SIZE
    max_queue = None
    abort_on_failure = False  # close the connection

    def __init__(self, spec: Json) -> None:
        super().__init__(spec)
        self.channel = spec["channel"]
        self.subs: list[ClientSub] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.frames = 0
        self.messages = 0
        self.first_recv: float | None = None
        self.last_recv: float | None = None
        self.pings = 0
        self.other: Counter[str] = Counter()
        self.order_examples: list[str] = []
        self.unexpected_closes: Counter[str] = Counter()
        self.expected = 0
        self.remaining = 0
        self.all_done = asyncio.Event()
        self.closing = False

    def opened(self, ws: ClientConnection) -> None:
        sub = ClientSub(ws)
        self.subs.append(sub)
        task = asyncio.create_task(self._read(sub))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self, sub: ClientSub) -> None:
        ws = sub.ws
        try:
            async for frame in ws:
                now = time.monotonic()
                if not isinstance(frame, str):
                    self.other["binary"] += 1
                    continue
                self.frames += 1
                got = 0
                for msg in frame_messages(self.kind, frame):
                    kind = msg.get("type")
                    if kind == "message":
                        got += 1
                        offset = msg.get("offset")
                        if offset != sub.last + 1:
                            sub.order_errors += 1
                            if len(self.order_examples) < 5:
                                self.order_examples.append(f"expected offset {sub.last + 1}, got {offset}")
                        if isinstance(offset, int):
                            sub.last = offset
                        sub.count += 1
                    elif kind == "ping":
                        self.pings += 1
                        await ws.send(pong(self.kind, msg))
                    else:
                        self.other[str(kind)] += 1
                if got:
                    self.messages += got
                    if self.first_recv is None:
                        self.first_recv = now
                    self.last_recv = now
                    if self.expected and not sub.complete and sub.count >= self.expected:
                        self._completed(sub)
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                code = ws.close_code
                reason = ws.close_reason or ""
                self.unexpected_closes[f"{code} {reason}".strip()] += 1

    def _completed(self, sub: ClientSub) -> None:
        sub.complete = True
        self.remaining -= 1
        if self.remaining <= 0:
            self.all_done.set()

    async def expect(self, messages: int, timeout: float, quiet: float) -> Json:
        cpu_start = time.process_time()
        self.expected = messages
        self.remaining = len(self.subs)
        for sub in self.subs:
            if sub.count >= messages:
                self._completed(sub)
        if not self.subs:
            self.all_done.set()
        deadline = time.monotonic() + timeout
        reason = "complete"
        while not self.all_done.is_set():
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if self.last_recv is not None and now - self.last_recv >= quiet:
                reason = "quiet"
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_done.wait(), min(0.2, deadline - now))
        exact = sum(1 for s in self.subs if s.count == messages and s.last == messages and not s.order_errors)
        return {
            "event": "done",
            "end": reason,
            "subscribers": len(self.subs),
            "exact": exact,
            "short": sum(1 for s in self.subs if s.count < messages),
            "extra": sum(1 for s in self.subs if s.count > messages),
            "order_errors": sum(s.order_errors for s in self.subs),
            "order_examples": self.order_examples,
            "cpu_seconds": time.process_time() - cpu_start,
            **self.figures(),
        }

    def figures(self) -> Json:
        return {
            "messages": self.messages,
            "frames": self.frames,
            "first_recv": self.first_recv,
            "last_recv": self.last_recv,
            "pings": self.pings,
            "other": dict(self.other),
            "unexpected_closes": dict(self.unexpected_closes),
        }

    async def close_all(self) -> None:
        self.closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await asyncio.gather(*(s.ws.close() for s in self.subs), return_exceptions=True)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def worker_main(spec: Json) -> int:
    stdin = await stdin_reader()
    worker = Worker(spec)
    await worker.open_and_report()
    while True:
        line = await stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            emit(await worker.expect(cmd["messages"], cmd["timeout"], cmd["quiet"]))
        elif cmd["cmd"] == "close":
            break
    figures = worker.figures()
    await worker.close_all()
    emit({"event": "closed", **figures})
    return 0


async def start_clients(
    python: str, kind: str, url: str, total: int, processes: int, channel: str, open_timeout: float
) -> list[WorkerProcess]:
    spec = {"url": url, "channel": channel, "concurrency": 64, "open_timeout": open_timeout}
    return await start_workers(python, SCRIPT, kind, total, processes, spec)


async def close_workers(workers: Sequence[WorkerProcess]) -> list[Json]:
    summaries = await asyncio.gather(*(w.close() for w in workers))
    return [s for s in summaries if s is not None]


# =================================================================== servers


@dataclass
class Server(ServerProcess):
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    notable: list[str] = field(default_factory=list)
    log_levels: Counter[str] = field(default_factory=Counter)

    @property
    def pub_url(self) -> str:
        """stablews publishes on its client endpoint; bare and socketio have a `/pub` endpoint."""
        return f"ws://{HOST}:{self.port}/ws" if self.kind == "stablews" else f"ws://{HOST}:{self.port}/pub"

    def keep(self, text: str) -> None:
        self.log_tail.append(text)
        level = "other"
        with contextlib.suppress(ValueError, AttributeError):
            level = str(json.loads(text).get("level", "other"))
        self.log_levels[level] += 1
        noisy = level not in ("info", "debug") or "abnormally" in text
        if noisy and len(self.notable) < 50:
            self.notable.append(text[:500])

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    async def stats(self) -> Json | None:
        if self.kind != "stablews":
            return None
        stats: Json = await http_get_json(self.port, "/api/v1/websocket/stats")
        return stats

    async def connections(self) -> int:
        if self.kind == "stablews":
            stats = await self.stats()
            assert stats is not None
            return int(stats["connections"]["active"])
        return int((await http_get_json(self.port, "/count"))["connections"])

    async def wait_connections(self, expected: int, timeout: float) -> None:
        async def check() -> bool:
            return await self.connections() == expected

        await wait_until(check, timeout, f"{self.kind} to report {expected} connections")

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (stablews drains), then SIGKILL after `timeout`; return the exit status."""
        proc = self.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                self.notable.append(f"did not exit within {timeout:g}s of SIGTERM: killed")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self.join_reader()
        return proc.returncode


async def start_server(kind: str, python: str, client_publish: bool) -> Server:
    flags = ["--client-publish", "true"] if client_publish else []
    return await Server.start(kind, python, flags, stdin=asyncio.subprocess.DEVNULL)


# How run_memory and run_fanout start their server: (kind, python, client_publish) -> a started Server.
# bench/telemetry_bench.py passes its own (stablews with telemetry off or on, scraped while it runs).
ServerStarter = Callable[[str, str, bool], Awaitable[Server]]


def stablews_anomalies(stats: Json | None) -> Json:
    """The figures of a stablews stats answer that show trouble (closes, errors, missed heartbeats)."""
    if not stats:
        return {}
    conns = stats.get("connections", {})
    beats = stats.get("heartbeats", {})
    return {
        "closed_by_cause": conns.get("closed_by_cause", {}),
        "errors_by_code": stats.get("errors", {}).get("by_code", {}),
        "heartbeats_sent": beats.get("sent_total"),
        "heartbeats_missed": beats.get("missed_total"),
        "status": stats.get("status"),
        "reasons": stats.get("reasons"),
    }


async def settle_rss(server: Server, timeout: float, window: int = 4, interval: float = 0.5) -> tuple[int, bool]:
    """Sample RSS until `window` samples in a row agree within max(64 KiB, 0.2 %)."""
    samples: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        samples.append(server.rss())
        recent = samples[-window:]
        if len(recent) == window and max(recent) - min(recent) <= max(64 * 1024, 0.002 * max(recent)):
            return recent[-1], True
        if time.monotonic() >= deadline:
            return samples[-1], False
        await asyncio.sleep(interval)


# =================================================================== measurements


@dataclass
class Options:
    python: str
    connections: int
    subscribers: int
    messages: int
    payload_bytes: int
    publish_window: int
    repeat: int
    processes: int
    warmup: int
    settle_timeout: float
    only: str
    kinds: tuple[str, ...] = KINDS  # the servers bench() measures


async def run_memory(kind: str, opts: Options, start: ServerStarter = start_server) -> Json:
    n = opts.connections
    server = await start(kind, opts.python, False)
    workers: list[WorkerProcess] = []
    result: Json = {"kind": kind, "connections": n}
    try:
        # Warm-up: the same client behaviour on a few connections, then closed,
        # so first-use allocations (imports, caches, pools) land before "before".
        workers = await start_clients(opts.python, kind, server.ws_url, opts.warmup, 1, IDLE_CHANNEL, 30)
        await workers_ready(workers, 60)
        await server.wait_connections(opts.warmup, 30)
        await close_workers(workers)
        workers = []
        await server.wait_connections(0, 30)
        rss_before, settled_before = await settle_rss(server, opts.settle_timeout)

        started = time.monotonic()
        open_timeout = 30 + n / 100
        workers = await start_clients(opts.python, kind, server.ws_url, n, opts.processes, IDLE_CHANNEL, open_timeout)
        ready = await workers_ready(workers, open_timeout + 30)
        await server.wait_connections(n, 60)
        open_seconds = time.monotonic() - started
        rss_after, settled_after = await settle_rss(server, opts.settle_timeout)
        live = await server.connections()
        stats = await server.stats()
        result.update(
            {
                "rss_before": rss_before,
                "rss_after": rss_after,
                "settled": settled_before and settled_after,
                "bytes_per_connection": (rss_after - rss_before) / n,
                "open_seconds": round(open_seconds, 3),
                "client_open_seconds": max(r["seconds"] for r in ready),
                "live_after_settle": live,
                "server": stablews_anomalies(stats),
            }
        )
        closed = await close_workers(workers)
        workers = []
        result["client"] = merge_client_figures(closed)
        if live != n:
            result["problem"] = f"server reported {live} connections after settling, expected {n}"
    finally:
        await end_run(server, workers, result)
    return result



async def end_run(server: Server, workers: Sequence[WorkerProcess], result: Json) -> None:
    """Close the client workers and the server; record how the server ended."""
    await close_workers(workers)
    result["server_exit_status"] = await server.stop()
    result["server_log_levels"] = dict(server.log_levels)
    result["server_notable_logs"] = server.notable[:20]


def payload(seq: int, size: int) -> Json:
    """A JSON object of about `size` bytes once encoded compactly."""
    base = len(dumps({"seq": seq, "pad": ""}))
    return {"seq": seq, "pad": "x" * max(0, size - base)}


async def publish(server: Server, messages: int, size: int, window: int, timeout: float) -> tuple[float, float, Json]:
    """Send `messages` publications, at most `window` unacknowledged (0: all back to back);
    return (first send time, last ack time, figures)."""
    ws = await connect(
        server.pub_url,
        subprotocols=[SUBPROTOCOL],
        compression=None,
        proxy=None,
        ping_interval=None,
        max_size=CLIENT_MAX_SIZE,
        max_queue=None,
        open_timeout=30,
    )
    figures: Json = {"acks": 0, "ack_offsets_in_order": True, "errors": []}
    try:
        if server.kind == "stablews":
            await ws.send(dumps({"type": "hello", "client": "core_bench-publisher"}))
            welcome = json.loads(str(await asyncio.wait_for(ws.recv(), 30)).split("\n")[0])
            if welcome.get("type") != "welcome":
                raise BenchError(f"publisher: expected welcome, got {welcome}")
            frames = [
                dumps({"type": "publish", "channel": FANOUT_CHANNEL, "data": payload(i, size), "id": i})
                for i in range(1, messages + 1)
            ]
        elif server.kind == "socketio":
            # The app emits what it receives: the payload itself, its seq standing for the offset.
            frames = [dumps(payload(i, size)) for i in range(1, messages + 1)]
        else:
            ts = int(time.time() * 1000)
            frames = [
                dumps(
                    {
                        "type": "message",
                        "channel": FANOUT_CHANNEL,
                        "epoch": "bare00000000",
                        "offset": i,
                        "data": payload(i, size),
                        "ts": ts,
                    }
                )
                for i in range(1, messages + 1)
            ]
        sent = 0
        first_sent = last_ack = time.monotonic()
        async with asyncio.timeout(timeout):
            while figures["acks"] < messages:
                while sent < messages and (window <= 0 or sent - figures["acks"] < window):
                    await ws.send(frames[sent])
                    sent += 1
                frame = await ws.recv()
                for msg in split_frame(frame):
                    kind = msg.get("type")
                    if kind == "published":
                        figures["acks"] += 1
                        last_ack = time.monotonic()
                        if server.kind == "stablews" and msg.get("offset") != figures["acks"]:
                            figures["ack_offsets_in_order"] = False
                    elif kind == "ping":
                        await ws.send(dumps({"type": "pong", "id": msg["id"]}))
                    elif kind == "error" and len(figures["errors"]) < 5:
                        figures["errors"].append(json.dumps(msg)[:300])
        return first_sent, last_ack, figures
    except TimeoutError:
        raise BenchError(f"publisher: {figures['acks']} of {messages} acks within {timeout:g}s") from None
    finally:
        await ws.close()


def merge_client_figures(reports: Sequence[Json]) -> Json:
    closes: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for r in reports:
        closes.update(r.get("unexpected_closes", {}))
        other.update(r.get("other", {}))
    return {
        "messages": sum(r.get("messages", 0) for r in reports),
        "frames": sum(r.get("frames", 0) for r in reports),
        "pings_answered": sum(r.get("pings", 0) for r in reports),
        "other_message_types": dict(other),
        "unexpected_closes": dict(closes),
    }


async def run_fanout(kind: str, opts: Options, start: ServerStarter = start_server) -> Json:
    subs, n = opts.subscribers, opts.messages
    server = await start(kind, opts.python, True)
    workers: list[WorkerProcess] = []
    result: Json = {
        "kind": kind,
        "subscribers": subs,
        "messages": n,
        "payload_bytes": opts.payload_bytes,
        "publish_window": opts.publish_window,
    }
    try:
        open_timeout = 30 + subs / 100
        workers = await start_clients(
            opts.python, kind, server.ws_url, subs, opts.processes, FANOUT_CHANNEL, open_timeout
        )
        await workers_ready(workers, open_timeout + 30)
        await server.wait_connections(subs, 60)
        timeout = 30 + n * subs / 20_000
        for w in workers:
            await w.command({"cmd": "expect", "messages": n, "timeout": timeout, "quiet": 10})
        cpu_before = server.cpu_seconds()
        first_sent, last_ack, pub = await publish(server, n, opts.payload_bytes, opts.publish_window, timeout)
        done = await asyncio.gather(*(w.event("done", timeout + 30) for w in workers))
        cpu_used = server.cpu_seconds() - cpu_before
        received = sum(d["messages"] for d in done)
        last_recv = max((d["last_recv"] for d in done if d["last_recv"] is not None), default=None)
        frames = sum(d["frames"] for d in done)
        if last_recv is None or received == 0:
            raise BenchError("no subscriber received anything")
        seconds = last_recv - first_sent
        exact = sum(d["exact"] for d in done)
        result.update(
            {
                "delivered_per_second": received / seconds,
                "received": received,
                "expected": n * subs,
                "seconds": round(seconds, 4),
                "first_sent_monotonic": first_sent,
                "last_recv_monotonic": last_recv,
                "publish_ack_seconds": round(last_ack - first_sent, 4),
                "frames_received": frames,
                "messages_per_frame": round(received / frames, 2) if frames else None,
                "server_cpu_seconds": round(cpu_used, 3),
                "server_cpu_us_per_message": round(cpu_used / received * 1e6, 3),
                "client_cpu_seconds": round(sum(d["cpu_seconds"] for d in done), 3),
                "exact_subscribers": exact,
                "short_subscribers": sum(d["short"] for d in done),
                "extra_subscribers": sum(d["extra"] for d in done),
                "order_errors": sum(d["order_errors"] for d in done),
                "order_examples": [e for d in done for e in d["order_examples"]][:5],
                "worker_end": sorted({d["end"] for d in done}),
                "publisher": pub,
                "server": stablews_anomalies(await server.stats()),
            }
        )
        if exact != subs:
            result["problem"] = (
                f"only {exact} of {subs} subscribers got offsets 1..{n} exactly once in order "
                f"({result['short_subscribers']} short, {result['extra_subscribers']} extra, "
                f"{result['order_errors']} out-of-order)"
            )
        closed = await close_workers(workers)
        workers = []
        result["client"] = merge_client_figures(closed)
    finally:
        await end_run(server, workers, result)
    return result


# =================================================================== report


def kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:,.2f}"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def figures_of(runs: Sequence[Json], key: str) -> list[float]:
    return [float(r[key]) for r in runs if "error" not in r and r.get(key) is not None]


@dataclass(frozen=True)
class Row:
    measure: str
    key: str
    label: str
    fmt: Callable[[float | None], str]
    goal: str  # "<= x", ">= x" or "" (for information)


ROWS = (
    Row(
        "memory",
        "bytes_per_connection",
        "idle memory per connection, KiB ({connections:,} conns)",
        kib,
        f"<= {MEMORY_GOAL}",
    ),
    Row(
        "fanout",
        "delivered_per_second",
        "fan-out, delivered msgs/s ({subscribers:,} subs x {messages:,} msgs, {publishing})",
        rate,
        f">= {FANOUT_GOAL}",
    ),
    Row(
        "fanout",
        "server_cpu_us_per_message",
        "fan-out, server CPU us per delivered msg",
        lambda v: "-" if v is None else f"{v:.2f}",
        "",
    ),
)


def meets(ratio: float | None, goal: str) -> bool | None:
    if ratio is None or not goal:
        return None
    op, limit = goal.split()
    return ratio <= float(limit) if op == "<=" else ratio >= float(limit)


def median_ratio(entry: Json, kind: str, baseline: str) -> float | None:
    """The ratio of the medians kind/baseline in a summary entry (None when either was not measured)."""
    value = entry.get(kind, {}).get("median")
    base = entry.get(baseline, {}).get("median")
    return value / base if base and value is not None else None


def summarize(results: Json) -> Json:
    """Median, min and max of each figure per server measured, and the ratios of the medians
    stablews/bare (`ratio`, what the goals bound) and stablews/socketio (`ratio_socketio`)."""
    summary: Json = {}
    for row in ROWS:
        runs = results.get(row.measure)
        if not runs:
            continue
        entry: Json = {}
        for kind in runs:
            values = figures_of(runs[kind], row.key)
            entry[kind] = {
                "median": statistics.median(values) if values else None,
                "min": min(values, default=None),
                "max": max(values, default=None),
                "runs": len(values),
            }
        entry["ratio"] = median_ratio(entry, "stablews", "bare")
        entry["ratio_socketio"] = median_ratio(entry, "stablews", "socketio")
        entry["goal"] = row.goal or None
        entry["meets_goal"] = meets(entry["ratio"], row.goal)
        summary[f"{row.measure}.{row.key}"] = entry
    return summary


def table(summary: Json, opts: Options) -> str:
    def cell(row: Row, figures: Json) -> str:
        text = row.fmt(figures["median"])
        if figures["runs"] > 1:
            text += f" ({row.fmt(figures['min'])}..{row.fmt(figures['max'])})"
        return text

    def fraction(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    publishing = "pipelined" if opts.publish_window == 0 else f"window {opts.publish_window}"
    labels = {**vars(opts), "publishing": publishing}
    kinds = opts.kinds
    # A ratio's columns only when both of its servers were measured (the goals bound stablews/bare).
    against_bare = "bare" in kinds and "stablews" in kinds
    against_socketio = "socketio" in kinds and "stablews" in kinds
    header = ["median of runs (min..max)", *kinds]
    if against_socketio:
        header.append("stablews/socketio")
    if against_bare:
        header += ["ratio", "goal", ""]
    rows = [header]
    for row in ROWS:
        entry = summary.get(f"{row.measure}.{row.key}")
        if entry is None:
            continue
        cells = [row.label.format(**labels), *(cell(row, entry[kind]) for kind in kinds)]
        if against_socketio:
            cells.append(fraction(entry["ratio_socketio"]))
        if against_bare:
            cells += [
                fraction(entry["ratio"]),
                row.goal or "-",
                {True: "met", False: "NOT met", None: ""}[entry["meets_goal"]],
            ]
        rows.append(cells)
    return text_table(rows)


def describe_run(measure: str, run: Json) -> str:
    if "error" in run:
        return f"  {measure:7} {run['kind']:8} ERROR: {run['error']}"
    if measure == "memory":
        text = (
            f"  memory  {run['kind']:8} {kib(run['bytes_per_connection'])} KiB/conn  "
            f"RSS {run['rss_before'] / 2**20:,.1f} -> {run['rss_after'] / 2**20:,.1f} MiB  "
            f"opened in {run['open_seconds']:.1f}s{'' if run['settled'] else '  (RSS not settled)'}"
        )
    else:
        text = (
            f"  fanout  {run['kind']:8} {rate(run['delivered_per_second'])} msgs/s  "
            f"{run['received']:,}/{run['expected']:,} in {run['seconds']:.3f}s  "
            f"{run['messages_per_frame']} msgs/frame  CPU server {run['server_cpu_seconds']:.2f}s "
            f"clients {run['client_cpu_seconds']:.2f}s"
        )
    notes = []
    if run.get("problem"):
        notes.append(run["problem"])
    closes = run.get("client", {}).get("unexpected_closes")
    if closes:
        notes.append(f"unexpected closes seen by clients: {closes}")
    server = run.get("server") or {}
    abnormal = {k: v for k, v in server.get("closed_by_cause", {}).items() if k != "normal"}
    if abnormal:
        notes.append(f"server closes by cause: {abnormal}")
    if server.get("errors_by_code"):
        notes.append(f"server errors: {server['errors_by_code']}")
    if run.get("server_notable_logs"):
        notes.append(f"{len(run['server_notable_logs'])} notable server log lines (see JSON)")
    return text + "".join(f"\n      ! {n}" for n in notes)


def machine() -> Json:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: version(d)
            for d in ("stablews", "uvicorn", "starlette", "websockets", "psutil", "python-socketio", "python-engineio")
        },
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# =================================================================== main


async def bench(opts: Options, output: Path, argv: Sequence[str]) -> int:
    results: Json = {
        "command": " ".join(["python", "bench/core_bench.py", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "revision": service_revision(),
        "loadavg_at_start": os.getloadavg(),
        "options": {k: v for k, v in vars(opts).items() if k != "python"},
    }
    measures: list[tuple[str, Callable[[str, Options], Awaitable[Json]]]] = []
    if opts.only in ("all", "memory"):
        measures.append(("memory", run_memory))
    if opts.only in ("all", "fanout"):
        measures.append(("fanout", run_fanout))
    for measure, runner in measures:
        runs: dict[str, list[Json]] = {kind: [] for kind in opts.kinds}
        results[measure] = runs
        print(f"{measure}:", flush=True)
        for i in range(opts.repeat):
            for kind in opts.kinds:  # interleaved, so all see the same machine conditions
                try:
                    run = await runner(kind, opts)
                except BenchError as exc:
                    run = {"kind": kind, "error": str(exc)}
                run["repeat"] = i + 1
                runs[kind].append(run)
                print(describe_run(measure, run), flush=True)
    results["summary"] = summarize(results)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["revision_at_finish"] = service_revision()
    results["loadavg_at_finish"] = os.getloadavg()
    if results["revision_at_finish"] != results["revision"]:
        print(f"warning: the service changed during the run: {results['revision']} -> {results['revision_at_finish']}")
    print()
    print(table(results["summary"], opts))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    failed = any("error" in run for m, _ in measures for kind in opts.kinds for run in results[m][kind])
    return 1 if failed else 0


def add_workload_options(parser: argparse.ArgumentParser, *, messages: int) -> None:
    """The memory and fan-out workload's options (shared with telemetry_bench.py)."""
    parser.add_argument("--connections", type=int, help="idle connections for the memory test (default 5000)")
    parser.add_argument("--subscribers", type=int, help="subscribers for the fan-out test (default 1000)")
    parser.add_argument(
        "--messages", type=int, default=messages, help="messages published in the fan-out test (default %(default)s)"
    )
    parser.add_argument(
        "--payload-bytes", type=int, default=100, help="JSON size of each message's data (default %(default)s)"
    )
    parser.add_argument(
        "--publish-window",
        type=int,
        default=0,
        help="most unacknowledged publishes in flight; 0 (default) pipelines all, 1 waits for each ack",
    )
    parser.add_argument("--repeat", type=int, help="runs of each measurement; the median is reported (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="client worker processes (default %(default)s)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        help="connections opened and closed before the first RSS reading (default %(default)s)",
    )
    parser.add_argument("--only", choices=("all", "memory", "fanout"), default="all")


def parse_kinds(text: str) -> tuple[str, ...]:
    """`--kinds`: server kinds, comma-separated, each once, in the order given (the order runs interleave)."""
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in SERVER_KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SERVER_KINDS)}, got {text!r}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Idle memory per connection and fan-out throughput: stablews against bare Starlette "
        "(and python-socketio)."
    )
    add_workload_options(parser, messages=200)
    parser.add_argument(
        "--kinds",
        type=parse_kinds,
        default=KINDS,
        help=f"servers to measure, comma-separated, of {','.join(SERVER_KINDS)} (default {','.join(KINDS)})",
    )
    parser.add_argument("--quick", action="store_true", help="200 connections, 100 subscribers, 1 run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (default %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers and workers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def workload_options(args: argparse.Namespace, *, quick_connections: int, quick_subscribers: int) -> Options | None:
    """`Options` from the parsed `add_workload_options` flags (and --quick, --python); None when a count is < 1."""
    opts = Options(
        python=args.python,
        connections=args.connections or (quick_connections if args.quick else 5000),
        subscribers=args.subscribers or (quick_subscribers if args.quick else 1000),
        messages=args.messages,
        payload_bytes=args.payload_bytes,
        publish_window=max(0, args.publish_window),
        repeat=args.repeat or (1 if args.quick else 3),
        processes=max(1, args.processes),
        warmup=min(args.warmup, 20) if args.quick else args.warmup,
        settle_timeout=5.0 if args.quick else 20.0,
        only=args.only,
    )
    if min(opts.connections, opts.subscribers, opts.messages, opts.repeat, opts.warmup) < 1:
        return None
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    raise_nofile_limit()
    if args.worker:
        return asyncio.run(worker_main(json.loads(args.worker)))
    opts = workload_options(args, quick_connections=200, quick_subscribers=100)
    if opts is None:
        print("core_bench: counts must be at least 1", file=sys.stderr)
        return 2
    opts.kinds = args.kinds
    return run_bench("core_bench", lambda: bench(opts, args.output, args_list))


if __name__ == "__main__":
    sys.exit(main())
