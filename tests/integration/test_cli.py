"""`stablews serve`: configuration sources, bad values, and a clean exit on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from support import hello_client

CLI = [sys.executable, "-m", "stablews"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--heartbeat-interval", "soon"], {}, "heartbeat_interval"),
        (["--port", "70000"], {}, "port"),
        ([], {"STABLEWS_MAX_MISSED_HEARTBEATS": "0"}, "max_missed_heartbeats"),
        ([], {"STABLEWS_CLIENT_PUBLISH": "maybe"}, "client_publish"),
        (["--heartbeat-interval", "1s", "--heartbeat-timeout", "5s"], {}, "heartbeat_timeout"),
        (["--broker", "kafka://x"], {}, "broker"),
    ],
)
def test_a_bad_value_stops_startup_with_one_line_and_status_2(args, env, needle):
    result = run_cli("serve", "--port", "0", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and lines[0].startswith("stablews: invalid configuration:")


def test_a_bad_config_file_is_one_line_too(tmp_path):
    path = tmp_path / "stablews.toml"
    path.write_text('[stability]\nheartbeat_intervall = "1s"\n')
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2 and "heartbeat_intervall" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = run_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr


async def test_flag_beats_environment_beats_file(start_server, tmp_path):
    path = tmp_path / "stablews.toml"
    path.write_text('[stability]\nheartbeat_interval = "9s"\nheartbeat_timeout = "700ms"\n'
                    '[server]\nhello_timeout = "3s"\ndemo_feed = false\n')
    server = start_server("--config", str(path), "--hello-timeout", "4s",
                          env={"STABLEWS_HEARTBEAT_INTERVAL": "1500ms", "STABLEWS_HELLO_TIMEOUT": "2s"})
    client, welcome = await hello_client(server.ws)
    assert welcome["heartbeat"] == {"interval_ms": 1500, "timeout_ms": 700}  # env over file; file over default
    await client.close()
    logs = server.logs()
    assert any(entry.get("msg") == "listening" for entry in logs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_every_client_and_exits_0(start_server, sig):
    server = start_server("--demo-feed-rate", "50", "--shutdown-timeout", "5s")
    clients = []
    for _ in range(5):
        client, _ = await hello_client(server.ws)
        await client.send({"type": "subscribe", "channel": "demo.ticker"})
        await client.recv_type("subscribed")
        clients.append(client)
    started = time.monotonic()
    server.signal(sig)
    for client in clients:
        advice = None
        while advice is None:
            message = await client.recv(10)
            if message["type"] == "reconnect":
                advice = message
            else:
                assert message["type"] == "message"
        assert advice["reason"] == "shutdown" and advice["after_ms"] >= 0
        assert await client.wait_closed() == 1001
    assert server.wait(10) == 0
    assert time.monotonic() - started < 5 + 3
    drained = [e for e in server.logs() if e.get("msg") == "drain finished"]
    assert drained and drained[0]["connections_closed"] == 5 and drained[0]["connections_abandoned"] == 0
