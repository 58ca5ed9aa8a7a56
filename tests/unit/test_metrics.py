"""Prometheus metrics: the catalogue (names, types, labels), values read from the core,
exemplars only in OpenMetrics, bounded label sets. In process, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from stablews.app import StableServer
from stablews.config import Settings
from stablews.connection import Connection
from stablews.protocol import CloseCause, ErrorCode
from stablews.stability import EVENTS
from stablews.telemetry.metrics import PrometheusMetrics

OPENMETRICS = "application/openmetrics-text; version=1.0.0"

# The contract of observability.md ("Metrics"): name -> (type, label names).
CATALOGUE: dict[str, tuple[str, tuple[str, ...]]] = {
    "stablews_connections_active": ("gauge", ()),
    "stablews_connections": ("gauge", ("health",)),
    "stablews_connections_opened_total": ("counter", ()),
    "stablews_connections_closed_total": ("counter", ("cause",)),
    "stablews_connection_duration_seconds": ("histogram", ("cause",)),
    "stablews_connection_health_score": ("histogram", ()),
    "stablews_heartbeats_sent_total": ("counter", ()),
    "stablews_heartbeats_missed_total": ("counter", ()),
    "stablews_heartbeat_rtt_seconds": ("histogram", ()),
    "stablews_messages_sent_total": ("counter", ()),
    "stablews_messages_received_total": ("counter", ()),
    "stablews_sent_bytes_total": ("counter", ()),
    "stablews_received_bytes_total": ("counter", ()),
    "stablews_frames_sent_total": ("counter", ()),
    "stablews_published_messages_total": ("counter", ()),
    "stablews_delivery_latency_seconds": ("histogram", ()),
    "stablews_send_queue_depth": ("histogram", ()),
    "stablews_resume_total": ("counter", ("result",)),
    "stablews_replayed_messages_total": ("counter", ()),
    "stablews_errors_total": ("counter", ("code",)),
    "stablews_stability_events_total": ("counter", ("event",)),
    "stablews_upstream_connected": ("gauge", ("upstream",)),
    "stablews_upstream_reconnect_attempts_total": ("counter", ("upstream", "outcome")),
    "stablews_circuit_breaker_state": ("gauge", ("target",)),
    "stablews_circuit_breaker_opened_total": ("counter", ("target",)),
    "stablews_event_loop_lag_seconds": ("histogram", ()),
    "stablews_shutdown_drain_seconds": ("gauge", ()),
    "stablews_ready": ("gauge", ()),
    "stablews_build_info": ("gauge", ("version",)),
    # Beyond the design's table: the broker (a Redis broker's link and streams; docs/observability.md).
    "stablews_broker_connected": ("gauge", ()),
    "stablews_broker_reconnect_attempts_total": ("counter", ("outcome",)),
    "stablews_broker_publish_failures_total": ("counter", ()),
    "stablews_broker_entries_read_total": ("counter", ()),
    "stablews_stream_resets_total": ("counter", ("reason",)),
}
CAUSES = {str(c) for c in CloseCause}
CODES = {str(c) for c in ErrorCode}
FEED = "json+ws://127.0.0.1:9/feed"  # nothing listens there; the relay is never started here


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1.7e9


def make_server(clocks: Clocks | None = None, **options: Any) -> StableServer:
    clocks = clocks or Clocks()
    settings = Settings(**{"demo_feed": False, **options})
    return StableServer(settings, clock=lambda: clocks.mono, wall=lambda: clocks.wall)


def metrics_of(server: StableServer) -> PrometheusMetrics:
    metrics = server.telemetry.metrics
    assert metrics is not None
    return metrics


def text(server: StableServer) -> str:
    body, content_type = metrics_of(server).exposition(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def openmetrics(server: StableServer) -> str:
    body, content_type = metrics_of(server).exposition(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    return body.decode()


def families(server: StableServer) -> dict[str, Any]:
    """OpenMetrics families by catalogue name (a counter family is named without `_total`)."""
    out = {}
    for family in parse_openmetrics(openmetrics(server)):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def value(server: StableServer, name: str, **labels: str) -> float:
    """One sample of the classic text exposition."""
    for family in parse_text(text(server)):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


async def _nowhere(message: dict) -> None:
    return None


def open_conn(server: StableServer, conn_id: str, trace_id: str | None = None) -> Connection:
    conn = Connection(server.manager, None, _nowhere, conn_id, client=("10.0.0.1", 40000), trace_id=trace_id)
    server.manager.register(conn)
    return conn


def close_conn(conn: Connection, cause: CloseCause | None = None, code: int = 1000) -> None:
    """End a connection the way the core does: a server-side cause is set before the socket goes."""
    if cause is not None:
        conn.close_cause, conn.close_code, conn.close_initiator = cause, code, "server"
    conn.finish(code)


# What the dashboard's runtime row reads (prometheus_client's process collector, on Linux).
PROCESS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
           "process_start_time_seconds"}


def test_every_catalogue_metric_has_its_type_and_labels():
    server = make_server(upstreams=(FEED + "#a",))
    found = families(server)
    for name, (kind, labels) in CATALOGUE.items():
        assert name in found, name
        family = found[name]
        assert family.type == kind, (name, family.type)
        assert family.samples, f"{name} has no series"
        for sample in family.samples:
            names = set(sample.labels) - {"le"}  # histogram buckets
            assert names == set(labels), (name, sample)
    # Only the catalogue and the process collector's process_* (the dashboard's runtime row), in both formats.
    assert {n for n in found if not n.startswith("process_")} == set(CATALOGUE)
    assert {n for n in found if n.startswith("process_")} >= PROCESS
    classic = {f.name for f in parse_text(text(server)) if not f.name.startswith("process_")}
    assert {n.removesuffix("_total") for n in CATALOGUE} <= classic
    extra = classic - {n.removesuffix("_total") for n in CATALOGUE}
    assert all(n.endswith("_created") for n in extra), extra  # prometheus_client's histogram _created


def test_series_of_known_label_values_exist_at_zero_from_the_start():
    server = make_server()
    found = families(server)

    def values(name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in found[name].samples if s.name == name}

    assert values("stablews_connections_closed_total", "cause") == dict.fromkeys(CAUSES, 0)
    assert values("stablews_errors_total", "code") == dict.fromkeys(CODES, 0)
    assert values("stablews_stability_events_total", "event") == dict.fromkeys(EVENTS, 0)
    assert values("stablews_resume_total", "result") == {"recovered": 0, "not_recovered": 0}
    assert values("stablews_connections", "health") == {"healthy": 0, "unhealthy": 0, "stale": 0}
    durations = {
        s.labels["cause"] for s in found["stablews_connection_duration_seconds"].samples
        if s.name.endswith("_count") and s.value == 0
    }
    assert durations == CAUSES
    for name in ("stablews_heartbeat_rtt_seconds", "stablews_delivery_latency_seconds",
                 "stablews_send_queue_depth", "stablews_connection_health_score", "stablews_event_loop_lag_seconds"):
        assert value(server, name + "_count") == 0
    assert value(server, "stablews_build_info", version=server.version) == 1


async def test_counters_follow_the_core():
    clocks = Clocks()
    server = make_server(clocks)
    manager = server.manager
    conns = [open_conn(server, f"c{i}", trace_id=f"{i:032x}") for i in range(5)]
    close_conn(conns[0])  # 1000: normal
    close_conn(conns[1], code=1006)  # no close frame: client_gone
    close_conn(conns[2], CloseCause.HEARTBEAT_TIMEOUT, 4000)
    manager.count_error(conns[3], str(ErrorCode.BAD_JSON))
    manager.count_error(conns[3], str(ErrorCode.BAD_JSON))
    manager.count_error(conns[3], str(ErrorCode.FORBIDDEN))
    for _ in range(3):
        manager.heartbeat_sent()
    manager.heartbeat_missed(conns[3], "missed", None)
    manager.emit("stale_connection", {})
    manager.emit("connection_recovered", {})
    # The send and receive paths add to these figures (connection.py); here they are set.
    manager.messages_out, manager.messages_in = 40, 12
    manager.bytes_out, manager.bytes_in, manager.frames_out = 4000, 600, 9
    manager.resumes_recovered, manager.resumes_not_recovered, manager.replayed_messages = 3, 1, 17
    await server.publish("prices", {"p": 1})
    await server.publish("prices", {"p": 2})

    expected = {
        "stablews_connections_opened_total": manager.opened_total,
        "stablews_heartbeats_sent_total": manager.heartbeats_sent,
        "stablews_heartbeats_missed_total": manager.heartbeats_missed,
        "stablews_messages_sent_total": manager.messages_out,
        "stablews_messages_received_total": manager.messages_in,
        "stablews_sent_bytes_total": manager.bytes_out,
        "stablews_received_bytes_total": manager.bytes_in,
        "stablews_frames_sent_total": manager.frames_out,
        "stablews_published_messages_total": server.broker.stats()["published_total"],
        "stablews_replayed_messages_total": manager.replayed_messages,
        "stablews_connections_active": len(manager.live),
    }
    assert expected["stablews_connections_opened_total"] == 5
    assert expected["stablews_published_messages_total"] == 2
    assert expected["stablews_connections_active"] == 2
    for name, wanted in expected.items():
        assert value(server, name) == wanted, name
    for cause in CAUSES:
        wanted = manager.closed_by_cause.get(cause, 0)
        assert value(server, "stablews_connections_closed_total", cause=cause) == wanted, cause
    assert manager.closed_by_cause == {"normal": 1, "client_gone": 1, "heartbeat_timeout": 1}
    assert value(server, "stablews_errors_total", code="bad_json") == 2
    assert value(server, "stablews_errors_total", code="forbidden") == 1
    assert value(server, "stablews_errors_total", code="internal") == 0
    assert value(server, "stablews_stability_events_total", event="stale_connection") == 1
    assert value(server, "stablews_stability_events_total", event="connection_recovered") == 1
    assert value(server, "stablews_stability_events_total", event="stability_alert") == 0
    assert value(server, "stablews_resume_total", result="recovered") == 3
    assert value(server, "stablews_resume_total", result="not_recovered") == 1
    # Values are read at scrape time: the next scrape sees what changed since.
    manager.messages_out += 5
    assert value(server, "stablews_messages_sent_total") == 45


def test_closed_total_and_duration_carry_the_trace_id_only_in_openmetrics():
    clocks = Clocks()
    server = make_server(clocks)
    first, second = "1" * 32, "ab" * 16
    a = open_conn(server, "a", trace_id=first)
    b = open_conn(server, "b", trace_id=second)
    c = open_conn(server, "c", trace_id=None)
    clocks.mono += 2.5
    clocks.wall += 2.5
    close_conn(a, CloseCause.HEARTBEAT_TIMEOUT, 4000)
    clocks.mono += 1
    clocks.wall += 1
    close_conn(b, CloseCause.HEARTBEAT_TIMEOUT, 4000)  # the most recent one of the cause wins
    close_conn(c)  # normal, without a trace id: no exemplar

    found = families(server)
    closed = {s.labels["cause"]: s for s in found["stablews_connections_closed_total"].samples
              if s.name == "stablews_connections_closed_total"}
    timeout = closed["heartbeat_timeout"]
    assert timeout.value == 2
    assert timeout.exemplar is not None
    assert timeout.exemplar.labels == {"trace_id": second}
    assert float(timeout.exemplar.timestamp) == pytest.approx(clocks.wall, abs=1e-3)  # the close's wall time
    assert closed["normal"].value == 1 and closed["normal"].exemplar is None
    assert all(s.exemplar is None for cause, s in closed.items() if cause != "heartbeat_timeout")

    buckets = [s for s in found["stablews_connection_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["cause"] == "heartbeat_timeout"]
    with_exemplar = [s for s in buckets if s.exemplar is not None]
    # 2.5 s and 3.5 s: both in the (1, 5] bucket, which keeps the latest exemplar
    assert [(s.labels["le"], s.exemplar.labels["trace_id"]) for s in with_exemplar] == [("5.0", second)]
    assert value(server, "stablews_connection_duration_seconds_sum", cause="heartbeat_timeout") == 6.0
    normal = [s for s in found["stablews_connection_duration_seconds"].samples
              if s.name.endswith("_bucket") and s.labels["cause"] == "normal"]
    assert all(s.exemplar is None for s in normal)

    classic = text(server)
    assert first not in classic and second not in classic and "trace_id" not in classic
    assert second in openmetrics(server)


def test_a_trace_id_too_long_for_an_exemplar_is_left_out_not_the_close():
    server = make_server()
    close_conn(open_conn(server, "long", trace_id="f" * 200), CloseCause.ERROR, 1011)
    found = families(server)  # the OpenMetrics exposition still renders and parses
    closed = [s for s in found["stablews_connections_closed_total"].samples
              if s.name == "stablews_connections_closed_total" and s.labels["cause"] == "error"]
    assert [(s.value, s.exemplar) for s in closed] == [(1, None)]
    assert value(server, "stablews_connection_duration_seconds_count", cause="error") == 1


def test_histograms_from_the_hooks():
    clocks = Clocks()
    server = make_server(clocks, send_queue_max=300, unhealthy_score=45)
    manager = server.manager
    conn = open_conn(server, "h", trace_id="cd" * 16)
    quiet = open_conn(server, "q", trace_id=None)
    manager.heartbeat_ok(conn, 0.012)
    manager.heartbeat_missed(conn, "late", 0.7)
    manager.heartbeat_missed(conn, "missed", None)  # no pong, no RTT
    manager.heartbeat_late(quiet, 0.9)
    assert value(server, "stablews_heartbeat_rtt_seconds_count") == 3
    assert value(server, "stablews_heartbeat_rtt_seconds_sum") == pytest.approx(0.012 + 0.7 + 0.9)

    manager.hooks.on_delivery(0.0004, conn)
    manager.hooks.on_delivery(0.03, quiet)
    assert value(server, "stablews_delivery_latency_seconds_count") == 2
    assert value(server, "stablews_delivery_latency_seconds_bucket", le="0.0005") == 1

    conn.queue.extend(["x"] * 7)
    manager.sweep()
    manager.sweep()
    assert value(server, "stablews_send_queue_depth_count") == 4  # 2 open connections x 2 sweeps
    assert value(server, "stablews_send_queue_depth_sum") == 14
    assert value(server, "stablews_send_queue_depth_bucket", le="0.0") == 2
    assert value(server, "stablews_send_queue_depth_bucket", le="10.0") == 4
    assert value(server, "stablews_send_queue_depth_bucket", le="300.0") == 4  # send_queue_max is a bound
    assert value(server, "stablews_connection_health_score_count") == 4
    assert value(server, "stablews_connection_health_score_sum") == pytest.approx(
        2 * (conn.health_score + quiet.health_score)
    )
    assert value(server, "stablews_connection_health_score_bucket", le="45.0") is not None  # unhealthy_score

    metrics_of(server).observe_loop_lag(0.003)
    assert value(server, "stablews_event_loop_lag_seconds_count") == 1
    assert value(server, "stablews_event_loop_lag_seconds_bucket", le="0.0025") == 0
    assert value(server, "stablews_event_loop_lag_seconds_bucket", le="0.005") == 1

    found = families(server)
    rtt = [s.exemplar for s in found["stablews_heartbeat_rtt_seconds"].samples if s.exemplar is not None]
    assert {e.labels["trace_id"] for e in rtt} == {"cd" * 16}  # the quiet one has no trace id
    delivery = [s.exemplar for s in found["stablews_delivery_latency_seconds"].samples if s.exemplar is not None]
    assert [e.labels["trace_id"] for e in delivery] == ["cd" * 16]
    for name in ("stablews_send_queue_depth", "stablews_connection_health_score", "stablews_event_loop_lag_seconds"):
        assert all(s.exemplar is None for s in found[name].samples)


def test_fleet_gauges_follow_the_sweep():
    clocks = Clocks()
    server = make_server(clocks, stale_connection_threshold=60.0)
    manager = server.manager
    conns = [open_conn(server, f"g{i}") for i in range(3)]
    conns[0].missed_in_a_row = 2  # the score is capped at 20: unhealthy
    conns[0].hb_success = 0.0
    manager.sweep()
    assert value(server, "stablews_connections", health="healthy") == 2
    assert value(server, "stablews_connections", health="unhealthy") == 1
    assert value(server, "stablews_connections", health="stale") == 0
    clocks.mono += 61  # no application traffic for longer than the threshold
    manager.sweep()
    assert value(server, "stablews_connections", health="stale") == 3
    assert value(server, "stablews_connections_active") == 3
    assert value(server, "stablews_stability_events_total", event="unhealthy_connection") == 1
    assert value(server, "stablews_stability_events_total", event="stale_connection") == 3


async def test_ready_and_drain_seconds_follow_the_server():
    server = make_server(event_loop_lag_interval=0.0)
    assert value(server, "stablews_ready") == 0  # not started
    await server.start()
    try:
        assert value(server, "stablews_ready") == 1
        assert value(server, "stablews_shutdown_drain_seconds") == 0
    finally:
        summary = await server.shutdown()
    assert value(server, "stablews_ready") == 0
    assert value(server, "stablews_shutdown_drain_seconds") == summary["drain_seconds"]
    metrics_of(server).on_shutdown({"drain_seconds": 1.25})
    assert value(server, "stablews_shutdown_drain_seconds") == 1.25


def test_upstream_series_are_the_configured_relays():
    other = "json+ws://127.0.0.1:10/other"
    server = make_server(upstreams=(FEED + "#a", other + "#b"), circuit_breaker_threshold=2, max_retries=10)
    keys = [relay.key for relay in server.relays]
    assert keys == [FEED, other]
    for key in keys:
        assert value(server, "stablews_upstream_connected", upstream=key) == 0
        assert value(server, "stablews_circuit_breaker_state", target=key) == 0
        assert value(server, "stablews_circuit_breaker_opened_total", target=key) == 0
        for outcome in ("success", "failure"):
            assert value(server, "stablews_upstream_reconnect_attempts_total", upstream=key, outcome=outcome) == 0

    recovery = server.relays[0].recovery
    for _ in range(2):
        assert recovery.start_attempt()
        recovery.failed()  # threshold 2: the circuit opens
    assert value(server, "stablews_upstream_reconnect_attempts_total", upstream=FEED, outcome="failure") == 2
    assert value(server, "stablews_circuit_breaker_state", target=FEED) == 2
    assert value(server, "stablews_circuit_breaker_opened_total", target=FEED) == 1
    assert value(server, "stablews_stability_events_total", event="circuit_breaker_opened") == 1
    recovery.breaker.opened_at = -1e9  # the open period is over: half-open
    assert value(server, "stablews_circuit_breaker_state", target=FEED) == 1
    assert recovery.start_attempt()
    recovery.succeeded()
    assert value(server, "stablews_circuit_breaker_state", target=FEED) == 0
    assert value(server, "stablews_upstream_reconnect_attempts_total", upstream=FEED, outcome="success") == 1
    assert value(server, "stablews_circuit_breaker_state", target=other) == 0

    server.relays[1]._state = "connected"  # what the relay's loop sets once the feed answers
    assert value(server, "stablews_upstream_connected", upstream=other) == 1


def test_label_sets_stay_bounded_whatever_the_connections():
    server = make_server()
    before = openmetrics(server)
    series_before = sum(len(f.samples) for f in parse_openmetrics(before))
    for i in range(200):
        conn = open_conn(server, f"conn-{i}", trace_id=f"{i + 1:032x}")
        conn.client_address = f"10.1.{i // 256}.{i % 256}"
        conn.channels.append(f"channel-{i}")
        server.manager.count_error(conn, str(ErrorCode.BAD_MESSAGE))
        server.manager.heartbeat_ok(conn, 0.001 * (i % 50))
        close_conn(conn, code=1006 if i % 2 else 1000)
    after = openmetrics(server)
    assert sum(len(f.samples) for f in parse_openmetrics(after)) == series_before
    allowed = {
        "cause": CAUSES, "code": CODES, "event": set(EVENTS), "result": {"recovered", "not_recovered"},
        "health": {"healthy", "unhealthy", "stale"}, "version": {server.version},
        "outcome": {"success", "failure"}, "reason": {"reset", "new_epoch", "gap"},
    }
    for family in parse_openmetrics(after):
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if label == "le":
                    continue
                assert label_value in allowed[label], (sample.name, label, label_value)
    classic = text(server)
    assert "conn-" not in classic and "10.1." not in classic and "channel-" not in classic


def test_servers_in_one_process_have_their_own_registries():
    one, two = make_server(), make_server()
    open_conn(one, "x", trace_id="ef" * 16)
    assert metrics_of(one).registry is not metrics_of(two).registry
    assert value(one, "stablews_connections_opened_total") == 1
    assert value(two, "stablews_connections_opened_total") == 0


def test_metrics_off_means_no_exporter():
    server = make_server(metrics_enabled=False)
    assert server.telemetry.metrics is None


def test_any_accept_header_other_than_openmetrics_gets_the_classic_format():
    server = make_server()
    for accept in (None, "", "*/*", "text/plain", "application/json", "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"):
        body, content_type = metrics_of(server).exposition(accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8", accept
        assert not body.rstrip().endswith(b"# EOF")
    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    body, content_type = metrics_of(server).exposition(prometheus_accept)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.rstrip().endswith(b"# EOF")
