"""`stablews client`: publications as JSON lines on stdout, lifecycle on stderr."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from support import ServerProcess

CLI = [sys.executable, "-m", "stablews", "client"]


class CliClient:
    """`stablews client` as its own process; stdout and stderr lines collected by threads."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._err_changed = threading.Condition()
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._err_changed:
                self.err.append(line)
                self._err_changed.notify_all()

    def publication(self, timeout: float = 15.0) -> dict[str, Any]:
        return json.loads(self.out.get(timeout=timeout))

    def wait_err(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._err_changed:
            while True:
                for line in self.err:
                    if needle in line:
                        return line
                left = deadline - time.monotonic()
                assert left > 0, f"no {needle!r} on stderr: {self.err}"
                self._err_changed.wait(left)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(15)


def test_prints_every_publication_and_survives_a_restart(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50", "--reconnect-delay", "0.2s")
    cli = CliClient(server.ws, "--channel", "demo.ticker", "--initial-delay", "50ms", "--jitter-max", "50ms")
    try:
        first = [cli.publication() for _ in range(10)]
        for pub in first:
            assert set(pub) >= {"channel", "epoch", "offset", "data", "ts"} and pub["channel"] == "demo.ticker"
        offsets = [p["offset"] for p in first]
        assert offsets == list(range(offsets[0], offsets[0] + 10))
        assert "connected" in cli.wait_err("stablews client: connected")

        server.stop()
        start_server("--port", str(server.port), "--demo-feed-rate", "50")
        resync = cli.wait_err("resync needed")
        assert "channel=demo.ticker" in resync and "reason=recovery_failed" in resync
        cli.wait_err("reconnecting")
        # stdout goes on with the new epoch, still one JSON object per line
        epochs = set()
        deadline = time.monotonic() + 20
        while first[0]["epoch"] in epochs or not epochs:
            assert time.monotonic() < deadline
            epochs = {cli.publication()["epoch"]}
        assert cli.stop() == 0
        assert "closed" in cli.wait_err("stablews client: closed")
    finally:
        if cli.proc.poll() is None:
            cli.proc.kill()


def test_count_exits_zero_after_n_lines(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50")
    result = subprocess.run([*CLI, server.ws, "--channel", "demo.ticker", "--count", "3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["channel"] == "demo.ticker" for line in lines)


def test_gives_up_with_status_1_when_recovery_is_exhausted() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket is closed
    result = subprocess.run(
        [*CLI, f"ws://127.0.0.1:{port}/ws", "--channel", "x", "--enable-circuit-breaker", "false"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "STABLEWS_MAX_RETRIES": "2", "STABLEWS_INITIAL_DELAY": "20ms", "STABLEWS_JITTER_MAX": "0"},
    )
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stablews client: stopped") and "recovery gave up: 2 attempts failed" in last
    # max_retries counts the attempts of the episode; the first connection is the first of them
    assert result.stderr.count("reconnecting") == 1


def test_bad_recovery_value_is_one_line_and_status_2() -> None:
    result = subprocess.run([*CLI, "ws://127.0.0.1:1/ws", "--channel", "x"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "STABLEWS_INITIAL_DELAY": "soon",
                                             "STABLEWS_PORT": "not-a-port"})  # a server option: not the client's
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "initial_delay" in lines[0] and "STABLEWS_INITIAL_DELAY" in lines[0]


def test_a_closed_pipe_ends_the_command_with_status_0(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50")
    proc = subprocess.Popen([*CLI, server.ws, "--channel", "demo.ticker"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["channel"] == "demo.ticker"
        proc.stdout.close()  # what `| head -n 1` does
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "Traceback" not in err and "handler failed" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
