"""`stablews loadtest` against a real server process: chaos (drops, freezes) with no message lost or
duplicated, what the server records for each fault, an interrupted endless run, the tool's own
publishing, and one-line refusals of bad options. Runs over several processes (merged figures,
a signal, a worker that dies) and over several server URLs. Also the accounting of losses and
duplicates, and the pieces of a multi-process run (serialised figures, the process plan)."""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stablews.cli import build_parser
from stablews.cli import main as cli_main
from stablews.client import StableClient
from stablews.loadtest import (
    CLIENTS_PER_PROCESS,
    BadOption,
    LatencyHistogram,
    Options,
    Outcome,
    Probe,
    Tally,
    parse_options,
    plan_processes,
    shares,
)
from support import ServerProcess

LOADTEST = [sys.executable, "-m", "stablews", "loadtest"]
# A dead peer is closed 0.5 x 2 + 0.3 = 1.3 s after its last answered ping: a freeze (auto: 2 x 0.8 + 1 = 2.6 s)
# ends in a 4000 within an 8 s run.
SHORT_HEARTBEATS = ("--heartbeat-interval", "0.5s", "--heartbeat-timeout", "0.3s", "--max-missed-heartbeats", "2")


def connection_stats(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{server.http}/api/v1/websocket/stats", timeout=10).json()["connections"]


def closed_by_cause(server: ServerProcess) -> dict[str, int]:
    return connection_stats(server)["closed_by_cause"]


def run_loadtest(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOADTEST, *args], capture_output=True, text=True, timeout=timeout)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return result


