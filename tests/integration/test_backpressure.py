"""Back-pressure: clients that never read are closed 4003 (slow consumer) while
publishing goes on at full rate, the server's memory stays bounded, and every
well-behaved subscriber of the same channel gets every message exactly once.

Real server process, real sockets on 127.0.0.1. The publisher and the
well-behaved subscribers are processes of their own (so the test's own work
cannot slow them down), and the publish rate achieved is read from the
server's stats, not assumed.

What a never-reading client sees depends on when it reads (docs/protocol.md,
close codes; docs/configuration.md, close_timeout): on a slow consumer the
server drops the queue and queues `reconnect` and the 4003 close frame behind
the send that is blocked. If the client reads within `close_timeout`, it gets
the rest of the stream, then `reconnect`, then the close frame. If not, the
server abandons the close at `close_timeout` (recorded as slow_consumer all the
same), the close frame is never written, and a client that reads later gets
what was already in the socket buffers, then EOF without a close frame (1006).
These tests use a long close_timeout so that the 4003 is seen by the client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import json
import socket
import subprocess
import sys
import termios
import threading
import time
from typing import Any

import psutil
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from support import ServerProcess, get_json, wait_for

CHANNEL = "bp.firehose"
RATE = 1000  # publications per second
PAYLOAD_BYTES = 1024  # `data` of each publication: a string of this many characters
MIN_RATE_RATIO = 0.9  # "never blocked": the achieved rate stays at least this share of RATE
MIN_WINDOW_RATIO = 0.8  # ... and over every 1 s window while slow clients connect and are stuck
SEND_QUEUE_MAX = 200  # the server's send_queue_max in these tests
MAX_FRAME_BYTES = 64 * 1024  # the server's max_frame_bytes (default)
SLOW_RCVBUF = 4096  # SO_RCVBUF of a never-reading client (the kernel doubles it, and keeps a floor)
HOLD_SECONDS = 3.0  # how long the closed-but-unread slow clients are kept stuck while publishing goes on

# --- The memory bound -------------------------------------------------------------------------------------------
# Measured: the RSS of the server process (psutil, sampled every 10 ms by a thread). Kernel socket buffers are not
# in it: a never-reading client here gets about 2.8 MB stuck in the server's send buffer (Linux autotunes it up to
# tcp_wmem max even against a tiny receive window), which is kernel memory, and the time it takes to fill at
# ~1.2 MB/s is most of the time to 4003.
#
# One `message` frame: the payload plus its envelope (type, channel, epoch, offset, ts: under 200 bytes; the
# test checks the real size against this).
MESSAGE_BYTES = PAYLOAD_BYTES + 200
# What one never-reading client can make the server hold in user space, worst case:
#  - its send queue: at most SEND_QUEUE_MAX live publications (one more closes it 4003, and the queue is dropped).
#    Each entry is a list slot (8 B) and, worst case, a str of its own (49 B header + MESSAGE_BYTES). Really the
#    frames are shared with the channel history and the other subscribers; this counts them once per client.
QUEUE_BYTES = SEND_QUEUE_MAX * (8 + 49 + MESSAGE_BYTES)
#  - the send its writer waits on: the joined frame (str, <= max_frame_bytes) and its encoded WebSocket frame
#    (bytes, same size + 14), plus the asyncio transport's write buffer, which uvicorn writes into only while it
#    is under the high-water mark (64 KiB), so at most 64 KiB + one frame.
IN_FLIGHT_BYTES = 2 * MAX_FRAME_BYTES + (64 * 1024 + MAX_FRAME_BYTES)
#  - the connection itself (Connection, uvicorn protocol, websockets parser): about 23 KiB per idle connection
#    in bench/RESULTS.md; 64 KiB allowed.
CONNECTION_BYTES = 64 * 1024
# Twice the sum, for allocator slack (pymalloc arenas and glibc heaps are not given back at once). With the
# values above: 2 x (256,200 + 262,144 + 65,536) = 1,167,760 B, about 1.1 MiB per never-reading client.
PER_SLOW_CLIENT_BYTES = 2 * (QUEUE_BYTES + IN_FLIGHT_BYTES + CONNECTION_BYTES)
# Fixed allowance on top of the baseline (the largest RSS over a quiet second at full publish rate, channel history
# already full, before any slow client): RSS noise of a busy CPython process (the stats and connection views the
# test polls, heap growth after a scheduling stall). Measured growth over 14 runs, 4 of them with two CPU hogs:
# 0.09-0.34 MiB with 1 slow client, 2.0-3.1 MiB with 20. 4 MiB is over ten times the one-client figure.
FIXED_ALLOWANCE_BYTES = 4 * 1024 * 1024


def memory_bound(slow_clients: int) -> int:
    """Most the server's RSS may grow above the baseline with `slow_clients` never-reading clients."""
    return slow_clients * PER_SLOW_CLIENT_BYTES + FIXED_ALLOWANCE_BYTES


