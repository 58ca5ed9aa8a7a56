"""The stability manager: the registry of connections, the one scheduler for
every heartbeat and deadline, the health sweep, the fleet assessment and the
stability events.

Events and their payloads (all dicts):

- `unhealthy_connection`: a connection's score fell below `unhealthy_score`
  (raised by the sweep, once per transition).
- `stale_connection`: no application traffic for `stale_connection_threshold`.
- `stability_alert`: the fleet status changed (healthy / degraded /
  unhealthy) with the reasons; `resolved: true` when it is healthy again.
- `connection_recovered`: a client resumed every channel it asked for.
- `circuit_breaker_opened`: a circuit breaker of an upstream opened.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from . import health
from .auth import Authenticator
from .broker import SubscribeResult
from .connection import Connection, State
from .health import FleetHealth
from .hooks import HookSet
from .outbound import Flusher
from .protocol import NORMAL_CAUSES, CloseCause, Limits, Position
from .scheduler import DeadlineScheduler

log = logging.getLogger("stablews.stability")

EVENTS = (
    "connection_recovered",
    "unhealthy_connection",
    "stale_connection",
    "stability_alert",
    "circuit_breaker_opened",
)
RTT_SAMPLES = 1024
RATE_SAMPLE_PERIOD = 5.0
RATE_SAMPLES = 13  # one minute of 5 s samples

EventCallback = Callable[[dict[str, Any]], Any]


class StabilityManager:
    def __init__(
        self,
        settings: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.auth = Authenticator.from_settings(settings)
        self.per_address: Counter[str] = Counter()  # live connections by client address
        self.limits = Limits(
            max_message_bytes=settings.max_message_bytes,
            max_resume_channels=settings.max_channels_per_connection,
        )
        self.welcome_limits = {
            "max_message_bytes": settings.max_message_bytes,
            "max_frame_bytes": settings.max_frame_bytes,
            "send_queue_max": settings.send_queue_max,
            "max_channels": settings.max_channels_per_connection,
            "history_size": settings.history_size,
            "max_recovery_messages": settings.max_recovery_messages,
            "client_publish": settings.client_publish,
        }
        self.live: dict[str, Connection] = {}
        self.closed: deque[Connection] = deque(maxlen=settings.closed_records_max)
        self.scheduler = DeadlineScheduler(lambda conn, now: conn.check(now), clock)
        self.hooks = HookSet()
        self.flusher = Flusher(clock)
        self._listeners: dict[str, list[EventCallback]] = {name: [] for name in EVENTS}
        self._listener_tasks: set[asyncio.Future[Any]] = set()
        self.housekeeping: list[Callable[[], None]] = []
        self.started_mono = clock()
        self.started_wall = wall()
        # totals (monotonic counters)
        self.opened_total = 0
        self.peak_connections = 0
        self.closed_by_cause: Counter[str] = Counter()
        self.errors_by_code: Counter[str] = Counter()
        self.events_total: Counter[str] = Counter()
        self.messages_in = self.messages_out = 0
        self.bytes_in = self.bytes_out = self.frames_out = 0
        self.heartbeats_sent = self.heartbeats_ok = self.heartbeats_missed = self.heartbeats_late = 0
        self.resumes_requested = self.resumes_recovered = self.resumes_not_recovered = 0
        self.replayed_messages = 0
        self.subscribes_total = 0
        # heartbeat RTT ring for percentiles (no allocation per sample)
        self._rtt = array("d", bytes(8 * RTT_SAMPLES))
        self._rtt_count = 0
        # fleet assessment windows: counts since the last sweep, and the one before
        self._window_sent = self._window_missed = 0
        self._prev_window = (0, 0)
        self.fleet = health.assess_fleet(0, 0, 0, 0, 0, settings.degraded_ratio, settings.unhealthy_ratio)
        self._rates: deque[tuple[float, int, int, int]] = deque(maxlen=RATE_SAMPLES)
        self.closed_signal: asyncio.Event | None = None  # set at each close while someone waits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: list[asyncio.TimerHandle] = []

    # ------------------------------------------------------------ events

    def on(self, event: str, callback: EventCallback) -> Callable[[], None]:
        """Subscribe to a stability event; returns a function that unsubscribes."""
        if event not in self._listeners:
            raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        self._listeners[event].append(callback)
        return lambda: self._listeners[event].remove(callback)

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        payload = {"event": event, "at": self.wall(), **payload}
        self.events_total[event] += 1
        self.hooks.on_event(event, payload)
        for callback in list(self._listeners[event]):
            try:
                result = callback(payload)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._listener_tasks.add(task)
                    task.add_done_callback(self._listener_tasks.discard)
            except Exception:
                log.exception("listener of %s failed", event)

    # ------------------------------------------------------------ registry

    def register(self, conn: Connection) -> None:
        self.live[conn.id] = conn
        if conn.client_address is not None:
            self.per_address[conn.client_address] += 1
        self.opened_total += 1
        if len(self.live) > self.peak_connections:
            self.peak_connections = len(self.live)
        if not conn.passive:
            self.scheduler.schedule(conn, conn.hello_deadline)
        self.hooks.on_open(conn)

    def connection_closed(self, conn: Connection) -> None:
        if self.live.pop(conn.id, None) is not None and conn.client_address is not None:
            left = self.per_address[conn.client_address] - 1
            if left > 0:
                self.per_address[conn.client_address] = left
            else:
                del self.per_address[conn.client_address]
        self.scheduler.cancel(conn)
        score, state = conn.compute_health(conn.closed_mono or self.clock())
        conn.health_score, conn.health_state = score, state
        cause = str(conn.close_cause)
        self.closed_by_cause[cause] += 1
        self.closed.append(conn)
        self.hooks.on_close(conn)
        if self.closed_signal is not None:
            self.closed_signal.set()
        if conn.close_cause not in NORMAL_CAUSES:
            log.info(
                "connection closed abnormally",
                extra={
                    **conn.log_fields(),
                    "cause": cause,
                    "code": conn.close_code,
                    "initiator": conn.close_initiator,
                    "duration_s": round((conn.closed_mono or 0) - conn.opened_mono, 3),
                    "missed_heartbeats": conn.missed_in_a_row,
                    "rtt_ms": None if conn.rtt_last is None else round(conn.rtt_last * 1000, 1),
                    "health_score": score,
                    "messages_in": conn.messages_in,
                    "messages_out": conn.messages_out,
                },
            )

    def get(self, conn_id: str) -> Connection | None:
        conn = self.live.get(conn_id)
        if conn is not None:
            return conn
        for closed in reversed(self.closed):
            if closed.id == conn_id:
                return closed
        return None

    # ------------------------------------------------------------ figures fed by connections

    def heartbeat_sent(self) -> None:
        self.heartbeats_sent += 1
        self._window_sent += 1

    def heartbeat_ok(self, conn: Connection, rtt: float) -> None:
        self.heartbeats_ok += 1
        self.hooks.on_heartbeat(conn, "ok", rtt)

    def heartbeat_missed(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        self.heartbeats_missed += 1
        self._window_missed += 1
        if outcome == "late":
            self.heartbeats_late += 1
        self.hooks.on_heartbeat(conn, outcome, rtt)

    def heartbeat_late(self, conn: Connection, rtt: float) -> None:
        """A pong after its miss was already counted: only the figure changes."""
        self.heartbeats_late += 1
        self.hooks.on_heartbeat(conn, "late", rtt)

    def record_rtt(self, rtt: float) -> None:
        self._rtt[self._rtt_count % RTT_SAMPLES] = rtt
        self._rtt_count += 1

    def count_error(self, conn: Connection, code: str) -> None:
        self.errors_by_code[code] += 1
        self.hooks.on_error(conn, code)

    def count_subscribe(
        self, conn: Connection, channel: str, since: Position | None, result: SubscribeResult
    ) -> None:
        self.subscribes_total += 1
        if since is not None:
            self.resumes_requested += 1
            if result.recovered:
                self.resumes_recovered += 1
                self.replayed_messages += len(result.replay)
            else:
                self.resumes_not_recovered += 1
        self.hooks.on_subscribe(conn, channel, since, result)

    # ------------------------------------------------------------ the sweep

    def sweep(self, now: float | None = None) -> FleetHealth:
        """Score every connection, raise events on transitions, assess the fleet,
        drop expired records. Runs every `health_check_interval`."""
        if now is None:
            now = self.clock()
        settings = self.settings
        counts = {health.HEALTHY: 0, health.UNHEALTHY: 0, health.STALE: 0}
        for conn in list(self.live.values()):
            if conn.state is not State.OPEN:
                continue
            score, state = conn.compute_health(now)
            previous = conn.health_state
            conn.health_score, conn.health_state = score, state
            counts[state] += 1
            if state == previous:
                continue
            conn.note(state, f"score {score}")
            if state == health.UNHEALTHY:
                self.emit("unhealthy_connection", _event_payload(conn, now))
            elif state == health.STALE:
                self.emit("stale_connection", _event_payload(conn, now))
                if settings.close_stale and not conn.passive:
                    conn.close(CloseCause.IDLE_TIMEOUT)
        sent = self._window_sent + self._prev_window[0]
        missed = self._window_missed + self._prev_window[1]
        self._prev_window = (self._window_sent, self._window_missed)
        self._window_sent = self._window_missed = 0
        fleet = health.assess_fleet(
            counts[health.HEALTHY], counts[health.UNHEALTHY], counts[health.STALE],
            sent, missed, settings.degraded_ratio, settings.unhealthy_ratio,
        )
        if fleet.status != self.fleet.status:
            self.emit(
                "stability_alert",
                {
                    "status": fleet.status,
                    "previous": self.fleet.status,
                    "resolved": fleet.status == "healthy",
                    "reasons": list(fleet.reasons),
                    "connections": fleet.total,
                    "unhealthy": fleet.unhealthy,
                    "unhealthy_ratio": fleet.unhealthy_ratio,
                    "missed_heartbeat_ratio": fleet.missed_heartbeat_ratio,
                },
            )
        self.fleet = fleet
        if self.hooks:
            self.hooks.on_sweep([c for c in self.live.values() if c.state is State.OPEN], now)
        self._prune_closed()
        for task in self.housekeeping:
            try:
                task()
            except Exception:
                log.exception("housekeeping failed")
        return fleet

    def _prune_closed(self) -> None:
        cutoff = self.wall() - self.settings.stale_connection_threshold
        closed = self.closed
        while closed and (closed[0].closed_wall or 0) < cutoff:
            closed.popleft()

    def assess(self, now: float | None = None) -> FleetHealth:
        """The fleet's health right now, without changing any state (for the API)."""
        if now is None:
            now = self.clock()
        counts = {health.HEALTHY: 0, health.UNHEALTHY: 0, health.STALE: 0}
        for conn in self.live.values():
            if conn.state is State.OPEN:
                counts[conn.compute_health(now)[1]] += 1
        return health.assess_fleet(
            counts[health.HEALTHY], counts[health.UNHEALTHY], counts[health.STALE],
            self._window_sent + self._prev_window[0], self._window_missed + self._prev_window[1],
            self.settings.degraded_ratio, self.settings.unhealthy_ratio,
        )

    # ------------------------------------------------------------ reports

    def rtt_percentiles(self) -> dict[str, float | None]:
        n = min(self._rtt_count, RTT_SAMPLES)
        if n == 0:
            return {"p50": None, "p95": None, "p99": None, "max": None, "samples": 0}
        values = sorted(self._rtt[:n])

        def pick(q: float) -> float:
            return round(values[min(n - 1, int(q * n))] * 1000, 3)

        return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": round(values[-1] * 1000, 3),
                "samples": n}

    def rates(self) -> dict[str, float]:
        samples = self._rates
        now_sample = (self.clock(), self.messages_out, self.messages_in, sum(self.errors_by_code.values()))
        if not samples:
            return {"messages_sent_per_second": 0.0, "messages_received_per_second": 0.0,
                    "errors_per_second": 0.0, "window_seconds": 0.0}
        first = samples[0]
        span = now_sample[0] - first[0]
        if span <= 0:
            span = 1.0
        return {
            "messages_sent_per_second": round((now_sample[1] - first[1]) / span, 3),
            "messages_received_per_second": round((now_sample[2] - first[2]) / span, 3),
            "errors_per_second": round((now_sample[3] - first[3]) / span, 3),
            "window_seconds": round(span, 3),
        }

    def _sample_rates(self) -> None:
        self._rates.append((self.clock(), self.messages_out, self.messages_in, sum(self.errors_by_code.values())))

    def recovery_stats(self) -> dict[str, Any]:
        asked = self.resumes_requested
        return {
            "resumes_requested": asked,
            "recovered": self.resumes_recovered,
            "not_recovered": self.resumes_not_recovered,
            "success_rate": round(self.resumes_recovered / asked, 4) if asked else None,
            "messages_replayed": self.replayed_messages,
            "connections_recovered": self.events_total["connection_recovered"],
        }

    def stability_report(self) -> dict[str, Any]:
        now = self.clock()
        fleet = self.assess(now)
        open_conns = [c for c in self.live.values() if c.state is State.OPEN]
        scores = [c.compute_health(now)[0] for c in open_conns]
        ages = [now - c.opened_mono for c in open_conns]
        received = self.messages_in
        errors = sum(self.errors_by_code.values())
        return {
            "status": fleet.status,
            "reasons": list(fleet.reasons),
            "uptime_seconds": round(now - self.started_mono, 3),
            "connections": {
                "active": len(self.live),
                "healthy": fleet.healthy,
                "unhealthy": fleet.unhealthy,
                "stale": fleet.stale,
                "peak": self.peak_connections,
                "opened_total": self.opened_total,
                "closed_total": sum(self.closed_by_cause.values()),
                "closed_by_cause": dict(self.closed_by_cause),
                "unhealthy_ratio": fleet.unhealthy_ratio,
                "average_health_score": round(sum(scores) / len(scores), 1) if scores else None,
                "average_uptime_seconds": round(sum(ages) / len(ages), 3) if ages else None,
                # What the registry holds: live connections, the bounded ring of closed ones, and the
                # scheduler's entries (a closed connection's entry is dropped when it comes due).
                "records": {
                    "live": len(self.live),
                    "closed_kept": len(self.closed),
                    "closed_kept_max": self.closed.maxlen,
                    "scheduled": len(self.scheduler),
                },
            },
            "messages": {
                "sent_total": self.messages_out,
                "received_total": received,
                "bytes_sent_total": self.bytes_out,
                "bytes_received_total": self.bytes_in,
                "frames_sent_total": self.frames_out,
                **self.rates(),
            },
            "errors": {
                "total": errors,
                "by_code": dict(self.errors_by_code),
                "error_rate": round(errors / received, 4) if received else 0.0,
            },
            "heartbeats": {
                "interval_ms": int(self.settings.heartbeat_interval * 1000),
                "timeout_ms": int(self.settings.heartbeat_timeout * 1000),
                "sent_total": self.heartbeats_sent,
                "ok_total": self.heartbeats_ok,
                "missed_total": self.heartbeats_missed,
                "late_total": self.heartbeats_late,
                "missed_ratio": fleet.missed_heartbeat_ratio,
                "rtt_ms": self.rtt_percentiles(),
            },
            "events": {name: self.events_total[name] for name in EVENTS},
        }

    # ------------------------------------------------------------ event loop glue

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.scheduler.attach(self._loop)
        self._sample_rates()
        self._timers = [
            self._loop.call_later(self.settings.health_check_interval, self._sweep_tick),
            self._loop.call_later(RATE_SAMPLE_PERIOD, self._rate_tick),
        ]

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        self.scheduler.detach()
        self._loop = None

    def _sweep_tick(self) -> None:
        try:
            self.sweep()
        finally:
            if self._loop is not None:
                self._timers[0] = self._loop.call_later(self.settings.health_check_interval, self._sweep_tick)

    def _rate_tick(self) -> None:
        self._sample_rates()
        if self._loop is not None:
            self._timers[1] = self._loop.call_later(RATE_SAMPLE_PERIOD, self._rate_tick)


def _event_payload(conn: Connection, now: float) -> dict[str, Any]:
    return {
        "connection": conn.id,
        "score": conn.health_score,
        "state": conn.health_state,
        "missed_in_a_row": conn.missed_in_a_row,
        "rtt_ms": None if conn.rtt_ewma is None else round(conn.rtt_ewma * 1000, 1),
        "queued": len(conn.queue),
        "errors": conn.errors,
        "seconds_since_app_traffic": round(now - conn.last_app_activity, 1),
        "trace_id": conn.trace_id,
    }