class Running:
    """A loadtest process whose stderr a thread reads, so that every wait has a deadline."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*LOADTEST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_progress(self, needle: str, timeout: float) -> None:
        """Until a progress line has `needle` and messages flowing."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no progress line with {needle!r} within {timeout}s:\n"
                                     + "".join(self.stderr)) from None
            assert line is not None, "loadtest ended early:\n" + "".join(self.stderr)
            if needle in line and "msgs/s=0.0" not in line:
                return

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the end: exit status, stdout (the summary: small, it fits the pipe), stderr."""
        status = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stdout is not None
        return status, self.proc.stdout.read(), "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("this system does not list a process's children in /proc")
    return [int(p) for p in path.read_text().split()]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_chaos_run_loses_and_duplicates_nothing(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(*SHORT_HEARTBEATS, "--demo-feed-rate", "50")
    done = run_loadtest(server.ws, "--clients", "20", "--duration", "8", "--drop-rate", "1", "--freeze-ratio", "0.2",
                        "--progress-interval", "2", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] is True
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["gaps"] == 0
    assert summary["clients_connected"] == 20
    assert summary["delivered"] > 20 * 50 * 4  # most of the feed reached every client
    assert summary["chaos"]["drops"] > 0 and summary["chaos"]["freezes"] > 0
    assert summary["drops"] > 0 and summary["reconnects"] > 0 and summary["resumes"] > 0
    assert summary["resyncs"] == 0  # history (1000 messages) covers every gap at 50/s
    assert summary["close_codes"].get("4000", 0) > 0  # the freezes, as the clients saw them
    assert summary["close_codes"].get("1006", 0) > 0  # the drops: no close frame
    lat = summary["latency_ms"]
    assert lat["count"] == summary["delivered"] and 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert summary["live_latency_ms"]["p99"] < 1000
    progress = [line for line in done.stderr.splitlines() if "connected=" in line]
    assert progress and all("lost=0 duplicated=0" in line for line in progress), done.stderr
    causes = closed_by_cause(server)
    assert causes.get("heartbeat_timeout", 0) > 0, causes  # the freezes
    assert causes.get("client_gone", 0) > 0, causes  # the drops


def test_endless_run_ends_on_sigterm_with_the_summary(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed", "false", "--client-publish", "true")
    run = Running(server.ws, "--clients", "5", "--channels", "lt.one,lt.two", "--publish-rate", "100",
                  "--duration", "0", "--ramp", "0.2s", "--drop-rate", "0", "--freeze-ratio", "0",
                  "--progress-interval", "0.5", "--json")
    try:
        deadline = time.monotonic() + 15
        for _ in range(3):
            run.wait_progress("connected=5/5", timeout=max(0.1, deadline - time.monotonic()))
        run.proc.send_signal(signal.SIGTERM)
        status, out, err = run.finish(timeout=15)
    finally:
        run.kill()
    assert status == 0, err
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["ok"] is True
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["published"]["acknowledged"] > 50 and summary["published"]["errors"] == 0
    assert summary["delivered"] > 5 * 50  # every client follows both channels


def test_publishing_refused_by_the_server_is_a_usage_error(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed", "false")
    done = run_loadtest(server.ws, "--clients", "1", "--publish-rate", "10", "--duration", "5", "--json")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--client-publish" in done.stderr.splitlines()[-1]
    assert json.loads(done.stdout)["ok"] is False


def test_two_processes_merge_their_figures(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50")
    done = run_loadtest(server.ws, "--clients", "20", "--processes", "2", "--duration", "6", "--drop-rate", "2",
                        "--freeze-ratio", "0", "--seed", "5", "--initial-delay", "200ms", "--jitter-max", "200ms",
                        "--progress-interval", "1", "--json", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    workers = summary["workers"]
    assert summary["processes"] == 2 and len(workers) == 2 and all(w["reported"] for w in workers)
    assert [w["clients"] for w in workers] == [10, 10] and [w["first_client"] for w in workers] == [0, 10]
    assert summary["ok"] is True and summary["clients_connected"] == 20 and summary["clients_stopped"] == 0
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["gaps"] == 0
    for name in ("delivered", "drops", "reconnects", "resumes", "lost", "duplicated"):
        assert summary[name] == sum(w[name] for w in workers), name
    assert summary["clients_connected"] == sum(w["clients_connected"] for w in workers)
    assert all(w["delivered"] > 10 * 50 * 2 for w in workers)  # both halves followed the feed
    # A drop rate of 2/s is 1/s per worker, never more than 2 s apart: each worker dropped some.
    assert summary["chaos"]["drops"] >= 2 and all(w["drops"] > 0 for w in workers)
    assert summary["reconnects"] > 0 and summary["resumes"] > 0  # after 0.2-0.4 s: the recovery flags reached them
    assert summary["latency_ms"]["count"] == summary["delivered"]
    assert summary["connected_in_seconds"] is not None and 0 < summary["connected_in_seconds"] < 6
    progress = [line for line in done.stderr.splitlines() if "connected=" in line]
    assert progress and all("/20 " in line and "lost=0 duplicated=0" in line for line in progress), done.stderr
    assert "in 2 processes" in done.stderr.splitlines()[0]
    assert all(gone(w["pid"]) for w in workers)  # no worker left behind
    assert closed_by_cause(server).get("client_gone", 0) > 0  # the drops, as the server saw them


def test_sigterm_stops_every_worker_with_the_merged_summary(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50")
    run = Running(server.ws, "--clients", "6", "--processes", "3", "--duration", "0", "--ramp", "0.2s",
                  "--drop-rate", "0", "--freeze-ratio", "0", "--progress-interval", "0.5", "--json")
    try:
        run.wait_progress("connected=6/6", timeout=20)
        workers = children(run.proc.pid)
        assert len(workers) == 3
        run.proc.send_signal(signal.SIGTERM)
        status, out, err = run.finish(timeout=20)
    finally:
        run.kill()
    assert status == 0, err
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["ok"] is True
    assert summary["clients_connected"] == 6 and summary["delivered"] > 0
    assert sorted(w["pid"] for w in summary["workers"]) == sorted(workers)
    assert all(w["reported"] for w in summary["workers"])
    assert all(gone(pid) for pid in workers)
    # Every client closed normally: the server holds none, and saw no abnormal close.
    wait_until(lambda: connection_stats(server)["active"] == 0, 10, "the clients' closes")
    assert closed_by_cause(server) == {"normal": 6}


def test_a_worker_that_dies_fails_the_run_with_one_line(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50")
    run = Running(server.ws, "--clients", "4", "--processes", "2", "--duration", "0", "--ramp", "0.2s",
                  "--drop-rate", "0", "--freeze-ratio", "0", "--progress-interval", "0.5", "--json")
    try:
        run.wait_progress("connected=4/4", timeout=20)
        workers = children(run.proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        status, out, err = run.finish(timeout=20)
    finally:
        run.kill()
    assert status == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("stablews loadtest: worker 2 of 2 (clients 2-3) died (killed by SIGKILL)"), err
    summary = json.loads(out)
    assert summary["ok"] is False and "died" in summary["failure"] and summary["interrupted"] is False
    assert [w["reported"] for w in summary["workers"]] == [True, False]
    assert summary["clients_connected"] == 2  # the figures of the worker still alive
    assert gone(workers[0])


@pytest.mark.parametrize("form", ["repeated", "comma-separated"])
def test_clients_are_spread_over_several_urls(form: str, start_server: Callable[..., ServerProcess]) -> None:
    one, two = start_server("--demo-feed-rate", "20"), start_server("--demo-feed-rate", "20")
    urls = [one.ws, two.ws] if form == "repeated" else [f"{one.ws},{two.ws}"]
    processes = "2" if form == "repeated" else "1"  # round robin within and across the workers
    done = run_loadtest(*urls, "--clients", "6", "--processes", processes, "--duration", "3", "--drop-rate", "0",
                        "--freeze-ratio", "0", "--progress-interval", "0", "--json", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["url"] == one.ws and summary["urls"] == [one.ws, two.ws]
    assert summary["ok"] is True and summary["clients_connected"] == 6 and summary["delivered"] > 0
    for server in (one, two):  # no chaos: each client connected once, to its first URL
        stats = connection_stats(server)
        assert (stats["opened_total"], stats["peak"]) == (3, 3), stats


def test_a_share_that_cannot_fit_the_open_file_limit_is_one_line() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    done = subprocess.run([*LOADTEST, "ws://127.0.0.1:1/ws", "--clients", "500", "--processes", "1"],
                          capture_output=True, text=True, timeout=30, preexec_fn=low_limit)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "stablews loadtest: --clients 500: 500 clients in one process need about 564 open files, and a process "
        "may open 200 (RLIMIT_NOFILE, raised to its hard limit); give --processes 4 or more, or raise the hard "
        "limit (ulimit -Hn)"
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ws://127.0.0.1:1/ws", "--clients", "0"], "--clients: expected a whole number"),
        (["ws://127.0.0.1:1/ws", "--drop-rate", "often"], "--drop-rate: expected a number"),
        (["ws://127.0.0.1:1/ws", "--duration", "soon"], "--duration: expected a duration"),
        (["ws://127.0.0.1:1/ws", "--freeze-ratio", "0.7", "--stall-ratio", "0.5"], "must not exceed 1"),
        (["ws://127.0.0.1:1/ws", "--freeze-seconds", "0"], "--freeze-seconds: expected a duration above 0"),
        (["http://127.0.0.1:1/ws"], "URL: expected a ws:// or wss:// URL"),
        (["ws://127.0.0.1:1/ws", "--channels", ","], "--channels"),
        (["ws://127.0.0.1:1/ws", "--channels", "ok,*bad"], "'*bad' is not a channel name"),
        (["ws://127.0.0.1:1/ws", "--max-retries", "soon"], "max_retries"),
        (["ws://127.0.0.1:1/ws", "--processes", "many"], "--processes: expected a whole number from 1 to 256 or auto"),
        (["ws://127.0.0.1:1/ws", "--processes", "0"], "--processes: expected a whole number"),
        (["ws://127.0.0.1:1/ws", "--clients", "2", "--processes", "3"], "3 processes for 2 client(s)"),
        (["ws://127.0.0.1:1/ws,http://127.0.0.1:2/ws"], "URL: expected a ws:// or wss:// URL, got 'http://"),
        (["ws://127.0.0.1:1/ws", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: url"),
    ],
)
def test_bad_options_exit_2_with_one_line(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli_main(["loadtest", *args])
    except SystemExit as exc:  # argparse's own refusals
        status = exc.code
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stablews loadtest: ") and needle in lines[0], captured.err


def test_bad_option_from_the_command_line() -> None:
    done = run_loadtest("ws://127.0.0.1:1/ws", "--clients", "many")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "stablews loadtest: --clients: expected a whole number from 1 to 100000, got 'many'"
    ]


# ------------------------------------------------------------ the accounting, without a server


def message(offset: int, epoch: str = "e1", channel: str = "c", ts: float | None = None) -> dict[str, Any]:
    return {"type": "message", "channel": channel, "epoch": epoch, "offset": offset, "data": None,
            "ts": time.time() * 1000 if ts is None else ts}


def test_probe_counts_gaps_as_loss_and_resyncs_apart() -> None:
    tally = Tally()
    probe = Probe(0, StableClient("ws://127.0.0.1:1/ws", channels=["c"]), tally)
    for offset in (5, 6, 7):  # the stream starts wherever the client joined it
        probe._on_message(message(offset))
    probe._on_message(message(7))  # a duplicate
    probe._on_message(message(10))  # 8 and 9 lost
    assert (tally.delivered, tally.duplicated, tally.lost, tally.gaps) == (5, 1, 2, 1)
    probe._on_resync("c", {"reason": "recovery_failed", "current": {"epoch": "e2", "offset": 40}})
    probe._on_message(message(41, "e2"))  # the new stream goes on after the offset of `subscribed`
    probe._on_resync("c", {"reason": "new_epoch", "current": {"epoch": "e3", "offset": 3}})
    probe._on_message(message(3, "e3"))
    probe._on_resync("c", {"reason": "gap", "current": {"epoch": "e3", "offset": 5}})
    probe._on_message(message(5, "e3"))  # a gap resync is a loss, not a resync
    assert (tally.resyncs, tally.lost, tally.gaps, tally.duplicated) == (2, 3, 2, 1)
    probe._on_recovered("c", 2)
    probe._on_message(message(6, "e3", ts=time.time() * 1000 - 5000))  # replayed: not live
    probe._on_message(message(7, "e3", ts=time.time() * 1000 - 5000))
    probe._on_message(message(8, "e3"))
    assert tally.latency.count == 11 and tally.live_latency.count == 9
    assert tally.live_latency.max < 1000 <= tally.latency.max
    probe._on_disconnected({"code": 4000, "verified": True})
    probe._on_disconnected({"code": None, "verified": True})
    assert tally.drops == 2 and dict(tally.close_codes) == {"4000": 1, "1006": 1}


def test_latency_histogram_quantiles_are_close_and_mergeable() -> None:
    one, two = LatencyHistogram(), LatencyHistogram()
    for ms in range(1, 1001):
        (one if ms % 2 else two).add(float(ms))
    one.merge(two)
    assert one.count == 1000 and one.max == 1000.0
    p50, p99 = one.quantile(0.5), one.quantile(0.99)
    assert p50 is not None and p99 is not None
    assert 500 <= p50 <= 500 * 1.011 and 990 <= p99 <= 990 * 1.011
    assert LatencyHistogram().summary() == {"count": 0, "p50": None, "p99": None, "max": None}


# ------------------------------------------------------------ the pieces of a multi-process run


def options_from(*argv: str) -> Options:
    args = build_parser().parse_args(["loadtest", *argv])
    assert isinstance(args, argparse.Namespace)
    return parse_options(args)


def test_urls_repeated_or_comma_separated() -> None:
    single = options_from("ws://a:1/ws")
    assert (single.url, single.urls, single.processes) == ("ws://a:1/ws", ("ws://a:1/ws",), None)
    assert single.urls_for(5) == ["ws://a:1/ws"]
    several = options_from("ws://a:1/ws,ws://b:2/ws", "ws://c:3/ws", "ws://a:1/ws")
    assert several.urls == ("ws://a:1/ws", "ws://b:2/ws", "ws://c:3/ws") and several.url == "ws://a:1/ws"
    assert [several.urls_for(i)[0] for i in range(4)] == ["ws://a:1/ws", "ws://b:2/ws", "ws://c:3/ws", "ws://a:1/ws"]
    assert several.urls_for(1) == ["ws://b:2/ws", "ws://c:3/ws", "ws://a:1/ws"]  # the others, to move on to


def test_process_plan() -> None:
    def plan(clients: int, processes: str = "auto", open_files: int = 20_000, cpus: int = 8) -> int:
        return plan_processes(options_from("ws://a/ws", "--clients", str(clients), "--processes", processes),
                              open_files, cpus)

    assert plan(1) == plan(CLIENTS_PER_PROCESS) == 1
    assert plan(CLIENTS_PER_PROCESS + 1) == 2 and plan(10_000) == 5 and plan(10_000, cpus=2) == 2
    assert plan(100_000, cpus=2) == 6  # more than the CPUs: each share must fit 20,000 open files
    assert plan(3, "3") == 3 and plan(10_000, "1") == 1
    with pytest.raises(BadOption, match=r"--clients 30000: 30,000 clients in one process .* --processes 2 or more"):
        plan(30_000, "1")


def test_shares_split_the_clients_and_rates_with_a_seed_per_worker() -> None:
    options = options_from("ws://a/ws", "ws://b/ws", "--clients", "11", "--drop-rate", "3", "--publish-rate", "90",
                           "--freeze-ratio", "0.2", "--seed", "7")
    parts = shares(options, 3, 7)
    assert [p.clients for p in parts] == [4, 4, 3] and [p.first_client for p in parts] == [0, 4, 8]
    assert sum(p.drop_rate for p in parts) == pytest.approx(3)
    assert sum(p.publish_rate for p in parts) == pytest.approx(90)
    assert all(p.freeze_ratio == 0.2 and p.processes == 1 for p in parts)
    assert len({p.seed for p in parts}) == 3 and [p.seed for p in parts] == [p.seed for p in shares(options, 3, 7)]
    assert parts[1].urls_for(0)[0] == "ws://a/ws" and parts[2].urls_for(0)[0] == "ws://a/ws"  # indices 4 and 8
    assert Options.from_json(json.loads(json.dumps(parts[1].to_json()))) == parts[1]


def test_outcomes_survive_json_and_merge() -> None:
    def outcome(delivered: int, connected: int, connected_in: float | None) -> Outcome:
        tally = Tally(delivered=delivered, reconnects=1, close_codes=Counter({"1006": 2}), chaos=Counter(drops=2))
        for ms in range(1, delivered + 1):
            tally.latency.add(float(ms))
        return Outcome(tally=tally, elapsed=5.0 + connected, clients=3, clients_connected=connected,
                       connected_in=connected_in, pause_seconds={"freeze": 2.6})

    one, two = outcome(100, 3, 1.5), outcome(50, 3, 2.5)
    copy = Outcome.from_json(json.loads(json.dumps(one.to_json())))
    assert copy.tally.latency.counts == one.tally.latency.counts and copy.tally.to_json() == one.tally.to_json()
    assert copy.to_json() == one.to_json()
    merged = Outcome()
    merged.merge(copy)
    merged.merge(two)
    assert (merged.tally.delivered, merged.tally.reconnects, merged.clients, merged.clients_connected) == (150, 2, 6, 6)
    assert merged.tally.close_codes == Counter({"1006": 4}) and merged.tally.latency.count == 150
    assert (merged.elapsed, merged.connected_in, merged.pause_seconds) == (8.0, 2.5, {"freeze": 2.6})
    merged.merge(outcome(10, 2, None))  # a worker whose clients did not all connect
    assert merged.connected_in is None
