"""`stablews bench`: the benchmark suite. Every figure is measured against a baseline in the same run.

Measures (each a fresh set of server and client processes on 127.0.0.1, ports from the OS):

- fanout:    delivered messages/s to 1,000 subscribers: stablews against a bare Starlette
             broadcast loop and against python-socketio emitting to a room (bench/core_bench.py);
- memory:    resident memory per idle connection at 1k, 5k and 10k connections, against the
             same two (permessage-deflate off everywhere);
- deadpeer:  100 frozen clients among 900 live: freeze to close against the configured
             heartbeat bound (bench/deadpeer_bench.py);
- storm:     5,000 recovering clients across a graceful restart: time until all resumed,
             messages lost, event-loop lag p99 (bench/storm_bench.py);
- telemetry: fan-out with metrics scraped and traces exported, against telemetry off
             (bench/telemetry_bench.py);
- soak:      10 minutes of churn: memory at the end against after warm-up, connection records
             left behind (bench/soak_bench.py).

Writes the results as JSON (`--output`), PNG plots next to it (`plots/`), and, for a full run,
its section of bench/RESULTS.md (between the `suite` markers). `--quick` runs small versions
that check correctness only (nothing lost or repeated, every connection accounted for) and
never a timing. `--compare FILE` flags every figure more than 10 % worse than in FILE (an
earlier `--output`). Exit status: 0 when every measure was correct (and, with --compare,
nothing regressed), 1 otherwise, 2 for bad flags.

    stablews bench                                 # the whole suite (about 30 minutes)
    stablews bench --quick                         # correctness only (about 2 minutes)
    stablews bench --only fanout,memory --repeat 1
    stablews bench --compare bench/baseline.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import core_bench
from benchlib import BENCH_DIR, BenchError, Json, raise_nofile_limit, run_bench, service_revision
from figures import REGRESSION, Figure, Report, compare, median

MEASURES = ("fanout", "memory", "deadpeer", "storm", "telemetry", "soak")
DEFAULT_OUTPUT = BENCH_DIR / "out" / "suite.json"
QUICK_OUTPUT = BENCH_DIR / "out" / "suite-quick.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
PUBLISHED_PLOTS = BENCH_DIR.parent / "docs" / "img" / "bench"  # committed copies, linked from the results
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"

FANOUT_GOAL = 1.5  # stablews / bare delivered messages/s, at least
MEMORY_GOAL = 1.10  # stablews / bare bytes per idle connection, at most
MEMORY_BYTES_GOAL = 24_000  # bytes per idle connection at 10k, at most
TELEMETRY_GOAL = 0.95  # on / off delivered messages/s, at least
MAX_CONNECTIONS = 20_000  # the server's own cap, raised above the largest memory point


@dataclass(frozen=True, slots=True)
class SuiteOptions:
    quick: bool
    only: tuple[str, ...]
    repeat: int
    memory_counts: tuple[int, ...]
    subscribers: int
    messages: int
    processes: int
    python: str


def core_options(opts: SuiteOptions, connections: int) -> core_bench.Options:
    return core_bench.Options(
        python=opts.python, connections=connections, subscribers=opts.subscribers, messages=opts.messages,
        payload_bytes=100, publish_window=0, repeat=1, processes=opts.processes,
        warmup=10 if opts.quick else 100, settle_timeout=10 if opts.quick else 30, only="all",
    )


async def start_server(kind: str, python: str, client_publish: bool) -> core_bench.Server:
    """core_bench's servers, stablews with its connection cap above the largest memory point."""
    flags = ["--max-connections", str(MAX_CONNECTIONS)]
    if client_publish:
        flags += ["--client-publish", "true"]
    return await core_bench.Server.start(kind, python, flags, stdin=asyncio.subprocess.DEVNULL)


def kinds_in(order: int) -> tuple[str, ...]:
    """The three servers, the order rotated between repeats so none always runs first."""
    kinds = ("bare", "stablews", "socketio")
    return kinds[order % 3:] + kinds[: order % 3]


