"""The fault proxy against a real TCP echo server and real client sockets: what a user of the proxy sees."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from faultproxy import FaultProxy

SILENCE = 0.5  # how long a black-holed link must stay silent


class EchoConnection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.received = bytearray()
        # How the connection ended, from the server's side: "eof" (a normal close) or "reset" (RST).
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def ended(self, timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self.outcome)


class EchoServer:
    """A tiny TCP echo server on loopback that records each connection's bytes and how it ended."""

    def __init__(self) -> None:
        self.connections: list[EchoConnection] = []
        self._arrived: asyncio.Queue[EchoConnection] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = EchoConnection(writer)
        self.connections.append(conn)
        self._arrived.put_nowait(conn)
        outcome = "eof"
        try:
            while data := await reader.read(65536):
                conn.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            writer.close()
            if not conn.outcome.done():
                conn.outcome.set_result(outcome)

    async def next_connection(self, timeout: float = 5.0) -> EchoConnection:
        async with asyncio.timeout(timeout):
            return await self._arrived.get()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.writer.transport.abort()
        async with asyncio.timeout(5):
            await asyncio.gather(*(conn.outcome for conn in self.connections))
            await self._server.wait_closed()


class Client:
    """A real client socket (asyncio streams) with deadline-bound helpers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def roundtrip(self, data: bytes, timeout: float = 5.0) -> float:
        """Send `data`, read the same bytes back; return the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(timeout):
            self.writer.write(data)
            echoed = await self.reader.readexactly(len(data))
            await self.writer.drain()
        assert echoed == data
        return loop.time() - started

    async def read(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read(65536)

    async def assert_silent(self, seconds: float = SILENCE) -> None:
        """Nothing arrives within `seconds`, and the socket is neither closed nor reset."""
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds):
                data = await self.reader.read(65536)
                pytest.fail(f"a black-holed link delivered {data!r} (b'' is an EOF)")
        assert not self.reader.at_eof()
        assert self.reader.exception() is None
        assert not self.writer.is_closing()

    async def assert_reset(self, timeout: float = 5.0) -> None:
        """The next read fails with ConnectionResetError: an RST, not a clean EOF."""
        with pytest.raises(ConnectionResetError):
            data = await self.read(timeout)
            pytest.fail(f"expected a reset, read {data!r} (b'' is a clean EOF)")


OpenClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def open_client() -> AsyncIterator[OpenClient]:
    writers: list[asyncio.StreamWriter] = []

    async def open_(port: int) -> Client:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return Client(reader, writer)

    yield open_
    for writer in writers:
        writer.transport.abort()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy
    assert fault_proxy.tasks == 0
    assert fault_proxy.errors == []


