"""Upstream relays: feed local channels from upstream WebSocket feeds, through
the same recovery machinery as the client (backoff, jitter, circuit breaker).

An `upstreams` entry is a URL whose fragment names the channels:

    ws://md-1:8000/ws#demo.ticker                  another stablews: relay demo.ticker as demo.ticker
    ws://md-1:8000/ws#prices>md.prices;trades      ... prices as md.prices, and trades as trades
    json+wss://feed.example/stream#md.raw          a plain JSON feed: every message into md.raw
    json+ws://feed/x#type=trade>md.trades;*>md.other   first matching route wins (dotted keys allowed)

A stablews upstream is followed by a `StableClient`: it resumes from its
positions, so the local channel continues without loss or repeat. When the
upstream cannot recover (a new epoch, history gone), the local channel is
reset to a new epoch and local subscribers get `recovered: false`: they
resynchronise instead of silently missing data. A plain JSON feed has no
positions, so every reconnect after a loss resets its local channels.

With `enable_connection_pooling`, entries naming the same URL share one
connection; otherwise each entry has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol
from .broker import BrokerUnavailable
from .client import StableClient
from .recovery import CircuitState, GiveUp, Recovery, RecoveryPolicy

if TYPE_CHECKING:
    from .app import StableServer

log = logging.getLogger("stablews.relay")

MAX_FEED_FRAME = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    """stablews: `source` is the upstream channel. json: `source` is `*` or `key=value`."""

    source: str
    local: str

    def matches(self, obj: Any) -> bool:
        if self.source == "*":
            return True
        key, _, expected = self.source.partition("=")
        value: Any = obj
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        return (value if isinstance(value, str) else json.dumps(value)) == expected


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    url: str  # without the fragment
    kind: str  # "stablews" | "json"
    routes: tuple[Route, ...]
    text: str
    token: str | None = None  # a stablews upstream's `?token=`, kept out of the URL shown in stats and logs


def parse_upstream(text: str) -> UpstreamSpec:
    """Parse one `upstreams` entry; ValueError says what is wrong."""
    entry = text.strip()
    url, _, fragment = entry.partition("#")
    kind = "stablews"
    if url.startswith("json+"):
        kind, url = "json", url[len("json+"):]
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{entry!r} is not a ws:// or wss:// URL (prefix json+ for a plain JSON feed)")
    routes: list[Route] = []
    for item in fragment.split(";"):
        item = item.strip()
        if not item:
            continue
        source, arrow, local = (s.strip() for s in item.partition(">"))
        if not arrow:
            source, local = (source, source) if kind == "stablews" else ("*", source)
        if not protocol.valid_channel(local):
            raise ValueError(f"{entry!r}: {local!r} is not a valid channel name")
        if kind == "stablews" and not protocol.valid_channel(source):
            raise ValueError(f"{entry!r}: {source!r} is not a valid channel name")
        if kind == "json" and source != "*" and "=" not in source:
            raise ValueError(f"{entry!r}: a JSON feed route is '*>channel' or 'key=value>channel', not {source!r}")
        routes.append(Route(source, local))
    if not routes:
        raise ValueError(f"{entry!r} names no channel: add #channel or #upstream_channel>local_channel")
    token = None
    if kind == "stablews" and parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        tokens = [value for name, value in query if name == "token"]
        if tokens:
            token = tokens[-1]
            rest = urlencode([(name, value) for name, value in query if name != "token"])
            url = urlunsplit(parts._replace(query=rest))
    return UpstreamSpec(url, kind, tuple(routes), entry, token)


def check_upstreams(entries: Sequence[str]) -> str | None:
    """The config check: None, or the first problem."""
    for entry in entries:
        try:
            parse_upstream(entry)
        except ValueError as exc:
            return str(exc)
    return None


class Relay:
    """What the server sees of one upstream connection."""

    kind = ""

    def __init__(self, server: StableServer, url: str, specs: list[UpstreamSpec], key: str = "") -> None:
        self.server = server
        self.url = url
        self.key = key or url  # unique among the server's relays: how stats and health name it
        self.specs = specs
        self.policy = RecoveryPolicy.from_settings(server.settings)
        self.messages_relayed = 0
        self.messages_dropped = 0
        self.resets = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._broken: set[str] = set()  # local channels that lost a relayed message
        # With a shared broker another instance may be the one relaying (singleton.py); with the
        # embedded broker this instance always is.
        self.standby = server.broker.shared

    @property
    def locals(self) -> list[str]:
        return sorted({route.local for spec in self.specs for route in spec.routes})

    @property
    def recovery(self) -> Recovery:
        raise NotImplementedError

    @property
    def state(self) -> str:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def lead(self) -> None:
        """Start relaying on this instance. With a broker shared by several instances another one
        may have relayed until now: what it published last is not known here, so local subscribers
        resync before the first message (never a silent gap, never a repeat)."""
        if self.server.broker.shared:
            self._broken.update(self.locals)
        self.standby = False
        await self.start()

    async def release(self) -> None:
        """Stop relaying here (the lease went to another instance, or the server stops)."""
        self.standby = True
        await self.stop()

    async def _publish(self, channel: str, data: Any) -> None:
        broker = self.server.broker
        try:
            if channel in self._broken:  # messages were lost here: local subscribers resync first
                await self._reset([channel], "messages were dropped while the broker was unavailable")
            await broker.publish(channel, data)
            self.messages_relayed += 1
        except BrokerUnavailable as exc:
            self._broken.add(channel)
            self.messages_dropped += 1
            self.last_error = f"publish to {channel} failed: {exc}"
        except ValueError as exc:  # not plain JSON: count it, keep relaying
            self.messages_dropped += 1
            self.last_error = f"publish to {channel} failed: {exc}"

    async def _reset(self, channels: Sequence[str], why: str) -> None:
        for channel in channels:
            await self.server.broker.reset(channel)
            self._broken.discard(channel)
            self.resets += 1
        log.warning("upstream relay reset local channels", extra={"upstream": self.key, "channels": list(channels),
                                                                  "why": why})

    async def _lost(self, channels: Sequence[str], why: str) -> None:
        """The source lost continuity: reset the local channels now, or at their next publication
        when the broker cannot take the reset."""
        try:
            await self._reset(channels, why)
        except BrokerUnavailable as exc:
            self._broken.update(channels)
            self.last_error = f"reset failed: {exc}"

    def _circuit(self, state: str) -> None:
        log.warning("upstream relay circuit %s", state, extra={"upstream": self.key, "last_error": self.last_error})
        if state == CircuitState.OPEN:
            self.server.manager.emit(
                "circuit_breaker_opened",
                {"upstream": self.key, "failures": self.recovery.breaker.consecutive_failures,
                 "retry_after_s": round(self.recovery.breaker.retry_after(), 3)},
            )

    def _recovered(self, recovered_in: float | None) -> None:
        if recovered_in is not None:
            self.server.manager.emit(
                "connection_recovered",
                {"upstream": self.key, "recovered_in_s": round(recovered_in, 4), "channels": len(self.locals)},
            )

    def stats(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "url": self.url,
            "kind": self.kind,
            "state": "standby" if self.standby else self.state,
            "routes": [f"{r.source}>{r.local}" for spec in self.specs for r in spec.routes],
            "messages_relayed": self.messages_relayed,
            "messages_dropped": self.messages_dropped,
            "channel_resets": self.resets,
            "last_error": self.last_error,
            "recovery": self.recovery.stats(),
        }


class StablewsRelay(Relay):
    """Follows another stablews with a StableClient (resume, no loss, no repeat)."""

    kind = "stablews"

    def __init__(self, server: StableServer, url: str, specs: list[UpstreamSpec], key: str = "") -> None:
        super().__init__(server, url, specs, key)
        self.targets: dict[str, list[str]] = {}
        for spec in specs:
            for route in spec.routes:
                locals_ = self.targets.setdefault(route.source, [])
                if route.local not in locals_:
                    locals_.append(route.local)
        self.client = StableClient(
            url,
            channels=list(self.targets),
            policy=self.policy,
            name=f"stablews-relay/{server.settings.instance_id}",
            token=specs[0].token,
        )
        self.client.on("message", self._on_message)
        self.client.on("resync", self._on_resync)
        self.client.on("circuit", self._circuit)
        self.client.on("connected", lambda info: self._recovered(info.get("recovered_in")))
        self.client.on("disconnected", self._on_disconnected)

    @property
    def recovery(self) -> Recovery:
        return self.client.recovery

    @property
    def state(self) -> str:
        return self.client.state

    async def start(self) -> None:
        await self.client.connect()

    async def stop(self) -> None:
        await self.client.close()

    async def _on_message(self, msg: dict[str, Any]) -> None:
        for local in self.targets.get(msg["channel"], ()):
            await self._publish(local, msg.get("data"))

    async def _on_resync(self, channel: str, info: dict[str, Any]) -> None:
        await self._lost(self.targets.get(channel, []), f"upstream {info.get('reason')}")

    def _on_disconnected(self, info: dict[str, Any]) -> None:
        self.last_error = f"disconnected: {info.get('code')} {info.get('reason')}"

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        stats["positions"] = {ch: {"epoch": p.epoch, "offset": p.offset} for ch, p in self.client.positions.items()}
        stats["recovery"] = self.client.recovery_stats()
        return stats


class JsonFeedRelay(Relay):
    """Follows a plain JSON feed: each text message (or each line of one) is one publication."""

    kind = "json"

    def __init__(self, server: StableServer, url: str, specs: list[UpstreamSpec], key: str = "") -> None:
        super().__init__(server, url, specs, key)
        self._recovery = Recovery(self.policy, on_circuit_change=lambda old, new: self._circuit(str(new)))
        self._state = "closed"
        self._stopping = False
        self.lost_once = False

    @property
    def recovery(self) -> Recovery:
        return self._recovery

    @property
    def state(self) -> str:
        return self._state

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._state = "connecting"
            self._task = asyncio.create_task(self._run(), name=f"relay {self.url}")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._state = "closed"

    async def _run(self) -> None:
        recovery = self._recovery
        settings = self.server.settings
        while not self._stopping:
            try:
                delay = recovery.next_delay()
            except GiveUp as exc:
                self.last_error = f"recovery gave up: {exc}"
                self._state = "closed"
                return
            if delay > 0:
                await asyncio.sleep(delay)
            if not recovery.start_attempt():
                continue
            verified = False
            try:
                async with asyncio.timeout(settings.heartbeat_interval + settings.heartbeat_timeout):
                    ws = await connect(
                        self.url,
                        open_timeout=None,
                        ping_interval=settings.heartbeat_interval,
                        ping_timeout=settings.heartbeat_timeout,
                        max_size=MAX_FEED_FRAME,
                        close_timeout=2,
                    )
                    pong = await ws.ping()
                    await pong  # verified: the feed answers before we call it healthy
                verified = True
                if self.lost_once:  # what the feed sent while we were away is gone
                    await self._lost(self.locals, "feed reconnected: messages while away are lost")
                self._state = "connected"
                self._recovered(recovery.succeeded())
                async for frame in ws:
                    text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
                    for line in text.split("\n"):
                        if line.strip():
                            await self._route(line)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            if self._stopping:
                return
            if verified:
                self.lost_once = True
                self._state = "reconnecting"
                recovery.lost()
            else:
                recovery.failed()
                if self._state == "connected":
                    self._state = "reconnecting"

    async def _route(self, line: str) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            self.messages_dropped += 1
            self.last_error = "a feed message was not JSON"
            return
        for spec in self.specs:
            for route in spec.routes:  # first match wins within one entry
                if route.matches(obj):
                    await self._publish(route.local, obj)
                    break


def build_relays(server: StableServer) -> list[Relay]:
    settings = server.settings
    specs = [parse_upstream(entry) for entry in settings.upstreams]
    groups: list[tuple[str, str, list[UpstreamSpec]]] = []
    if settings.enable_connection_pooling:
        by_key: dict[tuple[str, str, str | None], list[UpstreamSpec]] = {}
        for spec in specs:  # one connection speaks for one token: entries with other tokens get their own
            by_key.setdefault((spec.kind, spec.url, spec.token), []).append(spec)
        groups = [(kind, url, group) for (kind, url, _), group in by_key.items()]
    else:
        groups = [(spec.kind, spec.url, [spec]) for spec in specs]
    relays: list[Relay] = []
    seen: dict[str, int] = {}
    for kind, url, group in groups:
        cls = StablewsRelay if kind == "stablews" else JsonFeedRelay
        key = url if kind == "stablews" else f"json+{url}"
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # pooling off: several connections to one URL
            key = f"{key} ({seen[key]})"
        relays.append(cls(server, url, group, key))
    return relays
