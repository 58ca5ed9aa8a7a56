"""What must run on one instance only when several share a broker: the demo feed, each upstream relay.

Every instance runs the same configuration; a `Singleton` runs its job where the broker's lease
for it is held, and stands by elsewhere. The holder renews the lease every third of `ttl`; when
it stops (gracefully it releases the lease at once) or dies (the lease expires after `ttl`),
another instance takes the job over. While the lease cannot be confirmed (broker unavailable),
the job stops here: nothing could be published anyway, and two runners would publish everything
twice once the broker is back. With the memory broker the lease is always held, so the job runs
at start as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from .broker import Broker, BrokerUnavailable

log = logging.getLogger("stablews.singleton")

UNAVAILABLE_RETRY = 0.5  # seconds between claims while the broker cannot answer


class Singleton:
    def __init__(
        self,
        broker: Broker,
        name: str,
        holder: str,
        start: Callable[[], Awaitable[None]],
        stop: Callable[[], Awaitable[None]],
        ttl: float,
    ) -> None:
        self.broker = broker
        self.name = name
        self.holder = holder
        self._start = start
        self._stop = stop
        self.ttl = ttl
        self.running = False
        self.takeovers = 0  # times the job started here
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        return "running" if self.running else "standby"

    async def begin(self) -> None:
        """Claim once now (so an embedded broker starts the job before this returns), then keep claiming."""
        await self._round()
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"lease {self.name}")

    async def end(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._set(False)
        await self.broker.release(self.name, self.holder)

    async def _keep(self) -> None:
        while True:
            # Renew well before expiry; while the broker is away, ask again soon.
            await asyncio.sleep(self.ttl / 3 if self.broker.ready else min(self.ttl / 3, UNAVAILABLE_RETRY))
            try:
                await self._round()
            except Exception:  # a job that fails to start or stop must not end the lease's loop
                log.exception("lease round failed", extra={"job": self.name})

    async def _round(self) -> None:
        try:
            held = await self.broker.claim(self.name, self.holder, self.ttl)
        except BrokerUnavailable:
            held = False
        await self._set(held)

    async def _set(self, held: bool) -> None:
        if held == self.running:
            return
        self.running = held
        if held:
            self.takeovers += 1
            log.info("running here", extra={"job": self.name, "holder": self.holder})
            await self._start()
        else:
            log.info("standing by", extra={"job": self.name, "holder": self.holder})
            await self._stop()
