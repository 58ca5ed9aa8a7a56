"""The client through a fault-injecting TCP proxy: RST cuts, a black hole, added latency.

Run with `-s` to see the cut → resumed figures:
    python -m pytest -q -s tests/integration/test_client_faults.py -k cuts
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from typing import Any

from faultproxy import FaultProxy
from stablews.client import StableClient
from stablews.recovery import RecoveryPolicy
from support import ServerProcess, get_json, wait_for

CUTS = 50
POLICY = RecoveryPolicy(initial_delay=0.02, max_delay=0.3, jitter_max=0.02, max_retries=20,
                        circuit_breaker_threshold=20)


class Watch:
    """Offsets received and the times of the client's lifecycle events."""

    def __init__(self, client: StableClient) -> None:
        self.loop = asyncio.get_running_loop()
        self.offsets: list[int] = []
        self.epochs: set[str] = set()
        self.resyncs: list[dict[str, Any]] = []
        self.connected_at: list[float] = []
        self.disconnected_at: list[float] = []
        self.changed = asyncio.Event()
        client.on("message", self._message)
        client.on("resync", lambda ch, info: self.resyncs.append(info))
        client.on("connected", lambda info: self._mark(self.connected_at))
        client.on("disconnected", lambda info: self._mark(self.disconnected_at))

    def _message(self, msg: dict[str, Any]) -> None:
        self.offsets.append(msg["offset"])
        self.epochs.add(msg["epoch"])
        self.changed.set()

    def _mark(self, times: list[float]) -> None:
        times.append(self.loop.time())
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    def assert_exactly_once(self) -> None:
        first = self.offsets[0]
        assert self.offsets == list(range(first, first + len(self.offsets))), "a gap or a repeat"
        assert len(self.epochs) == 1 and not self.resyncs


async def test_fifty_random_cuts_every_offset_exactly_once(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "100", "--heartbeat-interval", "2s", "--heartbeat-timeout", "1s")
    rng = random.Random(20261129)
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        client = StableClient(proxy.url("/ws"), channels=["demo.ticker"], policy=POLICY)
        watch = Watch(client)
        async with client:
            await watch.until(lambda: len(watch.offsets) >= 10, 20, "the first messages")
            resumed_after: list[float] = []
            for n in range(CUTS):
                connected = len(watch.connected_at)
                if n % 5 == 4:
                    # Cut during the handshake: the next link is reset as soon as it is accepted.
                    proxy.cut()
                    accepted = proxy.accepted_total
                    await proxy.wait_until(lambda a=accepted: proxy.accepted_total > a, 10)
                    cut_at = watch.loop.time()
                    proxy.cut()
                else:
                    await asyncio.sleep(rng.uniform(0.02, 0.25))  # a random moment of the live stream
                    cut_at = watch.loop.time()
                    assert proxy.cut() >= 1
                await watch.until(
                    lambda c=connected, t=cut_at: len(watch.connected_at) > c and watch.connected_at[-1] > t,
                    20, f"the client to resume after cut {n + 1}",
                )
                resumed_after.append(watch.connected_at[-1] - cut_at)
            count = len(watch.offsets)
            await watch.until(lambda: len(watch.offsets) >= count + 50, 20, "the stream to go on after the last cut")
        stats = client.recovery_stats()
    watch.assert_exactly_once()
    assert stats["duplicates_dropped"] == 0 and stats["gaps"] == 0
    assert stats["drops"] >= CUTS * 4 // 5 and stats["channels_resumed"] >= CUTS * 4 // 5
    assert stats["channels_resynced"] == 0
    print(
        f"\n{CUTS} cuts, {len(watch.offsets)} messages exactly once; cut -> resumed: "
        f"median {statistics.median(resumed_after) * 1000:.0f} ms, worst {max(resumed_after) * 1000:.0f} ms"
    )


async def test_black_hole_is_detected_within_the_silence_bound(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "50", "--heartbeat-interval", "1s", "--heartbeat-timeout", "0.5s")
    bound = 1.5  # heartbeat_interval + heartbeat_timeout, announced in `welcome`
    first_delay = POLICY.initial_delay + POLICY.jitter_max
    margin = 2.0  # scheduling slack on a loaded 2-core machine
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        client = StableClient(proxy.url("/ws"), channels=["demo.ticker"], policy=POLICY)
        watch = Watch(client)
        async with client:
            await watch.until(lambda: len(watch.offsets) >= 20, 20, "the first messages")
            assert client.silence == bound
            proxy.blackhole(True)  # links stay open; nothing gets through any more
            holed_at = watch.loop.time()
            proxy.blackhole(False)  # ... for links made from now on
            await watch.until(lambda: bool(watch.disconnected_at), bound + margin, "the black hole to be detected")
            detected_in = watch.disconnected_at[0] - holed_at
            assert bound - 0.2 <= detected_in <= bound + margin, detected_in
            assert client.last_close is not None and "silent" in client.last_close["reason"]
            await watch.until(lambda: len(watch.connected_at) >= 2, first_delay + margin, "the resume")
            resumed_in = watch.connected_at[1] - holed_at
            assert resumed_in <= bound + first_delay + margin, resumed_in
            count = len(watch.offsets)
            await watch.until(lambda: len(watch.offsets) >= count + 20, 20, "the stream after the resume")
            proxy.cut()  # end the black-holed link still held by the proxy
    watch.assert_exactly_once()
    print(f"\nblack hole detected in {detected_in:.2f} s (bound {bound} s), resumed in {resumed_in:.2f} s")


async def test_latency_below_the_heartbeat_timeout_does_not_drop(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--demo-feed-rate", "20", "--heartbeat-interval", "1s", "--heartbeat-timeout", "0.9s")
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        proxy.set_delay(0.1)  # each way: RTT about 0.2 s, well under the 0.9 s timeout even on a loaded machine
        client = StableClient(proxy.url("/ws"), channels=["demo.ticker"], policy=POLICY)
        watch = Watch(client)
        async with client:
            await client.wait_connected(20)
            rtt = await client.ping()
            assert rtt >= 0.2 - 0.01

            async def heartbeats_ok() -> int:
                return (await get_json(f"{server.http}/api/v1/websocket/stats"))["heartbeats"]["ok_total"]

            start = await heartbeats_ok()
            await wait_for(lambda: _at_least(heartbeats_ok, start + 3), 30, "three answered heartbeats")
            stats = await get_json(f"{server.http}/api/v1/websocket/stats")
            assert stats["heartbeats"]["missed_total"] == 0
            assert stats["heartbeats"]["rtt_ms"]["p50"] >= 200 - 10
        assert watch.disconnected_at == [] and client.recovery_stats()["drops"] == 0
    watch.assert_exactly_once()


async def _at_least(figure: Callable[[], Any], target: int) -> bool:
    return await figure() >= target
