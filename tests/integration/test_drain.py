"""The drain on SIGTERM (operations.md#graceful-shutdown) under real load:

- 200 protocol clients each get `reconnect` (reason `shutdown`, `after_ms` within
  the documented spread) and then 1001; the listener is refused at once; the
  process exits 0 within `shutdown_timeout`;
- clients of the project's own client resume on a server restarted on the same
  port: one `resync` each, before the first message of the new epoch, no gap;
- a backlog queued before the signal is flushed before the `reconnect` and the 1001;
- a second signal during a drain that waits on a peer which does not read exits at once, status 1;
- such a peer is abandoned at `shutdown_timeout`, the others drain normally, and the process exits 0
  within the documented time budget.

test_cli.py covers the small case (5 clients, SIGTERM and SIGINT, exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import Client, ServerProcess, hello_client, wait_for

KEY = "drain-key"
# A loaded 2-core machine can be late by this much on top of any bound.
MARGIN = 3.0

StartServer = Callable[..., ServerProcess]


# ------------------------------------------------------------ helpers


def _exit_watch(server: ServerProcess, timeout: float) -> asyncio.Task[tuple[int | None, float]]:
    """Wait for the process in a thread; the result is (status, monotonic time of the exit).
    Start it before the signal so that the exit time is taken when it happens."""

    def wait() -> tuple[int | None, float]:
        try:
            status = server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None, time.monotonic()
        at = time.monotonic()
        server.wait(5)  # the exit is known: this only lets the log reader catch up
        return status, at

    return asyncio.ensure_future(asyncio.to_thread(wait))


def _log_entries(server: ServerProcess, msg: str) -> list[dict[str, Any]]:
    return [entry for entry in server.logs() if entry.get("msg") == msg]


def _errors(server: ServerProcess) -> list[dict[str, Any]]:
    """Error-level log lines. uvicorn's websockets-sansio logs "ASGI callable returned without completing
    handshake." for every upgrade answered with an HTTP response (the 503 of a drain): its noise, left out."""
    return [e for e in server.logs() if e.get("level") == "error" and "without completing handshake" not in e["msg"]]


async def _readyz(port: int) -> int | str:
    """The status of `GET /readyz` on a new connection; "refused" when the connection is refused,
    "reset" when the kernel had queued it but the server closed its listener before taking it."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return "refused"
    try:
        async with asyncio.timeout(10):
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            await writer.drain()
            line = await reader.readline()
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not line:
        return "reset"
    return int(line.split()[1])


def _listener_closed(server: ServerProcess) -> Callable[[], Any]:
    """A wait_for predicate: new connections to the server are refused."""

    async def refused() -> bool:
        return await _readyz(server.port) == "refused"

    return refused


async def _upgrade(url: str) -> int | str:
    """The HTTP status a WebSocket upgrade gets (101 when accepted), or "refused"/"reset"."""
    try:
        ws = await connect(url, subprotocols=["stablews.v1"], open_timeout=10, ping_interval=None)  # type: ignore[list-item]
    except ConnectionRefusedError:
        return "refused"
    except InvalidStatus as exc:
        return exc.response.status_code
    except (ConnectionResetError, ConnectionClosed, InvalidMessage):
        return "reset"
    await ws.close()
    return 101


async def _open_subscribed(url: str, count: int, channel: str, concurrency: int = 20) -> list[Client]:
    """`count` protocol clients, each past hello and subscribed to `channel`."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Client:
        async with gate:
            client, _ = await hello_client(url, hello={"client": "drain-test"})
            try:
                await client.send({"type": "subscribe", "channel": channel})
                message = await client.recv(30)
                while message["type"] == "message":  # cannot happen before `subscribed`; be explicit
                    message = await client.recv(30)
                assert message["type"] == "subscribed", message
            except BaseException:
                await client.close()
                raise
            return client

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    failures = [r for r in results if not isinstance(r, Client)]
    if failures:
        await asyncio.gather(*(c.close() for c in clients))
        raise failures[0]
    return clients


async def _advice_then_1001(client: Client) -> dict[str, Any]:
    """Read publications up to the `reconnect` advice; then nothing but the close, 1001 `shutdown`."""
    while True:
        message = await client.recv(30)
        if message["type"] == "reconnect":
            break
        assert message["type"] == "message", message
    assert await client.wait_closed(30) == 1001
    assert client.ws.close_reason == "shutdown"
    assert client.drained() == [], "messages after the reconnect advice"
    return message


