"""Drain benchmark: SIGTERM with N idle subscribed clients, stablews against plain uvicorn.

For each N in `--clients`, two servers are measured, one after the other, each a
fresh process on 127.0.0.1 (a free port from the OS):

- `bare`: bench/baseline_app.py, a bare Starlette WebSocket endpoint under plain
  uvicorn. On SIGTERM uvicorn closes every WebSocket at once with 1012, waits for
  the connections to go, and re-raises the signal (exit status -15);
- `stablews`: `python -m stablews serve --demo-feed false --shutdown-timeout T`.
  On SIGTERM it drains (operations.md, "Graceful shutdown"): `reconnect` advice
  with a jittered `after_ms`, then 1001, for every protocol connection; exit 0.

N client connections are opened by `--processes` worker processes (this script
with --worker; asyncio and `websockets`, at most 64 handshakes in flight per
worker). stablews clients send `hello`, `subscribe` to one channel and wait for
`subscribed`; bare clients only connect. Every client answers pings and records
when (CLOCK_MONOTONIC, one clock for every process on Linux) it got `reconnect`
and its close, and the close code. Then SIGTERM goes to the server, and the
script reports:

- signal -> exit: from the signal to the server process's exit;
- signal -> last close: from the signal to the close of the last client;
- how many clients got `reconnect` before a 1001 close, and the close codes;
- the spread of `after_ms` (min / median / max), with the documented bound
  min(max_reconnect_delay, max(reconnect_delay, N / 1000)) s (defaults: 30 s, 1 s);
- the ratio stablews / bare of both times.

    python bench/drain_bench.py                                    # 200, 1000 and 2000 clients
    python bench/drain_bench.py --clients 200,1000 --output /tmp/drain.json

Bounded: handshakes time out after `--open-timeout`, a server still running
`shutdown_timeout` + 30 s after the signal is killed (and the run reported as
such), workers give up waiting for their closes at the same bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from benchlib import (
    BENCH_DIR,
    KINDS,
    BenchError,
    ClientWorker,
    Json,
    ServerProcess,
    WorkerProcess,
    dumps,
    emit,
    raise_nofile_limit,
    run_bench,
    service_revision,
    start_workers,
    stdin_reader,
    workers_ready,
)

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "drain_bench.json"

CHANNEL = "bench.drain"
# stablews defaults (configuration.md): the shutdown spread of after_ms.
RECONNECT_DELAY = 1.0
MAX_RECONNECT_DELAY = 30.0
EXIT_GRACE = 30.0  # beyond shutdown_timeout, before the server is killed
WORKER_STREAM_LIMIT = 64 * 1024 * 1024  # the "done" line holds one record per connection


def documented_spread(clients: int) -> float:
    """protocol.md, "Reconnect advice": the shutdown spread of after_ms, in seconds."""
    return min(MAX_RECONNECT_DELAY, max(RECONNECT_DELAY, clients / 1000))


# =================================================================== workers
#
# A worker opens `count` connections, prints {"event": "ready", ...} on stdout,
# then waits until the server has closed every one of them (or `close_wait`
# seconds pass, or stdin reaches EOF: the parent is gone), prints
# {"event": "done", "records": [...]} and exits.


@dataclass(slots=True)
class Record:
    advice_at: float | None = None
    after_ms: Any = None
    reason: Any = None
    after_advice: int = 0  # messages received after the advice (there should be none)
    closed_at: float | None = None
    code: int | None = None

    def row(self) -> list[Any]:
        return [self.closed_at, self.code, self.advice_at, self.after_ms, self.reason, self.after_advice]


class Worker(ClientWorker):
    client = "drain_bench"
    channel = CHANNEL
    max_size = 16 * 1024 * 1024
    abort_on_failure = True

    def __init__(self, spec: Json) -> None:
        super().__init__(spec)
        self.close_wait: float = spec["close_wait"]
        self.connections: list[tuple[ClientConnection, Record]] = []
        self.readers: list[asyncio.Task[None]] = []

    def opened(self, ws: ClientConnection) -> None:
        record = Record()
        self.connections.append((ws, record))
        self.readers.append(asyncio.create_task(self._read(ws, record)))

    @staticmethod
    async def _read(ws: ClientConnection, record: Record) -> None:
        try:
            async for frame in ws:
                for line in str(frame).split("\n"):
                    msg = json.loads(line)
                    kind = msg.get("type")
                    if kind == "ping":
                        await ws.send(dumps({"type": "pong", "id": msg["id"]}))
                    elif kind == "reconnect" and record.advice_at is None:
                        record.advice_at = time.monotonic()
                        record.after_ms = msg.get("after_ms")
                        record.reason = msg.get("reason")
                    elif record.advice_at is not None:
                        record.after_advice += 1
        except ConnectionClosed:
            pass
        finally:
            record.closed_at = time.monotonic()
            record.code = ws.close_code


async def worker_main(spec: Json) -> int:
    stdin = await stdin_reader()
    worker = Worker(spec)
    await worker.open_and_report()
    parent_gone = asyncio.create_task(stdin.read())  # EOF: the parent is gone
    all_closed = asyncio.gather(*worker.readers, return_exceptions=True)
    await asyncio.wait({parent_gone, all_closed}, timeout=worker.close_wait, return_when=asyncio.FIRST_COMPLETED)
    still_open = 0
    for (ws, _), reader in zip(worker.connections, worker.readers, strict=True):
        if not reader.done():
            still_open += 1
            ws.transport.abort()
            reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await all_closed
    parent_gone.cancel()
    emit({
        "event": "done",
        "still_open": still_open,
        "records": [r.row() for _, r in worker.connections if r.closed_at is not None],
    })
    return 0


# =================================================================== servers


@dataclass
class Server(ServerProcess):
    lines: list[str] = field(default_factory=list)

    def keep(self, line: str) -> None:
        self.lines.append(line)

    def log(self, msg: str) -> Json | None:
        for line in self.lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == msg:
                    return entry
        return None


# =================================================================== one run


def spread_figures(values: Sequence[float]) -> Json | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


async def run_one(kind: str, clients: int, opts: argparse.Namespace) -> Json:
    result: Json = {"kind": kind, "clients": clients}
    server = await Server.start(
        kind, opts.python, ["--shutdown-timeout", f"{opts.shutdown_timeout:g}s", "--log-level", "info"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    workers: list[WorkerProcess] = []
    bound = opts.shutdown_timeout + EXIT_GRACE
    try:
        spec = {"url": server.ws_url, "concurrency": 64, "open_timeout": opts.open_timeout,
                "close_wait": opts.open_timeout + bound + 30}
        workers = await start_workers(opts.python, SCRIPT, kind, clients, opts.processes, spec,
                                      limit=WORKER_STREAM_LIMIT)
        opened = time.monotonic()
        await workers_ready(workers, opts.open_timeout * 3 + 60)
        result["open_seconds"] = round(time.monotonic() - opened, 3)

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(bound):
                status = await server.proc.wait()
            exited = time.monotonic()
        except TimeoutError:
            await server.kill()
            raise BenchError(f"{kind} server still running {bound:g}s after SIGTERM (killed)") from None
        done = await asyncio.gather(*(w.event("done", bound + opts.open_timeout + 60) for w in workers))
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        await server.kill()

    records = [row for d in done for row in d["records"]]
    closes = [r[0] for r in records]
    codes = Counter(str(r[1]) for r in records)
    advised = [r for r in records if r[2] is not None]
    advice_then_1001 = [r for r in advised if r[1] == 1001 and r[2] <= r[0]]
    after_ms = [r[3] for r in advised if isinstance(r[3], int | float)]
    result.update({
        "exit_status": status,
        "signal_to_exit_seconds": round(exited - signalled, 4),
        "signal_to_first_close_seconds": round(min(closes) - signalled, 4) if closes else None,
        "signal_to_last_close_seconds": round(max(closes) - signalled, 4) if closes else None,
        "closed": len(records),
        "still_open": sum(d["still_open"] for d in done),
        "close_codes": dict(codes),
        "reconnect_then_1001": len(advice_then_1001),
        "reconnect_reasons": dict(Counter(str(r[4]) for r in advised)),
        "messages_after_reconnect": sum(r[5] for r in records),
        "after_ms": spread_figures(after_ms),
        "after_ms_bound": int(documented_spread(clients) * 1000) if kind == "stablews" else None,
        "after_ms_out_of_bound": (
            sum(1 for v in after_ms if not 0 <= v <= documented_spread(clients) * 1000) if kind == "stablews" else None
        ),
    })
    if kind == "stablews":
        drained = server.log("drain finished")
        result["drain_log"] = {k: drained.get(k) for k in (
            "connections_closed", "connections_abandoned", "messages_flushed", "drain_seconds")} if drained else None
    return result


# =================================================================== report


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: Sequence[Json], counts: Sequence[int]) -> list[Json]:
    """Per N: the median of each time over the repeats, per server, and the ratio stablews / bare."""
    out = []
    for n in counts:
        entry: Json = {"clients": n}
        for kind in KINDS:
            ok = [r for r in runs if r["clients"] == n and r["kind"] == kind and "error" not in r]
            entry[kind] = {
                key: statistics.median(r[key] for r in ok) if ok else None
                for key in ("signal_to_exit_seconds", "signal_to_last_close_seconds")
            }
        for key in ("signal_to_exit_seconds", "signal_to_last_close_seconds"):
            value = ratio(entry["stablews"][key], entry["bare"][key])
            entry[f"ratio_{key}"] = None if value is None else round(value, 3)
        out.append(entry)
    return out


def table(runs: Sequence[Json], summary: Sequence[Json]) -> str:
    header = ("clients", "server", "exit", "signal->exit s", "signal->last close s", "close codes",
              "reconnect then 1001", "after_ms min/median/max (bound)")
    rows: list[tuple[str, ...]] = [header]
    for run in runs:
        if "error" in run:
            rows.append((str(run["clients"]), run["kind"], "ERROR", run["error"][:60], "", "", "", ""))
            continue
        spread = run["after_ms"]
        spread_text = "-" if spread is None else (
            f"{spread['min']:g}/{spread['median']:g}/{spread['max']:g} (0..{run['after_ms_bound']})"
        )
        codes = ", ".join(f"{code} x{n}" for code, n in sorted(run["close_codes"].items()))
        rows.append((
            str(run["clients"]), run["kind"], str(run["exit_status"]), seconds(run["signal_to_exit_seconds"]),
            seconds(run["signal_to_last_close_seconds"]), codes + (f", open x{run['still_open']}"
                                                                   if run["still_open"] else ""),
            f"{run['reconnect_then_1001']}/{run['clients']}", spread_text,
        ))
    for entry in summary:
        exit_ratio, close_ratio = entry["ratio_signal_to_exit_seconds"], entry["ratio_signal_to_last_close_seconds"]
        rows.append((str(entry["clients"]), "ratio s/b", "",
                     "-" if exit_ratio is None else f"{exit_ratio:.2f}",
                     "-" if close_ratio is None else f"{close_ratio:.2f}", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def bench(opts: argparse.Namespace, counts: list[int], argv: Sequence[str]) -> int:
    results: Json = {
        "command": " ".join(["python", "bench/drain_bench.py", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "loadavg": os.getloadavg()},
        "revision": service_revision(),
        "options": {"clients": counts, "processes": opts.processes, "shutdown_timeout": opts.shutdown_timeout,
                    "open_timeout": opts.open_timeout, "repeat": opts.repeat},
    }
    runs: list[Json] = []
    for n in counts:
        for repeat in range(opts.repeat):
            for kind in KINDS:
                try:
                    run = await run_one(kind, n, opts)
                except BenchError as exc:
                    run = {"kind": kind, "clients": n, "error": str(exc)}
                run["repeat"] = repeat + 1
                runs.append(run)
                if "error" in run:
                    print(f"  {n:>5} {kind:8} ERROR: {run['error']}", flush=True)
                else:
                    print(f"  {n:>5} {kind:8} exit {run['exit_status']} after {run['signal_to_exit_seconds']:.3f}s, "
                          f"last close {seconds(run['signal_to_last_close_seconds'])}s, "
                          f"codes {run['close_codes']}", flush=True)
    results["runs"] = runs
    results["summary"] = summarize(runs, counts)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print()
    print(table(runs, results["summary"]))
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {opts.output}")
    return 1 if any("error" in r for r in runs) else 0


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts must be at least 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SIGTERM with N idle subscribed clients: stablews's drain against plain uvicorn's shutdown."
    )
    parser.add_argument("--clients", type=parse_counts, default=[200, 1000, 2000],
                        help="client counts, comma-separated (default 200,1000,2000)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (default %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="client worker processes (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per count and server; medians (default 1)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="stablews --shutdown-timeout, seconds (default %(default)s)")
    parser.add_argument("--open-timeout", type=float, default=60.0,
                        help="per-connection handshake (and subscribe) deadline, seconds (default %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers and workers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(args_list)
    raise_nofile_limit()
    if opts.worker:
        return asyncio.run(worker_main(json.loads(opts.worker)))
    if opts.processes < 1 or opts.repeat < 1:
        print("drain_bench: --processes and --repeat must be at least 1", file=sys.stderr)
        return 2
    return run_bench("drain_bench", lambda: bench(opts, opts.clients, args_list))


if __name__ == "__main__":
    sys.exit(main())