def run_problems(report: Report, runs: Sequence[Json], what: str) -> None:
    for run in runs:
        if "error" in run:
            report.problem(f"{what} {run['kind']}: {run['error']}")
        elif run.get("problem"):
            report.problem(f"{what} {run['kind']}: {run['problem']}")
        elif (closes := run.get("client", {}).get("unexpected_closes")):
            report.problem(f"{what} {run['kind']}: unexpected closes {closes}")


async def guarded(runner: Callable[[], Awaitable[Json]], kind: str) -> Json:
    try:
        return await runner()
    except BenchError as exc:
        return {"kind": kind, "error": str(exc)}


def by_kind(runs: Sequence[Json], key: str) -> dict[str, float | None]:
    kinds = {r["kind"] for r in runs}
    return {k: median([r.get(key) for r in runs if r["kind"] == k and "error" not in r]) for k in kinds}


async def measure_fanout(opts: SuiteOptions) -> Report:
    report = Report("fanout", f"fan-out to {opts.subscribers:,} subscribers x {opts.messages} messages")
    core = core_options(opts, opts.subscribers)
    runs: list[Json] = []
    for i in range(opts.repeat):
        for kind in kinds_in(i):
            run = await guarded(lambda kind=kind: core_bench.run_fanout(kind, core, start=start_server), kind)
            print(core_bench.describe_run("fanout", run), flush=True)
            runs.append(run)
    run_problems(report, runs, "fan-out")
    rate, cpu = by_kind(runs, "delivered_per_second"), by_kind(runs, "server_cpu_us_per_message")
    label = f"fan-out, delivered msgs/s ({opts.subscribers:,} subscribers)"
    report.figures = [
        Figure("fanout.vs_bare", label, "msgs/s", rate.get("stablews"), rate.get("bare"), "bare Starlette loop",
               "higher", f">= {FANOUT_GOAL}"),
        Figure("fanout.vs_socketio", label, "msgs/s", rate.get("stablews"), rate.get("socketio"),
               "python-socketio room", "higher", ">= 1.0"),
        Figure("fanout.cpu_vs_bare", "fan-out, server CPU per delivered message", "us",
               cpu.get("stablews"), cpu.get("bare"), "bare Starlette loop", "lower"),
    ]
    report.series = {"delivered_per_second": {k: [r.get("delivered_per_second") for r in runs if r["kind"] == k]
                                              for k in rate}}
    report.raw = {"runs": runs}
    return report


async def measure_memory(opts: SuiteOptions) -> Report:
    counts = ", ".join(f"{n:,}" for n in opts.memory_counts)
    report = Report("memory", f"resident memory per idle connection at {counts} connections")
    runs: list[Json] = []
    for n in opts.memory_counts:
        core = core_options(opts, n)
        for i in range(opts.repeat):
            for kind in kinds_in(i):
                run = await guarded(lambda kind=kind, core=core: core_bench.run_memory(kind, core, start=start_server),
                                    kind)
                print(core_bench.describe_run("memory", run), flush=True)
                runs.append(run)
    run_problems(report, runs, "memory")
    per_kind: dict[str, dict[int, float | None]] = {}
    for n in opts.memory_counts:
        at_n = by_kind([r for r in runs if r.get("connections") == n], "bytes_per_connection")
        for kind, value in at_n.items():
            per_kind.setdefault(kind, {})[n] = value
        ours = at_n.get("stablews")
        report.figures += [
            Figure(f"memory.{n}.vs_bare", f"memory per idle connection at {n:,}", "bytes", ours, at_n.get("bare"),
                   "bare Starlette endpoint", "lower", f"<= {MEMORY_GOAL}"),
            Figure(f"memory.{n}.vs_socketio", f"memory per idle connection at {n:,}", "bytes", ours,
                   at_n.get("socketio"), "python-socketio", "lower", "<= 1.0"),
        ]
    largest = max(opts.memory_counts)
    report.figures.append(Figure(
        f"memory.{largest}.bytes", f"memory per idle connection at {largest:,}, against {MEMORY_BYTES_GOAL:,} bytes",
        "bytes", per_kind.get("stablews", {}).get(largest), MEMORY_BYTES_GOAL, "target", "lower",
        f"<= {MEMORY_BYTES_GOAL}", "value"))
    report.series = {"bytes_per_connection": {k: {str(n): v for n, v in d.items()} for k, d in per_kind.items()}}
    report.raw = {"runs": runs}
    return report


