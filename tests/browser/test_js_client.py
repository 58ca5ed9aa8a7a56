"""The browser client (/client/stablews.js) in headless Chromium against a real server.

- its backoff, jitter and circuit breaker give the same sequence as the Python client's `Recovery`
  with the same options and the same random draws, against a port where nothing listens, and the
  attempts are really that far apart; with the breaker off it gives up as the Python client does;
- a resume replays exactly the missed messages, several to a frame (newline-split), with no gap;
- it answers the server's heartbeats (the server counts them, none missed);
- a frozen server (SIGSTOP) is noticed after heartbeat interval + timeout of silence; the client
  reconnects once the server answers again and resumes with no gap;
- `reconnect` advice sets the first delay after a graceful restart, and it resumes on the new server;
- a token is accepted in the query or in hello; a bad one is closed 4401 and not retried.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from browserkit import Page, open_browser
from promkit import free_port
from stablews.recovery import GiveUp, Recovery, RecoveryPolicy
from support import ServerProcess, get_json, graceful_restart, wait_for

pytestmark = pytest.mark.integration

StartServer = Callable[..., ServerProcess]
KEY = "browser-test-key"
SECRET = "a-browser-test-secret-of-32-bytes-at-least"
# A loaded 2-core machine can be late by this much on top of any bound.
MARGIN = 3.0

LOAD_CLIENT = """async (module) => { window.stablews = await import(module); return Object.keys(window.stablews); }"""


async def client_page(page: Page, server: ServerProcess) -> None:
    """A tab on the server's origin with the client module loaded as `window.stablews`."""
    await page.goto(f"{server.http}/healthz")
    exported = await page.evaluate(LOAD_CLIENT, f"{server.http}/client/stablews.js")
    assert "StableClient" in exported


# ------------------------------------------------------------ backoff and circuit breaker


class Draws:
    """The same random draws for both clients: uniform(a, b) = a + (b - a) * next draw."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.i = 0

    def uniform(self, a: float, b: float) -> float:
        value = self.values[self.i % len(self.values)]
        self.i += 1
        return a + (b - a) * value


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def python_schedule(policy: RecoveryPolicy, draws: list[float], attempts: int) -> dict[str, Any]:
    """What the Python client's recovery does against a dead port: the same loop as StableClient._run,
    every attempt failing, on a clock that moves exactly by the delays waited."""
    clock = FakeClock()
    events: list[tuple[Any, ...]] = []
    recovery = Recovery(policy, clock=clock, rng=Draws(draws),
                        on_circuit_change=lambda old, new: events.append(("circuit", str(new))))
    made = 0
    gave_up = None
    while made < attempts:
        try:
            delay = recovery.next_delay()
        except GiveUp as exc:
            gave_up = f"recovery gave up: {exc}"
            break
        if delay > 0:
            events.append(("reconnecting", round(delay, 3), str(recovery.circuit_state)))
            clock.now += delay
        if not recovery.start_attempt():
            continue
        made += 1
        events.append(("attempt", made))
        recovery.failed()
    if gave_up is None:  # the browser run ends after its last failure, when the next wait is announced
        delay = recovery.next_delay()
        if delay > 0:
            events.append(("reconnecting", round(delay, 3), str(recovery.circuit_state)))
    return {"events": events, "stats": recovery.stats(), "gave_up": gave_up}


DEAD_PORT_RUN = """async ({url, policy, draws, attempts, deadline}) => {
  const { StableClient } = window.stablews;
  const t0 = performance.now() / 1000;
  const now = () => performance.now() / 1000 - t0;
  const events = [];
  let made = 0;
  class Counting extends WebSocket {  // the real WebSocket, counted
    constructor(...args) { made += 1; events.push(["attempt", made, now()]); super(...args); }
  }
  let i = 0;
  const client = new StableClient(url, { policy, random: () => draws[i++ % draws.length], WebSocket: Counting });
  client.on("reconnecting", (info) => events.push(["reconnecting", info.delay, info.circuit, now()]));
  client.on("circuit", (state) => events.push(["circuit", state, now()]));
  const closed = new Promise((resolve) => client.on("state", (s) => { if (s === "closed") resolve(); }));
  client.connect();
  const enough = new Promise((resolve) => {
    const poll = () => (made >= attempts && client.stats().consecutive_failures >= 1 &&
      client.stats().attempts === client.stats().failures ? resolve() : setTimeout(poll, 10));
    poll();
  });
  await Promise.race([enough, closed, new Promise((r) => setTimeout(r, deadline * 1000))]);
  const stats = client.stats();
  const error = client.error ? client.error.message : null;
  const state = client.state;
  await client.close();
  return { events, stats, error, state };
}"""


async def run_against_dead_port(
    start_server: StartServer, tmp_path: Path, policy: RecoveryPolicy, draws: list[float], attempts: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The browser client's run against a port where nothing listens (every attempt refused), and
    the Python client's schedule for the same options and draws."""
    server = start_server("--no-demo-feed")
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    js_policy = {name: getattr(policy, name) for name in RecoveryPolicy.__dataclass_fields__}
    async with open_browser(tmp_path) as page:
        await client_page(page, server)
        browser = await page.evaluate(DEAD_PORT_RUN, {
            "url": dead, "policy": js_policy, "draws": draws, "attempts": attempts, "deadline": 30,
        })
        assert page.uncaught == []
    return browser, python_schedule(policy, draws, attempts)


