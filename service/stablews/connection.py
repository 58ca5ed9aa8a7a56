"""One live connection: receive loop and dispatch, the bounded send queue and
how it is written, heartbeat and deadline checks, and the connection's figures.

Outbound: everything the server sends goes through one FIFO queue. The
`Flusher` (outbound.py) writes each connection's backlog once per loop
iteration, joined into frames (messages separated by `\n`); a send that
must wait for the peer's socket is finished by a task, the `writer`, which
then goes on writing the same way. While a writer waits, live publications beyond
`send_queue_max` close the connection 4003 after a `reconnect` advice, and
nothing upstream waits.

Closing: `close()` only marks the connection; the close frame follows the
queue, and the scheduler abandons a close still stuck after its deadline.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from . import health, outbound, protocol
from .auth import OPEN, AuthError, Grants
from .broker import Broker, BrokerUnavailable, PublishResult, SubscribeResult
from .protocol import CloseCause, ErrorCode, ProtocolError

if TYPE_CHECKING:
    from .stability import StabilityManager

log = logging.getLogger("stablews.connection")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

TIMELINE_MAX = 64
_INF = float("inf")
_PING_PREFIX = '{"type":"ping"'
# Closes of peers that cannot (or will not) read what is queued: drop it.
_UNREACHABLE = frozenset(
    {CloseCause.SLOW_CONSUMER, CloseCause.HEARTBEAT_TIMEOUT, CloseCause.IDLE_TIMEOUT, CloseCause.HELLO_TIMEOUT}
)
# Closes the client should recover from: a `reconnect` advice (jittered after_ms) goes first.
_ADVISED = frozenset(
    {CloseCause.SLOW_CONSUMER, CloseCause.OVERLOADED, CloseCause.SHUTDOWN, CloseCause.BROKER_UNAVAILABLE}
)
BAD_MESSAGE_WINDOW = 60.0
RATE_PAUSE = 1.0  # seconds without a dropped message that end a rate-limited stretch


class State(IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


def cause_of_peer_close(code: int) -> CloseCause:
    """Cause of a close the server did not start, from the code it saw."""
    if code in (1000, 1001):
        return CloseCause.NORMAL
    if code in (1005, 1006):  # no close frame (abrupt drop) or none with a code
        return CloseCause.CLIENT_GONE
    if code == 1009:  # the WebSocket parser refused a frame far over the limit
        return CloseCause.TOO_LARGE
    return CloseCause.ERROR  # protocol errors and application codes: worth a look


class Connection:
    __slots__ = (
        "__weakref__",
        "abandoned",
        "auth_result",
        "bad_count",
        "bad_window_start",
        "broker",
        "bytes_in",
        "bytes_out",
        "channels",
        "client_address",
        "client_name",
        "client_port",
        "close_cause",
        "close_code",
        "close_deadline",
        "close_initiator",
        "close_sent",
        "closed_mono",
        "closed_wall",
        "closing_mono",
        "dirty",
        "err_ratio",
        "errors",
        "frames_out",
        "grants",
        "hb_late",
        "hb_missed",
        "hb_ok",
        "hb_sent",
        "hb_success",
        "health_score",
        "health_state",
        "hello_deadline",
        "hello_done",
        "id",
        "last_app_activity",
        "last_inbound",
        "late_pong_possible",
        "manager",
        "messages_in",
        "messages_out",
        "missed_in_a_row",
        "next_ping_at",
        "opened_mono",
        "opened_wall",
        "passive",
        "ping_in_flight",
        "ping_sent_at",
        "ping_seq",
        "pong_deadline",
        "previous_trace_id",
        "queue",
        "rate_at",
        "rate_dropped_at",
        "rate_refused",
        "rate_tokens",
        "rtt_ewma",
        "rtt_last",
        "sched_due",
        "send",
        "server_address",
        "server_port",
        "span_id",
        "state",
        "subprotocol",
        "task",
        "telemetry",
        "timeline",
        "trace_headers",
        "trace_id",
        "user_agent",
        "writer",
    )

    def __init__(
        self,
        manager: StabilityManager,
        broker: Broker | None,
        send: Send,
        conn_id: str,
        *,
        client: tuple[str, int] | None = None,
        server: tuple[str, int] | None = None,
        user_agent: str | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        trace_headers: tuple[str, str | None] | None = None,
        subprotocol: str | None = None,
        passive: bool = False,
    ) -> None:
        settings = manager.settings
        now = manager.clock()
        self.id = conn_id
        self.manager = manager
        self.broker = broker
        self.send = send
        self.passive = passive
        self.state = State.OPEN
        self.queue: list[str | tuple[str, int]] = []
        self.dirty = False
        self.close_sent = False
        self.writer: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.abandoned = False
        self.sched_due = _INF
        self.client_address, self.client_port = client if client else (None, None)
        self.server_address, self.server_port = server if server else (None, None)
        self.user_agent = user_agent
        self.client_name: str | None = None
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_headers = trace_headers  # the client's (traceparent, tracestate), for tracing to continue
        self.previous_trace_id: str | None = None
        self.telemetry: dict[str, Any] | None = None  # state of the telemetry hooks (hooks.py)
        self.subprotocol = subprotocol
        self.opened_mono = now
        self.opened_wall = manager.wall()
        self.closed_mono: float | None = None
        self.closed_wall: float | None = None
        self.closing_mono: float | None = None
        self.close_cause: CloseCause | None = None
        self.close_code: int | None = None
        self.close_initiator: str | None = None
        self.close_deadline = _INF
        self.hello_done = passive
        self.hello_deadline = now + settings.hello_timeout
        self.channels: list[str] = []  # a few at most: a list is a third of a set's size
        # None until a token is verified, when authentication is on
        self.grants: Grants | None = None if manager.auth.enabled and not passive else OPEN
        self.auth_result = "pending" if self.grants is None else "off"  # then "ok" or "refused"
        self.rate_tokens = float(settings.rate_limit_burst)
        self.rate_at = now
        self.rate_refused = 0
        self.rate_dropped_at = -_INF
        # heartbeat figures
        self.ping_seq = 0
        self.ping_in_flight = False
        self.late_pong_possible = False
        self.ping_sent_at = 0.0
        self.pong_deadline = _INF
        self.next_ping_at = _INF
        self.missed_in_a_row = 0
        self.hb_sent = self.hb_ok = self.hb_missed = self.hb_late = 0
        self.hb_success = 1.0
        self.rtt_last: float | None = None
        self.rtt_ewma: float | None = None
        # traffic figures
        self.last_inbound = now
        self.last_app_activity = now
        self.messages_in = self.messages_out = 0
        self.bytes_in = self.bytes_out = self.frames_out = 0
        self.errors = 0
        self.err_ratio = 0.0
        self.bad_count = 0
        self.bad_window_start = now
        self.health_score = 100.0
        self.health_state = health.HEALTHY
        self.timeline: list[tuple[float, str, str]] = []  # "open" is implied by opened_wall

    # ------------------------------------------------------------ figures

    def log_fields(self) -> dict[str, Any]:
        """What every log line about this connection carries, to find its trace."""
        return {"connection": self.id, "trace_id": self.trace_id, "span_id": self.span_id}

    def note(self, event: str, detail: str = "") -> None:
        """Add to the lifecycle timeline (bounded: the first entries and the latest)."""
        timeline = self.timeline
        if len(timeline) >= TIMELINE_MAX:
            del timeline[7]  # keep how it started; drop the oldest of the rest
        timeline.append((self.manager.wall(), event, detail))

    def compute_health(self, now: float) -> tuple[float, str]:
        settings = self.manager.settings
        value = health.score(
            self.hb_success,
            self.rtt_ewma,
            settings.heartbeat_timeout,
            self.err_ratio,
            len(self.queue),
            settings.send_queue_max,
            self.missed_in_a_row,
        )
        state = health.classify(
            value, now - self.last_app_activity, settings.unhealthy_score, settings.stale_connection_threshold
        )
        return value, state

    # ------------------------------------------------------------ outbound

    def deliver(self, frame: str) -> None:
        """A live publication (the broker's fan-out). Never blocks, never waits."""
        if self.state is not State.OPEN:
            return
        queue = self.queue
        if self.writer is not None:
            # A send is waiting on the peer's full socket: this is the backlog.
            if len(queue) >= self.manager.settings.send_queue_max:
                self.close(CloseCause.SLOW_CONSUMER)
                return
        elif not self.dirty:
            self.manager.flusher.mark(self)
        queue.append(frame)

    def push(self, entry: str | tuple[str, int]) -> None:
        """A control message or a replay chunk: not subject to the queue limit."""
        if self.state is not State.OPEN:
            return
        self.queue.append(entry)
        if self.writer is None and not self.dirty:
            self.manager.flusher.mark(self)

    def _take_frame(self) -> tuple[str, int]:
        """Take the next frame off the queue: as many entries as fit in max_frame_bytes."""
        queue = self.queue
        if len(queue) == 1:  # the common case on a socket that keeps up
            entry = queue.pop()
            return (entry, 1) if entry.__class__ is str else entry  # type: ignore[return-value]
        entry = queue[0]
        text, count = (entry, 1) if entry.__class__ is str else entry  # type: ignore[misc]
        limit = self.manager.settings.max_frame_bytes
        taken = 1
        if len(text) < limit:
            parts = [text]
            size = len(text)
            for entry in queue[1:64]:
                nxt, n = (entry, 1) if entry.__class__ is str else entry  # type: ignore[misc]
                size += len(nxt) + 1
                if size > limit:
                    break
                parts.append(nxt)
                count += n
                taken += 1
            text = "\n".join(parts) if taken > 1 else text
        del queue[:taken]
        return text, count

    def _sent(self, frame: str, count: int, now: float) -> None:
        manager = self.manager
        if count > 1 or not frame.startswith(_PING_PREFIX):
            self.last_app_activity = now  # outbound data is application traffic
        size = len(frame)  # frames are ASCII (see protocol.encode_json)
        self.messages_out += count
        self.bytes_out += size
        self.frames_out += 1
        manager.messages_out += count
        manager.bytes_out += size
        manager.frames_out += 1

    def _close_message(self) -> dict[str, Any]:
        self.close_sent = True
        return {"type": "websocket.close", "code": self.close_code, "reason": str(self.close_cause)}

    def flush(self, now: float) -> None:
        """Write the backlog now (the flusher calls this once per loop iteration).
        A send the socket cannot take at once continues in a task: `writer`."""
        if self.writer is not None or self.state is State.CLOSED:
            return
        queue = self.queue
        try:
            while queue:
                frame, count = self._take_frame()
                if self._start_send({"type": "websocket.send", "text": frame}, frame, count):
                    return
                self._sent(frame, count, now)
            if self.state is State.CLOSING and not self.close_sent:
                self._start_send(self._close_message(), "", 0)
        except Exception as exc:  # the peer is gone; the receive loop sees the disconnect
            self._send_failed(exc)

    def _start_send(self, message: dict[str, Any], frame: str, count: int) -> bool:
        """Start a send in place; True when it must wait (a `writer` task finishes it)."""
        coro = self.send(message)
        pending = outbound.start(coro)
        if pending is None:
            return False
        self.writer = asyncio.get_running_loop().create_task(self._drain(coro, pending, frame, count))
        return True

    async def _drain(self, coro: Coroutine[Any, Any, Any], pending: Any, frame: str, count: int) -> None:
        """Finish a send that had to wait, then go on writing as `flush` does."""
        failure: Exception | None = None
        try:
            await outbound.finish(coro, pending)
        except Exception as exc:
            failure = exc
        finally:
            self.writer = None
        if failure is not None:
            self._send_failed(failure)
            return
        now = self.manager.clock()
        if count:
            self._sent(frame, count, now)
        self.flush(now)

    def _send_failed(self, exc: Exception) -> None:
        """A send raised: the peer is gone (the receive loop will see the
        disconnect), or something is broken. Either way nothing more is
        written: the connection ends, and the client resumes from its position."""
        self.queue.clear()
        gone = isinstance(exc, OSError)  # uvicorn's ClientDisconnected is an OSError
        if gone:
            log.debug("send failed on %s: %r", self.id, exc)
        else:
            log.warning("send failed on %s: %r", self.id, exc, extra=self.log_fields())
        if self.state is State.OPEN:
            if gone:
                self.close_cause, self.close_code, self.close_initiator = CloseCause.CLIENT_GONE, 1006, "client"
            else:
                self.close_cause, self.close_code, self.close_initiator = CloseCause.ERROR, 1011, "server"
            self.state = State.CLOSING
            self.closing_mono = self.manager.clock()
            self.manager.hooks.on_closing(self)
        self.abandon()

    def close(self, cause: CloseCause, *, after_ms: int | None = None, deadline: float | None = None) -> None:
        """Start a server-initiated close. Frames already queued are flushed
        first, unless the peer cannot take them (dead, idle, or too slow)."""
        if self.state is not State.OPEN:
            return
        manager = self.manager
        settings = manager.settings
        self.close_cause = cause
        self.close_code = int(protocol.CLOSE_CODE_FOR_CAUSE[cause])
        self.close_initiator = "server"
        if cause in _UNREACHABLE:
            self.queue.clear()
        if cause in _ADVISED:
            if after_ms is None:
                after_ms = random.randint(0, int(settings.reconnect_delay * 1000))
            self.queue.append(protocol.reconnect(str(cause), after_ms))
        self.state = State.CLOSING
        self.note("closing", f"{cause} ({self.close_code})")
        now = self.closing_mono = manager.clock()
        manager.hooks.on_closing(self)
        self.close_deadline = deadline if deadline is not None else now + settings.close_timeout
        manager.scheduler.schedule(self, self.close_deadline)
        if self.writer is None and not self.dirty and not self.passive:
            manager.flusher.mark(self)

    def abandon(self) -> None:
        """Give up on a close the peer never let through (it stopped reading)."""
        if self.state is State.CLOSED:
            return
        self.abandoned = True
        self.note("abandoned", "close did not complete in time")
        # A peer that stopped reading would hold the socket, its buffers and a file
        # descriptor for as long as it likes: a graceful close waits for it to read.
        outbound.abort_transport(self.send)
        current = asyncio.current_task()
        if self.writer is not None and self.writer is not current:
            self.writer.cancel()
        if self.task is not None and self.task is not current:
            self.task.cancel()

    # ------------------------------------------------------------ deadlines

    def check(self, now: float) -> float | None:
        """Scheduler callback: do what is due, return the next deadline."""
        state = self.state
        if state is State.CLOSED:
            return None
        if state is State.CLOSING:
            if now >= self.close_deadline:
                self.abandon()
                return None
            return self.close_deadline
        if self.passive:
            return None
        if not self.hello_done:
            if now >= self.hello_deadline:
                self.close(CloseCause.HELLO_TIMEOUT)
                return self.close_deadline
            return self.hello_deadline
        settings = self.manager.settings
        if self.ping_in_flight and now >= self.pong_deadline:
            self.ping_in_flight = False
            self.late_pong_possible = True
            self._heartbeat_failed("missed", None)
            if self.state is not State.OPEN:
                return self.close_deadline
        idle_due = self.last_inbound + settings.connection_timeout
        if now >= idle_due:
            self.close(CloseCause.IDLE_TIMEOUT)
            return self.close_deadline
        left = self._token_left()
        if left is not None:
            if left <= 0:
                self.refuse(ErrorCode.UNAUTHORIZED, "token expired")
                self.close(CloseCause.UNAUTHORIZED)
                return self.close_deadline
            idle_due = min(idle_due, now + left)  # wake up when the token runs out
        if now >= self.next_ping_at:
            self._send_ping(now)
        due = self.next_ping_at if self.next_ping_at < idle_due else idle_due
        if self.ping_in_flight and self.pong_deadline < due:
            due = self.pong_deadline
        return due

    def _token_left(self) -> float | None:
        """Seconds until the token stops being accepted (its expiry plus `auth_leeway`)."""
        grants = self.grants
        if grants is None or grants.expires_at is None:
            return None
        return grants.expires_at + self.manager.auth.leeway - self.manager.wall()

    def _send_ping(self, now: float) -> None:
        settings = self.manager.settings
        self.ping_seq += 1
        self.ping_in_flight = True
        self.late_pong_possible = False
        self.ping_sent_at = now
        self.pong_deadline = now + settings.heartbeat_timeout
        # Keep the cadence of the schedule (no drift from timer lateness), but
        # never burst to catch up after a stall.
        following = self.next_ping_at + settings.heartbeat_interval
        self.next_ping_at = following if following > now else now + settings.heartbeat_interval
        self.hb_sent += 1
        self.manager.heartbeat_sent()
        self.push(protocol.ping(self.ping_seq, int(self.manager.wall() * 1000)))

    def _heartbeat_failed(self, outcome: str, rtt: float | None) -> None:
        self.missed_in_a_row += 1
        self.hb_success = health.ewma(self.hb_success, 0.0)
        if outcome == "late":
            self.hb_late += 1
        self.hb_missed += 1
        self.manager.heartbeat_missed(self, outcome, rtt)
        self.note(f"heartbeat_{outcome}", f"{self.missed_in_a_row} in a row")
        if self.missed_in_a_row >= self.manager.settings.max_missed_heartbeats:
            self.close(CloseCause.HEARTBEAT_TIMEOUT)

    def _on_pong(self, ident: str | int, now: float) -> None:
        if ident != self.ping_seq:
            return  # not the latest ping: ignore
        rtt = now - self.ping_sent_at
        if self.ping_in_flight:
            self.ping_in_flight = False
            if now <= self.pong_deadline:
                self.missed_in_a_row = 0
                self.hb_ok += 1
                self.hb_success = health.ewma(self.hb_success, 1.0)
                self._record_rtt(rtt)
                self.manager.heartbeat_ok(self, rtt)
            else:  # arrived after the deadline, before the scheduler noticed
                self._record_rtt(rtt)
                self._heartbeat_failed("late", rtt)
        elif self.late_pong_possible:  # the miss is already counted; keep the figure
            self.late_pong_possible = False
            self.hb_late += 1
            self._record_rtt(rtt)
            self.manager.heartbeat_late(self, rtt)

    def _record_rtt(self, rtt: float) -> None:
        self.rtt_last = rtt
        self.rtt_ewma = rtt if self.rtt_ewma is None else health.ewma(self.rtt_ewma, rtt)
        self.manager.record_rtt(rtt)

    # ------------------------------------------------------------ inbound

    async def run(self, receive: Receive) -> None:
        """The receive loop; returns when the connection is gone."""
        self.task = asyncio.current_task()
        code = 1006
        try:
            while True:
                event = await receive()
                kind = event["type"]
                if kind == "websocket.receive":
                    text = event.get("text")
                    if self.state is not State.OPEN:
                        self.last_inbound = self.manager.clock()
                    elif text is not None:
                        try:
                            await self.on_text(text)
                        except Exception:  # a bug must end this connection only, and say so
                            log.exception("internal error on %s", self.id, extra=self.log_fields())
                            self.record_error(ErrorCode.INTERNAL)
                            self.push(protocol.error(ErrorCode.INTERNAL, "internal error"))
                            self.close(CloseCause.ERROR)
                    else:
                        self.count_inbound(len(event.get("bytes") or b""))
                        self.reject(ProtocolError(ErrorCode.BAD_MESSAGE, "binary frames are not supported"))
                elif kind == "websocket.disconnect":
                    code = event.get("code", 1005)
                    break
        except asyncio.CancelledError:
            if not self.abandoned:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            self.finish(code)

    def count_inbound(self, size: int) -> float:
        now = self.manager.clock()
        self.last_inbound = now
        self.messages_in += 1
        self.bytes_in += size
        manager = self.manager
        manager.messages_in += 1
        manager.bytes_in += size
        return now

    async def on_text(self, text: str) -> None:
        now = self.count_inbound(protocol.text_size(text))
        if self.manager.settings.rate_limit > 0 and not self._within_rate(now):
            return
        try:
            message = protocol.parse(text, self.manager.limits)
        except ProtocolError as exc:
            self.reject(exc)
            return
        kind = message.__class__
        if kind is protocol.Pong:
            self._on_pong(message.id, now)  # type: ignore[union-attr]
            return
        self.err_ratio = health.ewma(self.err_ratio, 0.0)
        if kind is protocol.Ping:
            self.push(protocol.pong(message.id))  # type: ignore[union-attr]
            return
        self.last_app_activity = now
        if kind is protocol.Hello:
            await self._on_hello(message)  # type: ignore[arg-type]
        elif not self.hello_done:
            self.reject(ProtocolError(ErrorCode.BAD_MESSAGE, "send hello first", _type_name(kind)))
        elif kind is protocol.Subscribe:
            await self._subscribe(message.channel, message.since)  # type: ignore[union-attr]
        elif kind is protocol.Unsubscribe:
            self._unsubscribe(message.channel)  # type: ignore[union-attr]
        elif kind is protocol.Publish:
            self._publish(message)  # type: ignore[arg-type]

    def _within_rate(self, now: float) -> bool:
        """Token bucket: `rate_limit` messages/s, bursts of `rate_limit_burst`. Over it, messages are
        dropped, and the first drop of a stretch says so with one `error`. A stretch ends after
        RATE_PAUSE seconds without a drop; one that drops more than a burst closes 4008, so a
        sender that stays over the rate is closed however close to the rate it stays."""
        settings = self.manager.settings
        tokens = self.rate_tokens + (now - self.rate_at) * settings.rate_limit
        burst = settings.rate_limit_burst
        self.rate_at = now
        if tokens >= 1.0:
            self.rate_tokens = (tokens if tokens < burst else burst) - 1.0
            return True
        self.rate_tokens = tokens
        if now - self.rate_dropped_at > RATE_PAUSE:
            self.rate_refused = 0
        self.rate_dropped_at = now
        self.rate_refused += 1
        if self.rate_refused > burst:
            self.record_error(ErrorCode.RATE_LIMITED)
            self.close(CloseCause.RATE_LIMITED)
        elif self.rate_refused == 1:
            self.refuse(
                ErrorCode.RATE_LIMITED,
                f"over {settings.rate_limit:g} messages/s: messages are dropped until the rate falls; "
                f"more than {burst} dropped without a {RATE_PAUSE:g} s pause close the connection (4008)",
            )
        else:
            self.record_error(ErrorCode.RATE_LIMITED)
        return False

    def refuse(self, code: ErrorCode, message: str, ref: str | int | None = None, channel: str | None = None) -> None:
        """Answer with `error` without counting toward the bad-input close (1008)."""
        self.record_error(code)
        self.push(protocol.error(code, message, ref, channel))
        self.note("error", f"{code}: {message[:80]}")

    def authenticate(self, token: str | None) -> bool:
        """Verify a token (handshake or hello); a bad one ends the connection with 4401. The
        error's ref is "hello" either way: the client's login step, whichever way the token came."""
        try:
            self.grants = self.manager.auth.verify(token or "")
        except AuthError as exc:
            self.auth_result = "refused"
            self.refuse(ErrorCode.UNAUTHORIZED, str(exc), "hello")
            self.close(CloseCause.UNAUTHORIZED)
            return False
        self.auth_result = "ok"
        self.note("authenticated", self.grants.subject or "")
        return True

    def record_error(self, code: ErrorCode) -> None:
        self.errors += 1
        self.err_ratio = health.ewma(self.err_ratio, 1.0)
        self.manager.count_error(self, str(code))

    def reject(self, exc: ProtocolError) -> None:
        """Answer bad input with `error`; close 1009 or 1008 when it must end."""
        self.record_error(exc.code)
        self.push(protocol.error(exc.code, exc.message, exc.ref, exc.channel))
        self.note("error", f"{exc.code}: {exc.message[:80]}")
        if exc.code is ErrorCode.TOO_LARGE:
            self.close(CloseCause.TOO_LARGE)
            return
        now = self.manager.clock()
        if now - self.bad_window_start > BAD_MESSAGE_WINDOW:
            self.bad_window_start = now
            self.bad_count = 0
        self.bad_count += 1
        if self.bad_count >= self.manager.settings.max_bad_messages:
            self.close(CloseCause.POLICY_VIOLATION)

    async def _on_hello(self, hello: protocol.Hello) -> None:
        if self.hello_done:
            self.reject(ProtocolError(ErrorCode.BAD_MESSAGE, "hello already received", "hello"))
            return
        manager = self.manager
        settings = manager.settings
        now = manager.clock()
        self.hello_done = True
        # A token in hello wins over one given at the handshake; with auth on, one is needed.
        needs_token = manager.auth.enabled and (hello.token is not None or self.grants is None)
        if needs_token and not self.authenticate(hello.token):
            return
        self.client_name = hello.client
        self.previous_trace_id = hello.previous_trace_id
        self.next_ping_at = now + settings.heartbeat_interval
        due = min(self.next_ping_at, now + settings.connection_timeout)
        left = self._token_left()
        if left is not None:
            due = min(due, now + left)
        manager.scheduler.schedule(self, due)
        self.push(
            protocol.welcome(
                self.id,
                settings.instance_id,
                self.trace_id,
                int(settings.heartbeat_interval * 1000),
                int(settings.heartbeat_timeout * 1000),
                manager.welcome_limits,
            )
        )
        self.note("hello", hello.client or "")
        manager.hooks.on_hello(self)
        if hello.resume:
            recovered = replayed = 0
            for channel, position in hello.resume.items():
                if self.state is not State.OPEN:
                    return
                result = await self._subscribe(channel, position)
                if result is not None and result.recovered:
                    recovered += 1
                    replayed += len(result.replay)
            asked = len(hello.resume)
            manager.hooks.on_resume(self, asked, recovered, replayed)
            if recovered == asked:
                manager.emit(
                    "connection_recovered",
                    {"connection": self.id, "channels": asked, "replayed": replayed,
                     "previous_trace_id": hello.previous_trace_id},
                )

    async def _subscribe(self, channel: str, since: protocol.Position | None) -> SubscribeResult | None:
        settings = self.manager.settings
        if channel in self.channels:
            self.reject(ProtocolError(ErrorCode.BAD_MESSAGE, f"already subscribed to {channel}", "subscribe"))
            return None
        if len(self.channels) >= settings.max_channels_per_connection:
            self.reject(
                ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    f"channel limit reached ({settings.max_channels_per_connection})",
                    "subscribe",
                )
            )
            return None
        assert self.grants is not None
        if not self.grants.may_subscribe(channel):
            self.refuse(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel}", "subscribe", channel)
            return None
        assert self.broker is not None
        self.channels.append(channel)
        try:
            result = await self.broker.subscribe(channel, self, since)
        except BrokerUnavailable as exc:
            # Nothing to serve the channel from: come back later and resume (nothing is lost).
            self.channels.remove(channel)
            self.refuse(ErrorCode.UNAVAILABLE, f"cannot subscribe to {channel} now: {exc}", "subscribe", channel)
            self.close(CloseCause.BROKER_UNAVAILABLE)
            return None
        if self.state is not State.OPEN:
            return result
        self.push(protocol.subscribed(channel, result.epoch, result.offset, result.recovered, len(result.replay)))
        for chunk in _chunks(result.replay, settings.max_frame_bytes):
            self.push(chunk)
        for frame in result.live:
            self.deliver(frame)
        self.manager.count_subscribe(self, channel, since, result)
        if since is None:
            self.note("subscribe", channel)
        else:
            self.note("subscribe", f"{channel} recovered={result.recovered} replayed={len(result.replay)}")
        return result

    def _unsubscribe(self, channel: str) -> None:
        if channel not in self.channels:
            self.reject(
                ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel}", "unsubscribe", channel)
            )
            return
        self.channels.remove(channel)
        assert self.broker is not None
        self.broker.unsubscribe(channel, self)
        self.push(protocol.unsubscribed(channel, "client"))
        self.note("unsubscribe", channel)

    def _publish(self, message: protocol.Publish) -> None:
        ref = message.id if message.id is not None else "publish"
        if not self.manager.settings.client_publish:
            self.refuse(ErrorCode.FORBIDDEN, "clients may not publish (client_publish is off)", ref, message.channel)
            return
        assert self.grants is not None
        if not self.grants.may_publish(message.channel):
            self.refuse(ErrorCode.FORBIDDEN, f"not allowed to publish to {message.channel}", ref, message.channel)
            return
        assert self.broker is not None
        try:
            outcome = self.broker.publish_nowait(message.channel, message.data)
        except ValueError:
            self.reject(ProtocolError(ErrorCode.BAD_MESSAGE, "'data' must be plain JSON (no NaN or Infinity)", ref))
            return
        except BrokerUnavailable as exc:
            self.refuse(ErrorCode.UNAVAILABLE, f"publish failed: {exc}", ref, message.channel)
            return
        if outcome.__class__ is PublishResult:
            self.push(protocol.published(message.id, outcome.channel, outcome.offset))  # type: ignore[union-attr]
        else:
            # Not waited for: the next messages are read meanwhile, so a client's pipelined publishes
            # travel to the broker together; their acknowledgements come in the same order.
            outcome.add_done_callback(functools.partial(self._published, message.id, ref, message.channel))  # type: ignore[union-attr]

    def _published(self, ident: str | int | None, ref: str | int, channel: str, outcome: Any) -> None:
        if outcome.cancelled():
            return
        exc = outcome.exception()
        if exc is None:
            self.push(protocol.published(ident, channel, outcome.result().offset))
        elif self.state is State.OPEN:
            self.refuse(ErrorCode.UNAVAILABLE, f"publish failed: {exc}", ref, channel)

    # ------------------------------------------------------------ the end

    def finish(self, peer_code: int) -> None:
        """Final bookkeeping once the socket is gone (idempotent)."""
        if self.state is State.CLOSED:
            return
        if self.close_cause is None:
            self.close_cause = cause_of_peer_close(peer_code)
            self.close_code = peer_code
            self.close_initiator = "server" if peer_code == 1009 else "client"
        self.state = State.CLOSED
        manager = self.manager
        self.closed_mono = manager.clock()
        self.closed_wall = manager.wall()
        if self.writer is not None:
            self.writer.cancel()
            self.writer = None
        self.queue.clear()
        self.dirty = False  # a pending flush finds the connection closed and does nothing
        if self.broker is not None:
            for channel in self.channels:
                self.broker.unsubscribe(channel, self)
        self.note("closed", f"{self.close_cause} ({self.close_code}) by {self.close_initiator}")
        manager.connection_closed(self)

    # ------------------------------------------------------------ views

    def summary(self, now: float) -> dict[str, Any]:
        if self.state is State.CLOSED:
            score, state = self.health_score, self.health_state
        else:
            score, state = self.compute_health(now)
        end = self.closed_mono if self.closed_mono is not None else now
        view: dict[str, Any] = {
            "id": self.id,
            "mode": "passive" if self.passive else "protocol",
            "state": self.state.name.lower(),
            "client": {
                "address": self.client_address,
                "port": self.client_port,
                "user_agent": self.user_agent,
                "name": self.client_name,
                "subject": self.grants.subject if self.grants is not None else None,
            },
            "opened_at": self.opened_wall,
            "duration_seconds": round(end - self.opened_mono, 3),
            "health": {"score": score, "state": state},
            "heartbeat": {
                "sent": self.hb_sent,
                "ok": self.hb_ok,
                "missed": self.hb_missed,
                "late": self.hb_late,
                "missed_in_a_row": self.missed_in_a_row,
                "rtt_ms_last": _ms(self.rtt_last),
                "rtt_ms_avg": _ms(self.rtt_ewma),
            },
            "messages": {
                "received": self.messages_in,
                "sent": self.messages_out,
                "bytes_received": self.bytes_in,
                "bytes_sent": self.bytes_out,
                "frames_sent": self.frames_out,
                "queued": len(self.queue),
            },
            "errors": self.errors,
            "channels": sorted(self.channels),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "seconds_since_inbound": round(end - self.last_inbound, 3),
            "seconds_since_app_traffic": round(end - self.last_app_activity, 3),
        }
        if self.close_cause is not None:
            view["close"] = {
                "code": self.close_code,
                "cause": str(self.close_cause),
                "initiator": self.close_initiator,
                "at": self.closed_wall,
            }
        return view

    def detail(self, now: float) -> dict[str, Any]:
        view = self.summary(now)
        opened = {"at": self.opened_wall, "event": "open", "detail": f"{self.client_address}:{self.client_port}"}
        view["timeline"] = [opened, *({"at": at, "event": e, "detail": d} for at, e, d in self.timeline)]
        return view


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _type_name(kind: type) -> str:
    return kind.__name__.lower()


def _chunks(frames: list[str], limit: int) -> list[tuple[str, int]]:
    """Join replayed frames into as few queue entries as fit in `limit` each."""
    chunks: list[tuple[str, int]] = []
    parts: list[str] = []
    size = 0
    for frame in frames:
        if parts and size + len(frame) + 1 > limit:
            chunks.append(("\n".join(parts), len(parts)))
            parts, size = [], 0
        parts.append(frame)
        size += len(frame) + 1
    if parts:
        chunks.append(("\n".join(parts), len(parts)))
    return chunks
