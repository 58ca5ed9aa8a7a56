"""Prometheus metrics: the catalogue of the observability design ("Metrics", prefix `stablews_`).

Names, types and labels are a contract (dashboards, alert rules and runbooks use them).

Cheap on the hot path: every counter the core already keeps (messages, bytes, frames,
heartbeats, opened, closed by cause, errors by code, events, resumes, published, replayed)
and every gauge is read at scrape time by `CoreCollector`; nothing is incremented per
message here. The hooks only do what the core cannot: the histograms, and the trace id of
the most recent close of each cause (the exemplar of `stablews_connections_closed_total`).

Each server has its own `CollectorRegistry`, so several servers in one process do not clash.
Every label takes a bounded set of values (causes, error codes, events, health states,
results, outcomes from enums; upstreams and targets from configuration), and the series of
a known value set exist at 0 from the start, for dashboards and `absent()`-style rules.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from ..health import HEALTHY, STALE, UNHEALTHY
from ..hooks import LifecycleHooks
from ..protocol import CloseCause, ErrorCode
from ..recovery import CircuitState
from ..stability import EVENTS

if TYPE_CHECKING:
    from ..app import StableServer
    from ..connection import Connection

CAUSES = tuple(str(cause) for cause in CloseCause)
ERROR_CODES = tuple(str(code) for code in ErrorCode)
HEALTH_STATES = (HEALTHY, UNHEALTHY, STALE)
RESUME_RESULTS = ("recovered", "not_recovered")
OUTCOMES = ("success", "failure")
RESET_REASONS = ("reset", "new_epoch", "gap")
CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

# Buckets (upper bounds; +Inf is added by the library).
# Connection lifetimes run from milliseconds (refused, hello timeout) to days (a dashboard
# tab left open): roughly logarithmic from 100 ms to a day, with the 1-2 minute range where
# "dropped soon after connecting" problems show.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
# Heartbeat RTT: 1 ms (loopback, same zone) to 10 s (a late pong can exceed heartbeat_timeout,
# whose default is 10 s); finer below 100 ms where healthy networks live.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Delivery latency (publication -> written to the socket): sub-millisecond when all is well,
# seconds when the loop or the peers lag; 100 us to 5 s.
DELIVERY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Event-loop lag: a healthy loop is late by < 1 ms; 100 ms is already visible to clients.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Send queue depth (frames): 0 is the norm; 1-2-5 steps up to the configured send_queue_max
# (added as a bound of its own: at the limit a slow consumer is closed 4003).
QUEUE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# Health score (0-100): steps of 10, plus unhealthy_score, so that "below the threshold" is a
# bucket boundary (miss caps make 20 and 40 common values, also boundaries).
SCORE_BUCKETS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


# An exemplar's labels may hold 128 characters (OpenMetrics): a trace id is 32 hex digits;
# anything much longer is not one and is left out rather than failing the observation or a scrape.
TRACE_ID_MAX = 64


def _exemplar(trace_id: str | None) -> dict[str, str] | None:
    if trace_id and len(trace_id) <= TRACE_ID_MAX:
        return {"trace_id": trace_id}
    return None


def queue_buckets(send_queue_max: int) -> tuple[float, ...]:
    bounds = [b for b in QUEUE_BUCKETS if b < send_queue_max]
    bounds.append(send_queue_max)
    return tuple(float(b) for b in bounds)


def score_buckets(unhealthy_score: float) -> tuple[float, ...]:
    bounds = list(SCORE_BUCKETS)
    if 0 < unhealthy_score < 100 and unhealthy_score not in bounds:
        insort(bounds, unhealthy_score)
    return tuple(float(b) for b in bounds)


class CoreCollector(Collector):
    """Reads the core's counters and the server's state at scrape time."""

    def __init__(self, server: StableServer, metrics: PrometheusMetrics) -> None:
        self.server = server
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(describe=True))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(describe=False))

    def _families(self, describe: bool) -> Iterator[Metric]:
        server = self.server
        manager = server.manager

        def counter(name: str, doc: str, value: float | None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=None if describe else value)

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=None if describe else value)

        # ---- connections
        yield gauge("stablews_connections_active", "Live connections (protocol and passive).", len(manager.live))
        fleet = manager.fleet
        health = GaugeMetricFamily(
            "stablews_connections", "Open connections by health at the last sweep.", labels=["health"]
        )
        if not describe:
            for state in HEALTH_STATES:
                health.add_metric([state], getattr(fleet, state))
        yield health
        yield counter("stablews_connections_opened_total", "Connections accepted.", manager.opened_total)
        closed = CounterMetricFamily(
            "stablews_connections_closed_total",
            "Connections closed, by cause (exemplar: trace id of the latest close of that cause).",
            labels=["cause"],
        )
        if not describe:
            by_cause = manager.closed_by_cause
            last = self.metrics.last_close
            for cause in CAUSES:
                seen = last.get(cause)
                exemplar = None if seen is None else Exemplar({"trace_id": seen[0]}, 1.0, seen[1])
                closed.add_metric([cause], by_cause.get(cause, 0), exemplar=exemplar)
        yield closed

        # ---- heartbeats, messages
        yield counter("stablews_heartbeats_sent_total", "Heartbeat pings sent.", manager.heartbeats_sent)
        yield counter(
            "stablews_heartbeats_missed_total", "Heartbeats without a pong in time (late or never).",
            manager.heartbeats_missed,
        )
        yield counter("stablews_messages_sent_total", "Messages sent to clients.", manager.messages_out)
        yield counter("stablews_messages_received_total", "Messages received from clients.", manager.messages_in)
        yield counter("stablews_sent_bytes_total", "Bytes of messages sent to clients.", manager.bytes_out)
        yield counter("stablews_received_bytes_total", "Bytes of messages received from clients.", manager.bytes_in)
        yield counter("stablews_frames_sent_total", "WebSocket frames sent (messages are coalesced).",
                      manager.frames_out)
        yield counter(
            "stablews_published_messages_total", "Messages published to the broker.", self._published()
        )

        # ---- recovery, errors, events
        resume = CounterMetricFamily(
            "stablews_resume_total", "Channel resumes asked for by clients, by result.", labels=["result"]
        )
        if not describe:
            resume.add_metric(["recovered"], manager.resumes_recovered)
            resume.add_metric(["not_recovered"], manager.resumes_not_recovered)
        yield resume
        yield counter(
            "stablews_replayed_messages_total", "Messages replayed from history on resume.", manager.replayed_messages
        )
        errors = CounterMetricFamily(
            "stablews_errors_total", "Protocol error messages sent, by code.", labels=["code"]
        )
        if not describe:
            by_code = manager.errors_by_code
            for code in ERROR_CODES:
                errors.add_metric([code], by_code.get(code, 0))
        yield errors
        events = CounterMetricFamily(
            "stablews_stability_events_total", "Stability events emitted, by event.", labels=["event"]
        )
        if not describe:
            for event in EVENTS:
                events.add_metric([event], manager.events_total.get(event, 0))
        yield events

        # ---- upstreams (one series per configured relay)
        connected = GaugeMetricFamily(
            "stablews_upstream_connected", "1 when the upstream relay is connected.", labels=["upstream"]
        )
        attempts = CounterMetricFamily(
            "stablews_upstream_reconnect_attempts_total",
            "Connection attempts of an upstream relay (the first included), by outcome.",
            labels=["upstream", "outcome"],
        )
        circuit = GaugeMetricFamily(
            "stablews_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["target"],
        )
        opened = CounterMetricFamily(
            "stablews_circuit_breaker_opened_total", "Times the circuit breaker opened.", labels=["target"]
        )
        if not describe:
            for relay in server.relays:
                recovery = relay.recovery
                if not relay.standby:  # another instance relays it: nothing to say here
                    connected.add_metric([relay.key], 1 if relay.state == "connected" else 0)
                attempts.add_metric([relay.key, "success"], recovery.successes)
                attempts.add_metric([relay.key, "failure"], recovery.failures)
            for target, recovery in server.circuit_breakers().items():
                circuit.add_metric([target], CIRCUIT_VALUES[recovery.circuit_state])
                opened.add_metric([target], recovery.breaker.opened_total)
        yield connected
        yield attempts
        yield circuit
        yield opened

        # ---- the broker (a broker outside the process has a connection of its own)
        broker = server.broker
        figures = {} if describe else broker.stats()
        yield gauge(
            "stablews_broker_connected", "1 when the broker can serve (always 1 for the memory broker).",
            1 if broker.ready else 0,
        )
        link = CounterMetricFamily(
            "stablews_broker_reconnect_attempts_total",
            "Connection attempts of the broker's link (the first included), by outcome.", labels=["outcome"],
        )
        if not describe:
            recovery = broker.recovery
            link.add_metric(["success"], recovery.successes if recovery is not None else 0)
            link.add_metric(["failure"], recovery.failures if recovery is not None else 0)
        yield link
        yield counter(
            "stablews_broker_publish_failures_total", "Publications refused because the broker was unavailable.",
            figures.get("publish_failures_total", 0),
        )
        yield counter(
            "stablews_broker_entries_read_total", "Stream entries this instance read from the shared broker.",
            figures.get("entries_read_total", 0),
        )
        resets = CounterMetricFamily(
            "stablews_stream_resets_total",
            "Streams whose subscribers here were told to resync, by reason: reset (the relayed source lost "
            "continuity), new_epoch (the broker lost the history), gap (this instance read too late).",
            labels=["reason"],
        )
        if not describe:
            # The memory broker tells its subscribers of its own resets; a shared broker reports
            # what this instance's subscribers were told, whoever made the change.
            seen = figures.get("discontinuities") or {"reset": figures.get("resets_total", 0)}
            for reason in RESET_REASONS:
                resets.add_metric([reason], seen.get(reason, 0))
        yield resets

        # ---- the server
        yield gauge("stablews_ready", "1 serving, 0 draining or not started.", 1 if server.ready else 0)
        yield gauge(
            "stablews_shutdown_drain_seconds", "How long the last drain took (0 until one ran).",
            self.metrics.drain_seconds,
        )
        build = GaugeMetricFamily("stablews_build_info", "The running version (always 1).", labels=["version"])
        if not describe:
            build.add_metric([str(server.version)], 1)
        yield build

    def _published(self) -> float:
        broker = self.server.broker
        total = getattr(broker, "published_total", None)
        if total is None:  # another broker: its stats say it
            total = broker.stats().get("published_total", 0)
        return float(total)


class PrometheusMetrics(LifecycleHooks):
    """The hooks that feed the histograms, and the exposition for GET /metrics."""

    def __init__(self, server: StableServer) -> None:
        self.server = server
        settings = server.settings
        self.registry = CollectorRegistry(auto_describe=True)
        # cause -> (trace id, wall time) of the most recent close with that cause
        self.last_close: dict[str, tuple[str, float]] = {}
        self.drain_seconds = 0.0
        self.registry.register(CoreCollector(server, self))
        # The process's CPU, memory and file descriptors (process_*: the dashboard's runtime row).
        ProcessCollector(registry=self.registry)
        registry = self.registry
        self.duration = Histogram(
            "stablews_connection_duration_seconds", "Connection lifetime, by close cause.", ["cause"],
            registry=registry, buckets=DURATION_BUCKETS,
        )
        self._duration_by_cause = {cause: self.duration.labels(cause) for cause in CAUSES}
        self.rtt = Histogram(
            "stablews_heartbeat_rtt_seconds", "Heartbeat round-trip time (ok and late pongs).",
            registry=registry, buckets=RTT_BUCKETS,
        )
        self.delivery = Histogram(
            "stablews_delivery_latency_seconds",
            "Publication to written to the socket (oldest message of each flush pass).",
            registry=registry, buckets=DELIVERY_BUCKETS,
        )
        self.queue_depth = Histogram(
            "stablews_send_queue_depth", "Queued frames per open connection, at each health sweep.",
            registry=registry, buckets=queue_buckets(settings.send_queue_max),
        )
        self.health_score = Histogram(
            "stablews_connection_health_score", "Health score (0-100) per open connection, at each health sweep.",
            registry=registry, buckets=score_buckets(settings.unhealthy_score),
        )
        self.loop_lag = Histogram(
            "stablews_event_loop_lag_seconds", "How late the event loop ran a timer.",
            registry=registry, buckets=LOOP_LAG_BUCKETS,
        )

    # ------------------------------------------------------------ hooks

    def on_close(self, conn: Connection) -> None:
        cause = str(conn.close_cause)
        child = self._duration_by_cause.get(cause)
        if child is None:  # not a CloseCause: never a label value of its own
            return
        end = conn.closed_mono if conn.closed_mono is not None else conn.opened_mono
        exemplar = _exemplar(conn.trace_id)
        if exemplar is not None:
            # The counter's exemplar is read at scrape time: keep the latest close of the cause.
            self.last_close[cause] = (exemplar["trace_id"], conn.closed_wall or self.server.manager.wall())
        child.observe(max(0.0, end - conn.opened_mono), exemplar)

    def on_heartbeat(self, conn: Connection, outcome: str, rtt: float | None) -> None:
        if rtt is not None and outcome != "missed":  # ok, and late pongs (their RTT is known)
            self.rtt.observe(rtt, _exemplar(conn.trace_id))

    def on_delivery(self, latency: float, conn: Connection) -> None:
        self.delivery.observe(latency, _exemplar(getattr(conn, "trace_id", None)))

    def on_sweep(self, live: Iterable[Connection], now: float) -> None:
        depth = self.queue_depth.observe
        score = self.health_score.observe
        for conn in live:
            depth(len(conn.queue))
            score(conn.health_score)

    def on_shutdown(self, summary: dict[str, Any]) -> None:
        self.drain_seconds = float(summary.get("drain_seconds") or 0.0)

    def observe_loop_lag(self, lag: float) -> None:
        self.loop_lag.observe(lag)

    # ------------------------------------------------------------ exposition

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for: OpenMetrics (with exemplars)
        for `Accept: application/openmetrics-text`, the classic text format otherwise."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