def _compare_schedules(browser: dict[str, Any], expected: dict[str, Any]) -> None:
    got = [tuple(e[:-1]) for e in browser["events"]]
    want = expected["events"]
    # Circuit waits depend on how long the failure took to be seen; everything else is exact.
    assert [e[0] for e in got] == [e[0] for e in want], (got, want)
    for g, w in zip(got, want, strict=True):
        if g[0] == "reconnecting" and w[2] == "open":
            assert g[2] == "open" and abs(g[1] - w[1]) <= 0.05 + MARGIN * 0.02, (g, w)
        else:
            assert g == w, (got, want)
    # The attempts were really as far apart as the delays said (and not much more).
    waited = 0.0
    last_attempt_at = None
    for event in browser["events"]:
        if event[0] == "reconnecting":
            waited += event[1]
        elif event[0] == "attempt":
            if last_attempt_at is not None:
                gap = event[2] - last_attempt_at
                assert waited - 0.02 <= gap <= waited + MARGIN, (event, waited, gap)
            last_attempt_at, waited = event[2], 0.0
    stats, want_stats = browser["stats"], expected["stats"]
    for key in ("attempts", "failures", "successes", "episodes", "circuit_opened_total", "consecutive_failures",
                "gave_up", "in_episode"):
        assert stats[key] == want_stats[key], (key, stats, want_stats)
    assert stats["success_rate"] == want_stats["success_rate"] == 0


async def test_backoff_jitter_and_circuit_breaker_match_the_python_client_against_a_dead_port(
    start_server: StartServer, tmp_path: Path,
) -> None:
    policy = RecoveryPolicy(initial_delay=0.2, backoff_multiplier=2, max_delay=0.8, jitter_max=0.1, max_retries=4,
                            circuit_breaker_threshold=3, circuit_breaker_timeout=1.0)
    # Four attempts: three in backoff, the circuit opens; the half-open trial fails, it opens again.
    browser, expected = await run_against_dead_port(start_server, tmp_path, policy, [0.1, 0.9, 0.5, 0.3, 0.7], 4)
    assert ("circuit", "open") in expected["events"] and ("circuit", "half_open") in expected["events"]
    assert expected["stats"]["circuit_opened_total"] == 2
    _compare_schedules(browser, expected)
    # Never connected: still "connecting", as the Python client; the breaker never gives up.
    assert browser["error"] is None and browser["state"] == "connecting"


