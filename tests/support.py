"""Test support: a real server process, an in-process uvicorn, and a protocol client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

STARTUP_DEADLINE = 20.0


class ServerProcess:
    """`stablews serve` as its own process on a free loopback port."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.flags = flags
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stablews", "serve", "--host", "127.0.0.1", "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(STARTUP_DEADLINE):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self._listening.is_set() and '"listening"' in line:
                self.port = json.loads(line)["port"]
                self._listening.set()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class InProcessServer:
    """uvicorn serving `app` inside the test's event loop, on a socket bound to port 0."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        options = {"ws": "websockets-sansio", "ws_ping_interval": None, "log_config": None, "lifespan": "on"}
        options.update(config)
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.server.install_signal_handlers = False  # type: ignore[attr-defined]
        self.task: asyncio.Task[None] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> InProcessServer:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        await wait_for(lambda: self.server.started, 10, "in-process server start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 20)
        self.sock.close()


async def graceful_restart(
    server: ServerProcess, start: Callable[..., ServerProcess], flags: tuple[str, ...]
) -> ServerProcess:
    """SIGTERM (the drain), wait for exit status 0, then a new server on the same port with `flags`."""
    server.signal(signal.SIGTERM)
    status = await asyncio.to_thread(server.wait, 30)
    assert status == 0, "".join(server.lines[-20:])
    return await asyncio.to_thread(start, "--port", str(server.port), *flags)


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float,
    what: str = "condition",
    interval: float = 0.02,
) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def get_json(url: str, **kw: Any) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url, **kw)
        return response.json()


class Client:
    """A protocol client for tests: a background reader splits frames, answers
    pings (while `answer_pings`) and queues every other message."""

    def __init__(self, ws: ClientConnection, answer_pings: bool) -> None:
        self.ws = ws
        self.answer_pings = answer_pings
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pings = 0
        self.frames = 0
        self.closed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        hello: dict[str, Any] | None = None,
        answer_pings: bool = True,
        subprotocol: str | None = "stablews.v1",
        **kw: Any,
    ) -> Client:
        ws = await connect(
            url,
            subprotocols=[subprotocol] if subprotocol else None,  # type: ignore[list-item]
            compression=None,
            ping_interval=None,
            max_size=16 * 1024 * 1024,
            open_timeout=10,
            close_timeout=5,
            **kw,
        )
        client = cls(ws, answer_pings)
        if hello is not None:
            await client.send({"type": "hello", **hello})
        return client

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self.frames += 1
                assert isinstance(frame, str)
                for line in frame.split("\n"):
                    message = json.loads(line)
                    if message["type"] == "ping":
                        self.pings += 1
                        if self.answer_pings:
                            await self.ws.send(json.dumps({"type": "pong", "id": message["id"]}))
                        continue
                    await self.inbox.put(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
            # cancellation of a reader loop when a message arrives at that moment.
            async with asyncio.timeout(timeout):
                return await self.inbox.get()
        except TimeoutError:
            raise AssertionError(f"no message within {timeout}s (close code {self.close_code})") from None

    async def recv_type(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next message of `kind`, failing on any other type first."""
        message = await self.recv(timeout)
        assert message["type"] == kind, message
        return message

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        try:
            async with asyncio.timeout(timeout):
                await self.closed.wait()
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s") from None
        return self.close_code

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code if self.closed.is_set() else None

    def drained(self) -> list[dict[str, Any]]:
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def abort(self) -> None:
        """Drop the TCP connection with no close frame."""
        self.ws.transport.abort()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


async def hello_client(url: str, **kw: Any) -> tuple[Client, dict[str, Any]]:
    client = await Client.connect(url, hello=kw.pop("hello", {"client": "tests"}), **kw)
    welcome = await client.recv_type("welcome")
    return client, welcome
