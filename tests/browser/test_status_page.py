"""The status page at `/` in headless Chromium, against real servers (docs/browser.md).

- it loads with no script error; the ticker of `demo.ticker` updates through the browser client;
- its figures are those of /api/v1/websocket/stats (counts, health distribution, heartbeat RTT,
  recovery), the score histogram is that of /connections, and the recent drops are those of
  /drops, each with its cause and a link to its trace at the configured trace view;
- a client name that is markup is shown as text;
- with an API key configured, the admin views ask for it and work once it is given;
- restarted gracefully while open, it reconnects on its own: on Redis its offsets go on with no gap
  and no resync; on the memory broker (a new epoch) it shows the resync;
- it can be switched off; the client it serves is the repository's clients/js/stablews.js.

The screenshots in docs/img/browser/ are the ones these tests take (STABLEWS_SCREENSHOTS=docs/img/browser).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from browserkit import Page, open_browser
from redis_server import RedisServer
from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import Client, ServerProcess, get_json, graceful_restart, hello_client, wait_for

pytestmark = pytest.mark.integration

StartServer = Callable[..., ServerProcess]
KEY = "status-page-key"
TRACE_VIEW = "http://traces.example:3000/trace/{trace_id}?from=status"
HOSTILE_NAME = '<img src=x onerror="window.pwned=1">'
REPO = Path(__file__).resolve().parents[2]
DASH = "\N{EN DASH}"  # what the page shows for a figure with no value


# ------------------------------------------------------------ what the page shows, computed here

def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else DASH


def fixed(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else DASH


def percent(value: Any) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, int | float) else DASH


def expected_figures(stats: dict[str, Any]) -> dict[str, str]:
    """Every figure the page shows of a stats answer, as it should read."""
    c, h, r = stats["connections"], stats["heartbeats"], stats["recovery"]
    figures = {"status": stats["status"], "instance": stats["instance"], "version": stats["version"]}
    for name in ("active", "peak", "opened_total", "closed_total", "healthy", "unhealthy", "stale"):
        figures[f"connections.{name}"] = count(c[name])
    figures["connections.average_health_score"] = fixed(c["average_health_score"])
    figures["connections.unhealthy_ratio"] = percent(c["unhealthy_ratio"])
    for q in ("p50", "p95", "p99", "max"):
        figures[f"heartbeats.rtt_ms.{q}"] = fixed(h["rtt_ms"][q])
    figures["heartbeats.rtt_ms.samples"] = count(h["rtt_ms"]["samples"])
    figures["heartbeats.missed_ratio"] = percent(h["missed_ratio"])
    for name in ("resumes_requested", "recovered", "not_recovered", "messages_replayed"):
        figures[f"recovery.{name}"] = count(r[name])
    figures["recovery.success_rate"] = percent(r["success_rate"])
    figures["errors.total"] = count(stats["errors"]["total"])
    figures["messages.sent_total"] = count(stats["messages"]["sent_total"])
    return figures


async def shown(page: Page, names: list[str]) -> dict[str, str]:
    return {name: await page.figure(name) for name in names}


async def open_status_page(page: Page, server: ServerProcess, query: str = "?refresh=0.5") -> None:
    await page.goto(f"{server.http}/{query}")
    await page.wait_for_function("window.stablewsStatus && window.stablewsStatus.client && "
                                 "window.stablewsStatus.client.state === 'connected'")
    await page.wait_for_function("window.stablewsStatus.received.length >= 4")


def buckets(scores: list[float]) -> dict[str, int]:
    bounds = [(0, 25), (25, 50), (50, 75), (75, 90), (90, 101)]
    return {f"{lo}-{min(hi, 100)}": sum(1 for s in scores if lo <= s < hi) for lo, hi in bounds}


# ------------------------------------------------------------ the figures


async def test_the_page_shows_the_stats_the_ticker_the_health_distribution_and_the_drops_with_trace_links(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server(
        "--demo-feed-rate", "10", "--heartbeat-interval", "1s", "--heartbeat-timeout", "500ms",
        "--max-missed-heartbeats", "1000", "--stale-connection-threshold", "3s", "--health-check-interval", "1s",
        "--trace-url", TRACE_VIEW,
    )
    fast = RecoveryPolicy(initial_delay=0.1, jitter_max=0.1)
    healthy = [StableClient(server.ws, channels=["demo.ticker"], policy=fast, name=f"bot-{i}") for i in range(2)]
    paused = StableClient(server.ws, channels=["demo.ticker"], policy=fast, name="frozen-bot")
    idle: Client | None = None
    try:
        for client in [*healthy, paused]:
            await client.connect()
            await client.wait_connected(10)
        paused.pause_reading()  # it stops answering pings: unhealthy from its first miss
        idle, _ = await hello_client(server.ws)  # answers pings, carries no data: stale after 3 s
        hostile, welcome = await hello_client(server.ws, hello={"client": HOSTILE_NAME})
        hostile.abort()  # dropped without a close frame: a flight-recorder entry

        async def fleet_settled() -> dict[str, Any] | None:
            stats = await get_json(f"{server.http}/api/v1/websocket/stats")
            c = stats["connections"]
            return stats if c["unhealthy"] >= 1 and c["stale"] >= 1 and c["closed_total"] >= 1 else None

        await wait_for(fleet_settled, 30, "an unhealthy, a stale and a dropped connection")

        async with open_browser(tmp_path) as page:
            await open_status_page(page, server)
            # The ticker updates: a symbol's offset moves on.
            first = await page.page.locator("#ticker tbody tr").first.locator("td").nth(2).text_content()
            await page.wait_for_function(
                "(before) => document.querySelector('#ticker tbody tr td:nth-child(3)').textContent !== before",
                first)
            symbols = await page.page.locator("#ticker tbody tr td:first-child").all_text_contents()
            assert sorted(s.strip() for s in symbols) == ["BTC-USD", "ETH-USD", "EUR-USD", "SOL-USD"]

            # What it shows is what its last stats answer said, formatted...
            names = list(expected_figures(await get_json(f"{server.http}/api/v1/websocket/stats")))

            async def rendered_matches() -> bool:
                stats = await page.evaluate("window.stablewsStatus.stats")
                return await shown(page, names) == expected_figures(stats)

            await wait_for(rendered_matches, 20, "the page's figures to read as its stats")
            # ...and that answer is the API's: the connection counts agree with a fresh fetch.
            counts = ["connections.active", "connections.healthy", "connections.unhealthy", "connections.stale",
                      "connections.opened_total", "connections.closed_total", "status"]

            async def counts_match() -> bool:
                api = expected_figures(await get_json(f"{server.http}/api/v1/websocket/stats"))
                return {n: api[n] for n in counts} == await shown(page, counts)

            await wait_for(counts_match, 20, "the page's counts to equal the stats API's")
            assert await page.figure("connections.active") == "5"  # 2 bots, the frozen one, the idle one, the page
            assert await page.figure("connections.unhealthy") == "1"
            assert await page.figure("connections.stale") == "1"
            assert await page.figure("heartbeats.rtt_ms.p50") != DASH  # heartbeats were answered and timed

            # The score histogram is that of /connections.
            async def histogram_matches() -> bool:
                listing = await get_json(f"{server.http}/api/v1/websocket/connections?limit=1000")
                want = buckets([c["health"]["score"] for c in listing["connections"]])
                got = {}
                for item in await page.page.locator("#scores li").all():
                    got[await item.get_attribute("data-bucket")] = int(
                        (await item.locator(".count").text_content() or "").replace(",", ""))
                return got == want and sum(got.values()) == 5

            await wait_for(histogram_matches, 20, "the score histogram to match /connections")

            # The drop: its cause, and its trace linked at the trace view.
            drops = await get_json(f"{server.http}/api/v1/websocket/drops")
            record = next(d for d in drops["drops"] if d["connection"] == welcome["connection"])
            row = page.page.locator(f'#drops tbody tr[data-connection="{welcome["connection"]}"]')
            await row.wait_for(timeout=20_000)
            assert (await row.locator("td.cause").text_content()) == record["cause"] == "client_gone"
            link = row.locator("a.trace")
            assert await link.text_content() == record["trace_id"] == welcome["trace_id"]
            assert await link.get_attribute("href") == TRACE_VIEW.replace("{trace_id}", record["trace_id"])
            # A client name that is markup is shown as text, and nothing of it ran.
            assert HOSTILE_NAME in (await row.text_content() or "")
            assert await page.page.locator("#drops img").count() == 0
            assert await page.evaluate("window.pwned === undefined")

            await page.screenshot("status-page.png")
            assert page.uncaught == [] and page.console_errors == []
    finally:
        if idle is not None:
            await idle.close()
        paused.resume_reading()
        await asyncio.gather(*(c.close() for c in [*healthy, paused]))


async def test_with_an_api_key_the_admin_views_ask_for_it_and_work_once_given(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server("--api-key", KEY, "--demo-feed-rate", "10")
    dropped, _ = await hello_client(server.ws)
    dropped.abort()
    await wait_for(lambda: _closed(server), 20, "the dropped connection to be recorded")
    async with open_browser(tmp_path) as page:
        await open_status_page(page, server)
        await page.wait_for_function("document.querySelector('[data-figure=\"drops.note\"]').textContent"
                                     ".includes('API key')")
        assert await page.figure("scores.note") == "(needs the API key)"
        assert await page.page.locator("#api-key-form").is_visible()
        assert await page.figure("connections.active") != "…"  # the stats are open to all
        await page.page.fill("#api-key", KEY)
        await page.page.click("#api-key-form button")
        await page.page.locator("#drops tbody tr").first.wait_for(timeout=20_000)
        assert await page.figure("drops.note") == "(1 latest of 1 recorded)"
        await page.wait_for_function("document.querySelector('[data-figure=\"scores.note\"]').textContent"
                                     " === '(1 connection)'")
        assert not await page.page.locator("#api-key-form").is_visible()


async def _closed(server: ServerProcess) -> bool:
    stats = await get_json(f"{server.http}/api/v1/websocket/stats")
    return stats["connections"]["closed_total"] >= 1


# ------------------------------------------------------------ a graceful restart while the page is open


async def _received(page: Page) -> list[tuple[str, int]]:
    return [tuple(x) for x in await page.evaluate("window.stablewsStatus.received")]


async def test_restarted_on_redis_the_page_reconnects_and_its_offsets_go_on_with_no_gap(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    flags = ("--broker", redis_server.url, "--demo-feed-rate", "10", "--shutdown-timeout", "5s")
    server = start_server(*flags)
    async with open_browser(tmp_path) as page:
        await open_status_page(page, server)
        await page.wait_for_function("window.stablewsStatus.received.length >= 10")
        new = await graceful_restart(server, start_server, flags)
        await page.wait_for_function("window.stablewsStatus.client.stats().drops === 1 && "
                                     "window.stablewsStatus.client.state === 'connected'", timeout=30)
        before = len(await _received(page))
        await page.wait_for_function("(n) => window.stablewsStatus.received.length >= n + 10", before, timeout=30)
        await page.wait_for_function(  # the figures caught up with the client (they refresh every 250 ms)
            "document.querySelector('[data-figure=\"client.channels_resumed\"]').textContent === '1'")
        received = await _received(page)
        assert len({epoch for epoch, _ in received}) == 1, received[:3]
        offsets = [offset for _, offset in received]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets  # no gap, no repeat
        assert await page.evaluate("window.stablewsStatus.resyncs") == []
        assert await page.figure("client.channels_resynced") == "0"
        assert await page.figure("client.gaps") == "0"
        assert await page.figure("client.drops") == "1"
        log = await page.page.locator("#client-log li").all_text_contents()
        assert any("demo.ticker resumed" in line for line in log), log
        assert any("dropped: 1001" in line for line in log), log
        # The stats follow the new instance too.
        await page.wait_for_function(
            "(instance) => document.querySelector('[data-figure=\"instance\"]').textContent === instance",
            (await get_json(f"{new.http}/api/v1/websocket/stats"))["instance"])
        await page.screenshot("status-page-after-restart.png")
        assert page.uncaught == []


async def test_restarted_on_the_memory_broker_the_page_shows_the_resync_to_the_new_epoch(
    start_server: StartServer, tmp_path: Path,
) -> None:
    flags = ("--demo-feed-rate", "10", "--shutdown-timeout", "5s")
    server = start_server(*flags)
    async with open_browser(tmp_path) as page:
        await open_status_page(page, server)
        await page.wait_for_function("window.stablewsStatus.received.length >= 10")
        await graceful_restart(server, start_server, flags)
        await page.wait_for_function("window.stablewsStatus.resyncs.length === 1", timeout=30)
        await page.wait_for_function(
            "document.querySelector('[data-figure=\"client.channels_resynced\"]').textContent === '1'")
        resync = (await page.evaluate("window.stablewsStatus.resyncs"))[0]
        received = await _received(page)
        old_epoch = received[0][0]
        assert resync["reason"] == "recovery_failed" and resync["previous"]["epoch"] == old_epoch
        new_epoch = resync["current"]["epoch"]
        assert new_epoch != old_epoch
        await page.wait_for_function(
            "(e) => window.stablewsStatus.received.filter((r) => r[0] === e).length >= 5", new_epoch, timeout=30)
        received = await _received(page)
        old = [o for e, o in received if e == old_epoch]
        new = [o for e, o in received if e == new_epoch]
        assert received == [(old_epoch, o) for o in old] + [(new_epoch, o) for o in new]  # old, then new
        assert old == list(range(old[0], old[0] + len(old))) and old[-1] == resync["previous"]["offset"]
        assert new == list(range(resync["current"]["offset"] + 1, resync["current"]["offset"] + 1 + len(new)))
        log = await page.page.locator("#client-log li.resync").all_text_contents()
        assert len(log) == 1 and "resync demo.ticker (recovery failed)" in log[0], log
        assert f"now {new_epoch}@" in log[0]
        assert await page.page.locator("#ticker tbody tr.resynced").count() == 4
        assert await page.figure("client.epoch") == new_epoch
        await page.screenshot("status-page-resync.png")
        assert page.uncaught == []


# ------------------------------------------------------------ serving


async def test_the_page_and_the_client_are_served_and_can_be_switched_off(start_server: StartServer) -> None:
    on = start_server("--no-demo-feed")
    off = start_server("--no-status-page", "--no-demo-feed")
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(f"{on.http}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<meta name="stablews-demo-channel" content="">' in page.text  # no demo feed, no ticker
        served = await http.get(f"{on.http}/client/stablews.js")
        assert served.status_code == 200 and "javascript" in served.headers["content-type"]
        assert served.content == (REPO / "clients" / "js" / "stablews.js").read_bytes()
        for path in ("/", "/client/stablews.js", "/status/status.js"):
            assert (await http.get(f"{off.http}{path}")).status_code == 404, path
        assert (await http.get(f"{off.http}/api/v1/websocket/stats")).status_code == 200