async def test_with_the_breaker_off_it_gives_up_after_max_retries_as_the_python_client(
    start_server: StartServer, tmp_path: Path,
) -> None:
    policy = RecoveryPolicy(initial_delay=0.1, max_delay=0.4, jitter_max=0.05, max_retries=3,
                            enable_circuit_breaker=False)
    browser, expected = await run_against_dead_port(start_server, tmp_path, policy, [0.25, 0.75], 10)
    assert expected["gave_up"] == "recovery gave up: 3 attempts failed"
    assert browser["state"] == "closed" and browser["error"] == expected["gave_up"], browser
    _compare_schedules(browser, expected)


# ------------------------------------------------------------ against a live server

RECORDING_CLIENT = """({url, options}) => {
  const { StableClient } = window.stablews;
  // One log in delivery order: messages, events, and every frame the browser received.
  const rec = { log: [], frames: [] };
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (e) => rec.frames.push(typeof e.data === "string" ? e.data : "<binary>"));
    }
  }
  const client = new StableClient(url, { ...options, WebSocket: Recording });
  client.on("message", (m) => rec.log.push(["message", m.channel, m.epoch, m.offset]));
  for (const name of ["state", "connected", "disconnected", "reconnecting", "recovered", "resync", "error"]) {
    client.on(name, (...args) => rec.log.push([name, ...args]));
  }
  window.client = client;
  window.rec = rec;
  client.connect();
  return true;
}"""

FAST = {"initial_delay": 0.2, "max_delay": 1.0, "jitter_max": 0.1, "max_retries": 1000,
        "circuit_breaker_threshold": 1000}


async def start_client(page: Page, url: str, **options: Any) -> None:
    await page.evaluate(RECORDING_CLIENT, {"url": url, "options": options})


def messages(log: list[list[Any]], channel: str | None = None) -> list[tuple[str, int]]:
    return [(e[2], e[3]) for e in log if e[0] == "message" and (channel is None or e[1] == channel)]


def contiguous(offsets: list[int]) -> bool:
    return offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else False


