"""Generate the stablews Grafana dashboard and its provisioning files.

    python dashboards/generate.py          # (re)write the files below
    python dashboards/generate.py --check  # exit 1 when a committed file differs from what this script makes

Writes, next to this script:

    stablews.json                          the dashboard (uid `stablews`), provisioned: no `__inputs`
    provisioning/dashboards/stablews.yml   Grafana's file provider for it
    provisioning/datasources/datasources.yml
                                           Prometheus (exemplars link to Tempo) and Tempo (traces link to metrics)

Edit this script, not the files: tests/bundle/test_dashboard.py regenerates them and fails when they differ.
Standard library only: the dashboard is plain dicts dumped as JSON.

Every panel queries Prometheus through the `datasource` variable and filters on the `job` and `instance`
variables. Panels that show exemplars (the RTT quantiles, the delivery latency, the closes by cause, the
slow-consumer closes, the lifetimes of dropped connections) query the raw histograms and counters:
recording rules carry no exemplars. The SLO and baseline rows read recording rules from
alerts/recording.rules.yml: their windows (up to 30 days) are too long to compute on every refresh.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "stablews.json"
PROVIDER_FILE = HERE / "provisioning" / "dashboards" / "stablews.yml"
DATASOURCES_FILE = HERE / "provisioning" / "datasources" / "datasources.yml"

# Where the compose file mounts dashboards/ inside the Grafana container (docs/dashboard.md).
GRAFANA_DASHBOARDS_PATH = "/var/lib/grafana/dashboards"

UID = "stablews"
TITLE = "stablews"
SCHEMA_VERSION = 39
PROMETHEUS_UID = "prometheus"
TEMPO_UID = "tempo"
DS = {"type": "prometheus", "uid": "${datasource}"}

# The selector every query carries; Grafana replaces the variables with regexes (`.*` for All).
SCOPE = 'job=~"$job",instance=~"$instance"'
RATE = "$__rate_interval"
# Closes that are part of normal operation (stablews.protocol.NORMAL_CAUSES); every other cause is abnormal.
ABNORMAL = 'cause!~"normal|shutdown"'

# The SLOs of alerts/ (objectives as fractions of good events) and the band drawn around a baseline.
SLOS = (
    ("heartbeat", "Heartbeat SLO", 0.999),
    ("delivery_latency", "Delivery latency SLO", 0.99),
)
BURN_WINDOWS = ("5m", "1h", "6h", "1d", "3d")
BASELINE_SIGMAS = 3

# The rows, top to bottom (the order); ROW_PANELS below says what each holds.
ROWS = (
    "Overview",
    "Heartbeats",
    "Delivery",
    "Recovery",
    "Runtime",
    "SLOs",
    "Baselines",
)


# --------------------------------------------------------------------------------------------- queries


def sel(metric: str, *matchers: str) -> str:
    """`metric{extra matchers, job=~"$job", instance=~"$instance"}`."""
    return metric + "{" + ",".join((*matchers, SCOPE)) + "}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[{RATE}])"


def sum_rate(metric: str, *matchers: str, by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}({rate(metric, *matchers)})"


def quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    labels = "le" + (f", {by}" if by else "")
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', *matchers)}))"


def target(expr: str, legend: str = "", *, exemplar: bool = False, fmt: str = "time_series",
           instant: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "exemplar": exemplar,
        "format": fmt,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
    }
    return out


# ---------------------------------------------------------------------------------------------- panels


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for value, color in steps]}


GREEN = thresholds((None, "green"))


def color_override(name: str, color: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": "color", "value": {"fixedColor": color, "mode": "fixed"}}],
    }


def right_axis_override(name: str, unit: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "unit", "value": unit},
        ],
    }


def dashed_override(name: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byRegexp", "options": name},
        "properties": [
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
            {"id": "custom.fillOpacity", "value": 0},
        ],
    }


def panel(kind: str, title: str, description: str, targets: list[dict[str, Any]], *, w: int, h: int = 8,
          defaults: dict[str, Any] | None = None, overrides: Iterable[dict[str, Any]] = (),
          options: dict[str, Any] | None = None) -> dict[str, Any]:
    refs = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": defaults or {}, "overrides": list(overrides)},
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "options": options or {},
        "targets": [{**t, "refId": next(refs)} for t in targets],
        "title": title,
        "type": kind,
    }


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str, *, w: int, h: int = 8,
               stack: bool = False, fill: int = 10, min_value: float | None = 0, max_value: float | None = None,
               steps: dict[str, Any] = GREEN, threshold_style: str = "off",
               overrides: Iterable[dict[str, Any]] = (), legend_table: bool = False) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "axisBorderShow": False,
            "axisCenteredZero": False,
            "axisColorMode": "text",
            "axisLabel": "",
            "axisPlacement": "auto",
            "barAlignment": 0,
            "drawStyle": "line",
            "fillOpacity": 100 if stack else fill,
            "gradientMode": "none" if stack else "opacity",
            "hideFrom": {"legend": False, "tooltip": False, "viz": False},
            "insertNulls": False,
            "lineInterpolation": "linear",
            "lineWidth": 1,
            "pointSize": 4,
            "scaleDistribution": {"type": "linear"},
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if stack else "none"},
            "thresholdsStyle": {"mode": threshold_style},
        },
        "mappings": [],
        "thresholds": steps,
        "unit": unit,
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    legend: dict[str, Any] = {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True}
    if legend_table:
        legend = {"calcs": ["mean", "max", "lastNotNull"], "displayMode": "table", "placement": "right",
                  "showLegend": True, "sortBy": "Max", "sortDesc": True}
    options = {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    return panel("timeseries", title, description, targets, w=w, h=h, defaults=defaults,
                 overrides=overrides, options=options)


def stat(title: str, description: str, targets: list[dict[str, Any]], unit: str, *, w: int, h: int = 8,
         steps: dict[str, Any] = GREEN, decimals: int | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"color": {"mode": "thresholds"}, "mappings": [], "thresholds": steps, "unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showPercentChange": False,
        "textMode": "value_and_name",
        "wideLayout": True,
    }
    return panel("stat", title, description, targets, w=w, h=h, defaults=defaults, options=options)


def gauge(title: str, description: str, targets: list[dict[str, Any]], unit: str, *, w: int, h: int = 8,
          steps: dict[str, Any], min_value: float, max_value: float) -> dict[str, Any]:
    defaults = {"color": {"mode": "thresholds"}, "mappings": [], "max": max_value, "min": min_value,
                "thresholds": steps, "unit": unit}
    options = {
        "minVizHeight": 75,
        "minVizWidth": 75,
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showThresholdLabels": False,
        "showThresholdMarkers": True,
        "sizing": "auto",
    }
    return panel("gauge", title, description, targets, w=w, h=h, defaults=defaults, options=options)


def heatmap(title: str, description: str, expr: str, unit: str, *, w: int, h: int = 8) -> dict[str, Any]:
    """A Prometheus histogram as a heatmap: one row per bucket (`le`), colour = observations per second."""
    defaults = {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                           "scaleDistribution": {"type": "linear"}}}
    options = {
        "calculate": False,
        "cellGap": 1,
        "color": {"exponent": 0.5, "fill": "dark-orange", "mode": "scheme", "reverse": False,
                  "scale": "exponential", "scheme": "Oranges", "steps": 64},
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
        "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
    }
    return panel("heatmap", title, description, [target(expr, "{{le}}", fmt="heatmap")], w=w, h=h,
                 defaults=defaults, options=options)


def state_timeline(title: str, description: str, targets: list[dict[str, Any]], mapping: dict[str, tuple[str, str]],
                   *, w: int, h: int = 8) -> dict[str, Any]:
    options_map = {value: {"color": color, "index": i, "text": text}
                   for i, (value, (text, color)) in enumerate(mapping.items())}
    defaults = {
        "color": {"mode": "thresholds"},
        "custom": {"fillOpacity": 80, "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                   "insertNulls": False, "lineWidth": 0, "spanNulls": False},
        "mappings": [{"options": options_map, "type": "value"}],
        "thresholds": GREEN,
    }
    options = {
        "alignValue": "left",
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "mergeValues": True,
        "rowHeight": 0.9,
        "showValue": "auto",
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return panel("state-timeline", title, description, targets, w=w, h=h, defaults=defaults, options=options)


# ------------------------------------------------------------------------------------------------ rows


def overview() -> list[dict[str, Any]]:
    return [
        stat("Active connections", "Live connections (protocol and lightweight endpoints) on the selected instances.",
             [target(f"sum({sel('stablews_connections_active')})", "active")], "short", w=4),
        stat("Ready instances",
             "Instances serving (stablews_ready = 1) against instances running. Fewer ready than running: "
             "some are starting or draining.",
             [target(f"sum({sel('stablews_ready')})", "ready"),
              target(f"count({sel('stablews_build_info')})", "running")], "short", w=4),
        stat("Broker connected",
             "Instances whose broker can serve (stablews_broker_connected = 1) against instances running. With a "
             "Redis broker, fewer: those instances cannot reach Redis; nothing they publish or relay gets through "
             "and they refuse new connections (runbook StablewsBrokerUnavailable).",
             [target(f"sum({sel('stablews_broker_connected')})", "connected"),
              target(f"count({sel('stablews_build_info')})", "running")], "short", w=4),
        timeseries("Connections by health",
                   "Live connections by health state as of the last sweep (docs/health.md): stale = no application "
                   "message for stale_connection_threshold, unhealthy = score below unhealthy_score. Unhealthy or "
                   "stale rising comes before drops.",
                   [target(f"sum by (health) ({sel('stablews_connections')})", "{{health}}")], "short", w=12,
                   stack=True,
                   overrides=[color_override("healthy", "green"), color_override("unhealthy", "orange"),
                              color_override("stale", "purple")]),
        heatmap("Health score distribution",
                "Scores of every live connection at each sweep (0-100; steps of 10, unhealthy_score is a bucket "
                "boundary). Mass moving down towards the unhealthy boundary comes before drops.",
                f"sum by (le) ({rate('stablews_connection_health_score_bucket')})", "short", w=8),
        timeseries("Opens and closes",
                   "Connections accepted and closed per second; abnormal = every cause but normal and shutdown. "
                   "Opens close to closes, both high: a reconnect storm.",
                   [target(sum_rate("stablews_connections_opened_total"), "opened"),
                    target(sum_rate("stablews_connections_closed_total"), "closed"),
                    target(sum_rate("stablews_connections_closed_total", ABNORMAL), "closed abnormally")],
                   "cps", w=8,
                   overrides=[color_override("opened", "blue"), color_override("closed", "green"),
                              color_override("closed abnormally", "red")]),
        timeseries("Closes by cause",
                   "Closes per second by cause (only causes with closes in the window are drawn). The diamonds are "
                   "exemplars: the trace id of a connection that closed with that cause; hover one and follow "
                   "the Tempo link to read that connection's trace.",
                   [target(f"{sum_rate('stablews_connections_closed_total', by='cause')} > 0", "{{cause}}",
                           exemplar=True)],
                   "cps", w=8, legend_table=True),
        timeseries("Lifetime of dropped connections",
                   "Median lifetime of connections by abnormal close cause. Drops clustering at one age point to a "
                   "proxy's idle timeout or a token lifetime. Exemplars link to the trace of one such connection.",
                   [target(f"{quantile(0.5, 'stablews_connection_duration_seconds', ABNORMAL, by='cause')} > 0",
                           "{{cause}}", exemplar=True)],
                   "s", w=8),
    ]


def heartbeats() -> list[dict[str, Any]]:
    rtt = "stablews_heartbeat_rtt_seconds"
    return [
        timeseries("Heartbeat RTT p50 / p95 / p99",
                   "Ping to pong round trip over all selected connections (ok and late pongs). Exemplars carry the "
                   "trace id of the connection behind a sample. p99 rising alone: the network; with the event loop "
                   "lag: the server.",
                   [target(quantile(0.5, rtt), "p50", exemplar=True),
                    target(quantile(0.95, rtt), "p95", exemplar=True),
                    target(quantile(0.99, rtt), "p99", exemplar=True)],
                   "s", w=12),
        timeseries("Missed heartbeat ratio",
                   "Pings not answered within heartbeat_timeout (late pongs included) over pings sent. Above a few "
                   "percent: network loss or stalled clients; max_missed_heartbeats in a row close the connection "
                   "(cause heartbeat_timeout).",
                   [target(f"{sum_rate('stablews_heartbeats_missed_total')} / "
                           f"{sum_rate('stablews_heartbeats_sent_total')}", "missed / sent")],
                   "percentunit", w=6, steps=thresholds((None, "green"), (0.01, "orange"), (0.05, "red")),
                   threshold_style="line"),
        timeseries("Heartbeats",
                   "Pings sent and missed per second.",
                   [target(sum_rate("stablews_heartbeats_sent_total"), "sent"),
                    target(sum_rate("stablews_heartbeats_missed_total"), "missed")],
                   "cps", w=6, overrides=[color_override("missed", "red")]),
    ]


def delivery() -> list[dict[str, Any]]:
    latency = "stablews_delivery_latency_seconds"
    return [
        timeseries("Messages per second",
                   "Protocol messages sent to clients (after coalescing into frames), received from clients, and "
                   "publications accepted by the broker (the input side of fan-out). Sent at 0 while connections "
                   "are up: the feed stopped.",
                   [target(sum_rate("stablews_messages_sent_total"), "sent"),
                    target(sum_rate("stablews_messages_received_total"), "received"),
                    target(sum_rate("stablews_published_messages_total"), "published")],
                   "cps", w=8),
        timeseries("Bytes per second",
                   "Payload bytes written to and read from clients.",
                   [target(sum_rate("stablews_sent_bytes_total"), "sent"),
                    target(sum_rate("stablews_received_bytes_total"), "received")],
                   "Bps", w=8),
        timeseries("Frames per second",
                   "WebSocket frames written per second, and messages per frame (right axis): the coalescing "
                   "factor. Near 1 under load means many small writes.",
                   [target(sum_rate("stablews_frames_sent_total"), "frames"),
                    target(f"{sum_rate('stablews_messages_sent_total')} / {sum_rate('stablews_frames_sent_total')}",
                           "messages per frame")],
                   "cps", w=8, overrides=[right_axis_override("messages per frame", "short")]),
        timeseries("Delivery latency p50 / p99",
                   "From the oldest message queued in a write pass to the end of that pass: how long messages wait "
                   "for the event loop. p99 above ~100 ms: the process is saturated. Exemplars link to the trace of "
                   "a connection served by a slow pass.",
                   [target(quantile(0.5, latency), "p50", exemplar=True),
                    target(quantile(0.99, latency), "p99", exemplar=True)],
                   "s", w=10, steps=thresholds((None, "green"), (0.1, "red")), threshold_style="line"),
        heatmap("Send queue depth",
                "Send queue of every live connection at each sweep; the top finite bucket is send_queue_max, where "
                "a connection is closed 4003 (slow consumer). Mass in the upper buckets: slow consumers coming.",
                f"sum by (le) ({rate('stablews_send_queue_depth_bucket')})", "short", w=7),
        timeseries("Slow-consumer closes",
                   "Connections closed 4003 because their send queue reached send_queue_max. Exemplars link to the "
                   "trace of one of them.",
                   [target(sum_rate("stablews_connections_closed_total", 'cause="slow_consumer"'), "slow_consumer",
                           exemplar=True)],
                   "cps", w=7, overrides=[color_override("slow_consumer", "red")]),
    ]


def recovery() -> list[dict[str, Any]]:
    recovered = sum_rate("stablews_resume_total", 'result="recovered"')
    return [
        timeseries("Resume recovered ratio",
                   "Resumes (subscribe with since, hello.resume) that history covered, over all resumes asked. "
                   "Falling: history too short (history_size, history_ttl) or restarts.",
                   [target(f"{recovered} / {sum_rate('stablews_resume_total')}", "recovered")],
                   "percentunit", w=6, max_value=1,
                   steps=thresholds((None, "red"), (0.9, "orange"), (0.99, "green")), threshold_style="line"),
        timeseries("Replayed messages",
                   "Messages replayed per second by recovered resumes: the cost of reconnects.",
                   [target(sum_rate("stablews_replayed_messages_total"), "replayed")], "cps", w=6),
        timeseries("Upstream reconnects",
                   "Relay connection attempts per second by upstream and outcome (the first attempt included). "
                   "Failures climbing: the upstream is down or refuses us.",
                   [target(sum_rate("stablews_upstream_reconnect_attempts_total", by="upstream, outcome"),
                           "{{upstream}} {{outcome}}")],
                   "cps", w=12),
        state_timeline("Circuit breaker states",
                       "Each relay's circuit breaker, and the Redis link's (target broker): closed (attempts "
                       "allowed), half-open (one trial attempt), open (no attempts until the breaker's timeout). "
                       "The worst state over the selected instances.",
                       [target(f"max by (target) ({sel('stablews_circuit_breaker_state')})", "{{target}}")],
                       {"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")}, w=12),
        state_timeline("Upstreams connected",
                       "Whether the relay to each upstream is connected, on every selected instance. Disconnected: "
                       "the local channels it feeds stop moving.",
                       [target(f"min by (upstream) ({sel('stablews_upstream_connected')})", "{{upstream}}")],
                       {"0": ("disconnected", "red"), "1": ("connected", "green")}, w=12),
        timeseries("Broker reconnects",
                   "Attempts of the Redis broker's link per second, by outcome (the first connection included; "
                   "always 0 with the memory broker). Failures climbing: Redis down, or refusing us.",
                   [target(sum_rate("stablews_broker_reconnect_attempts_total", by="outcome"), "{{outcome}}"),
                    target(sum_rate("stablews_broker_publish_failures_total"), "publishes refused")],
                   "cps", w=12,
                   overrides=[color_override("success", "green"), color_override("failure", "red"),
                              color_override("publishes refused", "orange")]),
        timeseries("Stream resets",
                   "Times the subscribers of a channel were told to resync, by reason: reset (a relayed source "
                   "lost continuity), new_epoch (the broker lost the history), gap (an instance read a stream "
                   "after Redis trimmed it). new_epoch and gap: runbook StablewsStreamHistoryLost.",
                   [target(f"sum by (reason) (increase({sel('stablews_stream_resets_total')}[{RATE}]))",
                           "{{reason}}")],
                   "short", w=12, stack=True),
    ]


def runtime() -> list[dict[str, Any]]:
    return [
        timeseries("Event loop lag p99",
                   "How late the lag monitor's 500 ms timer ran, per instance. Lag delays every heartbeat and every "
                   "write of the process; p99 above ~100 ms: CPU-starved or something blocks the loop.",
                   [target(quantile(0.99, "stablews_event_loop_lag_seconds", by="instance"), "{{instance}}")],
                   "s", w=6, steps=thresholds((None, "green"), (0.1, "red")), threshold_style="line"),
        timeseries("CPU",
                   "CPU time per second per instance (1 = one core). The event loop runs on one core: near 1, the "
                   "process is saturated whatever the host has left.",
                   [target(f"sum by (instance) ({rate('process_cpu_seconds_total')})", "{{instance}}")],
                   "percentunit", w=6, steps=thresholds((None, "green"), (0.8, "red")), threshold_style="line"),
        timeseries("Memory",
                   "Resident memory per instance. Growth at a steady connection count: a leak; each idle "
                   "connection costs some tens of KiB.",
                   [target(f"sum by (instance) ({sel('process_resident_memory_bytes')})", "{{instance}}")],
                   "bytes", w=6),
        timeseries("File descriptors",
                   "Open descriptors per instance against the limit (dashed). Each connection holds one: at the "
                   "limit, new connections are refused.",
                   [target(f"sum by (instance) ({sel('process_open_fds')})", "{{instance}} open"),
                    target(f"sum by (instance) ({sel('process_max_fds')})", "{{instance}} limit")],
                   "short", w=6, overrides=[dashed_override(".* limit")]),
    ]


def slos() -> list[dict[str, Any]]:
    gauges, burns = [], []
    for key, name, objective in SLOS:
        gauges.append(gauge(
            f"{name}: error budget left",
            f"Share of the 30-day error budget of the {name} (objective {objective:.1%}) not yet spent: 1 untouched, "
            f"0 spent. The worst of the selected instances (stablews:slo_{key}:error_budget_remaining).",
            [target(f"min({sel(f'stablews:slo_{key}:error_budget_remaining')})", "budget left")],
            "percentunit", w=4,
            steps=thresholds((None, "red"), (0.25, "orange"), (0.5, "green")), min_value=0, max_value=1))
        budget = f"scalar(1 - stablews:slo_{key}:objective)"
        burns.append(timeseries(
            f"{name}: burn rates",
            "Error ratio over each window divided by the error budget (1 - objective), the worst of the selected "
            "instances. 1 spends the budget in exactly 30 days; the alerts page at 14.4 over 1 h (with 5 m) and "
            "at 6 over 6 h (with 30 m), and open a ticket at 3 over 1 d and at 1 over 3 d.",
            [target(f"max({sel(f'stablews:slo_{key}_errors:ratio_rate{window}')}) / {budget}", window)
             for window in BURN_WINDOWS],
            "short", w=8, steps=thresholds((None, "green"), (1, "yellow"), (6, "orange"), (14.4, "red")),
            threshold_style="line"))
    return [*gauges, *burns]


def baselines() -> list[dict[str, Any]]:
    panels = []
    items = (
        ("Heartbeat RTT p99 against baseline", "stablews:heartbeat_rtt_seconds:p99_5m", "s",
         "Heartbeat RTT p99 over 5 minutes"),
        ("Delivery latency p99 against baseline", "stablews:delivery_latency_seconds:p99_5m", "s",
         "Delivery latency p99 over 5 minutes"),
        ("Abnormal close rate against baseline", "stablews:abnormal_closes:ratio_rate5m", "percentunit",
         "Abnormal closes over all closes over 5 minutes"),
    )
    k = BASELINE_SIGMAS
    for title, rule, unit, what in items:
        avg, dev = f"{rule}:avg_1w", f"{rule}:stddev_1w"
        panels.append(timeseries(
            title,
            f"{what} (current), against its learned baseline: the average of the last week, and a band of "
            f"{k} standard deviations around it. Current outside the band: behaviour the last week has not seen.",
            [target(f"max({sel(rule)})", "current"),
             target(f"max({sel(avg)})", "baseline"),
             target(f"max({sel(avg)} + {k} * {sel(dev)})", f"baseline + {k} sd"),
             target(f"clamp_min(max({sel(avg)} - {k} * {sel(dev)}), 0)", f"baseline - {k} sd")],
            unit, w=8,
            overrides=[
                color_override("current", "blue"),
                color_override("baseline", "green"),
                {"matcher": {"id": "byRegexp", "options": "baseline [+-].*"},
                 "properties": [{"id": "color", "value": {"fixedColor": "green", "mode": "fixed"}},
                                {"id": "custom.lineWidth", "value": 0}, {"id": "custom.fillOpacity", "value": 15}]},
                {"matcher": {"id": "byName", "options": f"baseline + {k} sd"},
                 "properties": [{"id": "custom.fillBelowTo", "value": f"baseline - {k} sd"}]},
            ]))
    return panels


ROW_PANELS = {
    "Overview": overview,
    "Heartbeats": heartbeats,
    "Delivery": delivery,
    "Recovery": recovery,
    "Runtime": runtime,
    "SLOs": slos,
    "Baselines": baselines,
}


def layout(rows: Iterable[tuple[str, list[dict[str, Any]]]]) -> Iterator[dict[str, Any]]:
    """Rows (expanded) and their panels on Grafana's 24-column grid, left to right, wrapping; ids in order."""
    y, ids = 0, iter(range(1, 1000))
    for title, panels in rows:
        yield {"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": next(ids), "panels": [],
               "title": title, "type": "row"}
        y += 1
        x, line_height = 0, 0
        for p in panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, line_height = 0, y + line_height, 0
            yield {**p, "gridPos": {"h": h, "w": w, "x": x, "y": y}, "id": next(ids)}
            x += w
            line_height = max(line_height, h)
        y += line_height


