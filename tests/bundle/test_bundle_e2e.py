"""The bundle end to end, with real processes: a real Prometheus (Debian's 2.42, exemplar storage on) loads
the project's own rule files and scrapes the real service while `stablews loadtest` runs chaos against it
(abrupt drops, clients that freeze and stop answering heartbeats), a few more clients never answer a
heartbeat, and an upstream relay points at a dead port (its circuit breaker opens). Every dashboard panel's
query returns data, and the alerts that match the chaos reach pending or firing in Prometheus's /api/v1/alerts.

The one override, as alerts/README.md documents it: the rule files are copied by alerts/shorten_for.py with
every `for:` cut to 2 s and group intervals left to the global 1 s evaluation interval. The shipped files are
not edited. The dashboard's variables are substituted as Grafana does for "All"."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import test_dashboard as dash  # the dashboard's queries and Grafana's substitutions, as test_dashboard.py reads them

from promkit import Prometheus, free_port, scrape_config
from support import ServerProcess, hello_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 150.0  # seconds for the data and the alerts to appear, on a loaded 2-core machine
# Grafana's "All" for the variables; rate windows short enough for a run of a minute or two.
VARIABLES = {"$job": ".*", "$instance": ".*", "$__rate_interval": "20s", "$__interval": "5s", "$__range": "5m",
             "$__tags": 'job="stablews"'}
# The alerts the chaos must raise, and why.
EXPECTED_ALERTS = {
    "StablewsMassDisconnect": "drops and freezes close a large share of the connections",
    "StablewsAbnormalCloseRatioHigh": "every close is abnormal (client_gone, heartbeat_timeout)",
    "StablewsMissedHeartbeats": "silent clients never answer pings: far more than 5 % of heartbeats missed",
    "StablewsCircuitBreakerOpen": "the relay's upstream is a dead port",
    "StablewsHeartbeatSLOBurnRatePage": "missed heartbeats burn the 99.9 % budget far faster than 14.4x",
    "StablewsHeartbeatSLOBurnRateTicket": "and faster than 3x",
}
SERVER_FLAGS = (
    "--heartbeat-interval", "0.5s", "--heartbeat-timeout", "0.3s", "--max-missed-heartbeats", "2",
    "--health-check-interval", "1s", "--demo-feed-rate", "50",
    "--initial-delay", "0.1s", "--max-delay", "0.5s", "--jitter-max", "0.1s",
    "--circuit-breaker-threshold", "2", "--circuit-breaker-timeout", "300s",
)


def shortened_rules(directory: Path) -> list[Path]:
    out = directory / "rules"
    files = sorted(str(p) for p in (ROOT / "alerts").glob("*.rules.yml"))
    subprocess.run([sys.executable, str(ROOT / "alerts" / "shorten_for.py"), "--for", "2s", "--out", str(out), *files],
                   check=True, capture_output=True, text=True, timeout=60)
    copies = sorted(out.glob("*.rules.yml"))
    assert len(copies) == len(files), copies
    return copies


def panel_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, Grafana's variables substituted. Annotations (restarts: none
    here) and variable queries are not panels."""
    board = dash.dashboard()
    return [
        (f"panel {p['title']!r} target {t['refId']}", dash.substitute(t["expr"], VARIABLES))
        for p in dash.panels(board)
        for t in p["targets"]
    ]


async def silent_clients(server: ServerProcess, count: int, stop: asyncio.Event) -> int:
    """`count` clients that say hello and never answer a ping; each is closed 4000 (heartbeat_timeout) and
    comes back at once, until `stop`. The sustained share of missed heartbeats the alerts are about (the
    load test's freezes are rarer: one per client per minute). Returns how many were closed 4000."""
    closed = 0

    async def one() -> None:
        nonlocal closed
        while not stop.is_set():
            client, _ = await hello_client(server.ws, answer_pings=False)
            try:
                if await client.wait_closed(10) == 4000:
                    closed += 1
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return closed


def start_loadtest(server: ServerProcess) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stablews", "loadtest", server.ws, "--clients", "30", "--duration", "240",
         "--ramp", "2", "--drop-rate", "1", "--freeze-ratio", "0.3", "--progress-interval", "60", "--seed", "7",
         "--initial-delay", "0.1s", "--max-delay", "0.5s", "--jitter-max", "0.1s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


async def test_every_panel_has_data_and_the_chaos_raises_its_alerts(start_server, tmp_path):
    upstream = f"ws://127.0.0.1:{free_port()}/ws#up.prices>relay.prices"  # nothing listens there
    server = start_server(*SERVER_FLAGS, "--upstreams", upstream)
    prometheus = Prometheus(tmp_path, scrape_config(server.port, shortened_rules(tmp_path)))
    load = start_loadtest(server)
    stop_silent = asyncio.Event()
    silent = asyncio.create_task(silent_clients(server, 8, stop_silent))
    try:
        await wait_for(prometheus.ready, 60, "prometheus ready")
        queries = panel_queries()
        assert len(queries) > 30, len(queries)
        empty: dict[str, str] = dict(queries)

        async def every_panel_has_data() -> bool:
            for where, expr in list(empty.items()):
                if await prometheus.query(expr):
                    del empty[where]
            return not empty

        try:
            await wait_for(every_panel_has_data, DEADLINE, "every panel query to return data", interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still empty: {sorted(empty)}\n{prometheus.logs()}") from None

        states: dict[str, str] = {}

        async def expected_alerts_raised() -> bool:
            data = await prometheus.get("/api/v1/alerts")
            for alert in data["data"]["alerts"]:
                name = alert["labels"]["alertname"]
                if alert["state"] == "firing" or name not in states:
                    states[name] = alert["state"]
            return all(states.get(name) in ("pending", "firing") for name in EXPECTED_ALERTS)

        try:
            await wait_for(expected_alerts_raised, DEADLINE, "the chaos's alerts", interval=1.0)
        except AssertionError as exc:
            missing = {n: why for n, why in EXPECTED_ALERTS.items() if states.get(n) not in ("pending", "firing")}
            raise AssertionError(f"{exc}; not raised: {missing}; seen: {states}") from None
        # Every raised alert carries what the runbooks promise.
        data = await prometheus.get("/api/v1/alerts")
        for alert in data["data"]["alerts"]:
            assert alert["labels"]["severity"] in ("page", "ticket"), alert
            assert {"summary", "description", "runbook_url"} <= set(alert["annotations"]), alert
        stop_silent.set()
        assert await asyncio.wait_for(silent, 20) > 0  # the silent clients really were closed 4000
    finally:
        stop_silent.set()
        if not silent.done():
            silent.cancel()
            with contextlib.suppress(BaseException):
                await silent
        if load.poll() is None:
            load.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(load.wait, 20)
        if load.poll() is None:
            load.kill()
            load.wait(5)
        prometheus.stop()
