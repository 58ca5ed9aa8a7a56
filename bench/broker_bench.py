"""Broker benchmark: the Redis Streams broker against the memory broker, in the same run.

A `redis-server` (Debian's package) is started by this script on a free loopback port with
nothing persisted; `stablews serve` processes run with `--broker memory` or `--broker
redis://127.0.0.1:<port>/0`, `--demo-feed false`, `--rate-limit 0`, `--client-publish true`.
The runs of each measurement alternate memory, redis, redis, memory, ... so both see the same
machine conditions.

1. Fan-out throughput: core_bench's fan-out (bench/core_bench.py: one publisher pipelines
   `--messages` publications to `--subscribers` subscribers in worker processes; delivered
   messages/s; every subscriber must get offsets 1..N once, in order). Ratio redis/memory.
2. Delivery latency at a steady rate: `--rate` publications a second for `--seconds` seconds to
   `--latency-subscribers` subscribers; each publication carries its send time (time.time()),
   each subscriber records receipt - send for every message. p50, p99 and max over all
   deliveries; every subscriber must get every offset once, in order. Ratio redis/memory.
3. Failover (redis only): instances A and B on the same Redis, `--failover-clients` StableClients
   (the project's client, in worker processes, `urls=[B, A]`, recovery options from
   `--initial-delay`, `--jitter-max`) subscribed on B while A takes `--failover-rate` (100)
   publications a second. B is killed with SIGKILL; the time from the kill to each client's
   resumed channel on A (its `recovered` event), and whether any client lost, repeated or
   resynced a message.

Times come from time.monotonic() (CLOCK_MONOTONIC, one clock for every process on the machine)
except latency, which uses time.time() in both the publisher and the subscribers (same machine).

    python bench/broker_bench.py            # 1,000 subscribers, 3 runs; 1,000 failover clients
    python bench/broker_bench.py --quick    # 100 subscribers, 1 run; 100 failover clients
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import core_bench
from benchlib import (
    BENCH_DIR,
    SUBPROTOCOL,
    BenchError,
    ClientWorker,
    Json,
    WorkerProcess,
    dumps,
    emit,
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
DEFAULT_OUTPUT = BENCH_DIR / "out" / "broker_bench.json"
LATENCY_CHANNEL = "bench.latency"
FAILOVER_CHANNEL = "bench.failover"
SAMPLE = 20_000  # latencies each worker sends back (a uniform sample of what it measured)


# =================================================================== redis


class Redis:
    """redis-server on a free loopback port, nothing persisted, its files in a temporary directory."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise BenchError("redis-server not found: apt-get install redis-server")
        self.dir = tempfile.mkdtemp(prefix="broker-bench-")
        for _ in range(5):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.port = sock.getsockname()[1]
            self.proc = subprocess.Popen(
                [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
                time.sleep(0.02)
            self.proc.kill()
            self.proc.wait()
        raise BenchError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), 5) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def broker_flags(broker: str) -> list[str]:
    return ["--broker", broker, "--rate-limit", "0", "--client-publish", "true"]


async def start_stablews(python: str, broker: str, *extra: str) -> core_bench.Server:
    return await core_bench.Server.start("stablews", python, [*broker_flags(broker), *extra],
                                         stdin=asyncio.subprocess.DEVNULL)


async def wait_ready(server: core_bench.Server, timeout: float = 30.0) -> None:
    from benchlib import http_get

    async def ready() -> bool:
        with contextlib.suppress(OSError, BenchError):
            return (await http_get(server.port, "/readyz")).status == 200
        return False

    await wait_until(ready, timeout, "the server ready")


# =================================================================== latency workers