# ------------------------------------------------------------------------------------------- dashboard


def variables() -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, filters: list[dict[str, str]]) -> dict[str, Any]:
        matchers = ",".join(f'{f["label"]}{f["op"]}"{f["value"]}"' for f in filters)
        query = f"label_values(stablews_build_info{'{' + matchers + '}' if matchers else ''}, {name})"
        # The query string is what Grafana runs; qryType, metric, label and labelFilters fill its variable editor.
        editor = {"qryType": 1, "query": query, "metric": "stablews_build_info", "label": name,
                  "labelFilters": filters, "refId": "PrometheusVariableQueryEditor-VariableQuery"}
        return {
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "datasource": DS,
            "definition": query,
            "hide": 0,
            "includeAll": True,
            "label": label,
            "multi": True,
            "name": name,
            "options": [],
            "query": editor,
            "refresh": 2,
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        }

    return [
        {
            "current": {"selected": False, "text": "Prometheus", "value": PROMETHEUS_UID},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
            "type": "datasource",
        },
        query_variable("job", "Job", []),
        query_variable("instance", "Instance", [{"label": "job", "op": "=~", "value": "$job"}]),
    ]


def annotations() -> list[dict[str, Any]]:
    return [
        {
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        },
        {
            "datasource": DS,
            "enable": True,
            "expr": f"changes({sel('process_start_time_seconds')}[{RATE}]) > 0",
            "iconColor": "orange",
            "name": "Restarts",
            "step": "1m",
            "textFormat": "{{instance}} restarted",
            "titleFormat": "Restart",
            "useValueForTime": False,
        },
    ]


