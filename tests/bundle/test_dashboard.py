"""dashboards/: the committed files are what dashboards/generate.py makes; the dashboard has the rows, panels
and variables the issue asks for, every panel on the `datasource` variable; every query parses in a real
Prometheus (promtool) once Grafana's variables are substituted; and every metric a query names is in a real
exposition of the service or is a recording rule in alerts/."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from stablews.protocol import NORMAL_CAUSES

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
ALERTS = ROOT / "alerts"
DOC = ROOT / "docs" / "dashboard.md"

DS = {"type": "prometheus", "uid": "${datasource}"}
SCOPE = ('job=~"$job"', 'instance=~"$instance"')
ROWS = ["Overview", "Heartbeats", "Delivery", "Recovery", "Runtime", "SLOs", "Baselines"]
# What the issue names in each row, by panel title.
REQUIRED = {
    "Overview": ["Active connections", "Connections by health", "Opens and closes", "Closes by cause",
                 "Health score distribution"],
    "Heartbeats": ["Heartbeat RTT p50 / p95 / p99", "Missed heartbeat ratio"],
    "Delivery": ["Messages per second", "Bytes per second", "Frames per second", "Delivery latency p50 / p99",
                 "Send queue depth", "Slow-consumer closes"],
    "Recovery": ["Resume recovered ratio", "Replayed messages", "Upstream reconnects", "Circuit breaker states"],
    "Runtime": ["Event loop lag p99", "CPU", "Memory", "File descriptors"],
    "SLOs": ["Heartbeat SLO: error budget left", "Delivery latency SLO: error budget left",
             "Heartbeat SLO: burn rates", "Delivery latency SLO: burn rates"],
    "Baselines": ["Heartbeat RTT p99 against baseline", "Delivery latency p99 against baseline",
                  "Abnormal close rate against baseline"],
}
# Panels whose points carry exemplars: they must query the raw series (recording rules have no exemplars).
EXEMPLAR_PANELS = ["Heartbeat RTT p50 / p95 / p99", "Delivery latency p50 / p99", "Closes by cause",
                   "Slow-consumer closes"]
# Recording rules without job/instance labels (one value for all): the only names queried without the scope.
UNSCOPED = {"stablews:slo_heartbeat:objective", "stablews:slo_delivery_latency:objective"}

# Grafana's variables, as Grafana substitutes them: All is the variable's allValue `.*`, several values a regex.
SUBSTITUTIONS = [
    {"$job": ".*", "$instance": ".*", "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
     "$__tags": 'job="stablews"'},
    {"$job": "(stablews|stablews-eu)", "$instance": "(10.0.0.1:8000|10.0.0.2:8000)", "$__rate_interval": "1m",
     "$__interval": "15s", "$__range": "1h", "$__tags": ""},
]

PROMQL_FUNCTIONS = {
    # aggregations
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    # functions (Prometheus 2.42)
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time", "minute", "month",
    "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar",
    "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time",
    "tan", "tanh", "time", "timestamp", "vector", "year",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "offset", "atan2", "inf", "nan"}
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
NOT_AFTER = r"(?<![A-Za-z0-9_:.$])"  # not inside a longer name, a number (1e-9) or a variable


# ------------------------------------------------------------------------------------------------ helpers


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stablews_dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dashboard() -> dict[str, Any]:
    return json.loads((DASHBOARDS / "stablews.json").read_text())


def rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row title → its panels, in the order of the dashboard (expanded rows: the panels follow their row)."""
    out: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for p in board["panels"]:
        if p["type"] == "row":
            current = out.setdefault(p["title"], [])
            current.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            assert current is not None, f"panel {p['title']!r} before the first row"
            current.append(p)
    return out


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for row in rows(board).values() for p in row]


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, its annotations and variables, and the trace-to-metrics
    queries of the Tempo data source."""
    for p in panels(board):
        for t in p["targets"]:
            yield f"panel {p['title']!r} target {t['refId']}", t["expr"]
    for a in board["annotations"]["list"]:
        if "expr" in a:
            yield f"annotation {a['name']!r}", a["expr"]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            # label_values(selector, label): the selector is PromQL.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"]["query"])
            assert match, v["query"]
            yield f"variable {v['name']!r}", match.group(1)
    for name, query in generator().TRACES_TO_METRICS_QUERIES:
        yield f"Tempo trace-to-metrics query {name!r}", query


def substitute(expr: str, values: dict[str, str]) -> str:
    for variable in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range …
        expr = expr.replace("${" + variable[1:] + "}", values[variable]).replace(variable, values[variable])
    assert "$" not in expr, f"a variable is left: {expr}"
    return expr


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, ranges, label
    lists, numbers, keywords and function calls are taken out. An unknown function fails."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", "", text)
    names = set()
    for match in re.finditer(NOT_AFTER + NAME, text):
        word = match.group()
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if text[match.end():].lstrip().startswith("("):
            assert word in PROMQL_FUNCTIONS, f"{word}() is not a PromQL function: {expr}"
            continue
        names.add(word)
    return names


def prefixed_names(expr: str) -> set[str]:
    """A second, independent look: every token that looks like one of the project's metrics."""
    return set(re.findall(NOT_AFTER + r"(?:stablews_|stablews:|process_)[A-Za-z0-9_:]*", strip_strings(expr)))


