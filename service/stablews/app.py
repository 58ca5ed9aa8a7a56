"""The server object (manager + broker + feeds), its drain, and the Starlette app factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute, WebSocketRoute

from . import __version__, config
from .api import api_routes
from .broker import Broker, MemoryBroker, PublishResult
from .config import Settings
from .connection import State
from .demo import run_demo_feed
from .endpoint import WebSocketEndpoint
from .protocol import CloseCause
from .recovery import CircuitState, Recovery, RecoveryPolicy
from .relay import Relay, build_relays
from .singleton import Singleton
from .stability import StabilityManager
from .statuspage import status_page_routes
from .telemetry import Telemetry

log = logging.getLogger("stablews.app")

# Reconnects after a drain are spread so that about this many clients come
# back per second (within [reconnect_delay, max_reconnect_delay]).
RECONNECTS_PER_SECOND = 1000


def make_broker(
    settings: Settings,
    clock: Callable[[], float],
    wall: Callable[[], float],
    on_event: Callable[[str, dict[str, Any]], None],
) -> Broker:
    """The broker the `broker` option names: memory, or Redis Streams for several instances."""
    if settings.broker == "memory":
        return MemoryBroker(settings.history_size, settings.history_ttl, settings.max_recovery_messages, clock, wall)
    from .redis_broker import RedisBroker

    return RedisBroker(
        settings.broker,
        history_size=settings.history_size,
        history_ttl=settings.history_ttl,
        max_recovery_messages=settings.max_recovery_messages,
        # A channel's keys outlive its history; every sweep renews those of channels followed here.
        key_ttl=settings.history_ttl + 2 * settings.health_check_interval,
        prefix=settings.broker_prefix,
        timeout=settings.broker_timeout,
        instance_id=settings.instance_id,
        policy=RecoveryPolicy.from_settings(settings),
        on_event=on_event,
        wall_clock=wall,
    )


class StableServer:
    """Everything one instance runs: the stability manager, the broker, the feeds.

    Use `create_app(server)` for the ASGI app; `await server.shutdown()` drains.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        broker: Broker | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        tracer_provider: Any = None,
    ) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider to trace connections with
        (otherwise the `OTEL_*` environment decides)."""
        self.settings = settings or Settings()
        s = self.settings
        self.manager = StabilityManager(s, clock=clock, wall=wall)
        self.broker = broker or make_broker(s, clock, wall, self.manager.emit)
        self.manager.housekeeping.append(self.broker.sweep)
        self.endpoint = WebSocketEndpoint(self)
        self.draining = False
        self.started = False
        self.refused_origins = 0
        self.version = __version__
        self._tasks: list[asyncio.Task[Any]] = []
        self.relays: list[Relay] = build_relays(self)
        self.singletons = self._singletons()
        self._drained: dict[str, Any] | None = None
        # Drain on the first SIGTERM/SIGINT before the host server's shutdown; off when the host
        # (`stablews serve`) already drains first.
        self.drain_on_signal = True
        self.telemetry = Telemetry(self, tracer_provider=tracer_provider)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        self.manager.start()
        self.telemetry.start()
        await self.broker.start()
        for singleton in self.singletons:
            await singleton.begin()
        log.info("stablews started", extra={"instance": self.settings.instance_id, "version": self.version})

    def _singletons(self) -> list[Singleton]:
        """The jobs that run on one instance of those sharing the broker: the demo feed, each relay."""
        holder = f"{self.settings.instance_id}/{secrets.token_hex(4)}"
        ttl = self.settings.lease_ttl
        jobs: list[Singleton] = []
        if self.settings.demo_feed:
            feed: list[asyncio.Task[None]] = []

            async def start_feed() -> None:
                feed.append(asyncio.create_task(run_demo_feed(self.broker, self.settings.demo_feed_rate)))

            async def stop_feed() -> None:
                while feed:
                    task = feed.pop()
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

            jobs.append(Singleton(self.broker, "demo_feed", holder, start_feed, stop_feed, ttl))
        for relay in self.relays:
            jobs.append(Singleton(self.broker, f"relay:{relay.key}", holder, relay.lead, relay.release, ttl))
        return jobs

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.broker.ready

    async def drain(self, timeout: float | None = None) -> dict[str, Any]:
        """Stop taking connections, advise every client to reconnect (jittered),
        flush what is queued and close with 1001, all within `timeout`
        (default `shutdown_timeout`). Idempotent: a second call waits for nothing."""
        if self._drained is not None:
            return self._drained
        self.draining = True
        settings = self.settings
        timeout = settings.shutdown_timeout if timeout is None else timeout
        manager = self.manager
        started = time.monotonic()
        deadline = manager.clock() + timeout
        connections = [c for c in manager.live.values() if c.state is State.OPEN and not c.passive]
        spread = min(
            settings.max_reconnect_delay, max(settings.reconnect_delay, len(connections) / RECONNECTS_PER_SECOND)
        )
        sent_before = sum(c.messages_out for c in connections)
        rng = random.Random()
        for conn in connections:
            conn.close(CloseCause.SHUTDOWN, after_ms=int(rng.uniform(0, spread) * 1000), deadline=deadline)
        remaining = [c for c in manager.live.values() if not c.passive]
        if remaining:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout + 0.5):
                    await self._wait_empty()
        elapsed = time.monotonic() - started
        # Abandoned: the close could not complete by the deadline (the peer did not read).
        abandoned = sum(1 for c in connections if c.abandoned or c.state is not State.CLOSED)
        self._drained = {
            "connections_closed": len(connections) - abandoned,
            "connections_abandoned": abandoned,
            "messages_flushed": sum(c.messages_out for c in connections) - sent_before,
            "drain_seconds": round(elapsed, 3),
        }
        manager.hooks.on_shutdown(dict(self._drained))
        log.info("drain finished", extra=self._drained)
        return self._drained

    async def _wait_empty(self) -> None:
        manager = self.manager
        manager.closed_signal = signal = asyncio.Event()
        try:
            while any(not c.passive for c in manager.live.values()):
                signal.clear()
                await signal.wait()
        finally:
            manager.closed_signal = None

    async def shutdown(self) -> dict[str, Any]:
        """Drain, stop the feeds and the broker. Safe to call more than once."""
        summary = await self.drain()
        for singleton in self.singletons:  # releases the leases: another instance takes over at once
            await singleton.end()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.started:
            await self.broker.stop()
            self.manager.stop()
            await self.telemetry.stop()
            self.started = False
        return summary

    # ------------------------------------------------------------ programmatic API

    async def publish(self, channel: str, data: Any) -> PublishResult:
        return await self.broker.publish(channel, data)

    def stability_report(self) -> dict[str, Any]:
        return self.manager.stability_report()

    def recovery_stats(self) -> dict[str, Any]:
        """Resumes of this server's clients, and the recovery of each upstream relay."""
        stats = self.manager.recovery_stats()
        stats["upstreams"] = {relay.key: relay.recovery.stats() for relay in self.relays}
        if self.broker.recovery is not None:
            stats["broker"] = self.broker.recovery.stats()
        return stats

    def dependency_problems(self) -> list[str]:
        """Reasons the service is degraded because of what it depends on: the broker unavailable,
        an upstream's circuit not closed, a relay stopped."""
        problems = []
        if self.started and not self.broker.ready:
            problems.append(f"broker unavailable ({self.broker.why_unavailable()})")
        for relay in self.relays:
            if relay.standby:  # another instance relays it
                continue
            if relay.recovery.circuit_state is not CircuitState.CLOSED:
                problems.append(f"upstream {relay.key} circuit {relay.recovery.circuit_state}")
            elif self.started and relay.state == "closed":
                problems.append(f"upstream {relay.key} stopped: {relay.last_error or 'closed'}")
        return problems

    def circuit_breakers(self) -> dict[str, Recovery]:
        """Every circuit breaker by target: the upstream relays, and the broker's link when it has one."""
        targets = {relay.key: relay.recovery for relay in self.relays}
        if self.broker.recovery is not None:
            targets["broker"] = self.broker.recovery
        return targets

    def service_status(self, status: str, reasons: list[str]) -> tuple[str, list[str]]:
        """The fleet's status and reasons with the server's own conditions added: a broker or upstream
        problem degrades a healthy service; a drain makes it unhealthy, whatever the figures."""
        problems = self.dependency_problems()
        if problems and status == "healthy":
            status = "degraded"  # local clients are served; some channels are not (broker, relays)
        reasons = [*reasons, *problems]
        if self.draining:
            return "unhealthy", ["draining", *reasons]
        return status, reasons

    def stats(self) -> dict[str, Any]:
        report = self.manager.stability_report()
        report["status"], report["reasons"] = self.service_status(report["status"], report["reasons"])
        report.update(
            {
                "instance": self.settings.instance_id,
                "version": self.version,
                "ready": self.ready,
                "draining": self.draining,
                "recovery": self.recovery_stats(),
                "broker": self.broker.stats(),
                "circuit_breakers": {target: str(r.circuit_state) for target, r in self.circuit_breakers().items()},
                "upstreams": [relay.stats() for relay in self.relays],
                "singletons": {job.name: job.state for job in self.singletons},
                "refused": {"origin": self.refused_origins},
                "telemetry": self.telemetry.stats(),
            }
        )
        return report

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Starlette lifespan: start, and drain at the end (`Starlette(lifespan=server.lifespan)`)."""
        await self.start()
        restore = self._drain_before_host_shutdown() if self.drain_on_signal else None
        try:
            yield
        finally:
            if restore is not None:
                restore()
            await self.shutdown()

    def _drain_before_host_shutdown(self) -> Callable[[], None] | None:
        """Under a plain ASGI server (e.g. `uvicorn --factory stablews.app:create_app`), the lifespan
        ends only after the server has already closed every socket (uvicorn: 1012 at once). So the
        first SIGTERM/SIGINT drains here (advice, flush, 1001), then is handed to the server's own
        handler; a second signal goes straight to it (uvicorn: force exit)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def pass_on(sig: int, frame: Any) -> None:
            handler = previous[signal.Signals(sig)]
            if callable(handler):
                handler(sig, frame)
            elif handler == signal.SIG_DFL:  # no host handler: end the way the default would
                os._exit(128 + sig)

        def on_signal(sig: int, frame: Any) -> None:
            if self.draining:
                pass_on(sig, frame)
                return
            self.draining = True  # readiness goes to 0 at once
            log.info("signal received: draining before the server's shutdown", extra={"signal": sig})

            async def drain_then_pass_on() -> None:
                await self.drain()
                pass_on(sig, None)

            self._tasks.append(loop.create_task(drain_then_pass_on()))

        for sig in previous:
            signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                if signal.getsignal(sig) is on_signal:
                    signal.signal(sig, handler)

        return restore

    def routes(self) -> list[BaseRoute]:
        return [WebSocketRoute(self.settings.ws_path, self.endpoint), *api_routes(self), *status_page_routes(self)]


class StableApp:
    """The ASGI app: the protocol socket goes straight to its endpoint (every
    frame it sends would otherwise pass Starlette's middleware stack); HTTP,
    other sockets and the lifespan go to the Starlette app."""

    def __init__(self, server: StableServer) -> None:
        self.stable = server
        self.ws_path = server.settings.ws_path
        self.endpoint = server.endpoint
        self.starlette = Starlette(routes=server.routes(), lifespan=server.lifespan)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.ws_path:
            await self.endpoint(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def create_app(server: StableServer | Settings | None = None) -> StableApp:
    """The ASGI app: the socket, the HTTP API, and a lifespan that starts and drains the server.

    Without settings, they come from the `STABLEWS_*` environment (as for `stablews serve`), so
    `uvicorn --factory stablews.app:create_app` is configured the same way."""
    if server is None:
        server = config.load()
    if not isinstance(server, StableServer):
        server = StableServer(server)
    return StableApp(server)
