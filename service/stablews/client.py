"""The Python client: connect, answer heartbeats, track positions, reconnect
with recovery, resume, and verify a new connection before calling it healthy.

    async with StableClient("ws://host:8000/ws", channels=["demo.ticker"]) as client:
        client.on("resync", on_resync)
        async for msg in client:          # `message` objects, exactly once, in offset order
            ...

Delivery: every `message` goes either to the `message` handlers (when any is
registered) or to the async iterator, in arrival order. A channel whose
recovery failed (`recovered: false`, a new epoch, or a gap) fires the
`resync` handlers before the first message of its new stream is delivered,
at the same point of the delivery order.

Positions are taken when a message is received (queued for the application,
not when it is processed): what is queued is never lost by a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State as WsState

from . import __version__
from .protocol import SUBPROTOCOL, CloseCode, Position
from .recovery import CircuitState, GiveUp, Recovery, RecoveryPolicy, Uniform

log = logging.getLogger("stablews.client")

# Close codes after which reconnecting cannot help (protocol.md): the client stops.
FINAL_CODES = frozenset({CloseCode.NORMAL, CloseCode.POLICY_VIOLATION, CloseCode.TOO_LARGE, CloseCode.UNAUTHORIZED})
STATES = ("connecting", "connected", "reconnecting", "closed")
EVENTS = ("message", "resync", "state", "connected", "disconnected", "reconnecting", "recovered", "circuit", "error")
DEFAULT_SILENCE = 40.0  # heartbeat_interval + heartbeat_timeout defaults, until `welcome` says otherwise

Handler = Callable[..., Any]


class ClientClosed(Exception):
    """The client stopped for good: a final close code, recovery gave up, or close()."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestFailed(Exception):
    """The server answered a request (publish) with an `error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _Dropped(Exception):
    """The current connection ended; `final` when the client must not reconnect."""

    def __init__(self, why: str, code: int | None, *, verified: bool, final: bool = False) -> None:
        super().__init__(why)
        self.code = code
        self.verified = verified
        self.final = final


@dataclass(slots=True)
class _Resync:
    channel: str
    info: dict[str, Any]


_END = object()
# Drops after which the same instance is unlikely to answer: no close frame at all (it died, or
# the network between us did), or 1001 (it is shutting down).
_INSTANCE_GONE = frozenset({None, 1006, 1001})


class StableClient:
    """An asyncio client of protocol.md v1 with the recovery options of configuration.md."""

    def __init__(
        self,
        url: str | None = None,
        *,
        urls: Sequence[str] | None = None,
        channels: Iterable[str] = (),
        token: str | None = None,
        policy: RecoveryPolicy | None = None,
        positions: Mapping[str, Position | tuple[str, int]] | None = None,
        name: str = "stablews-python",
        open_timeout: float = 10.0,
        verify_timeout: float = 10.0,
        max_pending: int = 10_000,
        max_frame_bytes: int = 16 * 1024 * 1024,
        rng: Uniform | None = None,
        headers: Mapping[str, str] | None = None,
        tracer_provider: Any = None,
    ) -> None:
        """`tracer_provider`: the OpenTelemetry TracerProvider for the client's spans (default:
        the global one; without an SDK, tracing is a no-op)."""
        chosen = list(urls or ([] if url is None else [url]))
        if not chosen:
            raise ValueError("give a url or urls=[...]")
        self.urls = chosen
        self.token = token
        self.name = name
        self.open_timeout = open_timeout
        self.verify_timeout = verify_timeout
        self.max_frame_bytes = max_frame_bytes
        self.headers = dict(headers or {})
        self.policy = policy or RecoveryPolicy()
        self.recovery = Recovery(
            self.policy, clock=time.monotonic, rng=rng, on_circuit_change=self._circuit_changed
        )
        self.channels: list[str] = list(dict.fromkeys(channels))
        self.positions: dict[str, Position] = {
            ch: pos if isinstance(pos, Position) else Position(pos[0], int(pos[1]))
            for ch, pos in (positions or {}).items()
        }
        self.state = "closed"
        self.connection_id: str | None = None
        self.server: str | None = None
        self.trace_id: str | None = None
        self.url: str = chosen[0]
        self.silence = DEFAULT_SILENCE
        self.error: ClientClosed | None = None
        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENTS}
        self.max_pending = max_pending
        # Unbounded for the end marker; messages wait on `_space` above max_pending.
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._space = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()
        self._ended = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiters: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._advice: float | None = None
        self._url_index = 0
        self._closing = False
        self._reading = asyncio.Event()  # cleared by pause_reading(): the read loop waits
        self._reading.set()
        # Figures beyond the recovery machinery's own.
        self.messages_received = 0
        self.duplicates_dropped = 0
        self.gaps = 0
        self.resumed = 0
        self.resynced = 0
        self.replayed = 0
        self.drops = 0
        self.last_close: dict[str, Any] | None = None
        self._tracing = _ClientTracing(tracer_provider)

    # ------------------------------------------------------------ public surface

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        """Register a handler (plain function or coroutine function); returns an unsubscribe function.

        message(msg) · resync(channel, info) · state(state) · connected(info) ·
        disconnected(info) · reconnecting(info) · recovered(channel, replayed) ·
        circuit(state) · error(msg)
        """
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        self._handlers[event].append(handler)
        return lambda: self._handlers[event].remove(handler)

    async def connect(self) -> None:
        """Start connecting in the background (returns at once; see wait_connected)."""
        if self._task is None:
            self._closing = False
            self.error = None
            if self._ended:  # connected again after close(): a fresh stream for the iterator
                self._queue = asyncio.Queue()
                self._ended = False
            self._task = asyncio.create_task(self._run(), name="stablews-client")

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection is verified (raises TimeoutError, or ClientClosed if the client stopped)."""
        async with asyncio.timeout(timeout):
            while not self._connected.is_set():
                if self.error is not None:
                    raise self.error
                if self._task is None or self._task.done():
                    raise ClientClosed("the client is closed")
                waiter = asyncio.ensure_future(self._connected.wait())
                try:
                    await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()

    async def wait_closed(self) -> None:
        """Wait until the client stops for good (a final close code, recovery gave up, or close())."""
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def close(self) -> None:
        """Close with 1000 and stop: the iterator ends after what is already queued."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(1000, "client closing")
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():  # close() from a handler: the loop ends itself
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tracing.end_episode("closed")
        self._set_state("closed")
        self._end()

    async def __aenter__(self) -> StableClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> StableClient:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            item = await self._queue.get()
            if self._queue.qsize() < self.max_pending:
                self._space.set()
            if item is _END:
                self._queue.put_nowait(_END)  # later calls end too
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            if isinstance(item, _Resync):
                await self._emit("resync", item.channel, item.info)
                continue
            return item

    async def subscribe(self, channel: str, since: Position | None = None) -> None:
        """Join a channel (from `since`, or from the position already held). Joined already: nothing to do."""
        if channel in self.channels:
            return
        self.channels.append(channel)
        if since is not None:
            self.positions[channel] = since
        if self._connected.is_set():
            await self._send(self._subscribe_message(channel))

    async def unsubscribe(self, channel: str, timeout: float = 10.0) -> None:
        """Leave a channel; nothing of it is delivered after this call (connected: once the server confirmed)."""
        if channel not in self.channels:
            return
        self.channels.remove(channel)
        self.positions.pop(channel, None)
        if self._connected.is_set():
            await self._request({"type": "unsubscribe", "channel": channel}, ("unsubscribed", channel), timeout)

    async def publish(self, channel: str, data: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Publish (when the server allows clients to); returns the `published` acknowledgement."""
        ident = f"p{next(self._ids)}"
        reply = await self._request({"type": "publish", "channel": channel, "data": data, "id": ident}, ident, timeout)
        return reply

    async def ping(self, timeout: float = 10.0) -> float:
        """A client ping; returns the round-trip time in seconds."""
        ident = f"c{next(self._ids)}"
        started = time.monotonic()
        await self._request({"type": "ping", "id": ident}, ident, timeout)
        return time.monotonic() - started

    # Fault injection (`stablews loadtest`, tests): not for ordinary use.

    @property
    def transport(self) -> asyncio.BaseTransport | None:
        """The current connection's transport, None between connections. `transport.abort()` cuts the TCP
        connection without a close frame, as a network loss would: the client reconnects and resumes."""
        ws = self._ws
        return None if ws is None else ws.transport

    def pause_reading(self) -> None:
        """Stop taking frames until resume_reading(): no message is delivered and no server `ping` is
        answered (the server closes the connection 4000 after its missed heartbeats, or 4003 once its send
        queue fills). The client's own silence timer does not run while paused."""
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def recovery_stats(self) -> dict[str, Any]:
        stats = self.recovery.stats()
        stats.update(
            {
                "state": self.state,
                "url": self.url,
                "connection": self.connection_id,
                "server": self.server,
                "drops": self.drops,
                "messages_received": self.messages_received,
                "duplicates_dropped": self.duplicates_dropped,
                "gaps": self.gaps,
                "channels_resumed": self.resumed,
                "channels_resynced": self.resynced,
                "messages_replayed": self.replayed,
                "last_close": self.last_close,
            }
        )
        return stats

    # ------------------------------------------------------------ the connection loop

    async def _run(self) -> None:
        recovery = self.recovery
        try:
            while not self._closing:
                try:
                    delay = recovery.next_delay()
                except GiveUp as exc:
                    self._tracing.end_episode("gave_up")
                    self._stop(ClientClosed(f"recovery gave up: {exc}"))
                    return
                if delay > 0:
                    await self._emit("reconnecting", {
                        "attempt": recovery.episode_attempts + 1, "delay": round(delay, 3),
                        "url": self._next_url_preview(), "circuit": str(recovery.circuit_state),
                    })
                    await asyncio.sleep(delay)
                    self._tracing.waited += delay
                if not recovery.start_attempt():
                    continue
                try:
                    await self._session()
                except _Dropped as drop:
                    self._connected.clear()
                    self._ws = None
                    if self._closing:
                        return
                    if drop.final:  # 1000 ends the stream normally; the others are errors
                        self._tracing.end_episode("final_close")
                        await self._emit("disconnected", dict(self.last_close or {}))
                        normal = drop.code == CloseCode.NORMAL
                        self._stop(None if normal else ClientClosed(f"closed by the server: {drop}", drop.code))
                        return
                    if drop.verified:
                        self.drops += 1
                        if drop.code in _INSTANCE_GONE:  # it vanished or is going away: try another first
                            self._rotate_url()
                        self._set_state("reconnecting")
                        await self._emit("disconnected", dict(self.last_close or {}))
                        recovery.lost(self._advice)
                        self._tracing.begin_episode(str(drop) or "dropped", new_count=True)
                    else:
                        recovery.failed()
                        self._tracing.attempt_failed(str(drop) or "failed")
                        self._rotate_url()
                        if self.state == "connected":
                            self._set_state("reconnecting")
                    self._advice = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the application waiting forever
            log.exception("client loop failed")
            self._tracing.end_episode("failed")
            if self._ws is not None:
                self._ws.transport.abort()
            self._stop(ClientClosed(f"client failed: {exc!r}"))

    def _next_url_preview(self) -> str:
        return self.urls[self._url_index % len(self.urls)]

    def _rotate_url(self) -> None:
        if len(self.urls) > 1:
            self._url_index = (self._url_index + 1) % len(self.urls)

    async def _session(self) -> None:
        """One connection from open to drop. Raises _Dropped (with `.verified`) when it ends.
        The attempt is the `ws.client.connect` span, until the connection is verified."""
        url = self.url = self.urls[self._url_index % len(self.urls)]
        if self.state == "closed":
            self._set_state("connecting")
        headers = dict(self.headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._tracing.start_connect(url, headers)  # injects `traceparent`
        try:
            await self._connection(url, headers)
        except _Dropped as drop:
            self._tracing.connect_failed(str(drop) or "dropped", drop.code)
            raise
        finally:
            self._tracing.connect_failed("interrupted", None)  # still open: close() cancelled it

    async def _connection(self, url: str, headers: dict[str, str]) -> None:
        verified = False
        try:
            async with asyncio.timeout(self.open_timeout):
                ws = await connect(
                    url,
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    additional_headers=headers,
                    open_timeout=None,
                    ping_interval=None,  # the protocol's heartbeats, not the library's
                    max_size=self.max_frame_bytes,
                    close_timeout=2,
                    user_agent_header=f"{self.name}/{__version__}",
                )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
            self.last_close = {"url": url, "code": None, "reason": _describe(exc), "verified": False}
            raise _Dropped(str(exc) or type(exc).__name__, None, verified=False) from None
        self._ws = ws
        try:
            await ws.send(json.dumps(self._hello(), separators=(",", ":")))
            # Until the welcome: the handshake deadline. Until the verifying pong: verify_timeout.
            # Then: the server's heartbeat figures (silence longer than interval + timeout is death).
            loop = asyncio.get_running_loop()
            verify_by = loop.time() + self.open_timeout
            welcomed = False
            verify_id = f"v{next(self._ids)}"
            while True:
                if not self._reading.is_set():
                    await self._reading.wait()
                deadline = loop.time() + self.silence if welcomed else verify_by
                if welcomed and not verified:
                    deadline = min(deadline, verify_by)
                try:
                    async with asyncio.timeout_at(deadline):
                        frame = await ws.recv()
                except TimeoutError:
                    what = (
                        "no welcome" if not welcomed
                        else "no pong to the verifying ping" if not verified
                        else f"server silent for {self.silence:g}s"
                    )
                    self.last_close = {"url": url, "code": None, "reason": what, "verified": verified}
                    ws.transport.abort()
                    raise _Dropped(what, None, verified=verified) from None
                if isinstance(frame, bytes):
                    frame = frame.decode("utf-8", "replace")
                for line in frame.split("\n"):
                    if not line:
                        continue
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError(f"server sent a non-object message: {line[:80]}")
                    kind = msg.get("type")
                    if kind == "message":
                        await self._on_message(msg)
                    elif kind == "ping":
                        # Not after the server's close frame: websockets' send() would then wait close_timeout for
                        # the TCP close, which it cannot see while its frame buffer is full and this loop, stuck in
                        # send(), does not empty it (a backlog read after a pause or a slow handler).
                        if ws.state is WsState.OPEN:
                            await ws.send(f'{{"type":"pong","id":{json.dumps(msg.get("id"))}}}')
                    elif kind == "welcome":
                        welcomed = True
                        verify_by = loop.time() + self.verify_timeout
                        await self._on_welcome(msg)
                        await ws.send(json.dumps({"type": "ping", "id": verify_id}))
                    elif kind == "pong" and msg.get("id") == verify_id and not verified:
                        verified = True
                        await self._verified()
                    elif kind == "subscribed":
                        await self._on_subscribed(msg)
                    elif kind == "reconnect":
                        after_ms = msg.get("after_ms")
                        if isinstance(after_ms, int | float) and after_ms >= 0:
                            self._advice = min(after_ms / 1000, self.policy.max_delay)
                    else:
                        self._answer(msg)
                        if kind == "error":
                            await self._emit("error", msg)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
            if not self._closing:  # last_close describes the last drop, not our own close()
                self.last_close = {"url": url, "code": code, "reason": reason, "verified": verified}
            final = code in FINAL_CODES and not self._closing
            raise _Dropped(f"{code} {reason}".strip(), code, verified=verified, final=final) from None
        except (OSError, ValueError) as exc:  # includes bad JSON from the server
            self.last_close = {"url": url, "code": None, "reason": _describe(exc), "verified": verified}
            ws.transport.abort()
            raise _Dropped(_describe(exc), None, verified=verified) from None
        finally:
            self._fail_waiters()

    def _hello(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"type": "hello", "client": {"name": self.name, "version": __version__}}
        if self.token:
            hello["token"] = self.token
        previous = self.trace_id  # the trace of the last connection the server welcomed
        if isinstance(previous, str) and 0 < len(previous) <= 64:
            hello["previous_trace_id"] = previous
        resume = {
            ch: {"epoch": pos.epoch, "offset": pos.offset} for ch, pos in self.positions.items() if ch in self.channels
        }
        if resume:
            hello["resume"] = resume
        return hello

    def _subscribe_message(self, channel: str) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "subscribe", "channel": channel}
        pos = self.positions.get(channel)
        if pos is not None:
            message["since"] = {"epoch": pos.epoch, "offset": pos.offset}
        return message

    async def _on_welcome(self, msg: dict[str, Any]) -> None:
        self.connection_id = msg.get("connection")
        self.server = msg.get("server")
        self.trace_id = msg.get("trace_id")
        beat = msg.get("heartbeat") or {}
        interval, timeout = beat.get("interval_ms"), beat.get("timeout_ms")
        if isinstance(interval, int | float) and isinstance(timeout, int | float) and interval > 0:
            self.silence = (interval + max(timeout, 0)) / 1000
        ws = self._ws
        assert ws is not None
        for channel in self.channels:
            if channel not in self.positions:  # positioned channels were resumed by the hello
                await ws.send(json.dumps(self._subscribe_message(channel)))

    async def _verified(self) -> None:
        recovered_in = self.recovery.succeeded()
        self._tracing.connected(self.connection_id, self.server, recovered_in)
        self._connected.set()
        self._set_state("connected")
        await self._emit("connected", {
            "url": self.url, "connection": self.connection_id, "server": self.server, "trace_id": self.trace_id,
            "recovered_in": None if recovered_in is None else round(recovered_in, 4),
        })

    async def _on_subscribed(self, msg: dict[str, Any]) -> None:
        channel, epoch, top = msg.get("channel"), msg.get("epoch"), msg.get("offset")
        if not isinstance(channel, str) or not isinstance(epoch, str) or not isinstance(top, int):
            return
        recovered = msg.get("recovered")
        held = self.positions.get(channel)
        if recovered is True:
            self.resumed += 1
            self.replayed += int(msg.get("replayed") or 0)
            await self._emit("recovered", channel, int(msg.get("replayed") or 0))
            return  # the replay that follows brings the position to the top
        self.positions[channel] = Position(epoch, top)
        if recovered is False:
            self.resynced += 1
            await self._resync(channel, {
                "reason": "recovery_failed", "previous": _pos_dict(held), "current": {"epoch": epoch, "offset": top},
            })

    async def _on_message(self, msg: dict[str, Any]) -> None:
        channel, epoch, offset = msg.get("channel"), msg.get("epoch"), msg.get("offset")
        if not isinstance(channel, str) or not isinstance(offset, int) or channel not in self.channels:
            return  # malformed, or in flight when the application unsubscribed
        held = self.positions.get(channel)
        if held is not None:
            if epoch == held.epoch:
                if offset <= held.offset:
                    self.duplicates_dropped += 1
                    return
                if offset > held.offset + 1:
                    self.gaps += 1
                    await self._resync(channel, {
                        "reason": "gap", "previous": _pos_dict(held), "current": {"epoch": epoch, "offset": offset},
                    })
            else:
                self.resynced += 1
                await self._resync(channel, {
                    "reason": "new_epoch", "previous": _pos_dict(held), "current": {"epoch": epoch, "offset": offset},
                })
        self.positions[channel] = Position(epoch, offset)  # type: ignore[arg-type]
        self.messages_received += 1
        if self._handlers["message"]:
            await self._emit("message", msg)
        else:
            while self._queue.qsize() >= self.max_pending:  # stop reading: the application sets the pace
                self._space.clear()
                await self._space.wait()
            self._queue.put_nowait(msg)

    async def _resync(self, channel: str, info: dict[str, Any]) -> None:
        info["channel"] = channel
        if self._handlers["message"]:
            await self._emit("resync", channel, info)
        else:
            self._queue.put_nowait(_Resync(channel, info))

    # ------------------------------------------------------------ requests

    async def _send(self, message: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ClientClosed("not connected")
        await ws.send(json.dumps(message, separators=(",", ":")))

    async def _request(self, message: dict[str, Any], ident: Any, timeout: float) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[ident] = future
        try:
            await self._send(message)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiters.pop(ident, None)

    def _answer(self, msg: dict[str, Any]) -> None:
        """Settle the request a `pong`, `published` or `error` answers."""
        kind = msg.get("type")
        if kind == "unsubscribed":
            ident: Any = ("unsubscribed", msg.get("channel"))
        elif kind == "error" and msg.get("ref") == "unsubscribe":
            # Not subscribed (its subscribe had failed): the wanted end state. Answers are in order.
            pending = [f for key, f in self._waiters.items() if isinstance(key, tuple) and not f.done()]
            if pending:
                pending[0].set_result(msg)
            return
        else:
            ident = msg.get("id") if kind in ("pong", "published") else msg.get("ref")
        future = self._waiters.get(ident) if isinstance(ident, str | tuple) else None
        if future is None or future.done():
            return
        if kind == "error":
            future.set_exception(RequestFailed(str(msg.get("code")), str(msg.get("message"))))
        else:
            future.set_result(msg)

    def _fail_waiters(self) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(ClientClosed("connection lost before the answer"))
        self._waiters.clear()

    # ------------------------------------------------------------ events and state

    async def _emit(self, event: str, *args: Any) -> None:
        for handler in list(self._handlers[event]):
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # an application bug must not drop the connection
                log.exception("stablews client: %s handler failed", event)

    def _emit_soon(self, event: str, *args: Any) -> None:
        for handler in list(self._handlers[event]):
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(_logged(result, event))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            except Exception:
                log.exception("stablews client: %s handler failed", event)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit_soon("state", state)

    def _circuit_changed(self, old: CircuitState, new: CircuitState) -> None:
        self._tracing.circuit(old, new)
        self._emit_soon("circuit", str(new))

    def _stop(self, error: ClientClosed | None) -> None:
        self.error = error
        self._connected.clear()
        self._set_state("closed")
        self._end()

    def _end(self) -> None:
        self._ended = True
        self._queue.put_nowait(_END)  # after what is queued: the iterator drains, then ends


class _ClientTracing:
    """The client's spans (observability.md), with the OpenTelemetry API only: without an SDK
    (or with a provider that does not record) every call does nothing worth counting.

    - `ws.client.connect` (CLIENT): one connection attempt, from the TCP connect to the
      verifying pong (or the failure); its context goes into the upgrade request as
      `traceparent`, so the server's `ws.connection` is its child. Attributes `url.full`
      (credentials redacted) and `stablews.attempt` (1-based, within the episode).
    - `ws.client.reconnect` (INTERNAL): one reconnect episode, from the drop (or the first
      failed attempt) to the verified reconnection, giving up, or close(). A trace of its own,
      linked to the dropped connection's `ws.client.connect`; the episode's attempts are its
      children, and `attempt` events (with the delay waited before each), `attempt_failed` and
      `circuit_breaker` events tell the story; `stablews.reconnect.outcome` the end.
    No span is made current: parents are given explicitly."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.context import Context
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        self._tracer = trace.get_tracer("stablews", __version__, tracer_provider=provider)
        self._with_span = trace.set_span_in_context
        self._inject = propagate.inject
        self._Context = Context
        self._Link = Link
        self._Status = Status
        self._error = StatusCode.ERROR
        self._client = SpanKind.CLIENT
        self._internal = SpanKind.INTERNAL
        self.episode: Any = None  # ws.client.reconnect of the episode in progress
        self.connect: Any = None  # ws.client.connect of the attempt in progress
        self.previous: Any = None  # span context of the last verified connection's ws.client.connect
        self.attempt = 0  # attempts in this episode (or of the first connection)
        self.waited = 0.0  # seconds waited before the next attempt

    def start_connect(self, url: str, headers: dict[str, str]) -> None:
        self.attempt += 1
        safe_url = _redact(url)
        episode = self.episode
        if episode is not None:
            episode.add_event("attempt", {
                "stablews.attempt": self.attempt, "stablews.delay_s": round(self.waited, 3), "url.full": safe_url,
            })
        self.waited = 0.0
        span = self._tracer.start_span(
            "ws.client.connect",
            context=None if episode is None else self._with_span(episode),
            kind=self._client,
            attributes={"url.full": safe_url, "stablews.attempt": self.attempt},
        )
        self.connect = span
        self._inject(headers, context=self._with_span(span))

    def connected(self, connection: str | None, server: str | None, recovered_in: float | None) -> None:
        span, self.connect = self.connect, None
        if span is not None:
            if connection:
                span.set_attribute("stablews.connection.id", connection)
            if server:
                span.set_attribute("stablews.instance", server)
            span.end()
            self.previous = span.get_span_context()
        self.end_episode("recovered", recovered_in)
        self.attempt = 0

    def connect_failed(self, why: str, code: int | None) -> None:
        span, self.connect = self.connect, None
        if span is None:
            return
        if code is not None:
            span.set_attribute("stablews.close.code", code)
        span.set_attribute("error.type", str(code) if code is not None else "connect_failed")
        span.set_status(self._Status(self._error, why))
        span.end()

    def attempt_failed(self, why: str) -> None:
        """An attempt did not get to a verified connection: an episode starts, or goes on."""
        self.begin_episode(why, new_count=False)
        self.episode.add_event("attempt_failed", {"stablews.attempt": self.attempt, "stablews.reason": why})

    def begin_episode(self, reason: str, *, new_count: bool) -> None:
        if self.episode is not None:
            return
        previous = self.previous
        links = None
        if previous is not None and previous.is_valid:
            links = [self._Link(previous, {"stablews.link.type": "dropped_connection"})]
        self.episode = self._tracer.start_span(
            "ws.client.reconnect",
            context=self._Context(),  # a trace of its own
            kind=self._internal,
            attributes={"stablews.reconnect.reason": reason},
            links=links,
        )
        if new_count:
            self.attempt = 0

    def circuit(self, old: CircuitState, new: CircuitState) -> None:
        if self.episode is not None:
            self.episode.add_event(
                "circuit_breaker", {"stablews.circuit.from": str(old), "stablews.circuit.to": str(new)}
            )

    def end_episode(self, outcome: str, recovered_in: float | None = None) -> None:
        span, self.episode = self.episode, None
        if span is None:
            return
        span.set_attribute("stablews.reconnect.outcome", outcome)
        span.set_attribute("stablews.reconnect.attempts", self.attempt)
        if recovered_in is not None:
            span.set_attribute("stablews.reconnect.seconds", round(recovered_in, 4))
        if outcome not in ("recovered", "closed"):
            span.set_status(self._Status(self._error, outcome))
        span.end()


def _redact(url: str) -> str:
    """`url` without credentials: user info and a `token` query parameter (url.full rules)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "REDACTED:REDACTED@" + netloc.rpartition("@")[2]
    query = parts.query
    if "token" in query:
        query = "&".join(
            "token=REDACTED" if item.partition("=")[0] == "token" else item for item in query.split("&")
        )
    if netloc is parts.netloc and query is parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


async def _logged(awaitable: Awaitable[Any], event: str) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("stablews client: %s handler failed", event)


def _pos_dict(pos: Position | None) -> dict[str, Any] | None:
    return None if pos is None else {"epoch": pos.epoch, "offset": pos.offset}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