def build_dashboard() -> dict[str, Any]:
    return {
        "annotations": {"list": annotations()},
        "description": "stablews: connections, heartbeats, delivery, recovery, runtime, SLOs and baselines. "
                       "Generated by dashboards/generate.py; docs/dashboard.md explains every panel.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": list(layout((title, ROW_PANELS[title]()) for title in ROWS)),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["stablews", "websocket"],
        "templating": {"list": variables()},
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


# ---------------------------------------------------------------------------------------- provisioning

# Trace → metrics: from a span, Tempo's "Related metrics" menu runs these with `$__tags` replaced by the
# span's tags mapped to labels (service.name → job).
TRACES_TO_METRICS_QUERIES = (
    ("Closes by cause", "sum by (cause) (rate(stablews_connections_closed_total{$__tags}[5m]))"),
    ("Heartbeat RTT p99",
     "histogram_quantile(0.99, sum by (le) (rate(stablews_heartbeat_rtt_seconds_bucket{$__tags}[5m])))"),
    ("Delivery latency p99",
     "histogram_quantile(0.99, sum by (le) (rate(stablews_delivery_latency_seconds_bucket{$__tags}[5m])))"),
    ("Active connections", "sum(stablews_connections_active{$__tags})"),
)


def build_datasources() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "type": "prometheus",
                "uid": PROMETHEUS_UID,
                "access": "proxy",
                "url": "http://prometheus:9090",
                "isDefault": True,
                "editable": False,
                "jsonData": {
                    "httpMethod": "POST",
                    "prometheusType": "Prometheus",
                    "timeInterval": "15s",
                    "exemplarTraceIdDestinations": [
                        # No urlDisplayLabel: the link reads "Query with Tempo", as the docs say.
                        {"name": "trace_id", "datasourceUid": TEMPO_UID},
                    ],
                },
            },
            {
                "name": "Tempo",
                "type": "tempo",
                "uid": TEMPO_UID,
                "access": "proxy",
                "url": "http://tempo:3200",
                "editable": False,
                "jsonData": {
                    "tracesToMetrics": {
                        "datasourceUid": PROMETHEUS_UID,
                        "spanStartTimeShift": "-15m",
                        "spanEndTimeShift": "15m",
                        "tags": [{"key": "service.name", "value": "job"}],
                        "queries": [{"name": name, "query": query} for name, query in TRACES_TO_METRICS_QUERIES],
                    },
                    "serviceMap": {"datasourceUid": PROMETHEUS_UID},
                    "nodeGraph": {"enabled": True},
                    "search": {"hide": False},
                },
            },
        ],
    }