async def measure_telemetry(opts: SuiteOptions) -> Report:
    import telemetry_bench

    report = Report("telemetry", f"telemetry on against off: fan-out to {opts.subscribers:,} subscribers")
    core = core_options(opts, opts.subscribers)
    topts = telemetry_bench.TelemetryOptions(scrape_interval=1.0)
    runs: list[Json] = []
    receiver = await telemetry_bench.Receiver.start(opts.python)
    try:
        for i in range(opts.repeat):
            for variant in telemetry_bench.VARIANTS if i % 2 == 0 else telemetry_bench.VARIANTS[::-1]:
                run = await telemetry_bench.measure_once("fanout", core_bench.run_fanout, variant, core, topts,
                                                         receiver)
                print(f"  telemetry {variant:3}" + core_bench.describe_run("fanout", run)[15:], flush=True)
                runs.append(run)
    finally:
        await receiver.stop()
    run_problems(report, runs, "telemetry")
    on = [r for r in runs if r.get("variant") == "on" and "error" not in r]
    if on and not any((r.get("otlp") or {}).get("spans") or (r.get("otlp") or {}).get("paths") for r in on):
        report.problem("telemetry on: the OTLP receiver got nothing")
    rate = {v: median([r.get("delivered_per_second") for r in runs if r.get("variant") == v and "error" not in r])
            for v in telemetry_bench.VARIANTS}
    report.figures = [Figure("telemetry.fanout_on_vs_off", "fan-out with telemetry on, delivered msgs/s", "msgs/s",
                             rate["on"], rate["off"], "telemetry off", "higher", f">= {TELEMETRY_GOAL}")]
    report.series = {"delivered_per_second": {v: [r.get("delivered_per_second") for r in runs
                                                  if r.get("variant") == v] for v in telemetry_bench.VARIANTS}}
    report.raw = {"runs": runs}
    return report


async def measure_deadpeer(opts: SuiteOptions) -> Report:
    import deadpeer_bench

    return await deadpeer_bench.measure(opts.quick, opts.python)


async def measure_storm(opts: SuiteOptions) -> Report:
    import storm_bench

    return await storm_bench.measure(opts.quick, opts.python)


async def measure_soak(opts: SuiteOptions) -> Report:
    import soak_bench

    return await soak_bench.measure(opts.quick, opts.python)


RUNNERS: dict[str, Callable[[SuiteOptions], Awaitable[Report]]] = {
    "fanout": measure_fanout,
    "memory": measure_memory,
    "deadpeer": measure_deadpeer,
    "storm": measure_storm,
    "telemetry": measure_telemetry,
    "soak": measure_soak,
}


# =================================================================== report


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if abs(value) >= 100:
        return f"{value:,.0f}" + (f" {unit}" if unit and unit not in ("msgs/s", "bytes") else "")
    return f"{value:.3g}" + (f" {unit}" if unit else "")


def verdict(f: Json) -> str:
    return {True: "met", False: "NOT met", None: ""}[f["met"]]


def figure_rows(results: Json) -> list[list[str]]:
    rows = []
    for report in results["reports"]:
        for f in report["figures"]:
            ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3f}"
            goal = f["goal"] and (f"{f['goal']} ({'value' if f['goal_on'] == 'value' else 'ratio'})")
            rows.append([f["label"], number(f["value"], f["unit"]), f"{number(f['baseline'], f['unit'])} "
                         f"({f['baseline_label']})", ratio, goal or "-", verdict(f)])
    return rows


