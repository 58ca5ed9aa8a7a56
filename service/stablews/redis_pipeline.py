"""Commands in flight on one Redis connection, in order (automatic pipelining).

Publishing one message at a time (send, wait for the answer, send the next) caps a publisher at
one publication per round trip and gives the readers one entry per read, so subscribers get one
message per frame. Here every command asked for in one event-loop iteration goes out in one write,
the next batch goes out while answers are still coming, and Redis answers in order, so each
answer settles the oldest command in flight. Publications keep the order they were asked in.

redis-py's pipelines batch what one caller builds; this batches what many callers ask at once, on
redis-py's own connection and RESP codec.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

Settle = Callable[[Any], Any]  # turns the reply into the future's result
Translate = Callable[[BaseException], BaseException]  # turns a failure into the future's exception


class CommandPipeline:
    def __init__(
        self,
        pool: aioredis.ConnectionPool,
        timeout: float,
        on_failure: Callable[[BaseException], None],
        translate: Translate = lambda exc: exc,
    ) -> None:
        """`pool`: where the connection comes from (socket_timeout None: `timeout` bounds each
        answer while commands are in flight). `on_failure`: told when the connection breaks.
        `translate`: what a caller gets instead of a failure (once per failed command)."""
        self._pool = pool
        self.timeout = timeout
        self._on_failure = on_failure
        self._translate = translate
        self._conn: Any = None
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any], Settle]] = []
        self._inflight: deque[tuple[asyncio.Future[Any], Settle]] = deque()
        self._sent = asyncio.Event()  # something is in flight: the answer reader has work
        self._writer: asyncio.Task[None] | None = None
        self._answers: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self._answers is not None and not self._answers.done()

    async def start(self) -> None:
        """Connect (again); commands may be asked for once this returns."""
        await self.stop(RedisConnectionError("reconnecting"))
        self._conn = self._pool.make_connection()
        await self._conn.connect()
        self._answers = asyncio.get_running_loop().create_task(self._read_answers(), name="redis answers")

    async def stop(self, why: BaseException) -> None:
        """Close the connection; every command queued or in flight fails with `why`."""
        for task in (self._writer, self._answers):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._writer = self._answers = None
        self._fail_all(why)
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
            self._conn = None

    def call(self, args: tuple[Any, ...], settle: Settle) -> asyncio.Future[Any]:
        """Queue one command; the future gets `settle(reply)`, or the error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.open:
            future.set_exception(self._translate(RedisConnectionError("not connected")))
            return future
        self._queued.append((args, future, settle))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return future

    async def _write(self) -> None:
        """Send what is queued, batch after batch, until nothing is (one writer at a time keeps the order)."""
        try:  # a task runs from the next loop iteration: this one's callers have all queued by then
            while self._queued:
                batch, self._queued = self._queued, []
                self._inflight.extend((future, settle) for _, future, settle in batch)
                self._sent.set()
                await self._conn.send_packed_command(
                    self._conn.pack_commands([args for args, _, _ in batch]), check_health=False
                )
        except Exception as exc:
            self._broken(exc)
        finally:
            self._writer = None

    async def _read_answers(self) -> None:
        inflight = self._inflight
        while True:
            if not inflight:
                self._sent.clear()
                await self._sent.wait()
            try:
                async with asyncio.timeout(self.timeout):
                    reply = await self._conn.read_response(disconnect_on_error=True)
                error: BaseException | None = None
            except ResponseError as exc:  # this command's own error reply; the connection is fine
                reply, error = None, exc
            except Exception as exc:
                self._broken(exc)
                return
            future, settle = inflight.popleft()
            if future.done():
                continue
            if error is not None:
                future.set_exception(self._translate(error))
                continue
            try:
                future.set_result(settle(reply))
            except Exception as exc:  # a reply of another shape than expected
                future.set_exception(self._translate(exc))

    def _broken(self, exc: BaseException) -> None:
        self._fail_all(exc)
        self._on_failure(exc)

    def _fail_all(self, exc: BaseException) -> None:
        pending = [future for future, _ in self._inflight] + [future for _, future, _ in self._queued]
        self._inflight.clear()
        self._queued.clear()
        for future in pending:
            if not future.done():
                future.set_exception(self._translate(exc))
