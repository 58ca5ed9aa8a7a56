"""A fault-injecting TCP proxy for tests: cut links with a reset, black-hole them, delay them, refuse new ones.

Everything runs in the caller's event loop (no threads). A *link* is one accepted client connection plus its
upstream connection to the target. Bytes are forwarded with asyncio streams; each direction has a bounded queue
read by one reader task and written by one forwarding task, so an added delay is a per-chunk latency that keeps
the order and does not add up across chunks.

    async with FaultProxy("127.0.0.1", server_port) as proxy:
        client = await connect(proxy.url("/ws"))
        await proxy.wait_links(1)
        proxy.cut()                      # both peers get a TCP RST

Only loopback addresses are accepted, for the listener and for the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["FaultProxy"]

CHUNK = 64 * 1024  # largest read, and the stream buffer limit
QUEUE_CHUNKS = 16  # chunks queued per direction before the reader stops reading (back-pressure)
CONNECT_TIMEOUT = 10.0

_EOF = b""  # queue sentinel: the source side closed normally


def _loopback(host: str) -> str:
    """The IP literal for a loopback `host`; anything else is refused."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"FaultProxy only uses loopback addresses, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"FaultProxy only uses loopback addresses, not {host!r}")
    return host


def _reset(transport: asyncio.WriteTransport | None) -> None:
    """Close `transport` with a TCP RST: SO_LINGER on with a zero timeout, then abort."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Link:
    CLIENT = "client"
    UPSTREAM = "upstream"

    def __init__(self, proxy: FaultProxy, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, blackholed: bool) -> None:
        self.proxy = proxy
        self.number = number
        self.blackholed = blackholed
        self.streams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {self.CLIENT: (reader, writer)}
        self.gone: set[str] = set()  # sides that closed while black-holed
        self.finished = False
        self.connecting = False
        self.done = asyncio.Event()
        self.children: set[asyncio.Task[None]] = set()
        self.task: asyncio.Task[None] | None = None

    # -- ending -------------------------------------------------------------------------------------------------

    def finish(self, *, reset: bool) -> None:
        """End the link: close both sides normally, or reset both (RST). Synchronous; idempotent."""
        if self.finished:
            return
        self.finished = True
        for _, writer in self.streams.values():
            if reset:
                _reset(writer.transport)
            else:
                writer.close()
        if self.connecting and self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # stop a pending upstream connect; its socket is closed by the connect itself
        self.proxy._link_ended(self)
        self.done.set()

    def side_gone(self, side: str) -> None:
        """A black-holed link's peer went away: the other peer hears nothing; both gone ends the link."""
        self.gone.add(side)
        if side in self.streams:
            self.streams[side][1].close()
        if self.gone >= {self.CLIENT, self.UPSTREAM}:
            self.finish(reset=False)

    # -- running ------------------------------------------------------------------------------------------------

    def spawn(self, name: str, function: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        task = self.proxy._spawn(self._guard(function, *args), f"faultproxy-link{self.number}-{name}")
        self.children.add(task)
        task.add_done_callback(self.children.discard)

    async def _guard(self, function: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # The coroutine is made here, not by the caller: a task cancelled before it starts leaves no
        # never-awaited coroutine behind.
        try:
            await function(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the proxy: record it for the test and reset the link
            self.proxy.errors.append(exc)
            self.finish(reset=True)

    async def run(self) -> None:
        try:
            if self.blackholed:
                self.gone.add(self.UPSTREAM)  # never contacted
            else:
                self.connecting = True
                try:
                    async with asyncio.timeout(self.proxy.connect_timeout):
                        up_reader, up_writer = await asyncio.open_connection(
                            self.proxy.target_host, self.proxy.target_port, limit=CHUNK)
                except (OSError, TimeoutError):
                    self.finish(reset=True)  # the upstream connection failed: reset the client
                    return
                finally:
                    self.connecting = False
                if self.finished:  # cut while connecting
                    _reset(up_writer.transport)
                    return
                self.streams[self.UPSTREAM] = (up_reader, up_writer)
            if self.blackholed:  # from the start, or since it was connecting: read and drop
                for side in self.streams:
                    self.spawn(f"{side}-read", self._read, side, None)
            else:
                to_upstream: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
                to_client: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
                self.spawn("client-read", self._read, self.CLIENT, to_upstream)
                self.spawn("to-upstream", self._forward, self.CLIENT, to_upstream, self.streams[self.UPSTREAM][1])
                self.spawn("upstream-read", self._read, self.UPSTREAM, to_client)
                self.spawn("to-client", self._forward, self.UPSTREAM, to_client, self.streams[self.CLIENT][1])
            await self.done.wait()
        finally:
            for task in list(self.children):
                task.cancel()
            if self.children:
                await asyncio.gather(*self.children, return_exceptions=True)
            if not self.finished:  # cancelled from outside (stop)
                self.finish(reset=True)

    async def _read(self, side: str, queue: asyncio.Queue[tuple[float, bytes]] | None) -> None:
        """Read `side` into `queue` (or nowhere); while black-holed every byte read is dropped."""
        reader = self.streams[side][0]
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(CHUNK):
                self.proxy._received(side, len(data))
                if self.blackholed or queue is None:
                    self.proxy.bytes_dropped += len(data)
                    continue
                await queue.put((loop.time() + self.proxy.delay, data))
        except OSError:  # ConnectionResetError and friends
            if self.finished:
                return
            if self.blackholed:
                self.side_gone(side)
            else:
                self.finish(reset=True)  # the peer reset: reset the other side too
            return
        if self.finished:
            return
        if self.blackholed or queue is None:
            self.side_gone(side)
        else:
            await queue.put((0.0, _EOF))  # closes after the data queued before it

    async def _forward(self, source: str, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter) -> None:
        """Write the queued chunks to `writer`, each no sooner than its due time, in order."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if data is _EOF:
                if self.blackholed:
                    self.side_gone(source)
                else:
                    self.finish(reset=False)  # a normal close is passed on as a normal close
                return
            if self.blackholed:
                self.proxy.bytes_dropped += len(data)
                continue
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                if self.blackholed:
                    self.proxy.bytes_dropped += len(data)
                    continue
            writer.write(data)
            self.proxy.bytes_forwarded += len(data)
            try:
                await writer.drain()
            except OSError:
                if not self.finished and not self.blackholed:
                    self.finish(reset=True)
                return


class FaultProxy:
    """An asyncio TCP proxy on loopback that injects faults into the links it forwards.

    Counters: `links` (live now), `accepted_total` (links ever accepted), `refused_total` (connections reset by
    `refuse()`), `cut_total` (links ended by `cut()`), `bytes_forwarded` (written to a peer, both directions),
    `bytes_from_clients` / `bytes_from_upstreams` (read from the peers, dropped or not), `bytes_dropped` (read while
    black-holed, never forwarded). `wait_until()` waits on any of them. `errors` collects unexpected exceptions
    inside the proxy (a test can assert it stays empty).
    """

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.target_host = _loopback(target_host)
        self.target_port = target_port
        self.listen_host = _loopback(listen_host)
        self.connect_timeout = connect_timeout
        self.port = 0
        self.delay = 0.0
        self.accepted_total = 0
        self.refused_total = 0
        self.cut_total = 0
        self.bytes_forwarded = 0
        self.bytes_from_clients = 0
        self.bytes_from_upstreams = 0
        self.bytes_dropped = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._live: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._blackhole_new = False
        self._refusing = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0, limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and reset every link; cancel and await every task of the proxy."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        for link in list(self._live):
            link.finish(reset=True)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def url(self, path: str = "/ws", scheme: str = "ws") -> str:
        if not self.port:
            raise RuntimeError("FaultProxy not started")
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{scheme}://{host}:{self.port}{path}"

    # -- faults -------------------------------------------------------------------------------------------------

    def cut(self) -> int:
        """Abort every live link with a TCP RST toward both peers; return how many links were cut."""
        links = list(self._live)
        for link in links:
            link.finish(reset=True)
        self.cut_total += len(links)
        return len(links)

    def blackhole(self, on: bool = True, *, new_links: bool = False) -> None:
        """Silence the live links (nothing forwarded either way, nothing closed); `new_links` also silences links
        accepted while it is on (the upstream is never contacted). Off: new links forward again; links already
        black-holed stay silent until `cut()` or `stop()`."""
        if on:
            for link in self._live:
                link.blackholed = True
            self._blackhole_new = new_links
        else:
            self._blackhole_new = False

    def set_delay(self, seconds: float) -> None:
        """One-way latency added to each chunk read from now on, in both directions; order is kept."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self.delay = seconds

    def refuse(self, on: bool = True) -> None:
        """While on, new client connections are accepted and at once reset (RST); the upstream is not contacted."""
        self._refusing = on

    # -- observing ----------------------------------------------------------------------------------------------

    @property
    def links(self) -> int:
        return len(self._live)

    @property
    def tasks(self) -> int:
        """Tasks of the proxy that have not finished (0 after `stop()`)."""
        return len(self._tasks)

    async def wait_links(self, n: int, timeout: float = 10.0, *, exact: bool = True) -> None:
        """Wait until exactly `n` links are live (at least `n` with exact=False); TimeoutError after `timeout`."""
        want = f"{n}" if exact else f"at least {n}"
        await self.wait_until(lambda: self.links == n if exact else self.links >= n, timeout,
                              lambda: f"{self.links} live links, wanted {want}")

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0,
                         describe: Callable[[], str] | None = None) -> None:
        """Wait until `predicate()` holds; it is checked whenever a link starts or ends or bytes are read from a
        peer. TimeoutError after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            detail = describe() if describe is not None else "condition not met"
            raise TimeoutError(f"FaultProxy after {timeout}s: {detail}") from None

    # -- internals ----------------------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing or self._stopped:
            self.refused_total += 1
            _reset(writer.transport)
            return
        self.accepted_total += 1
        link = _Link(self, self.accepted_total, reader, writer, blackholed=self._blackhole_new)
        self._live.add(link)
        link.task = self._spawn(link.run(), f"faultproxy-link{link.number}")
        self._notify()

    def _received(self, side: str, n: int) -> None:
        if side == _Link.CLIENT:
            self.bytes_from_clients += n
        else:
            self.bytes_from_upstreams += n
        self._notify()

    def _link_ended(self, link: _Link) -> None:
        if link in self._live:
            self._live.discard(link)
            self._notify()