def text_report(results: Json) -> str:
    rows = [["figure", "stablews", "baseline", "ratio", "goal", ""], *figure_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for report in results["reports"]:
        state = "correct" if report["correct"] else "NOT correct"
        lines.append(f"{report['measure']}: {state} ({report['seconds']:.0f} s) - {report['title']}")
        lines += [f"    {n}" for n in report["notes"]] + [f"    PROBLEM: {p}" for p in report["problems"]]
    return "\n".join(lines)


def markdown(results: Json, plots: Sequence[Path]) -> str:
    m = results["machine"]
    rows = figure_rows(results)
    table = ["| figure | stablews | baseline | ratio | goal | |", "|---|---:|---:|---:|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    correct = [f"- **{r['measure']}** ({r['title']}): {'correct' if r['correct'] else 'NOT correct'}"
               + "".join(f"; {n}" for n in r["notes"]) + "".join(f"; PROBLEM: {p}" for p in r["problems"])
               for r in results["reports"]]
    pictures = [f"![{p.stem}]({os.path.relpath(p, RESULTS_MD.parent)})" for p in plots]
    return "\n".join([
        BEGIN,
        "## The suite: `stablews bench`",
        "",
        "Written by `stablews bench` (bench/suite.py); every figure against a baseline run in the same invocation.",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['started']} to {results['finished']}; measured commit `{results['revision']['commit']}`"
        + (" (service/ modified)" if results["revision"]["service_modified"] else ""),
        f"- Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('memory_bytes', 0) / 2**30:.1f} GiB, "
        f"{m.get('platform')}, Python {m.get('python')}; load average at start {results['loadavg_at_start']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v),
        f"- Raw results: `{results['output']}` (bench/out/ is not committed)",
        "",
        *table,
        "",
        "Correctness:",
        "",
        *correct,
        "",
        *pictures,
        END,
    ])


