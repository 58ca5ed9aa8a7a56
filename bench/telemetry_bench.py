"""Telemetry benchmark: what metrics and tracing cost stablews, telemetry ON against OFF.

Every figure is a ratio (or a difference) against a baseline measured in the same
invocation on the same machine: `stablews serve` with telemetry OFF and ON, the
runs of each measurement interleaved (off, on, then on, off, ...) so both see the
same machine conditions.

- OFF: `stablews serve --metrics-enabled false`, no OTEL_* variable (so no exporter);
- ON: `stablews serve --metrics-enabled true`, GET /metrics scraped every
  `--scrape-interval` seconds (1 s) while the server runs, with
  `Accept: application/openmetrics-text; version=1.0.0`; and tracing exported over
  OTLP/HTTP to a receiver this script starts (a separate process, this script with
  --receiver): OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>,
  OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf, OTEL_SERVICE_NAME=stablews-bench.
  The receiver answers every POST with 200 and counts requests and bytes per path;
  it decodes the trace exports (to count spans by name) only when asked for its
  counts, after each run, so decoding costs nothing during a measurement.

Both variants: every OTEL_* and STABLEWS_* variable removed from the server's
environment, `--demo-feed false`, and `--rate-limit 0` (the publisher pipelines
more publications than the default burst of 1000 allows).

The measurements are core_bench's (bench/core_bench.py, its client workers too):

1. Idle memory per connection: RSS after a warm-up, then with `--connections`
   subscribed idle connections, settled; (after - before) / N.
2. Fan-out: one publisher sends `--messages` messages to `--subscribers`
   subscribers; delivered messages/s, every subscriber checked for offsets 1..N.

Each runs `--repeat` times (a fresh server and clients each time); the table shows
the medians, the ratio on/off and the difference. Goals: fan-out throughput on/off
>= 0.95 (at most 5 % cost), idle memory at most 2 KiB (2,048 bytes) more per
connection. The run also reports the scrapes (how many, during each fan-out) and
what the OTLP receiver got; if it got nothing (tracing not exporting, e.g. the
tracer still a placeholder) it says so, and the run still completes.

    python bench/telemetry_bench.py            # 5,000 connections, 1,000 subscribers x 1,000 msgs, 3 runs
    python bench/telemetry_bench.py --quick    # 1,000 connections, 200 subscribers x 1,000 msgs, 1 run (~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil

import core_bench
from benchlib import (
    BENCH_DIR,
    HOST,
    BenchError,
    Json,
    dumps,
    emit,
    http_get,
    http_get_json,
    raise_nofile_limit,
    run_bench,
    service_revision,
    text_table,
)
from core_bench import Options, kib, rate

SCRIPT = Path(__file__).resolve()
DEFAULT_OUTPUT = BENCH_DIR / "out" / "telemetry_bench.json"

VARIANTS = ("off", "on")
OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"
SCRAPE_TIMEOUT = 10.0  # seconds, Prometheus's default scrape_timeout; a slower scrape counts as failed
SERVICE_NAME = "stablews-bench"
COMMON_FLAGS = ("--rate-limit", "0")
THROUGHPUT_GOAL = 0.95  # on/off delivered messages/s, at least
MEMORY_GOAL_BYTES = 2048  # on - off bytes per idle connection, at most
RECEIVER_KEEP_BYTES = 256 * 1024 * 1024  # trace bodies kept for decoding between two counts, at most


# =================================================================== the OTLP/HTTP receiver (--receiver)
#
# A separate process: prints {"event": "listening", "port": N}, answers every POST with
# 200 (an empty protobuf message: a valid Export*ServiceResponse), counts requests and
# bytes per path, and on GET /take returns what it got since the last /take (trace
# exports decoded then, if opentelemetry-proto is installed) and starts again. Exits
# when its stdin ends (the parent is gone).


class ReceiverState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.paths: dict[str, dict[str, int]] = {}
        self.content_types: Counter[str] = Counter()
        self.content_encodings: Counter[str] = Counter()
        self.bodies: list[tuple[bytes, str]] = []  # trace exports not yet decoded, with their content-encoding
        self.kept = 0
        self.not_kept = 0

    def add(self, path: str, body: bytes, content_type: str, encoding: str) -> None:
        with self.lock:
            entry = self.paths.setdefault(path, {"requests": 0, "bytes": 0})
            entry["requests"] += 1
            entry["bytes"] += len(body)
            if path == "/v1/traces":
                self.content_types[content_type] += 1
                self.content_encodings[encoding or "identity"] += 1
                if self.kept + len(body) <= RECEIVER_KEEP_BYTES:
                    self.bodies.append((body, encoding))
                    self.kept += len(body)
                else:
                    self.not_kept += 1

    def take(self) -> Json:
        with self.lock:
            paths, bodies, not_kept = self.paths, self.bodies, self.not_kept
            types, encodings = self.content_types, self.content_encodings
            self.reset()
        traces = paths.get("/v1/traces", {"requests": 0, "bytes": 0})
        return {
            "paths": paths,
            "traces": {
                **traces,
                "content_types": dict(types),
                "content_encodings": dict(encodings),
                **decode_traces(bodies, not_kept),
            },
        }


def decode_traces(bodies: Sequence[tuple[bytes, str]], not_kept: int) -> Json:
    """Spans by name and the service names of OTLP/protobuf trace exports."""
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    except ImportError:
        return {"decoded": "no (opentelemetry-proto is not installed)"}
    names: Counter[str] = Counter()
    services: set[str] = set()
    errors = 0
    for body, encoding in bodies:
        try:
            raw = gzip.decompress(body) if encoding == "gzip" else body
            request = ExportTraceServiceRequest()
            request.ParseFromString(raw)
        except Exception:  # a body that is not what it should be: counted, not fatal
            errors += 1
            continue
        for resource_spans in request.resource_spans:
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.name":
                    services.add(attr.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    names[span.name] += 1
    return {
        "decoded": "yes" if not not_kept else f"partly ({not_kept} requests over the keep limit)",
        "decode_errors": errors,
        "spans": sum(names.values()),
        "span_names": dict(names.most_common()),
        "service_names": sorted(services),
    }


class ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as exporters expect
    server: ReceiverHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        body = self._body()
        self.server.state.add(
            path, body, self.headers.get("Content-Type", ""), self.headers.get("Content-Encoding", "").lower()
        )
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path == "/take":
            self._answer(200, dumps(self.server.state.take()).encode(), "application/json")
        else:
            self._answer(404, b"", "text/plain")


class ReceiverHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), ReceiverHandler)
        self.state = ReceiverState()


def receiver_main() -> int:
    httpd = ReceiverHTTPServer()
    thread = threading.Thread(target=httpd.serve_forever, name="receiver", daemon=True)
    thread.start()
    emit({"event": "listening", "port": httpd.server_address[1]})
    with contextlib.suppress(KeyboardInterrupt):
        while sys.stdin.readline():  # until EOF: the parent closed it, or is gone
            pass
    httpd.shutdown()
    httpd.server_close()
    return 0


class Receiver:
    """The receiver process, as seen from the main process."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, python: str, timeout: float = 15.0) -> Receiver:
        proc = await asyncio.create_subprocess_exec(
            python, str(SCRIPT), "--receiver", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            port = int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise BenchError(f"the OTLP receiver did not report its port within {timeout:g}s") from None
        return cls(proc, port)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def take(self) -> Json:
        """What the receiver got since the last take (an {"error": ...} if it does not answer)."""
        try:
            answer: Json = await http_get_json(self.port, "/take", timeout=60)
            return answer
        except (BenchError, OSError, TimeoutError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


# =================================================================== servers: OFF, and ON scraped


@dataclass
class TelemetryServer(core_bench.Server):
    """A stablews server; ON, it is scraped from start to stop; its last stats answer is kept."""

    variant: str = "off"
    scrapes: list[Json] = field(default_factory=list)
    scraper: asyncio.Task[None] | None = None
    last_stats: Json | None = None

    async def stats(self) -> Json | None:
        stats = await super().stats()
        self.last_stats = stats
        return stats

    def start_scraping(self, interval: float) -> None:
        self.scraper = asyncio.create_task(self._scrape_every(interval))

    async def _scrape_every(self, interval: float) -> None:
        due = time.monotonic()
        while True:
            started = time.monotonic()
            scrape: Json = {"t": started}
            try:
                answer = await http_get(self.port, "/metrics", {"Accept": OPENMETRICS_ACCEPT}, timeout=SCRAPE_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                scrape["error"] = f"{type(exc).__name__}: {exc}"
            else:
                scrape.update(
                    {
                        "status": answer.status,
                        "bytes": len(answer.body),
                        "content_type": answer.headers.get("content-type", ""),
                        "eof": answer.body.rstrip().endswith(b"# EOF"),  # OpenMetrics' terminator
                    }
                )
            scrape["seconds"] = time.monotonic() - started
            self.scrapes.append(scrape)
            due += interval
            now = time.monotonic()
            if due < now:  # a scrape took longer than the interval: the next one now
                due = now
            await asyncio.sleep(due - now)

    async def stop(self, timeout: float = 20.0) -> int | None:
        if self.scraper is not None:
            self.scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.scraper
            self.scraper = None
        return await super().stop(timeout)

    async def kill(self) -> None:
        if self.scraper is not None:
            self.scraper.cancel()
        await super().kill()


def server_env(variant: str, otlp_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STABLEWS_"))}
    if variant == "on":
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": SERVICE_NAME,
            }
        )
    return env


def server_flags(variant: str, client_publish: bool) -> list[str]:
    flags = [*COMMON_FLAGS, "--metrics-enabled", "true" if variant == "on" else "false"]
    if client_publish:
        flags += ["--client-publish", "true"]
    return flags


def starter(
    variant: str, otlp_endpoint: str, scrape_interval: float, started: list[TelemetryServer]
) -> core_bench.ServerStarter:
    """A core_bench.ServerStarter for `variant`; each server started is appended to `started`."""

    async def start(kind: str, python: str, client_publish: bool) -> core_bench.Server:
        server = await TelemetryServer.start(
            kind,
            python,
            server_flags(variant, client_publish),
            env=server_env(variant, otlp_endpoint),
            stdin=asyncio.subprocess.DEVNULL,
        )
        server.variant = variant
        started.append(server)
        if variant == "on":
            server.start_scraping(scrape_interval)
        return server

    return start


# =================================================================== one run


def scrape_figures(scrapes: Sequence[Json], window: tuple[float, float] | None) -> Json:
    ok = [s for s in scrapes if s.get("status") == 200]
    figures: Json = {
        "scrapes": len(scrapes),
        "ok": len(ok),
        "failed": len(scrapes) - len(ok),
        "statuses": dict(Counter(str(s.get("status", "error")) for s in scrapes)),
        "errors": [s["error"] for s in scrapes if "error" in s][:5],
        "content_types": sorted({s["content_type"] for s in ok}),
        "openmetrics_eof": sum(1 for s in ok if s["eof"]),
        "bytes_median": statistics.median([s["bytes"] for s in ok]) if ok else None,
        "bytes_max": max((s["bytes"] for s in ok), default=None),
        "seconds_median": round(statistics.median([s["seconds"] for s in scrapes]), 4) if scrapes else None,
        "seconds_max": round(max(s["seconds"] for s in scrapes), 4) if scrapes else None,
    }
    if window is not None:
        figures["during_measurement"] = sum(1 for s in scrapes if window[0] <= s["t"] <= window[1])
    return figures


Runner = Callable[..., Awaitable[Json]]


async def measure_once(
    measure: str, runner: Runner, variant: str, opts: Options, topts: TelemetryOptions, receiver: Receiver
) -> Json:
    started: list[TelemetryServer] = []
    if variant == "on":
        stray = await receiver.take()  # anything sent since the last ON run ended (expected: nothing)
        if stray.get("paths"):
            print(f"  note: the receiver got requests between runs: {stray['paths']}", flush=True)
    try:
        run = await runner("stablews", opts, start=starter(variant, receiver.endpoint, topts.scrape_interval, started))
    except BenchError as exc:
        run = {"kind": "stablews", "error": str(exc)}
    run["variant"] = variant
    server = started[0] if started else None
    if server is not None:
        run["telemetry"] = (server.last_stats or {}).get("telemetry")
        window = None
        if measure == "fanout" and "first_sent_monotonic" in run:
            window = (run["first_sent_monotonic"], run["last_recv_monotonic"])
        run["scrapes"] = scrape_figures(server.scrapes, window)
    if variant == "on":
        run["otlp"] = await receiver.take()  # after the server exited: its last export is in
    return run


# =================================================================== report


@dataclass(frozen=True)
class Row:
    measure: str
    key: str
    label: str
    fmt: Callable[[float | None], str]


ROWS = (
    Row("memory", "bytes_per_connection", "idle memory per connection, KiB ({connections:,} conns)", kib),
    Row(
        "fanout",
        "delivered_per_second",
        "fan-out, delivered msgs/s ({subscribers:,} subs x {messages:,} msgs, {publishing})",
        rate,
    ),
    Row(
        "fanout",
        "server_cpu_us_per_message",
        "fan-out, server CPU us per delivered msg",
        lambda v: "-" if v is None else f"{v:.2f}",
    ),
)


def summarize(results: Json) -> Json:
    summary: Json = {}
    for row in ROWS:
        runs = results.get(row.measure)
        if not runs:
            continue
        entry: Json = {}
        for variant in VARIANTS:
            values = core_bench.figures_of(runs.get(variant, []), row.key)
            entry[variant] = {
                "median": statistics.median(values) if values else None,
                "min": min(values, default=None),
                "max": max(values, default=None),
                "runs": len(values),
            }
        off, on = entry["off"]["median"], entry["on"]["median"]
        entry["ratio"] = on / off if off and on is not None else None
        entry["difference"] = on - off if off is not None and on is not None else None
        # The same figure per repeat (off and on measured back to back): how steady the ratio is.
        paired = []
        for a, b in zip(runs.get("off", []), runs.get("on", []), strict=False):
            if "error" not in a and "error" not in b and a.get(row.key) and b.get(row.key) is not None:
                paired.append(round(b[row.key] / a[row.key], 4))
        entry["ratio_per_repeat"] = paired
        if row.key == "delivered_per_second":
            entry["goal"] = f"ratio on/off >= {THROUGHPUT_GOAL}"
            entry["meets_goal"] = None if entry["ratio"] is None else entry["ratio"] >= THROUGHPUT_GOAL
        elif row.key == "bytes_per_connection":
            entry["goal"] = f"on - off <= {MEMORY_GOAL_BYTES} bytes ({MEMORY_GOAL_BYTES / 1024:g} KiB)"
            entry["meets_goal"] = None if entry["difference"] is None else entry["difference"] <= MEMORY_GOAL_BYTES
        else:
            entry["goal"] = None
            entry["meets_goal"] = None
        summary[f"{row.measure}.{row.key}"] = entry
    return summary


def cost_text(row: Row, entry: Json) -> str:
    if entry["ratio"] is None or entry["difference"] is None:
        return "-"
    if row.key == "bytes_per_connection":
        return f"{entry['difference'] / 1024:+,.2f} KiB/conn ({entry['difference']:+,.0f} B)"
    if row.key == "delivered_per_second":
        change = (entry["ratio"] - 1) * 100
        return f"{abs(change):.1f} % {'faster' if change >= 0 else 'slower'}"
    return f"{(entry['ratio'] - 1) * 100:+.1f} %"


def table(summary: Json, opts: Options) -> str:
    def cell(row: Row, figures: Json) -> str:
        text = row.fmt(figures["median"])
        if figures["runs"] > 1:
            text += f" ({row.fmt(figures['min'])}..{row.fmt(figures['max'])})"
        return text

    publishing = "pipelined" if opts.publish_window == 0 else f"window {opts.publish_window}"
    labels = {**vars(opts), "publishing": publishing}
    goals = {
        "delivered_per_second": f">= {THROUGHPUT_GOAL} (<= 5 % cost)",
        "bytes_per_connection": f"<= +{MEMORY_GOAL_BYTES / 1024:g} KiB",
    }
    rows = [("median of runs (min..max)", "telemetry off", "telemetry on", "on/off", "cost", "goal", "")]
    for row in ROWS:
        entry = summary.get(f"{row.measure}.{row.key}")
        if entry is None:
            continue
        rows.append(
            (
                row.label.format(**labels),
                cell(row, entry["off"]),
                cell(row, entry["on"]),
                "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}",
                cost_text(row, entry),
                goals.get(row.key, "-"),
                {True: "met", False: "NOT met", None: ""}[entry["meets_goal"]],
            )
        )
    return text_table(rows)


def describe_run(measure: str, run: Json) -> str:
    text = core_bench.describe_run(measure, {**run, "kind": run["variant"]})
    extra = []
    state = run.get("telemetry")
    if state is not None:
        extra.append(f"server: metrics={state.get('metrics')} tracing={state.get('tracing')}")
    scrapes = run.get("scrapes")
    if scrapes and scrapes["scrapes"]:
        during = scrapes.get("during_measurement")
        extra.append(
            f"scrapes {scrapes['ok']}/{scrapes['scrapes']} ok"
            + (f", {during} during the fan-out" if during is not None else "")
            + (f", ~{scrapes['bytes_median']:,.0f} B each" if scrapes["bytes_median"] is not None else "")
        )
    otlp = run.get("otlp")
    if otlp is not None:
        if "error" in otlp:
            extra.append(f"OTLP receiver: {otlp['error']}")
        else:
            traces = otlp["traces"]
            spans = f", {traces['spans']:,} spans" if "spans" in traces else ""
            extra.append(f"OTLP /v1/traces: {traces['requests']} requests, {traces['bytes']:,} B{spans}")
    if extra:
        first, _, rest = text.partition("\n")
        text = first + "\n      " + "; ".join(extra) + (f"\n{rest}" if rest else "")
    return text


def totals(results: Json, measures: Sequence[str]) -> Json:
    """Scrapes and OTLP exports over every ON run."""
    scrapes: Counter[str] = Counter()
    scrape_seconds: list[float] = []
    traces: Counter[str] = Counter()
    span_names: Counter[str] = Counter()
    services: set[str] = set()
    other_paths: Counter[str] = Counter()
    receiver_errors = []
    tracing_on: Counter[str] = Counter()
    for measure in measures:
        for run in results[measure]["on"]:
            s = run.get("scrapes") or {}
            scrapes.update({k: s.get(k) or 0 for k in ("scrapes", "ok", "failed", "during_measurement")})
            if s.get("seconds_max") is not None:
                scrape_seconds.append(s["seconds_max"])
            state = run.get("telemetry")
            tracing_on[str(None if state is None else state.get("tracing"))] += 1
            otlp = run.get("otlp") or {}
            if "error" in otlp:
                receiver_errors.append(otlp["error"])
                continue
            t = otlp.get("traces", {})
            traces.update({k: t.get(k) or 0 for k in ("requests", "bytes", "spans")})
            span_names.update(t.get("span_names", {}))
            services.update(t.get("service_names", []))
            for path, counts in otlp.get("paths", {}).items():
                if path != "/v1/traces":
                    other_paths[path] += counts["requests"]
    return {
        "scrapes": {**scrapes, "seconds_max": max(scrape_seconds, default=None)},
        "otlp_traces": {**traces, "span_names": dict(span_names.most_common()), "service_names": sorted(services)},
        "otlp_other_paths": dict(other_paths),
        "receiver_errors": receiver_errors,
        "server_tracing_flag": dict(tracing_on),
    }


def report_totals(t: Json, interval: float) -> list[str]:
    s, tr = t["scrapes"], t["otlp_traces"]
    lines = [
        f"scrapes of /metrics (ON runs, every {interval:g} s): {s.get('scrapes', 0)} "
        f"({s.get('ok', 0)} answered 200, {s.get('failed', 0)} not; "
        f"{s.get('during_measurement', 0)} during the fan-out measurements; slowest "
        + ("-" if s.get("seconds_max") is None else f"{s['seconds_max']:.2f} s")
        + f", timeout {SCRAPE_TIMEOUT:g} s)",
        f"OTLP receiver, POST /v1/traces: {tr.get('requests', 0)} requests, {tr.get('bytes', 0):,} bytes"
        + (f", {tr['spans']:,} spans" if "spans" in tr else ""),
    ]
    if tr.get("span_names"):
        names = ", ".join(f"{name} {count:,}" for name, count in list(tr["span_names"].items())[:8])
        lines.append(f"  spans by name: {names}; service.name: {', '.join(tr['service_names']) or '-'}")
    if t["otlp_other_paths"]:
        lines.append(f"  other OTLP paths: {t['otlp_other_paths']}")
    if t["receiver_errors"]:
        lines.append(f"  receiver errors: {t['receiver_errors'][:3]}")
    if not tr.get("requests"):
        flags = t["server_tracing_flag"]
        lines.append(
            "WARNING: no trace export reached the receiver: tracing did not export anything "
            f"(the server's stats said tracing={', '.join(flags) or '?'} in the ON runs; "
            "service/stablews/telemetry/tracing.py may still be a placeholder). "
            "The ON figures then measure metrics only."
        )
    if not s.get("ok"):
        lines.append("WARNING: no scrape of /metrics answered 200 in the ON runs.")
    return lines


# =================================================================== main


def machine_and_own_cpu() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process and its waited children)."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic(), busy, me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def other_cpu(start: tuple[float, float, float], finish: tuple[float, float, float]) -> Json:
    """CPU the rest of the machine used meanwhile (every server, worker and the receiver has been waited for)."""
    wall = finish[0] - start[0]
    seconds = max(0.0, (finish[1] - start[1]) - (finish[2] - start[2]))
    return {"seconds": round(seconds, 2), "wall_seconds": round(wall, 2), "share_of_one_cpu": seconds / wall}


@dataclass
class TelemetryOptions:
    scrape_interval: float


async def bench(opts: Options, topts: TelemetryOptions, output: Path, argv: Sequence[str]) -> int:
    results: Json = {
        "command": " ".join(["python", "bench/telemetry_bench.py", *argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": core_bench.machine(),
        "revision": service_revision(),
        "loadavg_at_start": os.getloadavg(),
        "options": {
            **{k: v for k, v in vars(opts).items() if k != "python"},
            **vars(topts),
            "server_flags_common": list(COMMON_FLAGS),
            "server_flags": {v: server_flags(v, False) for v in VARIANTS},
            "otel_env_on": {k: v for k, v in server_env("on", "http://127.0.0.1:<port>").items() if k[:5] == "OTEL_"},
            "scrape_accept": OPENMETRICS_ACCEPT,
        },
    }
    measures: list[tuple[str, Runner]] = []
    if opts.only in ("all", "memory"):
        measures.append(("memory", core_bench.run_memory))
    if opts.only in ("all", "fanout"):
        measures.append(("fanout", core_bench.run_fanout))
    cpu_start = machine_and_own_cpu()
    receiver = await Receiver.start(opts.python)
    try:
        print(f"OTLP receiver at {receiver.endpoint} (pid {receiver.proc.pid})", flush=True)
        for measure, runner in measures:
            runs: dict[str, list[Json]] = {v: [] for v in VARIANTS}
            results[measure] = runs
            print(f"{measure}:", flush=True)
            for i in range(opts.repeat):
                order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]  # off, on / on, off / ...
                for variant in order:
                    run = await measure_once(measure, runner, variant, opts, topts, receiver)
                    run["repeat"] = i + 1
                    runs[variant].append(run)
                    print(describe_run(measure, run), flush=True)
    finally:
        await receiver.stop()
    names = [m for m, _ in measures]
    results["other_cpu"] = other_cpu(cpu_start, machine_and_own_cpu())
    results["summary"] = summarize(results)
    results["totals"] = totals(results, names)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["revision_at_finish"] = service_revision()
    results["loadavg_at_finish"] = os.getloadavg()
    if results["revision_at_finish"] != results["revision"]:
        print(f"warning: the service changed during the run: {results['revision']} -> {results['revision_at_finish']}")
    print()
    print(table(results["summary"], opts))
    per_repeat = [
        f"{key.split('.')[0]} {', '.join(f'{r:.3f}' for r in entry['ratio_per_repeat'])}"
        for key, entry in results["summary"].items()
        if key != "fanout.server_cpu_us_per_message" and len(entry["ratio_per_repeat"]) > 1
    ]
    if per_repeat:
        print(f"on/off per repeat (off and on back to back): {'; '.join(per_repeat)}")
    other = results["other_cpu"]
    note = "  (others competed for the CPUs: expect noisier figures)" if other["share_of_one_cpu"] > 0.1 else ""
    print(
        f"CPU used by processes other than this bench's during the run: {other['seconds']:.1f} s "
        f"({other['share_of_one_cpu']:.0%} of one CPU, {os.cpu_count()} CPUs){note}"
    )
    print()
    for line in report_totals(results["totals"], topts.scrape_interval):
        print(line)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")
    failed = any("error" in run for m in names for v in VARIANTS for run in results[m][v])
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="What telemetry (metrics scraped every second, traces exported over OTLP/HTTP) costs stablews: "
        "fan-out throughput and idle memory per connection, telemetry on against off."
    )
    core_bench.add_workload_options(parser, messages=1000)
    parser.add_argument(
        "--scrape-interval", type=float, default=1.0, help="seconds between scrapes of /metrics, ON (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,000 connections, 200 subscribers x 1,000 messages, 1 run (~30 s)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results (default %(default)s)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for servers, workers and the receiver")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    if args.receiver:
        return receiver_main()
    raise_nofile_limit()
    opts = core_bench.workload_options(args, quick_connections=1000, quick_subscribers=200)
    topts = TelemetryOptions(scrape_interval=args.scrape_interval)
    if opts is None:
        print("telemetry_bench: counts must be at least 1", file=sys.stderr)
        return 2
    if not 0.05 <= topts.scrape_interval <= 60:
        print("telemetry_bench: --scrape-interval must be between 0.05 and 60 seconds", file=sys.stderr)
        return 2
    return run_bench("telemetry_bench", lambda: bench(opts, topts, args.output, args_list))


if __name__ == "__main__":
    sys.exit(main())
