"""What the benchmark scripts share: servers, client workers and their processes, small helpers.

The scripts are run as `python bench/<name>.py`, so this module is importable as `benchlib`
(the script's directory is on sys.path, for the workers the scripts start as well).

- servers: `ServerProcess` starts bench/baseline_app.py (`bare`), `stablews serve` (`stablews`) or
  bench/socketio_app.py (`socketio`, python-socketio) on 127.0.0.1 with port 0, reads the port from the
  `listening` log line and then keeps reading stderr (a full pipe would block the server), handing each
  line to `keep`. `KINDS` are the two most scripts compare; `SERVER_KINDS` adds `socketio`;
- client workers: `ClientWorker` opens a worker's connections (`open_client`: the stablews.v1
  subprotocol for bare and stablews, on stablews `hello`, `subscribe` and wait for `subscribed`, pings
  answered; on socketio Engine.IO v4 / Socket.IO v5 over the websocket transport: connect to `/`, emit
  `join` with the channel and wait for its ack) and prints the `ready` event; `WorkerProcess` is a
  worker as seen from the main process (JSON events on its stdout, commands on its stdin);
- `dumps`, `emit`, `split_frame`, `frame_messages`, `pong`, `wait_until`, `http_get`, `http_get_json`,
  `raise_nofile_limit`, `service_revision`, `run_bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException
from websockets.typing import Subprotocol

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BASELINE_APP = BENCH_DIR / "baseline_app.py"
SOCKETIO_APP = BENCH_DIR / "socketio_app.py"

HOST = "127.0.0.1"
KINDS = ("bare", "stablews")
SERVER_KINDS = (*KINDS, "socketio")
SUBPROTOCOL = Subprotocol("stablews.v1")
DEFAULT_MAX_QUEUE = 16  # websockets' connect() default
STREAM_LIMIT = 64 * 1024  # asyncio's default line limit for a subprocess's pipes

# Engine.IO v4 packets are text frames whose first character is the type; a MESSAGE (4) carries a
# Socket.IO v5 packet (its type next, then an optional ack id and the JSON), on the `/` namespace here.
EIO_OPEN, EIO_PING, EIO_PONG = "0", "2", "3"
SIO_CONNECT, SIO_EVENT, SIO_ACK, SIO_CONNECT_ERROR = "40", "42", "43", "44"
SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"  # straight to websocket: no polling first

Json = dict[str, Any]
T = TypeVar("T")


class BenchError(Exception):
    """A run that could not be measured (the message says why)."""


# =================================================================== small helpers


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def emit(obj: Json) -> None:
    """One JSON event on stdout (a worker's line to the main process)."""
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def split_frame(frame: str | bytes) -> list[dict[str, Any]]:
    """The messages of one server frame (a frame may carry several, one per line)."""
    return [json.loads(line) for line in str(frame).split("\n") if line]


def socketio_messages(frame: str | bytes) -> list[dict[str, Any]]:
    """One Engine.IO frame (one packet) in split_frame's terms, so one reader serves every server: the
    event `42["message", data]` as {"type": "message", "offset": data["seq"], "data": data} (the
    publisher numbers its payloads 1..N, as stablews numbers offsets), the ping `2` as {"type": "ping"},
    any other packet as {"type": "socketio <its first two characters>"}."""
    text = str(frame)
    if text == EIO_PING:
        return [{"type": "ping"}]
    if text.startswith(SIO_EVENT + "["):
        name, *args = json.loads(text[len(SIO_EVENT) :])
        if name == "message" and args and isinstance(args[0], dict):
            return [{"type": "message", "offset": args[0].get("seq"), "data": args[0]}]
        return [{"type": f"socketio event {name}"}]
    return [{"type": f"socketio {text[:2]}"}]


def frame_messages(kind: str, frame: str | bytes) -> list[dict[str, Any]]:
    """The messages of one frame from a `kind` server, as split_frame gives them."""
    return socketio_messages(frame) if kind == "socketio" else split_frame(frame)


def pong(kind: str, ping: Json) -> str:
    """The answer to a `ping` message of frame_messages."""
    return EIO_PONG if kind == "socketio" else dumps({"type": "pong", "id": ping["id"]})


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def wait_until(
    check: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.25
) -> T:
    """Poll `check` until it returns something true, and return that; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


@dataclass
class HttpAnswer:
    status: int  # 0: no status line
    status_line: str
    headers: dict[str, str]  # names in lower case
    body: bytes  # de-chunked


async def http_get(port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> HttpAnswer:
    """GET http://127.0.0.1:port/path (HTTP/1.1, Connection: close) with extra `headers`; the whole
    exchange within `timeout` seconds (TimeoutError after it)."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = _unchunk(body)
    return HttpAnswer(status, lines[0], fields, body)


async def http_get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    """GET http://127.0.0.1:port/path and decode its JSON body (no client library needed)."""
    answer = await http_get(port, path, timeout=timeout)
    if answer.status != 200:
        raise BenchError(f"GET {path}: {answer.status_line or 'no answer'!r}")
    return json.loads(answer.body)


def service_revision() -> Json:
    """The commit measured, and whether service/ differs from it (others may be editing it)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "service")
    return {"commit": git("rev-parse", "--short", "HEAD"), "service_modified": None if status is None else bool(status)}


def run_bench(name: str, bench: Callable[[], Awaitable[int]]) -> int:
    """Run the main coroutine; SIGTERM cancels it, so every `finally` stops the servers and workers it started."""

    async def main_async() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench()

    try:
        return asyncio.run(main_async())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted (servers and workers stopped)", file=sys.stderr)
        return 130


# =================================================================== client connections


async def await_subscribed(ws: ClientConnection) -> None:
    """Read until `subscribed`, answering pings; BenchError on an `error` or after 100 frames."""
    for _ in range(100):  # welcome, subscribed, perhaps a ping
        for line in str(await ws.recv()).split("\n"):
            if not line:
                continue
            msg = json.loads(line)
            kind = msg.get("type")
            if kind == "subscribed":
                return
            if kind == "ping":
                await ws.send(dumps({"type": "pong", "id": msg["id"]}))
            elif kind == "error":
                raise BenchError(f"server error during setup: {line[:200]}")
    raise BenchError("no 'subscribed' among the first 100 frames")


async def socketio_await(ws: ClientConnection, prefix: str) -> str:
    """Read until a frame starting with `prefix`, answering pings; BenchError on a connect error or
    after 100 frames."""
    for _ in range(100):
        frame = str(await ws.recv())
        if frame.startswith(prefix):
            return frame
        if frame == EIO_PING:
            await ws.send(EIO_PONG)
        elif frame.startswith(SIO_CONNECT_ERROR):
            raise BenchError(f"socket.io connect error: {frame[:200]}")
    raise BenchError(f"no {prefix!r} among the first 100 frames")


async def socketio_join(ws: ClientConnection, channel: str) -> None:
    """Engine.IO open, Socket.IO connect to `/`, then `join` `channel` (ack id 0) and wait for the ack."""
    opened = str(await ws.recv())
    if not opened.startswith(EIO_OPEN + "{"):
        raise BenchError(f"expected an Engine.IO open packet, got {opened[:200]!r}")
    await ws.send(SIO_CONNECT)
    await socketio_await(ws, SIO_CONNECT + "{")
    await ws.send(f"{SIO_EVENT}0{dumps(['join', channel])}")
    await socketio_await(ws, f"{SIO_ACK}0[")


async def open_client(
    url: str,
    kind: str,
    *,
    client: str,
    channel: str,
    max_size: int | None,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    abort_on_failure: bool = True,
) -> ClientConnection:
    """Connect with the stablews.v1 subprotocol (the same handshake for bare and stablews); on a stablews
    server send `hello` (as `client`) and `subscribe` to `channel`, and wait for `subscribed`. On a
    socketio server (no subprotocol, as Socket.IO clients do) join the room `channel` (`socketio_join`).

    If the setup fails, the connection is aborted (`abort_on_failure`) or closed, and the error raised.
    """
    ws = await connect(
        url,
        subprotocols=None if kind == "socketio" else [SUBPROTOCOL],
        compression=None,
        proxy=None,
        ping_interval=None,
        max_size=max_size,
        max_queue=max_queue,
        open_timeout=None,
        close_timeout=10,
    )
    try:
        if kind == "stablews":
            await ws.send(dumps({"type": "hello", "client": client}))
            await ws.send(dumps({"type": "subscribe", "channel": channel}))
            await await_subscribed(ws)
        elif kind == "socketio":
            await socketio_join(ws, channel)
    except BaseException:
        if abort_on_failure:
            ws.transport.abort()
        else:
            await ws.close()
        raise
    return ws


class ClientWorker:
    """The client side of a worker process: opens `count` connections, at most `concurrency` handshakes
    in flight, each within `open_timeout` seconds (from the spec the main process passed with --worker).

    Subclasses set the connection options below (and `channel`), and take each opened connection in `opened`.
    """

    client = "bench"  # the `hello` client name
    channel: str  # the channel subscribed to on stablews
    max_size: int | None = 16 * 1024 * 1024
    max_queue: int | None = DEFAULT_MAX_QUEUE
    abort_on_failure = True  # on a failed setup: abort the transport (True) or close the connection

    def __init__(self, spec: Json) -> None:
        self.kind: str = spec["kind"]
        self.url: str = spec["url"]
        self.count: int = spec["count"]
        self.concurrency: int = spec["concurrency"]
        self.open_timeout: float = spec["open_timeout"]
        self.connected = 0
        self.failed = 0
        self.first_error: str | None = None

    def opened(self, ws: ClientConnection) -> None:
        """Take one connection, set up and subscribed."""
        raise NotImplementedError

    async def open_all(self) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        await asyncio.gather(*(self._open(gate) for _ in range(self.count)))

    async def open_and_report(self) -> None:
        """Open every connection, then print {"event": "ready", ...}."""
        started = time.monotonic()
        await self.open_all()
        emit(
            {
                "event": "ready",
                "connected": self.connected,
                "failed": self.failed,
                "first_error": self.first_error,
                "seconds": round(time.monotonic() - started, 3),
            }
        )

    async def _open(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                async with asyncio.timeout(self.open_timeout):
                    ws = await open_client(
                        self.url,
                        self.kind,
                        client=self.client,
                        channel=self.channel,
                        max_size=self.max_size,
                        max_queue=self.max_queue,
                        abort_on_failure=self.abort_on_failure,
                    )
            except (OSError, TimeoutError, WebSocketException, BenchError) as exc:
                self.failed += 1
                if self.first_error is None:
                    self.first_error = f"{type(exc).__name__}: {exc}"
                return
        self.connected += 1
        self.opened(ws)


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin as an asyncio stream (a worker's commands; EOF: the parent is gone)."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    return stdin


# =================================================================== worker processes


class WorkerProcess:
    """A worker (a bench script run with --worker SPEC) as seen from the main process."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    async def start(cls, python: str, script: Path, spec: Json, name: str, *, limit: int = STREAM_LIMIT) -> Self:
        """`limit`: the longest line the worker may print (an event)."""
        proc = await asyncio.create_subprocess_exec(
            python,
            str(script),
            "--worker",
            dumps(spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_DIR,
            limit=limit,
        )
        return cls(proc, name)

    async def event(self, name: str, timeout: float) -> Json:
        """Read the worker's events until the one called `name`."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise BenchError(f"{self.name} exited (status {await self.proc.wait()}) before '{name}'")
                    msg: Json = json.loads(line)
                    if msg.get("event") == name:
                        return msg
        except TimeoutError:
            raise BenchError(f"{self.name}: no '{name}' within {timeout:g}s") from None

    async def command(self, cmd: Json) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def close(self, timeout: float = 90.0) -> Json | None:
        """Send {"cmd": "close"}, return the worker's 'closed' event and let it exit; kill it if it does not."""
        summary: Json | None = None
        try:
            if self.proc.returncode is None:
                await self.command({"cmd": "close"})
                summary = await self.event("closed", timeout)
                await asyncio.wait_for(self.proc.wait(), 10)
        except (BenchError, OSError, TimeoutError):
            pass
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        return summary

    async def stop(self) -> None:
        """Close the worker's stdin (EOF: it aborts what is left and exits); kill it after 10 s."""
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_workers(
    python: str, script: Path, kind: str, total: int, processes: int, spec: Json, *, limit: int = STREAM_LIMIT
) -> list[WorkerProcess]:
    """Start `processes` workers sharing `total` connections as evenly as can be (none with 0); each gets
    `spec` with its own "kind" and "count"."""
    workers: list[WorkerProcess] = []
    share, extra = divmod(total, processes)
    try:
        for i in range(processes):
            count = share + (1 if i < extra else 0)
            if count:
                worker_spec = {"kind": kind, **spec, "count": count}
                name = f"{kind} worker {i}"
                workers.append(await WorkerProcess.start(python, script, worker_spec, name, limit=limit))
    except BaseException:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        raise
    return workers


async def workers_ready(workers: Sequence[WorkerProcess], timeout: float) -> list[Json]:
    """Every worker's 'ready' event; BenchError if any connection failed to open."""
    ready = await asyncio.gather(*(w.event("ready", timeout) for w in workers))
    failed = sum(r["failed"] for r in ready)
    if failed:
        total = sum(r["connected"] + r["failed"] for r in ready)
        first = next(r["first_error"] for r in ready if r["failed"])
        raise BenchError(f"{failed} of {total} client connections failed to open; first error: {first}")
    return ready


# =================================================================== servers


def server_command(kind: str, python: str, stablews_flags: Sequence[str] = ()) -> list[str]:
    """The command line of a `bare`, `stablews` or `socketio` server on 127.0.0.1, port 0 (a free port
    from the OS), stablews without its demo feed and with `stablews_flags` (the other apps take none)."""
    if kind == "bare":
        return [python, str(BASELINE_APP), "--host", HOST, "--port", "0"]
    if kind == "socketio":
        return [python, str(SOCKETIO_APP), "--host", HOST, "--port", "0"]
    return [python, "-m", "stablews", "serve", "--host", HOST, "--port", "0", "--demo-feed", "false",
            *stablews_flags]


def listening_port(line: str) -> int | None:
    """The port of a `{"msg": "listening", "port": N, ...}` log line (stablews's and the bench apps')."""
    if '"listening"' not in line:
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        entry = json.loads(line)
        if isinstance(entry, dict) and entry.get("msg") == "listening":
            return int(entry["port"])
    return None


@dataclass
class ServerProcess:
    """A `bare`, `stablews` or `socketio` server process; subclasses keep what they need of its log lines
    (`keep`)."""

    kind: str
    proc: asyncio.subprocess.Process
    port: int = 0
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        kind: str,
        python: str,
        stablews_flags: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
        timeout: float = 30.0,
    ) -> Self:
        """Start the server and wait for its port (killed, and BenchError, if it does not report one)."""
        proc = await asyncio.create_subprocess_exec(
            *server_command(kind, python, stablews_flags),
            stdin=stdin,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_DIR,
            env=env,
        )
        server = cls(kind, proc)
        try:
            server.port = await server._read_port(timeout)
        except BaseException:
            await server.kill()
            raise
        server.reader = asyncio.create_task(server._read_rest())
        return server

    @property
    def ws_url(self) -> str:
        """Where clients connect (subscribers; publishers too on stablews)."""
        path = SOCKETIO_PATH if self.kind == "socketio" else "/ws"
        return f"ws://{HOST}:{self.port}{path}"

    def keep(self, line: str) -> None:
        """One line of the server's stderr (its newline stripped), in order, from the first."""

    async def _read_port(self, timeout: float) -> int:
        assert self.proc.stderr is not None
        tail: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        # Let the watcher reap it: kill() on a process that has just exited races with that.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.proc.wait(), 5)
                        text = "\n".join(tail[-20:])
                        raise BenchError(f"{self.kind} server exited before listening:\n{text}")
                    line = raw.decode(errors="replace").rstrip()
                    tail.append(line)
                    self.keep(line)
                    port = listening_port(line)
                    if port is not None:
                        return port
        except TimeoutError:
            raise BenchError(f"{self.kind} server did not report a port within {timeout:g}s") from None

    async def _read_rest(self) -> None:
        """Keep reading the server's logs (a full pipe would block it)."""
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.keep(raw.decode(errors="replace").rstrip())

    async def join_reader(self, timeout: float = 5.0) -> None:
        """Wait for the log reader to reach the end of stderr (after the process ended)."""
        if self.reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.reader, timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await self.join_reader()


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of strings as a plain-text table: the first column left-aligned, the others right-aligned,
    a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(widths[j + 1]) for j, c in enumerate(row[1:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
