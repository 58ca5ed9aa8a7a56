"""GET /metrics on a real server process: promtool accepts it, the catalogue is all there,
and a dropped connection's trace id reaches OpenMetrics scrapers and a real Prometheus
(with exemplar storage) as the exemplar of stablews_connections_closed_total."""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Any

import httpx
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from otlp_receiver import OtlpHttpReceiver
from promkit import Prometheus, binary, free_port, scrape_config
from support import Client, hello_client, wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# A peer that stops answering pings is closed 4000 after about interval x missed + timeout.
FLAGS = (
    "--heartbeat-interval", "0.4s", "--heartbeat-timeout", "0.3s", "--max-missed-heartbeats", "2",
    "--health-check-interval", "0.2s", "--demo-feed", "true", "--demo-feed-rate", "20",
)
CATALOGUE = (
    "stablews_connections_active", "stablews_connections", "stablews_connections_opened_total",
    "stablews_connections_closed_total", "stablews_connection_duration_seconds",
    "stablews_connection_health_score", "stablews_heartbeats_sent_total", "stablews_heartbeats_missed_total",
    "stablews_heartbeat_rtt_seconds", "stablews_messages_sent_total", "stablews_messages_received_total",
    "stablews_sent_bytes_total", "stablews_received_bytes_total", "stablews_frames_sent_total",
    "stablews_published_messages_total", "stablews_delivery_latency_seconds", "stablews_send_queue_depth",
    "stablews_resume_total", "stablews_replayed_messages_total", "stablews_errors_total",
    "stablews_stability_events_total", "stablews_upstream_connected", "stablews_upstream_reconnect_attempts_total",
    "stablews_circuit_breaker_state", "stablews_circuit_breaker_opened_total", "stablews_event_loop_lag_seconds",
    "stablews_shutdown_drain_seconds", "stablews_ready", "stablews_build_info",
)
PROMETHEUS_DEADLINE = 60.0


def dead_port() -> int:
    """A loopback port nothing listens on (the OS gave it, then it was closed)."""
    return free_port()


async def scrape(base: str, accept: str | None = None) -> httpx.Response:
    headers = {"accept": accept} if accept else {}
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(base + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response


async def drop_one(server: Any) -> tuple[list[Client], str]:
    """A few live clients and one that stops answering pings: it is closed 4000.
    Returns the clients still open and the dropped one's trace id (from its welcome)."""
    clients = []
    for _ in range(3):
        client, _ = await hello_client(server.ws)
        await client.send({"type": "subscribe", "channel": "demo.ticker"})
        await client.recv_type("subscribed")
        clients.append(client)
    dropped, welcome = await hello_client(server.ws)
    trace_id = welcome["trace_id"]
    assert isinstance(trace_id, str) and len(trace_id) == 32 and int(trace_id, 16) >= 0
    await wait_for(lambda: dropped.pings >= 1, 10, "a first answered ping")
    dropped.answer_pings = False
    assert await dropped.wait_closed(15) == 4000
    await dropped.close()
    return clients, trace_id


async def test_metrics_pass_promtool_carry_the_catalogue_and_the_dropped_trace_id(start_server):
    promtool = binary("promtool")
    feed = f"json+ws://127.0.0.1:{dead_port()}/feed"
    server = start_server(*FLAGS, "--upstreams", feed + "#relayed", "--initial-delay", "0.1s")
    clients, trace_id = await drop_one(server)
    try:
        await wait_for(lambda: all(c.pings >= 2 for c in clients), 10, "heartbeats of the live clients")
        # (1) promtool accepts the classic text exposition.
        response = await scrape(server.http)
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        body = response.text
        check = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        # (2) every metric of the catalogue, with series.
        declared = {line.split()[2] for line in body.splitlines() if line.startswith("# TYPE ")}
        missing = [name for name in CATALOGUE if name not in declared]
        assert not missing, missing
        samples = {line.split("{")[0].split()[0] for line in body.splitlines() if line and line[0] != "#"}
        for name in CATALOGUE:
            assert name in samples or f"{name}_count" in samples, f"{name} has no series"
        assert 'stablews_connections_closed_total{cause="heartbeat_timeout"} 1.0' in body
        assert "stablews_connections_active 3.0" in body
        assert f'stablews_upstream_connected{{upstream="{feed}"}} 0.0' in body
        assert trace_id not in body  # no exemplars in the classic format

        # (3) OpenMetrics: the exemplar of the heartbeat_timeout close is the dropped client's trace id.
        response = await scrape(server.http, OPENMETRICS)
        assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        closed = {}
        for family in parse_openmetrics(response.text):
            if family.name == "stablews_connections_closed":
                closed = {s.labels["cause"]: s for s in family.samples if s.name.endswith("_total")}
        sample = closed["heartbeat_timeout"]
        assert sample.value == 1
        assert sample.exemplar is not None and sample.exemplar.labels == {"trace_id": trace_id}
        assert all(s.exemplar is None for cause, s in closed.items() if cause != "heartbeat_timeout")
    finally:
        for client in clients:
            await client.close()


async def test_a_real_prometheus_stores_the_dropped_connections_trace_id(start_server, tmp_path):
    """Dashboard to trace, end to end: the server exports its spans over OTLP to a receiver, a real
    Prometheus scrapes it, and the exemplar Prometheus stores for the drop is the trace id of the
    dropped connection's exported `ws.connection` span."""
    receiver = OtlpHttpReceiver().start()
    server = start_server(*FLAGS, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })
    prometheus = Prometheus(tmp_path, scrape_config(server.port))
    clients: list[Client] = []
    try:
        await wait_for(prometheus.ready, PROMETHEUS_DEADLINE, "prometheus ready")

        async def target_up() -> bool:
            data = await prometheus.get("/api/v1/query", query='up{job="stablews"}')
            return any(r["value"][1] == "1" for r in data["data"]["result"])

        await wait_for(target_up, PROMETHEUS_DEADLINE, "the service scraped (up == 1)", interval=0.2)
        clients, trace_id = await drop_one(server)

        async def stored_trace_ids() -> set[str]:
            now = time.time()
            data = await prometheus.get(
                "/api/v1/query_exemplars", query="stablews_connections_closed_total",
                start=f"{now - 600:.3f}", end=f"{now + 60:.3f}",
            )
            assert data["status"] == "success", data
            found = set()
            for series in data["data"]:
                if series["seriesLabels"].get("cause") != "heartbeat_timeout":
                    continue
                found |= {e["labels"].get("trace_id") for e in series["exemplars"]}
            return found if trace_id in found else set()

        try:
            found = await wait_for(stored_trace_ids, PROMETHEUS_DEADLINE, "the exemplar in prometheus", interval=0.25)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nprometheus log:\n{prometheus.logs()}") from None
        assert found == {trace_id}
        # ... and that trace id is the exported trace of the dropped connection.
        (root,) = await receiver.wait_spans(name="ws.connection", trace_id=trace_id, timeout=20)
        assert root.attributes["stablews.close.cause"] == "heartbeat_timeout"
        # The counter itself was scraped too, with its cause label.
        data = await prometheus.get(
            "/api/v1/query", query='stablews_connections_closed_total{cause="heartbeat_timeout"}'
        )
        assert [r["value"][1] for r in data["data"]["result"]] == ["1"]
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        prometheus.stop()
        receiver.stop()
