"""Dead-peer detection: clients that freeze are closed within the configured heartbeat bound.

One `stablews serve` on 127.0.0.1 (a free port) with short heartbeats and its demo feed on.
A worker process (this script with --worker) opens `--frozen` + `--live` client connections
(plain `websockets`: hello, subscribe to demo.ticker, pings answered). Then the frozen ones
stop: their transport stops reading and no pong is sent again, as a hung process or a peer
behind a dead network path would. The live ones go on answering.

For every frozen connection: the time from its freeze (wall clock in the worker) to its close
by the server (the flight recorder's `at`, wall clock in the server: one clock on one
machine), against the bound `heartbeat_interval x max_missed_heartbeats + heartbeat_timeout`.
Correct when every frozen connection was closed 4000 (`heartbeat_timeout`) and no live one
was closed at all.

    python bench/deadpeer_bench.py                 # 100 frozen among 900 live, 2 s / 1 s / 2 missed
    python bench/deadpeer_bench.py --quick         # 20 frozen among 50 live, 0.5 s / 0.25 s / 2 missed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from benchlib import (
    BENCH_DIR,
    SUBPROTOCOL,
    BenchError,
    Json,
    WorkerProcess,
    dumps,
    emit,
    http_get_json,
    raise_nofile_limit,
    run_bench,
    split_frame,
    stdin_reader,
    wait_until,
)
from core_bench import Server
from figures import Figure, Report, median, percentile

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "deadpeer_bench.json"
CHANNEL = "demo.ticker"
MARGIN = 0.5  # seconds past the bound still counted as on time (the target)


@dataclass(frozen=True, slots=True)
class Options:
    frozen: int = 100
    live: int = 900
    interval: float = 2.0
    timeout: float = 1.0
    missed: int = 2
    feed_rate: float = 10.0

    @property
    def bound(self) -> float:
        return self.interval * self.missed + self.timeout


QUICK = Options(frozen=20, live=50, interval=0.5, timeout=0.25, missed=2)


# =================================================================== the worker


class Peer:
    __slots__ = ("frozen", "id", "ws")

    def __init__(self, ws: ClientConnection, ident: str) -> None:
        self.ws = ws
        self.id = ident
        self.frozen = False


class Worker:
    def __init__(self, spec: Json) -> None:
        self.url: str = spec["url"]
        self.frozen_count: int = spec["frozen"]
        self.live_count: int = spec["live"]
        self.peers: list[Peer] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.live_closes: Counter[str] = Counter()
        self.pongs = 0
        self.failed = 0
        self.first_error: str | None = None
        self.closing = False

    async def open_one(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                async with asyncio.timeout(30):
                    ws = await connect(self.url, subprotocols=[SUBPROTOCOL], compression=None, proxy=None,
                                       ping_interval=None, open_timeout=None, close_timeout=5)
                    await ws.send(dumps({"type": "hello", "client": "deadpeer_bench"}))
                    await ws.send(dumps({"type": "subscribe", "channel": CHANNEL}))
                    ident = ""
                    while True:
                        msgs = split_frame(await ws.recv())
                        for msg in msgs:
                            if msg.get("type") == "welcome":
                                ident = str(msg["connection"])
                            elif msg.get("type") == "ping":
                                await ws.send(dumps({"type": "pong", "id": msg["id"]}))
                        if any(m.get("type") == "subscribed" for m in msgs):
                            break
            except (OSError, TimeoutError, WebSocketException, KeyError) as exc:
                self.failed += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
                return
        peer = Peer(ws, ident)
        self.peers.append(peer)
        task = asyncio.create_task(self.read(peer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def read(self, peer: Peer) -> None:
        ws = peer.ws
        try:
            async for frame in ws:
                if peer.frozen:
                    continue  # whatever was already buffered goes unanswered
                for msg in split_frame(frame):
                    if msg.get("type") == "ping":
                        self.pongs += 1
                        await ws.send(dumps({"type": "pong", "id": msg["id"]}))
        except ConnectionClosed:
            pass
        finally:
            if not peer.frozen and not self.closing:
                self.live_closes[f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1

    def freeze(self) -> Json:
        frozen = self.peers[: self.frozen_count]
        at = time.time()
        for peer in frozen:
            peer.frozen = True
            peer.ws.transport.pause_reading()
        return {"event": "frozen", "at": at, "ids": [p.id for p in frozen]}

    def report(self) -> Json:
        return {"event": "report", "live_closes": dict(self.live_closes), "pongs": self.pongs,
                "live_open": sum(1 for p in self.peers if not p.frozen and p.ws.close_code is None)}

    async def close_all(self) -> None:
        self.closing = True
        for peer in self.peers:
            if peer.frozen:
                peer.ws.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(p.ws.close() for p in self.peers if not p.frozen), return_exceptions=True)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def worker_main(spec: Json) -> int:
    raise_nofile_limit()
    stdin = await stdin_reader()
    worker = Worker(spec)
    gate = asyncio.Semaphore(64)
    started = time.monotonic()
    await asyncio.gather(*(worker.open_one(gate) for _ in range(worker.frozen_count + worker.live_count)))
    emit({"event": "ready", "connected": len(worker.peers), "failed": worker.failed,
          "first_error": worker.first_error, "seconds": round(time.monotonic() - started, 3)})
    while line := await stdin.readline():
        cmd = json.loads(line)["cmd"]
        if cmd == "freeze":
            emit(worker.freeze())
        elif cmd == "report":
            emit(worker.report())
        elif cmd == "close":
            break
    await worker.close_all()
    emit({"event": "closed"})
    return 0


# =================================================================== the measure


async def drops_of(port: int, ids: set[str]) -> dict[str, Json]:
    answer = await http_get_json(port, "/api/v1/websocket/drops?limit=1000")
    return {d["connection"]: d for d in answer["drops"] if d["connection"] in ids}


async def measure(quick: bool, python: str = sys.executable, options: Options | None = None) -> Report:
    opts = options or (QUICK if quick else Options())
    report = Report("deadpeer", f"dead-peer detection: {opts.frozen} frozen clients among {opts.live} live")
    started = time.monotonic()
    flags = ["--heartbeat-interval", f"{opts.interval}s", "--heartbeat-timeout", f"{opts.timeout}s",
             "--max-missed-heartbeats", str(opts.missed), "--flight-recorder-size", "1000",
             "--demo-feed", "true", "--demo-feed-rate", f"{opts.feed_rate:g}"]
    server = await Server.start("stablews", python, flags, stdin=asyncio.subprocess.DEVNULL)
    worker: WorkerProcess | None = None
    try:
        spec = {"kind": "stablews", "url": server.ws_url, "frozen": opts.frozen, "live": opts.live}
        worker = await WorkerProcess.start(python, SCRIPT, spec, "deadpeer worker", limit=1024 * 1024)
        ready = await worker.event("ready", 60 + (opts.frozen + opts.live) / 50)
        if ready["failed"]:
            raise BenchError(f"{ready['failed']} connections failed to open: {ready['first_error']}")
        # Two heartbeat rounds answered first, so every connection is in its steady state when frozen.
        await asyncio.sleep(2 * opts.interval)
        await worker.command({"cmd": "freeze"})
        frozen = await worker.event("frozen", 30)
        ids, freeze_at = set(frozen["ids"]), float(frozen["at"])
        deadline = opts.bound + 30
        found: dict[str, Json] = {}

        async def all_closed() -> bool:
            found.update(await drops_of(server.port, ids - found.keys()))
            return len(found) == len(ids)

        with contextlib.suppress(BenchError):
            await wait_until(all_closed, deadline, "every frozen client closed", interval=0.1)
        await worker.command({"cmd": "report"})
        live = await worker.event("report", 30)
        stats = await http_get_json(server.port, "/api/v1/websocket/stats")
    finally:
        if worker is not None:
            await worker.close()
        status = await server.stop()
    report.seconds = time.monotonic() - started

    delays = sorted(float(d["at"]) - freeze_at for d in found.values())
    causes = Counter(f"{d['code']} {d['cause']}" for d in found.values())
    on_time = sum(1 for s in delays if s <= opts.bound + MARGIN)
    if len(found) != len(ids):
        report.problem(f"{len(ids) - len(found)} of {len(ids)} frozen clients were not closed within "
                       f"{deadline:g}s")
    if set(causes) != {"4000 heartbeat_timeout"} and causes:
        report.problem(f"frozen clients closed otherwise than 4000 heartbeat_timeout: {dict(causes)}")
    if live["live_closes"]:
        report.problem(f"live clients were closed: {live['live_closes']}")
    if live["live_open"] != opts.live:
        report.problem(f"{live['live_open']} of {opts.live} live clients still open")
    if status != 0:
        report.problem(f"the server exited {status} on SIGTERM")
    worst = delays[-1] if delays else None
    report.figures = [
        Figure("deadpeer.max_seconds", "dead peer: freeze to close, slowest of the frozen", "s", worst, opts.bound,
               "configured bound", "lower", f"<= {opts.bound + MARGIN:g}", "value"),
        Figure("deadpeer.p50_seconds", "dead peer: freeze to close, median", "s", median(delays), opts.bound,
               "configured bound", "lower"),
        Figure("deadpeer.p99_seconds", "dead peer: freeze to close, p99", "s", percentile(delays, 0.99), opts.bound,
               "configured bound", "lower"),
    ]
    report.series["freeze_to_close_seconds"] = [round(s, 4) for s in delays]
    report.raw = {
        "options": {"frozen": opts.frozen, "live": opts.live, "heartbeat_interval": opts.interval,
                    "heartbeat_timeout": opts.timeout, "max_missed_heartbeats": opts.missed,
                    "bound_seconds": opts.bound, "feed_rate": opts.feed_rate},
        "closed": len(found), "on_time": on_time, "causes": dict(causes), "live": live,
        "server_exit_status": status, "heartbeats": stats.get("heartbeats"),
        "closed_by_cause": stats["connections"]["closed_by_cause"],
    }
    report.notes.append(f"{on_time} of {len(ids)} closed within bound + {MARGIN:g} s "
                        f"(bound {opts.interval:g} s x {opts.missed} + {opts.timeout:g} s = {opts.bound:g} s)")
    return report


def show(report: Report) -> str:
    lines = [report.title]
    for f in report.figures:
        value = "-" if f.value is None else f"{f.value:.3f}"
        lines.append(f"  {f.label}: {value} {f.unit} (bound {f.baseline:g} s, ratio "
                     f"{'-' if f.ratio is None else f'{f.ratio:.3f}'}){' goal ' + f.goal if f.goal else ''}")
    lines += [f"  {n}" for n in report.notes] + [f"  PROBLEM: {p}" for p in report.problems]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--frozen", type=int)
    parser.add_argument("--live", type=int)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.worker:
        return asyncio.run(worker_main(json.loads(args.worker)))
    raise_nofile_limit()
    base = QUICK if args.quick else Options()
    opts = Options(args.frozen or base.frozen, base.live if args.live is None else args.live, base.interval,
                   base.timeout, base.missed, base.feed_rate)

    async def bench() -> int:
        report = await measure(args.quick, options=opts)
        print(show(report))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report.as_json(), indent=1))
        return 0 if report.correct else 1

    return run_bench("deadpeer_bench", bench)


if __name__ == "__main__":
    sys.exit(main())