async def _backlogged_client(server: ServerProcess, channel: str, *, min_queued: int) -> tuple[ClientConnection, str]:
    """A client subscribed to `channel` that stops reading, and a backlog of publications
    (POST /api/v1/publish) until at least `min_queued` wait in its server-side send queue.

    Its socket has a small receive buffer (set before connect), and the websockets library stops
    reading the socket once `max_queue` frames wait for `recv()`: the server's writes then block
    and what is published next stays in the connection's queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    ws = await connect(server.ws, sock=sock, compression=None, ping_interval=None, max_queue=1,
                       max_size=16 * 1024 * 1024, close_timeout=10,
                       subprotocols=["stablews.v1"])  # type: ignore[list-item]
    await ws.send(json.dumps({"type": "hello", "client": "backlogged"}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    await ws.send(json.dumps({"type": "subscribe", "channel": channel}))
    subscribed = json.loads(await ws.recv())
    assert subscribed["type"] == "subscribed" and subscribed["offset"] == 0, subscribed
    conn_id = welcome["connection"]
    payload = "x" * 16_000
    published = 0
    async with httpx.AsyncClient(base_url=server.http, headers={"X-API-Key": KEY}, timeout=10) as http:
        while True:
            for _ in range(20):
                reply = await http.post("/api/v1/publish", json={"channel": channel, "data": {"n": published + 1,
                                                                                           "pad": payload}})
                assert reply.status_code == 200, reply.text
                published += 1
                assert reply.json()["offset"] == published
            view = (await http.get(f"/api/v1/websocket/connections/{conn_id}")).json()
            assert view["state"] == "open", view
            if view["messages"]["queued"] >= min_queued:
                return ws, conn_id
            assert published < 5000, f"no backlog after {published} publications: {view['messages']}"


# ------------------------------------------------------------ 200 clients


async def test_sigterm_with_200_clients_advises_each_then_1001_refuses_new_ones_and_exits_0(
    start_server: StartServer,
) -> None:
    count, shutdown_timeout, reconnect_delay = 200, 10.0, 2.0
    server = start_server("--shutdown-timeout", f"{shutdown_timeout:g}s", "--reconnect-delay", f"{reconnect_delay:g}s",
                          "--demo-feed-rate", "20")
    clients = await _open_subscribed(server.ws, count, "demo.ticker")
    assert await _readyz(server.port) == 200
    exit_watch = _exit_watch(server, 60)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)

    # Readiness 503 at once, then the listener is closed: refused (operations.md, health.md).
    # Nothing is accepted after the signal (no 200, no 101), and an upgrade that gets an answer gets
    # 503 (protocol.md, "during a drain"): several at a time, so that some are in flight as the drain ends.
    readiness: list[int | str] = []
    upgrades: list[int | str] = []
    while not (readiness and readiness[-1] == "refused" and upgrades and upgrades[-1] == "refused"):
        assert time.monotonic() - signalled < 5 + MARGIN, (readiness, upgrades)
        ready, *upgraded = await asyncio.gather(_readyz(server.port), *(_upgrade(server.ws) for _ in range(4)))
        readiness.append(ready)
        upgrades.extend(upgraded)
        await asyncio.sleep(0.01)  # a poll interval, not a synchronisation
    assert set(readiness) <= {503, "refused", "reset"}, readiness
    assert set(upgrades) <= {503, "refused", "reset"}, (upgrades, _errors(server))

    advice = await asyncio.gather(*(_advice_then_1001(c) for c in clients))
    assert all(a["reason"] == "shutdown" for a in advice)
    after = [a["after_ms"] for a in advice]
    assert all(type(ms) is int for ms in after), after
    # spread = min(max_reconnect_delay, max(reconnect_delay, N / 1000)) s (protocol.md#reconnect-advice)
    spread_ms = int(min(30.0, max(reconnect_delay, count / 1000)) * 1000)
    assert min(after) >= 0 and max(after) <= spread_ms, (min(after), max(after))
    assert max(after) - min(after) >= spread_ms / 2, "after_ms is not spread"  # 200 uniform draws
    assert len(set(after)) > count / 4

    status, exited = await exit_watch
    assert status == 0, "".join(server.lines[-20:])
    assert exited - signalled < shutdown_timeout, exited - signalled
    drained = _log_entries(server, "drain finished")
    assert len(drained) == 1, drained
    assert drained[0]["connections_closed"] == count and drained[0]["connections_abandoned"] == 0
    assert not _log_entries(server, "connection closed abnormally")
    assert not _errors(server)
    for client in clients:
        await client.close()


# ------------------------------------------------------------ the project's client across a restart


async def test_stable_clients_resume_on_the_restarted_server_with_one_resync_before_the_new_epoch(
    start_server: StartServer,
) -> None:
    count = 20
    flags = ("--demo-feed-rate", "20", "--shutdown-timeout", "10s")
    old = start_server(*flags)
    policy = RecoveryPolicy(initial_delay=0.05, max_delay=0.5, jitter_max=0.05, max_retries=1000,
                            enable_circuit_breaker=False)
    events: list[list[tuple[Any, ...]]] = [[] for _ in range(count)]
    drops: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    clients = [StableClient(old.ws, channels=["demo.ticker"], policy=policy, name=f"drain-{i}") for i in range(count)]

    async def consume(client: StableClient, log: list[tuple[Any, ...]]) -> None:
        async for msg in client:
            assert msg["channel"] == "demo.ticker"
            log.append(("message", msg["epoch"], msg["offset"]))

    def in_epoch(log: list[tuple[Any, ...]], pred: Callable[[str], bool]) -> int:
        return sum(1 for e in log if e[0] == "message" and pred(e[1]))

    consumers: list[asyncio.Task[None]] = []
    try:
        for client, log, dropped in zip(clients, events, drops, strict=True):
            client.on("resync", lambda channel, info, log=log: log.append(("resync", channel, info)))
            client.on("disconnected", dropped.append)
            await client.connect()
            consumers.append(asyncio.create_task(consume(client, log)))
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.wait_connected() for c in clients))
        await wait_for(lambda: all(in_epoch(log, lambda _: True) >= 5 for log in events), 30, "messages before")
        first_epoch = events[0][0][1]

        exit_watch = _exit_watch(old, 60)
        signalled = time.monotonic()
        old.signal(signal.SIGTERM)
        status, exited = await exit_watch
        assert status == 0, "".join(old.lines[-20:])
        assert exited - signalled < 10
        assert _log_entries(old, "drain finished")[0]["connections_closed"] == count

        new = await asyncio.to_thread(start_server, "--port", str(old.port), *flags)
        assert new.port == old.port
        await wait_for(lambda: all(in_epoch(log, lambda e: e != first_epoch) >= 5 for log in events), 60,
                       "messages of the new epoch on every client")
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        async with asyncio.timeout(10):
            await asyncio.gather(*consumers)

    new_epochs = set()
    for i, (client, log) in enumerate(zip(clients, events, strict=True)):
        resyncs = [n for n, e in enumerate(log) if e[0] == "resync"]
        assert len(resyncs) == 1, (i, [e for e in log if e[0] == "resync"])
        cut = resyncs[0]
        before, (_, channel, info), after = log[:cut], log[cut], log[cut + 1:]
        assert channel == "demo.ticker" and info["reason"] == "recovery_failed", info
        # Before the resync: the old epoch only, no gap, no repeat.
        assert before and all(e[0] == "message" and e[1] == first_epoch for e in before), (i, before[-3:])
        old_offsets = [e[2] for e in before]
        assert old_offsets == list(range(old_offsets[0], old_offsets[0] + len(old_offsets))), i
        # The resync names where the client was and where the new stream starts.
        assert info["previous"] == {"epoch": first_epoch, "offset": old_offsets[-1]}, (i, info)
        new_epoch = info["current"]["epoch"]
        assert new_epoch != first_epoch
        new_epochs.add(new_epoch)
        # After it: the new epoch only, from the top the resync reported, no gap.
        assert after and all(e[0] == "message" and e[1] == new_epoch for e in after), (i, after[:3])
        new_offsets = [e[2] for e in after]
        start = info["current"]["offset"] + 1
        assert new_offsets == list(range(start, start + len(new_offsets))), (i, start, new_offsets[:5])
        assert [(d["code"], d["reason"]) for d in drops[i]] == [(1001, "shutdown")], (i, drops[i])
        stats = client.recovery_stats()
        assert stats["channels_resynced"] == 1 and stats["gaps"] == 0 and stats["drops"] == 1, (i, stats)
        assert stats["duplicates_dropped"] == 0, (i, stats)
    assert len(new_epochs) == 1  # one channel, one epoch on the new server


# ------------------------------------------------------------ a backlog is flushed before 1001


async def test_messages_queued_at_the_signal_are_all_delivered_before_the_advice_and_1001(
    start_server: StartServer,
) -> None:
    server = start_server("--api-key", KEY, "--demo-feed", "false", "--send-queue-max", "100000",
                          "--shutdown-timeout", "30s")
    ws, _ = await _backlogged_client(server, "burst", min_queued=100)
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        top = (await http.post("/api/v1/publish", headers={"X-API-Key": KEY},
                               json={"channel": "burst", "data": {"last": True}})).json()["offset"]
    exit_watch = _exit_watch(server, 90)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    # The drain starts right after the listener closes (server.py: shutdown). Only then does the
    # client read again: what it gets from here on was queued when the drain began.
    await wait_for(_listener_closed(server), 10 + MARGIN, "the listener closed")
    offsets: list[int] = []
    tail: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                for line in str(frame).split("\n"):
                    message = json.loads(line)
                    if message["type"] == "message" and not tail:
                        offsets.append(message["offset"])
                    elif message["type"] != "ping":
                        tail.append(message)
    assert offsets == list(range(1, top + 1)), (len(offsets), top)
    assert [m["type"] for m in tail] == ["reconnect"], tail
    assert tail[0]["reason"] == "shutdown"
    assert ws.close_code == 1001 and ws.close_reason == "shutdown"
    status, exited = await exit_watch
    assert status == 0 and exited - signalled < 30
    drained = _log_entries(server, "drain finished")[0]
    assert drained["connections_closed"] == 1 and drained["connections_abandoned"] == 0
    # What was still queued at the signal went out during the drain (plus the advice).
    assert drained["messages_flushed"] >= 100, drained


# ------------------------------------------------------------ a second signal


async def test_a_second_signal_during_a_stuck_drain_exits_at_once_with_status_1(start_server: StartServer) -> None:
    shutdown_timeout = 60.0
    server = start_server("--api-key", KEY, "--demo-feed", "false", "--send-queue-max", "100000",
                          "--shutdown-timeout", f"{shutdown_timeout:g}s")
    ws, _ = await _backlogged_client(server, "stuck", min_queued=50)  # and it never reads again
    exit_watch = _exit_watch(server, 90)
    server.signal(signal.SIGTERM)
    # The listener closes when the drain starts (server.py: shutdown): from then on it waits on the
    # client that does not read, up to shutdown_timeout.
    await wait_for(_listener_closed(server), 10 + MARGIN, "the listener closed")
    await wait_for(lambda: _log_entries(server, "signal received: draining"), 10, "the drain log line")
    assert server.proc.poll() is None, "the drain did not wait for the client that does not read"
    second = time.monotonic()
    server.signal(signal.SIGTERM)
    status, exited = await exit_watch
    assert status == 1, "".join(server.lines[-20:])
    assert exited - second < 2 + MARGIN, exited - second
    assert _log_entries(server, "second signal: exiting now")[0]["signal"] == "SIGTERM"
    assert not _log_entries(server, "drain finished")
    ws.transport.abort()


# ------------------------------------------------------------ a peer that never reads


async def test_a_peer_that_never_reads_is_abandoned_at_the_deadline_and_the_others_drain_normally(
    start_server: StartServer,
) -> None:
    shutdown_timeout, close_timeout = 3.0, 2.0
    server = start_server("--api-key", KEY, "--demo-feed", "false", "--send-queue-max", "100000",
                          "--shutdown-timeout", f"{shutdown_timeout:g}s", "--close-timeout", f"{close_timeout:g}s")
    readers = await _open_subscribed(server.ws, 10, "other")
    ws, _ = await _backlogged_client(server, "stuck", min_queued=50)  # never reads again
    exit_watch = _exit_watch(server, 90)
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    for reader in readers:
        await _advice_then_1001(reader)
    status, exited = await exit_watch
    assert status == 0, "".join(server.lines[-20:])
    # operations.md, time budget: shutdown_timeout + max(1 s, close_timeout), and a few seconds.
    assert shutdown_timeout <= exited - signalled < shutdown_timeout + max(1.0, close_timeout) + MARGIN, (
        exited - signalled
    )
    drained = _log_entries(server, "drain finished")
    assert len(drained) == 1
    assert drained[0]["connections_closed"] == 10 and drained[0]["connections_abandoned"] == 1, drained
    assert shutdown_timeout <= drained[0]["drain_seconds"] < shutdown_timeout + 0.5 + MARGIN
    ws.transport.abort()
    for reader in readers:
        await reader.close()