# --- The publisher: its own process, a WebSocket client publishing at RATE ----------------------------------------
# Paced on its own clock in 5 ms ticks, catching up after a late tick (so a scheduling stall does not lower the
# average), never more than 1 s behind. Acks (`published`) are read as they come. It stops when its stdin closes,
# then prints {"sent": n, "acked": n, "last_offset": n}. Why WebSocket publishing (client_publish on, rate limit
# off) and not POST /api/v1/publish: measured on this 2-core machine, a 1 KiB publish costs the server about 840 us
# of CPU over HTTP (1,000/s would take 84% of a core) and about 240 us over WebSocket, one at a time; 1,000/s over
# WebSocket holds with two CPU hogs running. (The demo feed reaches 1,000/s too, but its ~150-byte messages would
# make the memory bound below too loose to mean anything.)
PUBLISHER = r"""
import asyncio, json, sys, threading, time
from websockets.asyncio.client import connect

async def main(url, channel, rate, payload_bytes):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    payload = "p" * payload_bytes
    async with connect(url, subprotocols=["stablews.v1"], compression=None, ping_interval=None,
                       max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello", "client": "bp-publisher"}))
        acked = 0
        last = 0
        async def acks():
            nonlocal acked, last
            async for frame in ws:
                for line in frame.split("\n"):
                    message = json.loads(line)
                    if message["type"] == "published":
                        acked += 1
                        last = message["offset"]
                    elif message["type"] == "ping":
                        await ws.send(json.dumps({"type": "pong", "id": message["id"]}))
                    elif message["type"] == "error":
                        print(json.dumps({"error": message}), file=sys.stderr, flush=True)
        reader = asyncio.create_task(acks())
        sent = 0
        start = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - start) * rate)
            if due - sent > rate:  # more than 1 s behind: do not burst to catch up
                start = time.monotonic() - sent / rate
                due = sent
            while sent < due:
                sent += 1
                await ws.send(json.dumps({"type": "publish", "channel": channel, "data": payload}))
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 20
        while acked < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        reader.cancel()
        print(json.dumps({"sent": sent, "acked": acked, "last_offset": last}), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
"""


class Publisher:
    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, url, CHANNEL, str(RATE), str(PAYLOAD_BYTES)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    async def stop(self) -> dict[str, Any]:
        out, err = await asyncio.to_thread(self.proc.communicate, timeout=40)  # closes stdin: stop
        assert self.proc.returncode == 0, err
        assert "error" not in err, err  # no `error` answered to a publish
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- Clients -------------------------------------------------------------------------------------------------------


class NeverReader:
    """A client that completes the handshake, `hello` and `subscribe`, then never reads.

    It is a raw TCP socket with a small SO_RCVBUF, set before connect() so the window is small from the SYN on
    (a window shrunk after the handshake can stall loopback TCP), driven by the sans-I/O `websockets`
    ClientProtocol. Nothing reads the socket after `subscribed`: no library transport, no buffer on our side, so
    the kernel's receive buffer fills, the server's send buffer fills behind it, and the server's writes block.
    `unread_bytes()` shows the kernel's receive buffer really is full. `read_to_end()` reads at last."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        self.sock.setblocking(False)
        self.proto = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws"), subprotocols=[Subprotocol("stablews.v1")], max_size=None
        )
        self.id = ""
        self.messages: list[dict[str, Any]] = []
        self.subscribed_at = 0.0  # time.monotonic() when `subscribed` arrived: it stops reading from here
        self.eof = False

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.proto.data_to_send():
            if data:  # b"" means "half-close": not needed
                await loop.sock_sendall(self.sock, data)

    def _take_events(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Response):
                continue
            if event.opcode is Opcode.TEXT:
                self.messages.extend(json.loads(line) for line in event.data.decode().split("\n"))

    async def _read_some(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if data:
            self.proto.receive_data(data)
        else:
            self.eof = True
            self.proto.receive_eof()
        self._take_events()
        await self._flush()  # a close frame received is answered here

    async def open(self) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
            self.proto.send_request(self.proto.connect())
            await self._flush()
            while self.proto.state is State.CONNECTING:  # the 101 response
                await self._read_some()
            assert self.proto.handshake_exc is None, self.proto.handshake_exc
            for message in ({"type": "hello", "client": "never-reads"}, {"type": "subscribe", "channel": CHANNEL}):
                self.proto.send_text(json.dumps(message).encode())
            await self._flush()
            while not any(m["type"] == "subscribed" for m in self.messages):
                await self._read_some()
        self.subscribed_at = time.monotonic()
        welcome = self.messages[0]
        assert welcome["type"] == "welcome", welcome
        self.id = welcome["connection"]
        return self.id

    def unread_bytes(self) -> int:
        """Bytes waiting in the kernel's receive buffer (FIONREAD)."""
        count = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, count)
        return count[0]

    async def read_to_end(self, timeout: float) -> int | None:
        """Read everything until the server closes the TCP connection; the close code seen, if any.

        Several MB wait in the server's socket buffer. A larger SO_RCVBUF now takes them in bigger reads (the
        window still stays under 64 KiB: the small buffer at connect() left no window scaling)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self._read_some()
        return self.proto.close_code

    def close(self) -> None:
        self.sock.close()


# The well-behaved subscribers: their own process too, so that the test's own work (reading megabytes from the
# never-reading clients at the end, polling stats) cannot make them slow readers. Each connection says hello,
# subscribes before the first publication, reads everything and answers pings. "ready" on stdout once all are
# subscribed; then a line with the last offset on stdin: it waits (at most 60 s) until every connection has it
# and prints, per connection, every offset received, its epochs, the largest `message` (compact JSON, as the
# server encodes it) and whether the server closed it.
SUBSCRIBERS = r"""
import asyncio, json, sys, time
from websockets.asyncio.client import connect