def recording_rules() -> set[str]:
    files = sorted([*ALERTS.glob("*.yml"), *ALERTS.glob("*.yaml")])
    names = set()
    for path in files:
        names.update(re.findall(r"^\s*(?:-\s*)?record:\s*[\"']?(" + NAME + ")", path.read_text(), re.MULTILINE))
    return names


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: apt-get install prometheus", pytrace=False)
    return path


# -------------------------------------------------------------------------------------------------- tests


def test_the_committed_files_are_what_generate_py_makes():
    stale = [str(path.relative_to(ROOT)) for path, text in generator().render().items()
             if not path.exists() or path.read_text() != text]
    assert stale == [], "run: python dashboards/generate.py"
    check = subprocess.run([sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_dashboard_is_provisionable_with_the_variables():
    board = dashboard()
    assert board["uid"] == "stablews"
    assert board["schemaVersion"] >= 39
    assert "__inputs" not in board and "__requires" not in board and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["datasource"] == DS, name
        assert v["query"]["query"].startswith("label_values(stablews_build_info"), v["query"]
        assert v["query"]["query"].endswith(f", {name})"), v["query"]
    assert '$job' in variables["instance"]["query"]["query"]  # instances of the selected jobs


def test_rows_in_order_with_the_panels_of_the_issue_all_on_the_datasource_variable():
    board = dashboard()
    by_row = rows(board)
    assert list(by_row) == ROWS
    for row, titles in REQUIRED.items():
        present = [p["title"] for p in by_row[row]]
        assert [t for t in titles if t not in present] == [], (row, present)
    everything = panels(board)
    for p in everything:
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, (p["title"], t["refId"])
    for a in board["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"] == DS, a["name"]
    ids = [p["id"] for p in board["panels"]] + [c["id"] for p in board["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in everything]
    assert len(titles) == len(set(titles))


def test_panels_fit_the_grid_without_overlapping():
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_what_the_panels_show():
    by_title = {p["title"]: p for p in panels(dashboard())}

    def exprs(title: str) -> list[str]:
        return [t["expr"] for t in by_title[title]["targets"]]

    # Exemplar panels: exemplars on, raw histograms and counters (no recording rule).
    for title in EXEMPLAR_PANELS:
        for t in by_title[title]["targets"]:
            assert t["exemplar"] is True, (title, t["refId"])
            assert "stablews:" not in t["expr"] and "$__rate_interval" in t["expr"], (title, t["expr"])
    rtt = exprs("Heartbeat RTT p50 / p95 / p99")
    for q, expr in zip(("0.5", "0.95", "0.99"), rtt, strict=True):
        assert expr.startswith(f"histogram_quantile({q},") and "stablews_heartbeat_rtt_seconds_bucket" in expr
    assert any("histogram_quantile(0.99," in e and "stablews_delivery_latency_seconds_bucket" in e
               for e in exprs("Delivery latency p50 / p99"))
    assert "by (cause)" in exprs("Closes by cause")[0]
    normal = "|".join(sorted(cause.value for cause in NORMAL_CAUSES))  # abnormal: every cause but these
    abnormal = generator().ABNORMAL
    assert abnormal == f'cause!~"{normal}"'
    assert 'cause="slow_consumer"' in exprs("Slow-consumer closes")[0]
    assert "by (health)" in exprs("Connections by health")[0]
    for title, metric in (("Health score distribution", "stablews_connection_health_score_bucket"),
                          ("Send queue depth", "stablews_send_queue_depth_bucket")):
        assert by_title[title]["type"] == "heatmap"
        assert by_title[title]["targets"][0]["format"] == "heatmap" and metric in exprs(title)[0]
    assert "stablews_heartbeats_missed_total" in exprs("Missed heartbeat ratio")[0]
    breaker = by_title["Circuit breaker states"]
    assert breaker["type"] == "state-timeline"
    assert set(breaker["fieldConfig"]["defaults"]["mappings"][0]["options"]) == {"0", "1", "2"}
    runtime = {"Event loop lag p99": "stablews_event_loop_lag_seconds_bucket", "CPU": "process_cpu_seconds_total",
               "Memory": "process_resident_memory_bytes", "File descriptors": "process_open_fds"}
    for title, metric in runtime.items():
        assert any(metric in e for e in exprs(title)), title
    for slo in ("heartbeat", "delivery_latency"):
        name = "Heartbeat SLO" if slo == "heartbeat" else "Delivery latency SLO"
        assert f"stablews:slo_{slo}:error_budget_remaining" in exprs(f"{name}: error budget left")[0]
        burns = exprs(f"{name}: burn rates")
        assert all(f"stablews:slo_{slo}_errors:ratio_rate" in e for e in burns) and len(burns) >= 2
    for title, rule in (("Heartbeat RTT p99 against baseline", "stablews:heartbeat_rtt_seconds:p99_5m"),
                        ("Delivery latency p99 against baseline", "stablews:delivery_latency_seconds:p99_5m"),
                        ("Abnormal close rate against baseline", "stablews:abnormal_closes:ratio_rate5m")):
        names = set().union(*(metric_names(e) for e in exprs(title)))
        assert {rule, f"{rule}:avg_1w", f"{rule}:stddev_1w"} <= names, (title, names)


def test_every_query_is_scoped_by_job_and_instance():
    for where, expr in queries(dashboard()):
        if where.startswith(("Tempo", "variable")):
            continue
        for name in metric_names(expr) - UNSCOPED:
            for match in re.finditer(NOT_AFTER + re.escape(name) + r"(?![A-Za-z0-9_:])(\{[^}]*\})?", expr):
                matchers = match.group(1) or ""
                assert all(s in matchers for s in SCOPE), f"{where}: {name} without the job/instance scope: {expr}"


def test_every_panel_is_explained_in_the_docs():
    text = DOC.read_text()
    board = dashboard()
    missing = [p["title"] for p in board["panels"] if f"**{p['title']}**" not in text and p["type"] != "row"]
    missing += [title for title in rows(board) if f"## {title}" not in text]
    assert missing == [], "not in docs/dashboard.md: " + ", ".join(missing)


def test_the_slo_objectives_are_those_of_the_recording_rules():
    """The panels' descriptions quote the objectives; the burn rates divide by the rules' own objective."""
    text = "\n".join(p.read_text() for p in sorted(ALERTS.glob("*.yml")))
    for key, _name, objective in generator().SLOS:
        match = re.search(rf"record:\s*stablews:slo_{key}:objective\s+expr:\s*vector\(([0-9.]+)\)", text)
        assert match, f"stablews:slo_{key}:objective is not a recording rule in alerts/"
        assert float(match.group(1)) == objective, key


def test_every_query_parses_in_prometheus(tmp_path):
    """promtool parses (and type-checks) PromQL in recording rules: every query becomes one, once per way
    Grafana fills in the variables."""
    promtool = tool("promtool")
    board = dashboard()
    found = list(queries(board))
    assert len(found) > 40
    rules, where_of = [], {}
    for n, values in enumerate(SUBSTITUTIONS):
        for i, (where, expr) in enumerate(found):
            record = f"dashboard:query_{n}_{i}"
            where_of[record] = f"{where}: {substitute(expr, values)}"
            rules.append(f"      - record: {record}\n        expr: {json.dumps(substitute(expr, values))}\n")
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("groups:\n  - name: dashboard\n    rules:\n" + "".join(rules))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    failing = [f"{where_of[r]}" for r in re.findall(r"dashboard:query_\d+_\d+", check.stdout + check.stderr)
               if r in where_of]
    assert check.returncode == 0, "\n".join(failing) or check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout, check.stdout


def test_the_name_extraction_finds_what_a_query_selects():
    expr = ('histogram_quantile(0.99, sum by (le, cause) (rate(a_bucket{cause!~"normal|shutdown",job=~"$job"}'
            '[$__rate_interval]))) / on (job) group_left (x) scalar(1 - b:objective) + clamp_min(c offset 1h, 1e-9)'
            ' > bool 0 and d')
    assert metric_names(expr) == {"a_bucket", "b:objective", "c", "d"}
    assert metric_names('sum(rate(stablews_x_total{cause="process_y"}[5m]))') == {"stablews_x_total"}
    with pytest.raises(AssertionError):
        metric_names("not_a_function(x)")


def exposition_names(start_server) -> set[str]:
    """Sample names of a real scrape of this checkout's server, with an upstream configured (nothing listens
    there) so that the relay and circuit breaker families have series."""
    # This checkout's code, whatever `pip install -e` points at.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "service"), os.environ.get("PYTHONPATH")]))
    server = start_server("--upstreams", "json+ws://127.0.0.1:9/feed#relayed", "--initial-delay", "0.1s",
                          env={"PYTHONPATH": pythonpath})
    deadline = time.monotonic() + 20
    while True:
        body = httpx.get(server.http + "/metrics", timeout=10).text
        names = {line.split("{")[0].split()[0] for line in body.splitlines() if line and not line.startswith("#")}
        if {"stablews_circuit_breaker_state", "process_open_fds"} <= names or time.monotonic() > deadline:
            return names
        time.sleep(0.2)


def test_every_metric_a_query_names_is_exposed_or_a_recording_rule(start_server):
    exposed = exposition_names(start_server)
    assert "stablews_heartbeat_rtt_seconds_bucket" in exposed and "process_cpu_seconds_total" in exposed
    records = recording_rules()
    assert records, f"no recording rules in {ALERTS.relative_to(ROOT)}/*.yml"
    unknown = []
    for where, expr in queries(dashboard()):
        names = metric_names(expr)
        assert names, f"{where} names no metric: {expr}"
        assert prefixed_names(expr) <= names, (where, expr)
        unknown += [f"{where}: {name}" for name in sorted(names - exposed - records)]
    assert unknown == [], "neither exposed by the service nor recorded in alerts/:\n" + "\n".join(unknown)