def write_results_md(section: str, path: Path) -> None:
    """Replace the suite's section of RESULTS.md (or put it first, after the title)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        title, _, body = text.partition("\n")
        text = f"{title}\n\n{section}\n{body}"
    path.write_text(text)


# =================================================================== main


async def suite(opts: SuiteOptions, output: Path, results_md: Path | None, compare_with: Path | None,
                argv: Sequence[str]) -> int:
    recorded = None
    if compare_with is not None:
        recorded = json.loads(compare_with.read_text())
    results: Json = {
        "command": " ".join(["stablews bench", *argv]),
        "quick": opts.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": core_bench.machine(),
        "revision": service_revision(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "output": str(output.relative_to(BENCH_DIR.parent)) if output.is_relative_to(BENCH_DIR.parent) else str(output),
        "reports": [],
    }
    for name in opts.only:
        print(f"{name}:", flush=True)
        started = time.monotonic()
        try:
            report = await RUNNERS[name](opts)
        except BenchError as exc:
            report = Report(name, name)
            report.problem(str(exc))
        report.seconds = time.monotonic() - started
        results["reports"].append(report.as_json())
        print(f"{name}: {'correct' if report.correct else 'NOT correct'} in {report.seconds:.0f} s", flush=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    output.parent.mkdir(parents=True, exist_ok=True)
    import plots

    drawn = plots.draw(results, output.parent / "plots")
    results["plots"] = [str(p) for p in drawn]
    status = 0 if all(r["correct"] for r in results["reports"]) else 1
    if recorded is not None:
        figures = [f for r in results["reports"] for f in r["figures"]]
        old = [f for r in recorded.get("reports", []) for f in r["figures"] if r["measure"] in opts.only]
        regressions, missing = compare(figures, old)
        results["compare"] = {"file": str(compare_with), "regressions": [r.text() for r in regressions],
                              "missing": missing}
        if recorded.get("quick") != opts.quick:
            print(f"note: {compare_with} was {'a quick' if recorded.get('quick') else 'a full'} run, this one is "
                  f"{'quick' if opts.quick else 'full'}: the figures are not alike", flush=True)
        for r in regressions:
            print(f"REGRESSION: {r.text()}", flush=True)
        for key in missing:
            print(f"missing now: {key}", flush=True)
        print(f"compared with {compare_with}: {len(regressions)} figure(s) more than {REGRESSION:.0%} worse",
              flush=True)
        if regressions:
            status = 1
    output.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(text_report(results))
    print(f"\nwrote {output} and {len(drawn)} plot(s) in {output.parent / 'plots'}")
    if results_md is not None:
        # bench/out/ is not committed: the results link copies kept beside the docs.
        PUBLISHED_PLOTS.mkdir(parents=True, exist_ok=True)
        published = [Path(shutil.copy2(p, PUBLISHED_PLOTS / p.name)) for p in drawn]
        write_results_md(markdown(results, published), results_md)
        print(f"wrote the suite's section of {results_md}")
    return status


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not counts or min(counts) < 1 or max(counts) > 15_000:
        raise argparse.ArgumentTypeError(f"expected counts from 1 to 15000, got {text!r}")
    return counts


def parse_only(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MEASURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown measure {', '.join(unknown) or repr(text)}: choose from "
                                         f"{', '.join(MEASURES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablews bench", description=__doc__.split("\n\n")[0],
                                     epilog="Measures: " + ", ".join(MEASURES))
    add = parser.add_argument
    add("--quick", action="store_true", help="small versions, correctness only (no timing is checked)")
    add("--only", type=parse_only, default=MEASURES, metavar="M1,M2", help="measures to run (default: all)")
    add("--repeat", type=int, metavar="N", help="runs of each fan-out and memory point (default 3; quick 1)")
    add("--memory-counts", type=parse_counts, metavar="N1,N2", help="memory points (default 1000,5000,10000)")
    add("--output", type=Path, metavar="FILE", help="JSON results (default bench/out/suite.json, quick "
        "bench/out/suite-quick.json); plots go to plots/ beside it")
    add("--results", type=Path, metavar="FILE", help="the Markdown file whose suite section is rewritten "
        "(default bench/RESULTS.md for a full run of every measure, none otherwise)")
    add("--compare", type=Path, metavar="FILE", help="an earlier --output: flag figures more than 10%% worse")
    add("--python", default=sys.executable, help="interpreter for the servers and workers")

    def one_line_error(message: str) -> None:  # argparse would print the usage too: one line is enough
        parser.exit(2, f"stablews bench: {message} (see stablews bench --help)\n")

    parser.error = one_line_error  # type: ignore[method-assign]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    missing = [m for m in ("socketio", "matplotlib", "psutil") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"stablews bench: {', '.join(missing)} missing: pip install -e '.[test]'", file=sys.stderr)
        return 2
    repeat = args.repeat or (1 if args.quick else 3)
    if not 1 <= repeat <= 20:
        parser.error("--repeat: expected 1 to 20")
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare: {args.compare} is not a file")
    opts = SuiteOptions(
        quick=args.quick, only=args.only, repeat=repeat,
        memory_counts=args.memory_counts or ((200,) if args.quick else (1000, 5000, 10_000)),
        subscribers=50 if args.quick else 1000, messages=50 if args.quick else 200,
        processes=1 if args.quick else 2, python=args.python,
    )
    output = (args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)).resolve()
    results_md = args.results
    if results_md is None and not args.quick and set(args.only) == set(MEASURES):
        results_md = RESULTS_MD
    raise_nofile_limit()
    return run_bench("stablews bench", lambda: suite(opts, output, results_md, args.compare, args_list))


if __name__ == "__main__":
    sys.exit(main())