def build_dashboard_provider() -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "stablews",
                "orgId": 1,
                "folder": "stablews",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": GRAFANA_DASHBOARDS_PATH, "foldersFromFilesStructure": False},
            }
        ],
    }


PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")  # strings YAML reads back as the same string, unquoted
YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def yaml_scalar(value: Any) -> str:
    """A YAML scalar. Strings are double-quoted JSON strings (a subset of YAML's double-quoted style), with `$`
    doubled: Grafana expands `$VAR` and `${VAR}` from the environment in provisioning files, `$$` is a `$`."""
    if isinstance(value, str):
        if PLAIN.fullmatch(value) and value.lower() not in YAML_WORDS:
            return value
        return json.dumps(value.replace("$", "$$"), ensure_ascii=False)
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return json.dumps(value)
    raise TypeError(f"not a YAML scalar: {value!r}")


def yaml_lines(value: Any, indent: int = 0) -> Iterator[str]:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                yield f"{pad}{key}:"
                yield from yaml_lines(item, indent + 2)
            elif isinstance(item, dict | list):
                yield f"{pad}{key}: {json.dumps(item)}"  # {} or []
            else:
                yield f"{pad}{key}: {yaml_scalar(item)}"
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                first, *rest = yaml_lines(item, indent + 2)
                yield f"{pad}- {first.lstrip()}"
                yield from rest
            else:
                yield f"{pad}- {yaml_scalar(item)}"
    else:
        yield pad + yaml_scalar(value)


def to_yaml(header: str, value: dict[str, Any]) -> str:
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    return comments + "\n".join(yaml_lines(value)) + "\n"


def render() -> dict[Path, str]:
    generated = "Generated by dashboards/generate.py: edit that script, then run it (docs/dashboard.md)."
    return {
        DASHBOARD_FILE: json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n",
        PROVIDER_FILE: to_yaml(
            f"""{generated}
Grafana loads every dashboard JSON under {GRAFANA_DASHBOARDS_PATH} (the repository's dashboards/ directory,
mounted read-only) into the folder "stablews". Mount this directory as /etc/grafana/provisioning/dashboards.""",
            build_dashboard_provider(),
        ),
        DATASOURCES_FILE: to_yaml(
            f"""{generated}
Prometheus (uid {PROMETHEUS_UID}): exemplars' trace_id label links to Tempo. Prometheus must run with
--enable-feature=exemplar-storage, and scrape every 15s (timeInterval, the floor of $__rate_interval).
Tempo (uid {TEMPO_UID}): a span's "Related metrics" queries Prometheus (service.name -> job), and the service
map reads Tempo's metrics-generator series from Prometheus. Mount as /etc/grafana/provisioning/datasources.""",
            build_datasources(),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