def proxy_tasks() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("faultproxy")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_bytes_echo_through(proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    client = await open_client(proxy.port)
    await client.roundtrip(b"hello")
    big = bytes(range(256)) * 4096  # 1 MiB: more than the proxy buffers, so back-pressure is exercised
    await client.roundtrip(big, timeout=20)
    assert (await echo.next_connection()).received == b"hello" + big
    assert proxy.links == 1
    assert proxy.accepted_total == 1
    assert proxy.bytes_forwarded == 2 * (5 + len(big))
    assert len(echo.connections) == 1


async def test_url_and_loopback_only(proxy: FaultProxy) -> None:
    assert proxy.url() == f"ws://127.0.0.1:{proxy.port}/ws"
    assert proxy.url("/health", "http") == f"http://127.0.0.1:{proxy.port}/health"
    with pytest.raises(ValueError):
        FaultProxy("10.1.2.3", 80)
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1", 80, listen_host="0.0.0.0")


async def test_normal_close_is_passed_on_as_a_normal_close(
        proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    client = await open_client(proxy.port)
    await client.roundtrip(b"a")
    client.writer.close()
    assert await (await echo.next_connection()).ended() == "eof"
    await proxy.wait_links(0)

    client = await open_client(proxy.port)
    await client.roundtrip(b"b")
    (await echo.next_connection()).writer.close()
    assert await client.read() == b""  # a clean EOF
    await proxy.wait_links(0)
    assert proxy.cut_total == 0


async def test_cut_resets_both_sides_and_new_links_work(
        proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    client = await open_client(proxy.port)
    await client.roundtrip(b"before the cut")
    upstream = await echo.next_connection()

    assert proxy.cut() == 1
    assert proxy.links == 0
    assert proxy.cut_total == 1
    await client.assert_reset()
    assert await upstream.ended() == "reset"

    again = await open_client(proxy.port)
    await again.roundtrip(b"after the cut")
    await proxy.wait_links(1)
    assert proxy.accepted_total == 2
    assert proxy.cut() == 1
    await again.assert_reset()
    assert proxy.cut() == 0


async def test_blackhole_silences_live_links_without_closing_them(
        proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    client = await open_client(proxy.port)
    await client.roundtrip(b"hello")
    upstream = await echo.next_connection()
    forwarded = proxy.bytes_forwarded

    proxy.blackhole()
    client.writer.write(b"into the void")
    upstream.writer.write(b"from the server")  # the other direction is silent too
    # Both reached the proxy and were dropped: the silence below is not just a slow path.
    await proxy.wait_until(lambda: proxy.bytes_dropped == len(b"into the void") + len(b"from the server"))
    await client.assert_silent()
    assert bytes(upstream.received) == b"hello"  # nothing reached the server either
    assert not upstream.outcome.done()  # and the server's side is not closed
    assert proxy.links == 1
    assert proxy.bytes_forwarded == forwarded

    proxy.blackhole(False)
    fresh = await open_client(proxy.port)
    await fresh.roundtrip(b"a new link works")
    dropped = proxy.bytes_dropped
    client.writer.write(b"still nothing")  # the black-holed link does not come back
    await proxy.wait_until(lambda: proxy.bytes_dropped == dropped + len(b"still nothing"))
    await client.assert_silent(0.2)
    assert bytes(upstream.received) == b"hello"

    await proxy.wait_links(2)
    assert proxy.cut() == 2
    await client.assert_reset()
    await fresh.assert_reset()
    assert await upstream.ended() == "reset"


async def test_blackhole_new_links(proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    proxy.blackhole(new_links=True)
    client = await open_client(proxy.port)
    await proxy.wait_links(1)
    client.writer.write(b"anyone there?")
    await proxy.wait_until(lambda: proxy.bytes_dropped == len(b"anyone there?"))
    await client.assert_silent()
    assert echo.connections == []  # the upstream was never contacted
    assert proxy.bytes_forwarded == 0

    proxy.blackhole(False)
    fresh = await open_client(proxy.port)
    await fresh.roundtrip(b"forwarded again")
    assert len(echo.connections) == 1
    client.writer.write(b"still?")
    await client.assert_silent(0.2)

    client.writer.close()  # the black-holed client leaves; its link ends, the fresh one stays
    await proxy.wait_links(1)
    await fresh.roundtrip(b"unaffected")


async def test_delay_adds_latency_each_way_and_keeps_order(
        proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    client = await open_client(proxy.port)
    fast = await client.roundtrip(b"warm up")

    delay = 0.2
    proxy.set_delay(delay)
    slow = await client.roundtrip(b"slow")
    assert slow >= 2 * delay - 0.001, (fast, slow)

    # Many chunks: each line is written only once the proxy has read the one before, so every line is its own
    # read and its own queued chunk (TCP would otherwise merge them), each with its own due time.
    delay = 0.1
    proxy.set_delay(delay)
    lines = [f"{i:05d}\n".encode() for i in range(60)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        for line in lines:
            sent = proxy.bytes_from_clients + len(line)
            client.writer.write(line)
            await proxy.wait_until(lambda sent=sent: proxy.bytes_from_clients >= sent)
        read_all = loop.time() - started
        echoed = await client.reader.readexactly(sum(map(len, lines)))
    elapsed = loop.time() - started
    assert echoed == b"".join(lines)
    assert elapsed >= 2 * delay - 0.001
    # The delay is a latency per chunk, not a sleep per chunk one after the other (that would be 60 x 0.1 s).
    assert read_all < 10 * delay, read_all
    assert elapsed < 20 * delay, elapsed

    proxy.set_delay(0)
    assert await client.roundtrip(b"quick again") < delay


async def test_refuse_resets_new_connections(proxy: FaultProxy, echo: EchoServer, open_client: OpenClient) -> None:
    live = await open_client(proxy.port)
    await live.roundtrip(b"live before refuse")

    proxy.refuse()
    refused = await open_client(proxy.port)
    await refused.assert_reset()
    assert proxy.refused_total == 1
    assert proxy.accepted_total == 1
    assert len(echo.connections) == 1
    await live.roundtrip(b"live links are not touched")

    proxy.refuse(False)
    fresh = await open_client(proxy.port)
    await fresh.roundtrip(b"accepted again")
    assert proxy.links == 2


async def test_failed_upstream_resets_the_client(open_client: OpenClient) -> None:
    async with FaultProxy("127.0.0.1", free_port()) as proxy:
        client = await open_client(proxy.port)
        await client.assert_reset()
        await proxy.wait_links(0)
        assert proxy.accepted_total == 1
    assert proxy.tasks == 0
    assert proxy.errors == []


async def test_wait_links_has_a_deadline(proxy: FaultProxy, open_client: OpenClient) -> None:
    with pytest.raises(TimeoutError):
        await proxy.wait_links(1, timeout=0.1)
    await open_client(proxy.port)
    await open_client(proxy.port)
    await proxy.wait_links(1, exact=False)
    await proxy.wait_links(2)


async def test_stop_closes_everything_and_leaves_no_task(echo: EchoServer, open_client: OpenClient) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    await proxy.start()
    plain = await open_client(proxy.port)
    await plain.roundtrip(b"plain")
    silenced = await open_client(proxy.port)
    await silenced.roundtrip(b"to be black-holed")
    upstreams = [await echo.next_connection(), await echo.next_connection()]
    proxy.blackhole()
    proxy.blackhole(False)
    delayed = await open_client(proxy.port)
    await delayed.roundtrip(b"delayed")
    upstreams.append(await echo.next_connection())
    proxy.set_delay(30)
    delayed.writer.write(b"queued behind a 30 s delay")  # a forwarding task is asleep on this chunk
    await delayed.writer.drain()
    await proxy.wait_links(3)
    assert proxy_tasks()

    await proxy.stop()
    assert proxy.links == 0
    assert proxy.tasks == 0
    assert proxy_tasks() == []
    assert proxy.errors == []
    for client in (plain, silenced, delayed):
        await client.assert_reset()
    for upstream in upstreams:
        assert await upstream.ended() == "reset"
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(5):
            await open_client(proxy.port)
    await proxy.stop()  # idempotent


async def test_async_with_stops_on_error(echo: EchoServer, open_client: OpenClient) -> None:
    with contextlib.suppress(RuntimeError):
        async with FaultProxy("127.0.0.1", echo.port) as proxy:
            client = await open_client(proxy.port)
            await client.roundtrip(b"x")
            raise RuntimeError("the test body failed")
    await client.assert_reset()
    assert proxy_tasks() == []