async def main(url, channel, count):
    conns = []
    for _ in range(count):
        ws = await connect(url, subprotocols=["stablews.v1"], compression=None, ping_interval=None, max_size=None)
        await ws.send(json.dumps({"type": "hello", "client": "bp-subscriber"}))
        await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
        conns.append(ws)
    state = [{"offsets": [], "epochs": set(), "largest": 0, "closed": None, "subscribed": None} for _ in conns]
    subscribed = asyncio.Event()

    async def read(ws, st):
        try:
            async for frame in ws:
                for line in frame.split("\n"):
                    message = json.loads(line)
                    kind = message["type"]
                    if kind == "message":
                        st["offsets"].append(message["offset"])
                        st["epochs"].add(message["epoch"])
                        if len(st["offsets"]) % 97 == 1:
                            st["largest"] = max(st["largest"], len(line))
                    elif kind == "ping":
                        await ws.send(json.dumps({"type": "pong", "id": message["id"]}))
                    elif kind == "subscribed":
                        st["subscribed"] = message["offset"]
                        if all(s["subscribed"] is not None for s in state):
                            subscribed.set()
        finally:
            st["closed"] = ws.close_code

    readers = [asyncio.create_task(read(ws, st)) for ws, st in zip(conns, state)]
    async with asyncio.timeout(10):
        await subscribed.wait()
    print("ready", flush=True)
    top = int(await asyncio.to_thread(sys.stdin.readline))
    deadline = time.monotonic() + 60
    while any(len(st["offsets"]) < top and st["closed"] is None for st in state) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    for task in readers:
        task.cancel()
    print(json.dumps([{**st, "epochs": sorted(st["epochs"])} for st in state]), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


class Subscribers:
    def __init__(self, url: str, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBERS, url, CHANNEL, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    async def ready(self) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(20):
            line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line.strip() == "ready", (line, self.proc.stderr.read() if self.proc.poll() is not None else "")

    async def results(self, top: int) -> list[dict[str, Any]]:
        out, err = await asyncio.to_thread(self.proc.communicate, f"{top}\n", 90)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# --- Measurements --------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the server's resident set size every 10 ms (a thread: a busy event loop cannot delay it)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
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
                self.samples += 1
            time.sleep(0.01)

    def take_peak(self) -> int:
        """The peak since the last call (and start a new window)."""
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak


async def stats(server: ServerProcess) -> dict[str, Any]:
    return await get_json(server.http + "/api/v1/websocket/stats")


def published(report: dict[str, Any]) -> tuple[float, int]:
    """(server uptime in s, publications so far): two of these give the achieved rate on the server's clock."""
    return report["uptime_seconds"], report["broker"]["published_total"]


def rate_between(a: tuple[float, int], b: tuple[float, int]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


class RateWatch:
    """Polls the server's stats every 0.25 s: (uptime, published_total) samples for windowed rates."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples: list[tuple[float, int]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append(published(await stats(self.server)))
            await asyncio.sleep(0.25)

    def slowest_window(self, seconds: float) -> float:
        """The lowest publish rate over any window of at least `seconds` between two samples."""
        rates = []
        for i, a in enumerate(self.samples):
            b = next((b for b in self.samples[i + 1:] if b[0] - a[0] >= seconds), None)
            if b is not None:
                rates.append(rate_between(a, b))
        assert rates, self.samples
        return min(rates)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def start_backpressure_server(start_server: Any) -> ServerProcess:
    return start_server(
        "--send-queue-max", str(SEND_QUEUE_MAX), "--max-frame-bytes", str(MAX_FRAME_BYTES),
        # Long enough that the stuck clients are still waiting for their close frame when they read at last.
        "--close-timeout", "60s",
        "--client-publish", "true", "--demo-feed", "false",
        "--heartbeat-interval", "120s",  # no pings to the never-reading clients during the test
        # The publisher sends 1,000/s on one connection, above the per-connection rate limit (when the limit
        # exists; an unknown STABLEWS_* variable is ignored, so this works with or without it).
        env={"STABLEWS_RATE_LIMIT": "0"},
    )


async def run_scenario(start_server: Any, slow_count: int) -> None:
    server = start_backpressure_server(start_server)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    fast = Subscribers(server.ws, 2)
    publisher: Publisher | None = None
    slow = [NeverReader(server.port) for _ in range(slow_count)]
    try:
        await fast.ready()  # subscribed before the first publication: they must get offsets 1, 2, 3 ...
        publisher = Publisher(server.ws)
        # Warm up at full rate until the channel history (1,000 messages) is full, then take the baseline:
        # the largest RSS over a quiet second.
        await wait_for(
            lambda: _published_at_least(server, 1500), 30, "the publisher to warm up", interval=0.1
        )
        sampler.take_peak()
        await asyncio.sleep(1.0)
        baseline = sampler.take_peak()
        before = published(await stats(server))
        watch = RateWatch(server)

        # The never-reading clients: hello, subscribe, then nothing.
        ids = await asyncio.gather(*(c.open() for c in slow))
        assert len(set(ids)) == slow_count

        # Each is closed 4003: the server decides it (state closing, cause slow_consumer) while the client
        # still has not read, which is possible only because its writes blocked (see connection.deliver).
        async def server_view(conn_id: str) -> dict[str, Any]:
            return await get_json(f"{server.http}/api/v1/websocket/connections/{conn_id}")

        async def all_closing() -> bool:
            views = await asyncio.gather(*(server_view(i) for i in ids))
            return all(v["state"] != "open" for v in views)

        await wait_for(all_closing, 30, "every never-reading client to be closed", interval=0.1)
        for view in await asyncio.gather(*(server_view(i) for i in ids)):
            assert view["close"]["cause"] == "slow_consumer" and view["close"]["code"] == 4003, view
            assert view["close"]["initiator"] == "server", view
        # The kernel buffers really filled: bytes are waiting, unread, in every client's receive buffer.
        for client in slow:
            assert client.unread_bytes() > 0

        # Keep them stuck (closing, close frame not through, nothing read) while publishing goes on.
        stuck_from = published(await stats(server))
        await asyncio.sleep(HOLD_SECONDS)
        stuck_to = published(await stats(server))

        # At last they read: contiguous live messages, then the advice, then the 4003 close frame. Nothing was
        # dropped silently before it: the queue is dropped only with the close (docs/protocol.md).
        reading = time.monotonic()
        codes = await asyncio.gather(*(c.read_to_end(30) for c in slow))
        reading = time.monotonic() - reading
        for client, code in zip(slow, codes, strict=True):
            assert code == 4003, (client.id, code, client.messages[-3:])
            last = client.messages[-1]
            assert last["type"] == "reconnect" and last["reason"] == "slow_consumer", last
            assert 0 <= last["after_ms"] <= 1000, last
            top_at_subscribe = next(m["offset"] for m in client.messages if m["type"] == "subscribed")
            live = [m["offset"] for m in client.messages if m["type"] == "message"]
            assert live == list(range(top_at_subscribe + 1, top_at_subscribe + 1 + len(live))), "gap before 4003"
        report = await wait_for(
            lambda: _closed_slow(server, slow_count), 20, "the slow-consumer closes to be counted"
        )
        # Only they were closed: no well-behaved subscriber, no publisher.
        assert report["connections"]["closed_by_cause"] == {"slow_consumer": slow_count}, report
        peak = sampler.take_peak()
        after = published(await stats(server))
        await watch.stop()

        # Stop publishing; every fast subscriber gets every offset exactly once, in order, over the whole test.
        result = await publisher.stop()
        assert result["acked"] == result["sent"], result
        top = result["last_offset"]
        assert top == result["sent"] >= 1500 + RATE * HOLD_SECONDS * MIN_RATE_RATIO, result
        for subscriber in await fast.results(top):
            assert subscriber["offsets"] == list(range(1, top + 1)), "gap or duplicate on a well-behaved client"
            assert len(subscriber["epochs"]) == 1, subscriber["epochs"]
            assert subscriber["closed"] is None, subscriber["closed"]  # never closed, slow consumer or otherwise
            assert subscriber["largest"] <= MESSAGE_BYTES, subscriber["largest"]

        # Publishing was never blocked: the rate on the server's clock, over the whole slow phase and over the
        # stretch where the slow clients were stuck.
        assert rate_between(before, after) >= RATE * MIN_RATE_RATIO, (before, after)
        assert rate_between(stuck_from, stuck_to) >= RATE * MIN_RATE_RATIO, (stuck_from, stuck_to)
        slowest = watch.slowest_window(1.0)
        assert slowest >= RATE * MIN_WINDOW_RATIO, (slowest, watch.samples)

        # Memory stayed within the bound.
        growth = max(peak, baseline) - baseline
        bound = memory_bound(slow_count)
        print(
            f"slow={slow_count} baseline={baseline / 2**20:.1f} MiB peak={peak / 2**20:.1f} MiB "
            f"growth={growth / 2**20:.2f} MiB bound={bound / 2**20:.2f} MiB "
            f"rate={rate_between(before, after):.0f}/s stuck_rate={rate_between(stuck_from, stuck_to):.0f}/s "
            f"slowest_1s={slowest:.0f}/s samples={sampler.samples} read_slow={reading:.2f}s"
        )
        assert growth <= bound, f"RSS grew {growth} bytes, bound {bound}"
    finally:
        sampler.done.set()
        if publisher is not None:
            publisher.kill()
        fast.kill()
        for client in slow:
            client.close()


async def _published_at_least(server: ServerProcess, count: int) -> bool:
    return published(await stats(server))[1] >= count


async def _closed_slow(server: ServerProcess, count: int) -> dict[str, Any] | None:
    report = await stats(server)
    return report if report["connections"]["closed_by_cause"].get("slow_consumer", 0) >= count else None


async def test_a_never_reading_client_is_closed_4003_with_bounded_memory_and_no_gap_for_others(start_server):
    await run_scenario(start_server, 1)


async def test_twenty_never_reading_clients_at_once(start_server):
    await run_scenario(start_server, 20)



async def test_a_close_the_peer_never_reads_is_cut_at_close_timeout(start_server):
    """The 4003 close frame cannot get through to a client that stopped reading. At `close_timeout` the
    server drops the TCP connection (socket, buffers, file descriptor), however long the client keeps it open:
    otherwise each such client would pin a socket and its buffers for as long as it liked."""
    server = start_server(
        "--send-queue-max", str(SEND_QUEUE_MAX), "--close-timeout", "1s", "--client-publish", "true",
        "--demo-feed", "false", "--heartbeat-interval", "120s", env={"STABLEWS_RATE_LIMIT": "0"},
    )
    process = psutil.Process(server.proc.pid)
    client = NeverReader(server.port)
    publisher: Publisher | None = None
    try:
        conn_id = await client.open()
        local_port = client.sock.getsockname()[1]

        def server_side_open() -> bool:
            return any(c.raddr and c.raddr.port == local_port for c in process.net_connections(kind="tcp"))

        assert server_side_open()
        publisher = Publisher(server.ws)

        async def view() -> dict[str, Any]:
            return await get_json(f"{server.http}/api/v1/websocket/connections/{conn_id}")

        await wait_for(lambda: _state_is(view, "closed"), 40, "the slow consumer's close to be given up")
        closed = await view()
        assert closed["close"]["cause"] == "slow_consumer" and closed["close"]["code"] == 4003, closed
        await wait_for(lambda: not server_side_open(), 10, "the server to drop the TCP connection")
        # The client, still holding its end, finds the connection cut when it reads: what was already in its
        # receive buffer, then a reset or EOF, never the close frame that could not be written.
        with contextlib.suppress(ConnectionResetError):
            await client.read_to_end(30)
        assert client.proto.close_rcvd is None  # no close frame: 1006 on the client's side
        assert not server_side_open()
    finally:
        if publisher is not None:
            publisher.kill()
        client.close()


async def _state_is(view: Any, state: str) -> bool:
    return (await view())["state"] == state
