"""Back-pressure benchmark: what clients that never read cost the server, and the clients that do read.

For each count of never-reading ("slow") clients given with --slow, in one invocation:

1. A fresh `stablews serve` process on 127.0.0.1 (free port), client publishing on, demo feed off,
   `--send-queue-max`, a long `--close-timeout` (the slow clients stay stuck in `closing` for the whole window
   instead of being abandoned), no heartbeats during the run, per-connection rate limit off
   (STABLEWS_RATE_LIMIT=0).
2. `--fast` well-behaved subscribers (their own process, this script with --role subscribers) subscribe to the
   channel before the first publication; a publisher (its own process, --role publisher) publishes `--rate`
   messages/s of `--payload-bytes` on one WebSocket connection, paced on its own clock.
3. Warm-up (channel history full), then the baseline RSS: the largest over a quiet second (psutil, sampled every
   10 ms by a thread).
4. The slow clients connect (raw sockets with SO_RCVBUF 4096 set before connect(), driven by the sans-I/O
   websockets ClientProtocol): handshake, hello, subscribe, then never read again. The window starts here.
5. It ends when every slow client is closing (the server decided 4003) plus `--hold` seconds, and lasts at least
   `--window` seconds (so the 0-slow run is measured over the same kind of stretch).
6. Figures of the window: server RSS peak and growth over the baseline; time to 4003 for each slow client (on the
   server's clock: from its `subscribe` to its `closing` in the connection's timeline); fast clients' delivery
   latency p50/p99/max (receipt wall time minus the message's `ts`, both on this machine's clock; `ts` is whole
   ms, so figures carry up to 1 ms of quantization); the publish rate (server stats); whether every fast
   subscriber got every offset exactly once, in order; bytes stuck in the server's kernel send buffers of the
   slow connections (from `ss`, not part of RSS).
7. The slow sockets are closed, publishing stops, the server is stopped.

Every run with slow clients is compared with the 0-slow run of the same invocation (ratios). Loopback only;
each step has a deadline (--run-timeout per run).

    python bench/backpressure_bench.py                              # --slow 0,10,100 --rate 1000
    python bench/backpressure_bench.py --slow 0,20 --rate 500 --output /tmp/bp.json
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from benchlib import (
    BENCH_DIR,
    HOST,
    SUBPROTOCOL,
    http_get_json,
    listening_port,
    raise_nofile_limit,
    server_command,
    wait_until,
)

DEFAULT_OUTPUT = BENCH_DIR / "out" / "backpressure_bench.json"
CHANNEL = "bench.backpressure"
SLOW_RCVBUF = 4096
Json = dict[str, Any]


# ---------------------------------------------------------------------------------------------- worker roles


async def publisher_main(url: str, rate: float, payload_bytes: int) -> None:
    """Publish `rate` messages/s until stdin closes (5 ms ticks, catching up at most 1 s); print the totals."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    payload = "p" * payload_bytes
    async with connect(url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None,
                       max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello", "client": "bench-publisher"}))
        acked = last = errors = 0

        async def acks() -> None:
            nonlocal acked, last, errors
            async for frame in ws:
                for line in str(frame).split("\n"):
                    message = json.loads(line)
                    if message["type"] == "published":
                        acked += 1
                        last = message["offset"]
                    elif message["type"] == "error":
                        errors += 1

        reader = asyncio.create_task(acks())
        sent = 0
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            if due - sent > rate:
                start = time.monotonic() - sent / rate
                due = sent
            while sent < due:
                sent += 1
                await ws.send(json.dumps({"type": "publish", "channel": CHANNEL, "data": payload}))
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 30
        while acked < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        reader.cancel()
        print(json.dumps({"sent": sent, "acked": acked, "last_offset": last, "errors": errors}), flush=True)


async def subscribers_main(url: str, count: int) -> None:
    """`count` subscribers: "ready" once subscribed; then, given the last offset on stdin, wait for it and print
    per connection: offsets exact?, close code, and (receipt wall ms, latency ms) of every message."""
    conns = []
    for _ in range(count):
        ws = await connect(url, subprotocols=[SUBPROTOCOL], compression=None, ping_interval=None,
                           max_size=None)
        await ws.send(json.dumps({"type": "hello", "client": "bench-subscriber"}))
        await ws.send(json.dumps({"type": "subscribe", "channel": CHANNEL}))
        conns.append(ws)
    state: list[Json] = [{"offsets": [], "received": [], "closed": None, "subscribed": None} for _ in conns]
    subscribed = asyncio.Event()

    async def read(ws: Any, st: Json) -> None:
        try:
            async for frame in ws:
                now_ms = time.time() * 1000
                for line in frame.split("\n"):
                    message = json.loads(line)
                    kind = message["type"]
                    if kind == "message":
                        st["offsets"].append(message["offset"])
                        st["received"].append((round(now_ms, 3), round(now_ms - message["ts"], 3)))
                    elif kind == "ping":
                        await ws.send(json.dumps({"type": "pong", "id": message["id"]}))
                    elif kind == "subscribed":
                        st["subscribed"] = message["offset"]
                        if all(s["subscribed"] is not None for s in state):
                            subscribed.set()
        finally:
            st["closed"] = ws.close_code

    readers = [asyncio.create_task(read(ws, st)) for ws, st in zip(conns, state, strict=True)]
    async with asyncio.timeout(20):
        await subscribed.wait()
    print("ready", flush=True)
    top = int(await asyncio.to_thread(sys.stdin.readline))
    deadline = time.monotonic() + 60
    while any(len(st["offsets"]) < top and st["closed"] is None for st in state) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for task in readers:
        task.cancel()
    out = [
        {
            "exact": st["offsets"] == list(range(1, top + 1)),
            "count": len(st["offsets"]),
            "closed": st["closed"],
            "subscribed_at": st["subscribed"],
            "received": st["received"],
        }
        for st in state
    ]
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- helpers


class WorkerProcess:
    """This script in another role, as a child process talking over stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    async def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(self.proc.stdout.readline)

    async def finish(self, text: str | None, timeout: float) -> Any:
        out, err = await asyncio.to_thread(self.proc.communicate, text, timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker failed ({self.proc.returncode}): {err[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Server:
    """`stablews serve` on a free loopback port."""

    def __init__(self, flags: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "STABLEWS_RATE_LIMIT": "0"}
        self.proc = subprocess.Popen(
            server_command("stablews", sys.executable, flags),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.port = 0
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(30):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))
        self.process = psutil.Process(self.proc.pid)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.lines) < 200:
                self.lines.append(line)
            if not self._listening.is_set() and (port := listening_port(line)) is not None:
                self.port = port
                self._listening.set()

    @property
    def ws(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    async def get(self, path: str) -> Any:
        """GET on the API with a plain asyncio socket (no HTTP client needed)."""
        return await http_get_json(self.port, path, 15)

    async def stats(self) -> Json:
        return await self.get("/api/v1/websocket/stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class NeverReader:
    """Handshake, hello, subscribe, then never read: a raw socket with a small SO_RCVBUF (set before connect, so
    the window is small from the start) and the sans-I/O websockets protocol; no transport reads behind it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        self.sock.setblocking(False)
        self.proto = ClientProtocol(parse_uri(f"ws://{HOST}:{port}/ws"), subprotocols=[SUBPROTOCOL],
                                    max_size=None)
        self.messages: list[Json] = []
        self.id = ""

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.proto.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def _read_some(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionError("server closed during the handshake")
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if not isinstance(event, Response) and event.opcode.name == "TEXT":
                self.messages.extend(json.loads(line) for line in event.data.decode().split("\n"))

    async def open(self) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(20):
            await loop.sock_connect(self.sock, (HOST, self.port))
            self.proto.send_request(self.proto.connect())
            await self._flush()
            while self.proto.state is State.CONNECTING:
                await self._read_some()
            if self.proto.handshake_exc is not None:
                raise self.proto.handshake_exc
            for message in ({"type": "hello", "client": "bench-never-reads"},
                            {"type": "subscribe", "channel": CHANNEL}):
                self.proto.send_text(json.dumps(message).encode())
            await self._flush()
            while not any(m["type"] == "subscribed" for m in self.messages):
                await self._read_some()
        self.id = self.messages[0]["connection"]
        return self.id

    def unread_bytes(self) -> int:
        count = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, count)
        return count[0]

    def close(self) -> None:
        self.sock.close()


class RssSampler(threading.Thread):
    def __init__(self, process: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak = 0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            with self.lock:
                self.peak = max(self.peak, rss)
            time.sleep(0.01)

    def take_peak(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak


def kernel_send_queue(port: int, peer_ports: set[int]) -> int | None:
    """Bytes in the server's kernel send buffers towards `peer_ports` (ss), None without ss."""
    if not peer_ports or shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tnH", "state", "established", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10).stdout
    total = 0
    for line in out.splitlines():
        fields = line.split()
        # Recv-Q Send-Q Local Peer (the state column is left out when a state filter is given)
        if len(fields) >= 4 and int(fields[3].rsplit(":", 1)[1]) in peer_ports:
            total += int(fields[1])
    return total


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------------- one run


async def run_once(slow_count: int, args: argparse.Namespace) -> Json:
    server = Server([
        "--client-publish", "true", "--send-queue-max", str(args.send_queue_max),
        "--close-timeout", "300s", "--heartbeat-interval", "600s", "--heartbeat-timeout", "10s",
    ])
    sampler = RssSampler(server.process)
    sampler.start()
    fast = WorkerProcess("--role", "subscribers", "--url", server.ws, "--count", str(args.fast))
    publisher: WorkerProcess | None = None
    slow = [NeverReader(server.port) for _ in range(slow_count)]
    try:
        line = await fast.readline(30)
        if line.strip() != "ready":
            raise RuntimeError(f"subscribers not ready: {line!r}")
        publisher = WorkerProcess("--role", "publisher", "--url", server.ws, "--rate", str(args.rate),
                                  "--payload-bytes", str(args.payload_bytes))

        async def warmed() -> bool:
            return (await server.stats())["broker"]["published_total"] >= max(2 * args.rate, 1500)

        await wait_until(warmed, 60, "the publisher to warm up", interval=0.1)
        sampler.take_peak()
        await asyncio.sleep(1.0)
        baseline = sampler.take_peak()
        before = await server.stats()

        window_start_wall = time.time()
        window_start = time.monotonic()
        gate = asyncio.Semaphore(50)

        async def open_one(client: NeverReader) -> str:
            async with gate:
                return await client.open()

        ids = await asyncio.gather(*(open_one(c) for c in slow))
        connected = time.monotonic() - window_start

        async def all_closing() -> bool:
            if not ids:
                return True
            listed = await server.get("/api/v1/websocket/connections?limit=1000")
            states = {view["id"]: view["state"] for view in listed["connections"]}
            return all(states.get(i, "closed") != "open" for i in ids)

        await wait_until(all_closing, args.run_timeout / 2, "every slow client to be closed", interval=0.25)
        all_closed_after = time.monotonic() - window_start
        await asyncio.sleep(args.hold)
        rest = args.window - (time.monotonic() - window_start)
        if rest > 0:
            await asyncio.sleep(rest)
        window_end_wall = time.time()
        window_seconds = time.monotonic() - window_start
        after = await server.stats()
        peak = sampler.take_peak()
        unread = [c.unread_bytes() for c in slow]
        stuck_kernel = kernel_send_queue(server.port, {c.sock.getsockname()[1] for c in slow})

        # Time to 4003, on the server's clock: subscribe -> closing in each connection's timeline.
        to_4003: list[float] = []
        causes: dict[str, int] = {}
        for conn_id in ids:
            view = await server.get(f"/api/v1/websocket/connections/{conn_id}")
            cause = (view.get("close") or {}).get("cause", "none")
            causes[cause] = causes.get(cause, 0) + 1
            events = {e["event"]: e["at"] for e in view["timeline"]}
            if "subscribe" in events and "closing" in events:
                to_4003.append(events["closing"] - events["subscribe"])

        for client in slow:
            client.close()

        async def slow_counted() -> Json | None:
            report = await server.stats()
            closed = report["connections"]["closed_by_cause"]
            return report if sum(closed.values()) >= slow_count else None

        final = await wait_until(slow_counted, 60, "the slow closes to be counted", interval=0.25)
        rss_after = server.process.memory_info().rss

        result = await publisher.finish(None, 60)
        publisher = None
        subs = await fast.finish(f"{result['last_offset']}\n", 90)

        latencies = [
            latency for sub in subs for (at, latency) in sub["received"]
            if window_start_wall * 1000 <= at <= window_end_wall * 1000
        ]
        rate = (after["broker"]["published_total"] - before["broker"]["published_total"]) / (
            after["uptime_seconds"] - before["uptime_seconds"]
        )
        return {
            "slow": slow_count,
            "window_seconds": round(window_seconds, 3),
            "slow_connected_seconds": round(connected, 3),
            "all_slow_closing_after_seconds": round(all_closed_after, 3) if slow_count else None,
            "rss_baseline_bytes": baseline,
            "rss_peak_bytes": max(peak, baseline),
            "rss_growth_bytes": max(peak, baseline) - baseline,
            "rss_after_slow_gone_bytes": rss_after,
            "time_to_4003_seconds": {
                "count": len(to_4003),
                "min": round(min(to_4003), 3) if to_4003 else None,
                "p50": round(statistics.median(to_4003), 3) if to_4003 else None,
                "max": round(max(to_4003), 3) if to_4003 else None,
                "each": [round(x, 3) for x in to_4003],
            },
            "slow_close_causes": causes,
            "closed_by_cause": final["connections"]["closed_by_cause"],
            "slow_unread_bytes_in_client_kernel_min": min(unread) if unread else None,
            "slow_bytes_in_server_kernel_send_buffers": stuck_kernel,
            "publish_rate_per_second": round(rate, 1),
            "published": result,
            "fast_latency_ms": {
                "samples": len(latencies),
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
                "max": max(latencies) if latencies else None,
            },
            "fast_exact": [sub["exact"] for sub in subs],
            "fast_closed": [sub["closed"] for sub in subs],
        }
    finally:
        sampler.done.set()
        if publisher is not None:
            publisher.kill()
        fast.kill()
        for client in slow:
            client.close()
        server.stop()


# ---------------------------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def table(runs: list[Json]) -> str:
    base = next((r for r in runs if r["slow"] == 0), None)
    header = (
        f"{'slow':>5} {'rate/s':>7} {'vs 0':>6} {'RSS base':>9} {'RSS peak':>9} {'vs 0':>6} {'growth':>7} {'vs 0':>7} "
        f"{'4003 p50':>9} {'4003 max':>9} {'lat p50':>8} {'vs 0':>6} {'lat p99':>8} {'vs 0':>6} {'lat max':>8} "
        f"{'kernel MiB':>10} {'fast ok':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        lat = r["fast_latency_ms"]
        t = r["time_to_4003_seconds"]
        kernel = r["slow_bytes_in_server_kernel_send_buffers"]
        growth_vs = "-" if base is None or r is base else f"+{mib(r['rss_growth_bytes'] - base['rss_growth_bytes'])}"
        lines.append(
            f"{r['slow']:>5} {r['publish_rate_per_second']:>7.0f} "
            f"{ratio(r['publish_rate_per_second'], base and base['publish_rate_per_second']):>6} "
            f"{mib(r['rss_baseline_bytes']):>9} {mib(r['rss_peak_bytes']):>9} "
            f"{ratio(r['rss_peak_bytes'], base and base['rss_peak_bytes']):>6} "
            f"{mib(r['rss_growth_bytes']):>7} {growth_vs:>7} "
            f"{t['p50'] if t['p50'] is not None else '-':>9} {t['max'] if t['max'] is not None else '-':>9} "
            f"{lat['p50']:>8.1f} {ratio(lat['p50'], base and base['fast_latency_ms']['p50']):>6} "
            f"{lat['p99']:>8.1f} {ratio(lat['p99'], base and base['fast_latency_ms']['p99']):>6} "
            f"{lat['max']:>8.1f} {mib(kernel) if kernel is not None else '-':>10} "
            f"{'yes' if all(r['fast_exact']) and not any(r['fast_closed']) else 'NO':>7}"
        )
    lines.append("")
    lines.append("rate = publications/s over the window (server stats); 'vs 0' columns are ratios to the 0-slow run,")
    lines.append("except growth's: RSS in MiB, growth = window peak - baseline, its 'vs 0' = minus the 0-slow growth")
    lines.append("(a ratio to a growth of ~0 means nothing);")
    lines.append("4003 = seconds from a slow client's subscribe to the server's slow-consumer close (server clock);")
    lines.append("lat = fast subscribers' delivery latency in ms (receipt - ts) over the window;")
    lines.append("kernel = bytes stuck in the server's socket send buffers of the slow connections")
    lines.append("at the end of the window (not in RSS); fast ok = every offset once, in order, never closed.")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.slow.split(",") if x.strip()]
    if 0 not in counts:
        counts.insert(0, 0)  # the reference run
    runs = []
    started = time.time()
    for count in counts:
        print(f"run: {count} slow clients ...", file=sys.stderr, flush=True)
        async with asyncio.timeout(args.run_timeout):
            runs.append(await run_once(count, args))
    summary = table(runs)
    print(summary)
    output = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": started,
        "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "options": vars(args),
        "runs": runs,
        "table": summary,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2) + "\n")
    print(f"written: {path}", file=sys.stderr)
    ok = all(all(r["fast_exact"]) and not any(r["fast_closed"]) for r in runs) and all(
        r["slow_close_causes"] == ({"slow_consumer": r["slow"]} if r["slow"] else {}) for r in runs
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", default="0,10,100", help="never-reading client counts (0 is always run first)")
    parser.add_argument("--rate", type=float, default=1000.0, help="publications per second")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results file")
    parser.add_argument("--fast", type=int, default=2, help="well-behaved subscribers")
    parser.add_argument("--payload-bytes", type=int, default=1024, help="size of each publication's data string")
    parser.add_argument("--send-queue-max", type=int, default=1000, help="the server's send_queue_max")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds slow clients stay stuck after 4003")
    parser.add_argument("--window", type=float, default=8.0, help="shortest measurement window, seconds")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="deadline of one run, seconds")
    parser.add_argument("--role", choices=["publisher", "subscribers"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "publisher":
        asyncio.run(publisher_main(args.url, args.rate, args.payload_bytes))
        return 0
    if args.role == "subscribers":
        asyncio.run(subscribers_main(args.url, args.count))
        return 0
    raise_nofile_limit()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
