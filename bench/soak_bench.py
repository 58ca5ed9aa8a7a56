"""Churn soak: connections come and go at a steady rate; memory and connection records must level off.

One `stablews serve` on 127.0.0.1 (a free port), demo feed on. `--processes` worker processes
(this script with --worker) keep `--slots` connections between them: each slot connects,
says hello, subscribes to demo.ticker, reads (pings answered) for a lifetime drawn around
`--lifetime`, and ends it: two times in three with a close frame, else with an abrupt TCP
abort (a drop: the server records `client_gone`). Then the slot connects again. So about
slots / lifetime connections open and close every second, for `--duration` seconds.

The server's resident memory is sampled every second. Figures:
- memory at the end against memory after the warm-up (`--warmup`), both as the median of
  the last samples of that moment, under the same churn: growth must stay within 5 %;
- connection records once every client has gone (stats `connections.records`): no live
  connection, no scheduler entry, the ring of closed connections at most its bound.
Correct when every connection got contiguous offsets while it lived (none lost, none
repeated), no connection failed to open, and the records came back to their bound.

    python bench/soak_bench.py                   # 10 minutes, 400 slots, 4 s lifetimes (~100 connects/s)
    python bench/soak_bench.py --quick           # 12 s, 40 slots, 1 s lifetimes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from benchlib import (
    BENCH_DIR,
    SUBPROTOCOL,
    BenchError,
    Json,
    WorkerProcess,
    dumps,
    emit,
    raise_nofile_limit,
    run_bench,
    split_frame,
    stdin_reader,
    wait_until,
)
from core_bench import Server
from figures import Figure, Report, median

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "soak_bench.json"
CHANNEL = "demo.ticker"
GROWTH_GOAL = 1.05
SAMPLE_WINDOW = 10  # samples (seconds) in the median of "after warm-up" and "at the end"


@dataclass(frozen=True, slots=True)
class Options:
    duration: float = 600.0
    warmup: float = 60.0
    slots: int = 400
    lifetime: float = 4.0
    processes: int = 2
    heartbeat_interval: float = 5.0
    feed_rate: float = 20.0


QUICK = Options(duration=12.0, warmup=3.0, slots=40, lifetime=1.0, processes=1, heartbeat_interval=1.0)


# =================================================================== the worker


class Churn:
    def __init__(self, spec: Json) -> None:
        self.url: str = spec["url"]
        self.slots: int = spec["slots"]
        self.lifetime: float = spec["lifetime"]
        self.rng = random.Random(spec["seed"])
        self.stopping = asyncio.Event()
        self.opened = 0
        self.failed = 0
        self.first_error: str | None = None
        self.ended: Counter[str] = Counter()  # graceful, dropped, by_server
        self.messages = 0
        self.lost = 0
        self.duplicated = 0
        self.server_closes: Counter[str] = Counter()

    async def slot(self) -> None:
        while not self.stopping.is_set():
            await self.one_connection(self.lifetime * (0.5 + self.rng.random()), self.rng.random() < 1 / 3)

    async def one_connection(self, lifetime: float, drop: bool) -> None:
        try:
            async with asyncio.timeout(30):
                ws = await connect(self.url, subprotocols=[SUBPROTOCOL], compression=None, proxy=None,
                                   ping_interval=None, open_timeout=None, close_timeout=5)
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.failed += 1
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.1)  # a refused connect does not spin
            return
        self.opened += 1
        last: tuple[str, int] | None = None
        try:
            await ws.send(dumps({"type": "hello", "client": "soak_bench"}))
            await ws.send(dumps({"type": "subscribe", "channel": CHANNEL}))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(lifetime):
                    async for frame in ws:
                        for msg in split_frame(frame):
                            kind = msg.get("type")
                            if kind == "ping":
                                await ws.send(dumps({"type": "pong", "id": msg["id"]}))
                            elif kind == "message":
                                self.messages += 1
                                epoch, offset = msg["epoch"], msg["offset"]
                                if last is not None and last[0] == epoch:
                                    if offset <= last[1]:
                                        self.duplicated += 1
                                    elif offset > last[1] + 1:
                                        self.lost += offset - last[1] - 1
                                last = (epoch, offset)
            if ws.close_code is not None:
                self.server_closes[f"{ws.close_code} {ws.close_reason or ''}".strip()] += 1
                self.ended["by_server"] += 1
            elif drop:
                ws.transport.abort()
                self.ended["dropped"] += 1
            else:
                await ws.close()
                self.ended["graceful"] += 1
        except (ConnectionClosed, OSError) as exc:
            self.server_closes[type(exc).__name__] += 1
            self.ended["by_server"] += 1
            ws.transport.abort()

    def figures(self) -> Json:
        return {"opened": self.opened, "failed": self.failed, "first_error": self.first_error,
                "ended": dict(self.ended), "messages": self.messages, "lost": self.lost,
                "duplicated": self.duplicated, "server_closes": dict(self.server_closes)}


async def worker_main(spec: Json) -> int:
    raise_nofile_limit()
    stdin = await stdin_reader()
    churn = Churn(spec)
    slots = [asyncio.create_task(churn.slot()) for _ in range(churn.slots)]
    emit({"event": "ready"})
    while line := await stdin.readline():
        cmd = json.loads(line)["cmd"]
        if cmd == "progress":
            emit({"event": "progress", **churn.figures()})
        elif cmd == "close":
            break
    churn.stopping.set()  # every slot ends its current connection at the end of its lifetime
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(churn.lifetime * 1.5 + 35):
            await asyncio.gather(*slots, return_exceptions=True)
    for task in slots:
        task.cancel()
    emit({"event": "closed", **churn.figures()})
    return 0


# =================================================================== the measure


def merge(reports: Sequence[Json]) -> Json:
    total: Json = {"opened": 0, "failed": 0, "messages": 0, "lost": 0, "duplicated": 0}
    ended: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    for r in reports:
        for key in total:
            total[key] += r[key]
        ended.update(r["ended"])
        closes.update(r["server_closes"])
    total["ended"] = dict(ended)
    total["server_closes"] = dict(closes)
    total["first_error"] = next((r["first_error"] for r in reports if r["first_error"]), None)
    return total


async def measure(quick: bool, python: str = sys.executable, options: Options | None = None) -> Report:
    opts = options or (QUICK if quick else Options())
    report = Report("soak", f"churn soak: {opts.duration:g} s of {opts.slots} connections living about "
                            f"{opts.lifetime:g} s (~{opts.slots / opts.lifetime:.0f} connects/s, a third dropped)")
    started = time.monotonic()
    flags = ["--demo-feed", "true", "--demo-feed-rate", f"{opts.feed_rate:g}",
             "--heartbeat-interval", f"{opts.heartbeat_interval:g}s",
             "--heartbeat-timeout", f"{opts.heartbeat_interval / 2:g}s"]
    server = await Server.start("stablews", python, flags, stdin=asyncio.subprocess.DEVNULL)
    workers: list[WorkerProcess] = []
    samples: list[tuple[float, int]] = []
    closed: list[Json] = []
    records: Json = {}
    try:
        share, extra = divmod(opts.slots, opts.processes)
        for i in range(opts.processes):
            spec = {"url": server.ws_url, "slots": share + (i < extra), "lifetime": opts.lifetime, "seed": i}
            workers.append(await WorkerProcess.start(python, SCRIPT, spec, f"soak worker {i}"))
        for w in workers:
            await w.event("ready", 30)
        begin = time.monotonic()
        while (now := time.monotonic()) - begin < opts.duration:
            samples.append((round(now - begin, 2), server.rss()))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        opened_total = (await server.stats() or {})["connections"]["opened_total"]
        closed = [c for c in await asyncio.gather(*(w.close() for w in workers)) if c is not None]
        workers = []

        async def records_back() -> bool:
            nonlocal records
            stats = await server.stats() or {}
            records = stats["connections"]["records"]
            return records["live"] == 0 and records["scheduled"] == 0

        # A closed connection's scheduler entry goes when it comes due: within a heartbeat interval.
        settle = opts.heartbeat_interval * 2 + 15
        settled = True
        try:
            await wait_until(records_back, settle, "connection records back to their bound", interval=0.2)
        except BenchError:  # reported below with what was left
            settled = False
        stats = await server.stats() or {}
    finally:
        for w in workers:
            await w.close()
        status = await server.stop()
    report.seconds = time.monotonic() - started

    churn = merge(closed)
    warm = [rss for t, rss in samples if t <= opts.warmup][-SAMPLE_WINDOW:]
    end = [rss for _, rss in samples][-SAMPLE_WINDOW:]
    rss_warm, rss_end = median(warm), median(end)
    if len(closed) != opts.processes:
        report.problem(f"{opts.processes - len(closed)} churn workers did not report")
    if churn["failed"]:
        report.problem(f"{churn['failed']} connections failed to open: {churn['first_error']}")
    if churn["lost"] or churn["duplicated"]:
        report.problem(f"messages lost {churn['lost']}, duplicated {churn['duplicated']} within connections")
    if not settled:
        report.problem(f"connection records did not come back within {settle:g}s: {records}")
    if records.get("closed_kept", 0) > (records.get("closed_kept_max") or 0):
        report.problem(f"closed records above their bound: {records}")
    if status != 0:
        report.problem(f"the server exited {status} on SIGTERM")
    report.figures = [
        Figure("soak.rss_growth", "churn soak: resident memory at the end against after warm-up", "bytes",
               rss_end, rss_warm, "after warm-up", "lower", f"<= {GROWTH_GOAL}"),
        Figure("soak.records_left", "churn soak: connection records left once every client has gone", "records",
               float(records.get("live", 0) + records.get("scheduled", 0)), None, "-", "lower", "<= 0", "value"),
        Figure("soak.connects_per_second", "churn soak: connections opened per second", "/s",
               opened_total / opts.duration if opts.duration else None, None, "-", "higher"),
    ]
    report.series["rss"] = samples
    report.series["warmup_seconds"] = opts.warmup
    report.raw = {"options": asdict(opts),
        "churn": churn, "records": records, "opened_total": opened_total, "rss_warm": rss_warm, "rss_end": rss_end,
        "closed_by_cause": stats.get("connections", {}).get("closed_by_cause"), "server_exit_status": status}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--slots", type=int)
    parser.add_argument("--lifetime", type=float)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.worker:
        return asyncio.run(worker_main(json.loads(args.worker)))
    raise_nofile_limit()
    opts = QUICK if args.quick else Options()
    given = {k: getattr(args, k) for k in ("duration", "warmup", "slots", "lifetime") if getattr(args, k) is not None}
    opts = replace(opts, **given)

    async def bench() -> int:
        report = await measure(args.quick, options=opts)
        for f in report.figures:
            print(f"{f.label}: {f.value} against {f.baseline} ({f.baseline_label}), ratio {f.ratio}, met {f.met}")
        for p in report.problems:
            print(f"PROBLEM: {p}")
        print(json.dumps(report.raw["churn"]), json.dumps(report.raw["records"]))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report.as_json(), indent=1))
        return 0 if report.correct else 1

    return run_bench("soak_bench", bench)


if __name__ == "__main__":
    sys.exit(main())