class LatencyWorker(ClientWorker):
    client = "broker_bench"
    max_queue = None

    def __init__(self, spec: Json) -> None:
        super().__init__(spec)
        self.channel = spec["channel"]
        self.latencies: list[float] = []
        self.counts: list[int] = []
        self.order_errors = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.received = 0

    def opened(self, ws: ClientConnection) -> None:
        index = len(self.counts)
        self.counts.append(0)
        task = asyncio.create_task(self._read(ws, index))
        self.tasks.add(task)

    async def _read(self, ws: ClientConnection, index: int) -> None:
        latencies = self.latencies
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                now = time.time()
                for msg in split_frame(frame):
                    kind = msg.get("type")
                    if kind == "message":
                        if msg["offset"] != self.counts[index] + 1:
                            self.order_errors += 1
                        self.counts[index] = msg["offset"]
                        latencies.append(now - msg["data"]["t"])
                        self.received += 1
                    elif kind == "ping":
                        await ws.send(dumps({"type": "pong", "id": msg["id"]}))

    async def expect(self, messages: int, timeout: float) -> Json:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c < messages for c in self.counts):
            await asyncio.sleep(0.05)
        sample = self.latencies if len(self.latencies) <= SAMPLE else random.sample(self.latencies, SAMPLE)
        return {
            "event": "done",
            "received": self.received,
            "exact": sum(1 for c in self.counts if c == messages) if not self.order_errors else 0,
            "order_errors": self.order_errors,
            "max": max(self.latencies, default=None),
            "sample": [round(x, 6) for x in sample],
        }


async def latency_worker(spec: Json) -> int:
    stdin = await stdin_reader()
    worker = LatencyWorker(spec)
    await worker.open_and_report()
    while line := await stdin.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            emit(await worker.expect(cmd["messages"], cmd["timeout"]))
        elif cmd["cmd"] == "close":
            break
    for task in worker.tasks:
        task.cancel()
    emit({"event": "closed"})
    return 0


async def paced_publisher(url: str, channel: str, rate: float, count: int, pad: int = 60) -> Json:
    """Publish `count` messages at `rate` a second over the protocol (client publish), each carrying its send time."""
    ws = await connect(url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None, max_queue=None)
    acks = 0
    try:
        await ws.send(dumps({"type": "hello", "client": "broker_bench-publisher"}))

        async def read_acks() -> None:
            nonlocal acks
            async for frame in ws:
                for msg in split_frame(frame):
                    if msg.get("type") == "published":
                        acks += 1
                    elif msg.get("type") == "ping":
                        await ws.send(dumps({"type": "pong", "id": msg["id"]}))

        reader = asyncio.create_task(read_acks())
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data = {"t": time.time(), "seq": i, "pad": "x" * pad}
            await ws.send(dumps({"type": "publish", "channel": channel, "data": data, "id": i}))
        async def all_acked() -> bool:
            return acks >= count

        await wait_until(all_acked, 30, "every publication acknowledged")
        reader.cancel()
        return {"sent": count, "acks": acks, "seconds": round(loop.time() - start, 3)}
    finally:
        await ws.close()


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run_latency(broker: str, opts: Options) -> Json:
    server = await start_stablews(opts.python, broker)
    workers: list[WorkerProcess] = []
    count = int(opts.rate * opts.seconds)
    result: Json = {"broker": "redis" if broker != "memory" else "memory", "rate": opts.rate, "messages": count,
                    "subscribers": opts.latency_subscribers}
    try:
        await wait_ready(server)
        spec = {"url": server.ws_url, "concurrency": 100, "open_timeout": 60, "channel": LATENCY_CHANNEL}
        workers = await start_workers(opts.python, SCRIPT, "stablews", opts.latency_subscribers, opts.processes,
                                      {**spec, "mode": "latency"}, limit=64 * 1024 * 1024)
        await workers_ready(workers, 90)
        for w in workers:
            await w.command({"cmd": "expect", "messages": count, "timeout": opts.seconds + 60})
        result["publisher"] = await paced_publisher(server.ws_url, LATENCY_CHANNEL, opts.rate, count)
        done = await asyncio.gather(*(w.event("done", opts.seconds + 90) for w in workers))
        sample = sorted(x for d in done for x in d["sample"])
        result.update({
            "received": sum(d["received"] for d in done),
            "expected": count * opts.latency_subscribers,
            "exact_subscribers": sum(d["exact"] for d in done),
            "order_errors": sum(d["order_errors"] for d in done),
            "p50_ms": round(percentile(sample, 0.5) * 1000, 3) if sample else None,
            "p99_ms": round(percentile(sample, 0.99) * 1000, 3) if sample else None,
            "max_ms": round(max(d["max"] for d in done if d["max"] is not None) * 1000, 3),
        })
        if result["exact_subscribers"] != opts.latency_subscribers:
            result["problem"] = f"{result['exact_subscribers']} of {opts.latency_subscribers} got every offset"
    finally:
        for w in workers:
            await w.close()
        await server.stop()
    return result