async def publish(server: ServerProcess, channel: str, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as http:
        acks = []
        for i in range(count):
            reply = await http.post(f"{server.http}/api/v1/publish", headers={"X-API-Key": KEY},
                                    json={"channel": channel, "data": {"n": i, "pad": "x" * 200}})
            assert reply.status_code == 200, reply.text
            acks.append(reply.json())
        return acks


async def test_a_resume_replays_what_was_missed_in_coalesced_frames_and_heartbeats_are_answered(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server("--no-demo-feed", "--api-key", KEY, "--heartbeat-interval", "1s",
                          "--heartbeat-timeout", "1s")
    acks = await publish(server, "feed.a", 60)
    epoch = acks[0]["epoch"]
    assert [a["offset"] for a in acks] == list(range(1, 61))
    async with open_browser(tmp_path) as page:
        await client_page(page, server)
        await start_client(page, server.ws, channels=["feed.a"], positions={"feed.a": {"epoch": epoch, "offset": 10}})
        await page.wait_for_function("window.rec.log.filter((e) => e[0] === 'message').length >= 50")
        await publish(server, "feed.a", 5)
        await page.wait_for_function("window.rec.log.filter((e) => e[0] === 'message').length >= 55")
        rec = await page.evaluate("window.rec")
        log = rec["log"]
        # Exactly the missed messages, in order, then the live ones: no gap, no repeat.
        assert messages(log) == [(epoch, n) for n in range(11, 66)]
        assert ["recovered", "feed.a", 50] in log
        assert log.index(["recovered", "feed.a", 50]) < log.index(["message", "feed.a", epoch, 11])
        # The replay came several messages to a frame: the client split them on newlines.
        replay_frames = [f for f in rec["frames"] if '"type":"message"' in f and f.count("\n") >= 1]
        assert replay_frames, rec["frames"][:3]
        assert sum(f.count('"type":"message"') for f in rec["frames"]) == 55
        assert len([f for f in rec["frames"] if '"type":"message"' in f]) < 55

        # Heartbeats: the server pings every second and counts the browser's pongs.
        connection = await page.evaluate("window.client.connectionId")

        async def answered() -> dict[str, Any] | None:
            detail = await get_json(f"{server.http}/api/v1/websocket/connections/{connection}",
                                    headers={"X-API-Key": KEY})
            return detail if detail["heartbeat"]["ok"] >= 3 else None

        detail = await wait_for(answered, 20, "three answered heartbeats")
        assert detail["heartbeat"]["missed"] == 0 and detail["heartbeat"]["rtt_ms_last"] is not None
        stats = await page.evaluate("window.client.stats()")
        assert stats["channels_resumed"] == 1 and stats["messages_replayed"] == 50
        assert stats["gaps"] == stats["duplicates_dropped"] == stats["channels_resynced"] == 0
        assert stats["state"] == "connected" and stats["drops"] == 0
        assert page.uncaught == [] and page.console_errors == []
        await page.evaluate("window.client.close()")


async def test_a_frozen_server_is_noticed_after_interval_plus_timeout_and_the_client_resumes(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server("--demo-feed-rate", "10", "--heartbeat-interval", "1s", "--heartbeat-timeout", "500ms")
    async with open_browser(tmp_path) as page:
        await client_page(page, server)
        await start_client(page, server.ws, channels=["demo.ticker"], policy=FAST, openTimeout=1.5)
        await page.wait_for_function("window.rec.log.filter((e) => e[0] === 'message').length >= 5")
        frozen_at = time.monotonic()
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await page.wait_for_function("window.client.state === 'reconnecting'", timeout=1.5 + MARGIN * 2)
            noticed_after = time.monotonic() - frozen_at
            last_close = await page.evaluate("window.client.stats().last_close")
            assert last_close["reason"] == "server silent for 1.5s" and last_close["code"] is None, last_close
            assert noticed_after >= 1.0, noticed_after  # silence is measured from the last frame, < 1 s before
            # While it stays frozen, attempts time out (the kernel accepts, nobody answers) and back off.
            await page.wait_for_function("window.client.stats().failures >= 1", timeout=1.5 + MARGIN * 2)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await page.wait_for_function("window.client.state === 'connected'", timeout=20)
        before = len(messages(await page.evaluate("window.rec.log")))
        await page.wait_for_function(
            "(n) => window.rec.log.filter((e) => e[0] === 'message').length >= n + 5", before, timeout=20)
        log = await page.evaluate("window.rec.log")
        got = messages(log)
        assert len({e for e, _ in got}) == 1 and contiguous([o for _, o in got]), got
        assert [e for e in log if e[0] == "resync"] == []
        stats = await page.evaluate("window.client.stats()")
        assert stats["drops"] == 1 and stats["channels_resumed"] == 1 and stats["gaps"] == 0, stats
        assert page.uncaught == []
        await page.evaluate("window.client.close()")


async def test_reconnect_advice_sets_the_first_delay_and_a_restarted_server_brings_one_resync(
    start_server: StartServer, tmp_path: Path,
) -> None:
    flags = ("--demo-feed-rate", "20", "--shutdown-timeout", "10s")
    old = start_server(*flags)
    async with open_browser(tmp_path) as page:
        await client_page(page, old)
        await start_client(page, old.ws, channels=["demo.ticker"], policy={**FAST, "max_delay": 5.0})
        await page.wait_for_function("window.rec.log.filter((e) => e[0] === 'message').length >= 5")
        await graceful_restart(old, start_server, flags)
        await page.wait_for_function("window.rec.log.some((e) => e[0] === 'resync')", timeout=30)
        await page.wait_for_function(
            "window.rec.log.filter((e) => e[0] === 'message').length >= "
            "window.rec.log.findIndex((e) => e[0] === 'resync') + 5", timeout=30)
        rec = await page.evaluate("window.rec")
    log = rec["log"]
    advice = [m for f in rec["frames"] for m in f.split("\n") if '"type":"reconnect"' in m]
    assert len(advice) == 1, advice
    after_ms = json.loads(advice[0])["after_ms"]
    first_wait = next(e for e in log if e[0] == "reconnecting")[1]
    assert first_wait["delay"] == round(min(after_ms / 1000, 5.0), 3), (first_wait, after_ms)
    assert next(e for e in log if e[0] == "disconnected")[1]["code"] == 1001
    cut = next(i for i, e in enumerate(log) if e[0] == "resync")
    _, channel, info = log[cut]
    before, after = messages(log[:cut]), messages(log[cut:])
    assert channel == "demo.ticker" and info["reason"] == "recovery_failed"
    assert len({e for e, _ in before}) == 1 and contiguous([o for _, o in before])
    assert info["previous"] == {"epoch": before[-1][0], "offset": before[-1][1]}
    assert all(e == info["current"]["epoch"] != before[0][0] for e, _ in after)
    new_offsets = [o for _, o in after]
    assert new_offsets[0] == info["current"]["offset"] + 1 and contiguous(new_offsets)


async def test_a_token_goes_in_the_query_or_in_hello_and_a_bad_one_is_final(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server("--auth-secret", SECRET, "--demo-feed-rate", "20")
    good = jwt.encode({"sub": "dashboard", "exp": int(time.time()) + 600, "channels": ["demo.>"]}, SECRET,
                      algorithm="HS256")
    forged = jwt.encode({"sub": "dashboard", "exp": int(time.time()) + 600, "channels": [">"]}, "x" * 40,
                        algorithm="HS256")
    async with open_browser(tmp_path) as page:
        await client_page(page, server)
        for place in ("query", "hello"):
            await start_client(page, server.ws, channels=["demo.ticker"], token=good, tokenIn=place)
            await page.wait_for_function("window.rec.log.some((e) => e[0] === 'message')")
            connection = await page.evaluate("window.client.connectionId")
            listing = await get_json(f"{server.http}/api/v1/websocket/connections")
            subjects = {c["id"]: c["client"]["subject"] for c in listing["connections"]}
            assert subjects[connection] == "dashboard", (place, listing)
            shown_url = await page.evaluate("window.client.stats().url")
            assert SECRET not in shown_url and good not in shown_url  # the token is never shown
            await page.evaluate("window.client.close()")

        await start_client(page, server.ws, channels=["demo.ticker"], token=forged, policy=FAST)
        await page.wait_for_function("window.client.state === 'closed'", timeout=20)
        stats = await page.evaluate("window.client.stats()")
        error = await page.evaluate("({message: window.client.error.message, code: window.client.error.code})")
    assert error["code"] == 4401 and "4401" in error["message"], error
    assert stats["attempts"] == 1 and stats["last_close"]["code"] == 4401, stats  # not retried


async def test_publish_is_acknowledged_ping_times_a_round_trip_and_unsubscribe_stops_delivery(
    start_server: StartServer, tmp_path: Path,
) -> None:
    server = start_server("--no-demo-feed", "--client-publish", "--api-key", KEY)
    async with open_browser(tmp_path) as page:
        await client_page(page, server)
        await start_client(page, server.ws, channels=["chat.a"])
        await page.evaluate("window.client.waitConnected(10)")
        ack = await page.evaluate("window.client.publish('chat.a', {text: 'hi'})")
        assert ack["type"] == "published" and ack["channel"] == "chat.a" and ack["offset"] == 1
        await page.wait_for_function("window.rec.log.some((e) => e[0] === 'message' && e[3] === 1)")
        rtt = await page.evaluate("window.client.ping()")
        assert 0 < rtt < MARGIN
        refused = await page.evaluate("window.client.publish('bad channel!', 1).then(() => null, (e) => e.code)")
        assert refused == "bad_message"
        await page.evaluate("window.client.unsubscribe('chat.a')")
        later = await publish(server, "chat.a", 3)
        epoch = later[0]["epoch"]
        assert [a["offset"] for a in later] == [2, 3, 4]  # published, in the same stream...
        await page.evaluate("window.client.ping()")  # ...and anything in flight would arrive before this pong
        assert messages(await page.evaluate("window.rec.log")) == [(epoch, 1)]  # none after the confirmation
        await page.evaluate("window.client.close()")
        assert await page.evaluate("window.client.state") == "closed"
        assert page.uncaught == []
