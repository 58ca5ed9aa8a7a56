"""`stablews bench`: the quick suite runs every measure against real processes and reports them correct;
`--compare` flags a figure worse than a recorded one; bad flags get one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, "-m", "stablews", "bench"]
PNG = b"\x89PNG\r\n\x1a\n"
MEASURES = {"fanout", "memory", "deadpeer", "storm", "telemetry", "soak"}


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    results_md = REPO / "bench" / "RESULTS.md"
    before = results_md.read_bytes()
    done = bench("--quick", "--output", str(out), timeout=600)
    assert results_md.read_bytes() == before, "a quick run must not rewrite bench/RESULTS.md"
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, json.loads(out.read_text()), out


@pytest.mark.timeout(700)
def test_the_quick_suite_runs_every_measure_and_finds_them_correct(quick: Any) -> None:
    done, results, out = quick
    reports = {r["measure"]: r for r in results["reports"]}
    assert set(reports) == MEASURES
    for name, report in reports.items():
        assert report["correct"] is True and report["problems"] == [], (name, report["problems"])
        assert report["figures"], name
    # Every ratio is against a baseline measured in the same run (or, where the issue gives one, a bound).
    figures = {f["key"]: f for r in results["reports"] for f in r["figures"]}
    for key in ("fanout.vs_bare", "fanout.vs_socketio", "memory.200.vs_bare", "memory.200.vs_socketio",
                "telemetry.fanout_on_vs_off", "deadpeer.max_seconds", "soak.rss_growth"):
        assert figures[key]["value"] is not None and figures[key]["baseline"], key
        assert figures[key]["ratio"] > 0, key
    assert figures["soak.records_left"]["value"] == 0  # no connection record leaked
    assert figures["storm.lost"]["value"] == 0
    fanout_runs = reports["fanout"]["raw"]["runs"]
    assert {r["kind"] for r in fanout_runs} == {"bare", "stablews", "socketio"}
    for run in fanout_runs:  # every subscriber got every message once, in order, on every server
        assert run["exact_subscribers"] == run["subscribers"], run["kind"]
    # A plot per measure, as PNG files next to the JSON.
    for name in MEASURES:
        png = out.parent / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG, name
    # The printed table names every figure.
    for f in figures.values():
        assert f["label"] in done.stdout


@pytest.mark.timeout(700)
def test_compare_flags_a_figure_worse_than_recorded_and_passes_one_that_is_not(quick: Any, tmp_path: Path) -> None:
    _, results, _ = quick
    deadpeer = next(r for r in results["reports"] if r["measure"] == "deadpeer")
    worst = next(f for f in deadpeer["figures"] if f["key"] == "deadpeer.max_seconds")
    assert worst["better"] == "lower"

    def recorded(factor: float) -> Path:
        forged = json.loads(json.dumps(results))
        for report in forged["reports"]:
            for f in report["figures"]:
                if f["key"] == "deadpeer.max_seconds":
                    f["value"] = worst["value"] * factor
        path = tmp_path / f"recorded-{factor}.json"
        path.write_text(json.dumps(forged))
        return path

    # Recorded as twice as fast as it can be (half the time): now is far more than 10 % worse.
    done = bench("--quick", "--only", "deadpeer", "--output", str(tmp_path / "a.json"),
                 "--compare", str(recorded(0.5)), timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    flagged = [line for line in done.stdout.splitlines() if line.startswith("REGRESSION:")]
    assert len(flagged) == 1 and worst["label"] in flagged[0], done.stdout
    # Recorded three times slower: nothing regressed.
    done = bench("--quick", "--only", "deadpeer", "--output", str(tmp_path / "b.json"),
                 "--compare", str(recorded(3.0)), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REGRESSION" not in done.stdout
    assert "0 figure(s) more than 10% worse" in done.stdout


@pytest.mark.parametrize(("args", "says"), [
    (("--only", "nope"), "unknown measure nope"),
    (("--memory-counts", "0"), "expected counts from 1 to 15000"),
    (("--compare", "/nonexistent/recorded.json"), "is not a file"),
])
def test_bad_flags_get_one_line_and_status_2(args: tuple[str, ...], says: str) -> None:
    done = bench(*args, timeout=60)
    assert done.returncode == 2
    assert says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