# =================================================================== failover workers


async def failover_worker(spec: Json) -> int:
    """`count` StableClients with urls [B, A]; report when each resumed after the kill, and what each received."""
    sys.path.insert(0, str(BENCH_DIR.parent / "service"))
    from stablews.client import StableClient
    from stablews.recovery import RecoveryPolicy

    stdin = await stdin_reader()
    policy = RecoveryPolicy(initial_delay=spec["initial_delay"], jitter_max=spec["jitter_max"], max_retries=50,
                            circuit_breaker_threshold=50)
    clients: list[StableClient] = []
    seen: list[list[int]] = []
    resumed_at: list[float | None] = []
    resyncs = [0]
    for i in range(spec["count"]):
        client = StableClient(urls=spec["urls"], channels=[FAILOVER_CHANNEL], policy=policy, open_timeout=30)
        offsets: list[int] = []
        seen.append(offsets)
        resumed_at.append(None)
        client.on("message", lambda msg, offsets=offsets: offsets.append(msg["offset"]))
        client.on("recovered", lambda channel, replayed, i=i: resumed_at.__setitem__(i, time.monotonic()))
        client.on("resync", lambda channel, info: resyncs.__setitem__(0, resyncs[0] + 1))
        clients.append(client)
    gate = asyncio.Semaphore(100)

    async def start(client: StableClient) -> None:
        async with gate:
            await client.connect()
            await client.wait_connected(60)

    await asyncio.gather(*(start(c) for c in clients))
    emit({"event": "ready", "connected": len(clients), "failed": 0, "first_error": None,
          "servers": sorted({str(c.server) for c in clients})})
    while line := await stdin.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "report":
            last = cmd["last"]
            deadline = time.monotonic() + cmd["timeout"]
            while time.monotonic() < deadline and any((s[-1] if s else 0) < last for s in seen):
                await asyncio.sleep(0.05)
            lost = dup = 0
            for offsets in seen:
                if offsets:
                    expected = list(range(offsets[0], offsets[-1] + 1))
                    dup += len(offsets) - len(set(offsets))
                    lost += len(set(expected) - set(offsets)) + max(0, last - offsets[-1])
            emit({"event": "report", "resumed_at": resumed_at, "servers": sorted({str(c.server) for c in clients}),
                  "lost": lost, "duplicated": dup, "resyncs": resyncs[0],
                  "drops": sum(c.recovery_stats()["drops"] for c in clients)})
        elif cmd["cmd"] == "close":
            break
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    emit({"event": "closed"})
    return 0


