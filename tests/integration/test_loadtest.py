"""`stablews loadtest` against a real server process: chaos (drops, freezes) with no message lost or
duplicated, what the server records for each fault, an interrupted endless run, the tool's own
publishing, and one-line refusals of bad options. Also the accounting of losses and duplicates."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from stablews.cli import main as cli_main
from stablews.client import StableClient
from stablews.loadtest import LatencyHistogram, Probe, Tally
from support import ServerProcess

LOADTEST = [sys.executable, "-m", "stablews", "loadtest"]
# A dead peer is closed 0.5 x 2 + 0.3 = 1.3 s after its last answered ping: a freeze (auto: 2 x 0.8 + 1 = 2.6 s)
# ends in a 4000 within an 8 s run.
SHORT_HEARTBEATS = ("--heartbeat-interval", "0.5s", "--heartbeat-timeout", "0.3s", "--max-missed-heartbeats", "2")


def closed_by_cause(server: ServerProcess) -> dict[str, int]:
    stats = httpx.get(f"{server.http}/api/v1/websocket/stats", timeout=10).json()
    return stats["connections"]["closed_by_cause"]


def run_loadtest(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOADTEST, *args], capture_output=True, text=True, timeout=timeout)


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
    proc = subprocess.Popen(
        [*LOADTEST, server.ws, "--clients", "5", "--channels", "lt.one,lt.two", "--publish-rate", "100",
         "--duration", "0", "--ramp", "0.2s", "--drop-rate", "0", "--freeze-ratio", "0",
         "--progress-interval", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        progress = 0
        deadline = time.monotonic() + 15
        while progress < 3 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "loadtest ended early"
            if "connected=5/5" in line and "msgs/s=0.0" not in line:
                progress += 1
        assert progress == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
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