async def http_publisher(port: int, channel: str, rate: float, stop: asyncio.Event, acked: list[int]) -> None:
    """Publish at `rate` a second through POST /api/v1/publish on one keep-alive connection until `stop`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        i = 0
        while not stop.is_set():
            body = dumps({"channel": channel, "data": {"seq": i}}).encode()
            writer.write(b"POST /api/v1/publish HTTP/1.1\r\nHost: bench\r\nX-API-Key: bench-key-0123456789\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            answer = json.loads(await reader.readexactly(length))
            if "offset" in answer:
                acked.append(answer["offset"])
            i += 1
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        writer.close()


async def run_failover(redis: Redis, opts: Options) -> Json:
    env = {**os.environ, "STABLEWS_API_KEY": "bench-key-0123456789"}
    a = await core_bench.Server.start("stablews", opts.python, [*broker_flags(redis.url), "--instance-id", "a"],
                                      stdin=asyncio.subprocess.DEVNULL, env=env)
    b = await core_bench.Server.start("stablews", opts.python, [*broker_flags(redis.url), "--instance-id", "b"],
                                      stdin=asyncio.subprocess.DEVNULL, env=env)
    workers: list[WorkerProcess] = []
    stop = asyncio.Event()
    acked: list[int] = []
    publisher: asyncio.Task[None] | None = None
    result: Json = {"clients": opts.failover_clients, "rate": opts.failover_rate, "initial_delay": opts.initial_delay,
                    "jitter_max": opts.jitter_max}
    try:
        await wait_ready(a)
        await wait_ready(b)
        spec = {"urls": [b.ws_url, a.ws_url], "initial_delay": opts.initial_delay, "jitter_max": opts.jitter_max,
                "mode": "failover", "url": b.ws_url, "concurrency": 100, "open_timeout": 60}
        workers = await start_workers(opts.python, SCRIPT, "stablews", opts.failover_clients, opts.processes, spec,
                                      limit=64 * 1024 * 1024)
        ready = await workers_ready(workers, 120)
        if {s for r in ready for s in r["servers"]} != {"b"}:
            raise BenchError(f"clients not all on B: {[r['servers'] for r in ready]}")
        publisher = asyncio.create_task(http_publisher(a.port, FAILOVER_CHANNEL, opts.failover_rate, stop, acked))
        await asyncio.sleep(2)  # traffic flows before the kill
        killed_at = time.monotonic()
        b.proc.send_signal(signal.SIGKILL)
        await b.proc.wait()
        await asyncio.sleep(max(5.0, opts.initial_delay * 4 + opts.jitter_max * 2))
        stop.set()
        await publisher
        publisher = None
        for w in workers:
            await w.command({"cmd": "report", "last": acked[-1], "timeout": 60})
        reports = await asyncio.gather(*(w.event("report", 90) for w in workers))
        times = sorted(t - killed_at for r in reports for t in r["resumed_at"] if t is not None)
        result.update({
            "published": len(acked),
            "resumed": len(times),
            "resume_p50_s": round(percentile(times, 0.5), 3) if times else None,
            "resume_p99_s": round(percentile(times, 0.99), 3) if times else None,
            "all_resumed_s": round(times[-1], 3) if times else None,
            "lost": sum(r["lost"] for r in reports),
            "duplicated": sum(r["duplicated"] for r in reports),
            "resyncs": sum(r["resyncs"] for r in reports),
            "servers_after": sorted({s for r in reports for s in r["servers"]}),
        })
        if len(times) != opts.failover_clients:
            result["problem"] = f"{len(times)} of {opts.failover_clients} clients resumed"
    finally:
        stop.set()
        if publisher is not None:
            with contextlib.suppress(Exception):
                await publisher
        for w in workers:
            await w.close()
        await a.stop()
        await b.kill()
    return result


# =================================================================== main


@dataclass
class Options:
    python: str
    subscribers: int
    messages: int
    repeat: int
    processes: int
    rate: float
    seconds: float
    latency_subscribers: int
    failover_clients: int
    failover_rate: float
    initial_delay: float
    jitter_max: float
    only: str


def fanout_options(opts: Options) -> core_bench.Options:
    return core_bench.Options(python=opts.python, connections=0, subscribers=opts.subscribers,
                              messages=opts.messages, payload_bytes=100, publish_window=0, repeat=1,
                              processes=opts.processes, warmup=0, settle_timeout=5.0, only="fanout")


def median(runs: Sequence[Json], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


async def bench(opts: Options, output: Path, argv: Sequence[str]) -> int:
    redis = Redis()
    results: Json = {"command": " ".join(["python", "bench/broker_bench.py", *argv]),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "machine": core_bench.machine(), "revision": service_revision(),
                     "options": {k: v for k, v in vars(opts).items() if k != "python"},
                     "fanout": {"memory": [], "redis": []}, "latency": {"memory": [], "redis": []}}
    failed = False
    try:
        order = [("memory", "redis") if i % 2 == 0 else ("redis", "memory") for i in range(opts.repeat)]
        for measure in [m for m in ("fanout", "latency") if opts.only in ("all", m)]:
            print(f"{measure}:", flush=True)
            for i, pair in enumerate(order):
                for name in pair:
                    broker = "memory" if name == "memory" else redis.url
                    redis.flush()
                    try:
                        if measure == "fanout":
                            async def starter(kind: str, python: str, client_publish: bool, broker=broker):
                                server = await start_stablews(python, broker)
                                await wait_ready(server)
                                return server

                            run = await core_bench.run_fanout("stablews", fanout_options(opts), starter)
                        else:
                            run = await run_latency(broker, opts)
                    except BenchError as exc:
                        run = {"error": str(exc)}
                        failed = True
                    run["repeat"] = i + 1
                    results[measure][name].append(run)
                    shown = {k: run.get(k) for k in ("delivered_per_second", "p50_ms", "p99_ms", "max_ms",
                                                     "exact_subscribers", "problem", "error") if k in run}
                    print(f"  {name:6} run {i + 1}: {shown}", flush=True)
        if opts.only in ("all", "failover"):
            print("failover:", flush=True)
            redis.flush()
            try:
                results["failover"] = await run_failover(redis, opts)
            except BenchError as exc:
                results["failover"] = {"error": str(exc)}
                failed = True
            print(f"  {results['failover']}", flush=True)
    finally:
        redis.stop()
    fan = {n: median(results["fanout"][n], "delivered_per_second") for n in ("memory", "redis")}
    lat = {n: {k: median(results["latency"][n], k) for k in ("p50_ms", "p99_ms", "max_ms")}
           for n in ("memory", "redis")}
    results["summary"] = {"fanout": fan, "latency": lat}
    rows = [
        ["figure", "memory", "redis", "redis/memory"],
        [f"fan-out to {opts.subscribers} subscribers (msgs/s)", f"{fan['memory'] or 0:,.0f}",
         f"{fan['redis'] or 0:,.0f}", ratio(fan["redis"], fan["memory"])],
    ]
    for key in ("p50_ms", "p99_ms", "max_ms"):
        rows.append([f"delivery latency {key[:-3]} (ms) at {opts.rate:g}/s to {opts.latency_subscribers}",
                     f"{lat['memory'][key]}", f"{lat['redis'][key]}", ratio(lat["redis"][key], lat["memory"][key])])
    print()
    print(text_table(rows))
    fo = results.get("failover", {})
    print(f"\nfailover ({opts.failover_clients} clients, initial_delay {opts.initial_delay:g}s, jitter_max "
          f"{opts.jitter_max:g}s): all resumed in {fo.get('all_resumed_s')} s (p50 {fo.get('resume_p50_s')} s, "
          f"p99 {fo.get('resume_p99_s')} s); lost {fo.get('lost')}, duplicated {fo.get('duplicated')}, "
          f"resyncs {fo.get('resyncs')}")
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description="The Redis broker against the memory broker, in one run.")
    parser.add_argument("--quick", action="store_true", help="100 subscribers, 1 run, 100 failover clients")
    parser.add_argument("--subscribers", type=int, help="fan-out subscribers (default 1000)")
    parser.add_argument("--messages", type=int, default=200, help="fan-out messages (default %(default)s)")
    parser.add_argument("--repeat", type=int, help="runs of each broker (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="client worker processes (default %(default)s)")
    parser.add_argument("--rate", type=float, default=1000, help="steady publications a second (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=5, help="length of the latency run (default %(default)s)")
    parser.add_argument("--latency-subscribers", type=int, help="latency subscribers (default 100)")
    parser.add_argument("--failover-clients", type=int, help="clients on the killed instance (default 1000)")
    parser.add_argument("--failover-rate", type=float, default=100,
                        help="publications a second during the failover (default %(default)s: the default history "
                             "of 1000 messages then covers 10 s away)")
    parser.add_argument("--initial-delay", type=float, default=1.0, help="clients' first backoff (default 1 s)")
    parser.add_argument("--jitter-max", type=float, default=1.0, help="clients' jitter (default 1 s)")
    parser.add_argument("--only", choices=("all", "fanout", "latency", "failover"), default="all")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(args_list)
    raise_nofile_limit()
    if args.worker:
        spec = json.loads(args.worker)
        runner = latency_worker if spec["mode"] == "latency" else failover_worker
        return asyncio.run(runner(spec))
    opts = Options(
        python=args.python,
        subscribers=args.subscribers or (100 if args.quick else 1000),
        messages=args.messages,
        repeat=args.repeat or (1 if args.quick else 3),
        processes=max(1, args.processes),
        rate=args.rate,
        seconds=args.seconds,
        latency_subscribers=args.latency_subscribers or (20 if args.quick else 100),
        failover_clients=args.failover_clients or (100 if args.quick else 1000),
        failover_rate=args.failover_rate,
        initial_delay=args.initial_delay,
        jitter_max=args.jitter_max,
        only=args.only,
    )
    return run_bench("broker_bench", lambda: bench(opts, args.output, args_list))


if __name__ == "__main__":
    sys.exit(main())
