"""The Redis broker: channels as Redis Streams, shared by every instance on the same Redis.

Keys of one channel (they share a hash slot through the `{channel}` hash tag):

- `<prefix>:{<channel>}:m`, a hash: `epoch` and `top` (the last offset assigned);
- `<prefix>:{<channel>}:s`, the stream: one entry a publication, fields `f` (the encoded
  `message` frame, built once, in Redis, where the offset is assigned), `e` (epoch), `o`
  (offset); an entry with `o` 0 and no frame marks a new epoch.

Every change runs as one Lua script, so offsets are assigned once for all instances and an
epoch is created exactly once when the history is missing (Redis flushed, restarted without
persistence, keys expired, or rolled back to an older snapshot). The stream is capped near
`max(history_size, MIN_STREAM_LENGTH)` entries and trimmed by age (`history_ttl`); a recovery
never replays more than `history_size` messages, as with the memory broker.

Each instance reads with ONE loop (XREAD BLOCK over every channel that has local subscribers)
and fans each entry out locally (follower.py). A subscriber joins through a snapshot script
(epoch, top, replay) stitched to that loop without loss or repeat.

The connection to Redis recovers through the project's recovery machinery (backoff with
jitter, circuit breaker). While it is down the broker is not ready: publishes and subscribes
raise BrokerUnavailable, live subscriptions stay. When it is back, every followed stream is
checked before the broker is ready again: same epoch and history, reading goes on where it
stopped; history lost, subscribers get the new epoch (an unrequested `subscribed` with
`recovered: false`) and nothing is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import protocol
from .broker import Broker, BrokerUnavailable, PublishResult, Subscriber, SubscribeResult, encode_data, new_epoch
from .follower import Step, StreamFollower
from .protocol import Position
from .recovery import CircuitState, Recovery, RecoveryPolicy
from .redis_pipeline import CommandPipeline

log = logging.getLogger("stablews.redis")

MIN_STREAM_LENGTH = 1000  # entries kept whatever history_size says: a lagging reader's margin
READ_COUNT = 1000  # entries per stream per read
BLOCK_MS = 1000  # a read waits this long for news, then starts again (channels may have changed)
POOL_SIZE = 32  # connections for commands (the reader has its own)

# Failures of the link (as opposed to a script refused by Redis, e.g. a key of the wrong type).
LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
ANY_ERROR = (RedisError, OSError, TimeoutError)

_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function id_ms(id) return tonumber(string.match(id, '^(%d+)')) end
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
-- A new epoch: history dropped, top 0, and a marker entry that tells every reader at once
-- (why: 'reset', the source lost continuity; 'lost', the history was gone).
-- The marker's id is above every id the old stream gave, so readers positioned in it see the marker
-- (an automatic id in the same millisecond could be below their position).
local function renew(meta, stream, epoch, why)
  local id = '*'
  if redis.call('EXISTS', stream) == 1 then
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local ms, seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
        if tonumber(ms) >= now_ms() then id = ms .. '-' .. string.format('%d', tonumber(seq) + 1) end
      end
    end
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  redis.call('XADD', stream, id, 'f', '', 'e', epoch, 'o', '0', 'r', why)
end
-- The channel's epoch, created when its history is missing; the keys' lifetime renewed.
local function ensure(meta, stream, candidate, key_ttl)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = candidate
    renew(meta, stream, epoch, 'lost')
  end
  redis.call('PEXPIRE', meta, key_ttl)
  redis.call('PEXPIRE', stream, key_ttl)
  return epoch
end
"""

# KEYS meta, stream. ARGV candidate epoch, frame head, frame tail, stream cap, key ttl ms, history ttl ms.
# Returns {epoch, offset}.
PUBLISH = _PRELUDE + """
local epoch = ensure(KEYS[1], KEYS[2], ARGV[1], ARGV[5])
local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'top', 1))
local frame = ARGV[2] .. epoch .. '","offset":' .. offset .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'f', frame, 'e', epoch, 'o', offset)
redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', now_ms() - tonumber(ARGV[6])))
return {epoch, tonumber(offset)}
"""

# KEYS meta, stream. ARGV candidate epoch, since epoch, since offset (-1: no position),
# most messages to replay, key ttl ms, history ttl ms.
# Returns {epoch, top, id of the last entry, recovered (1, 0, or -1: no position), frames...}.
SNAPSHOT = _PRELUDE + """
local epoch = ensure(KEYS[1], KEYS[2], ARGV[1], ARGV[5])
local top = tonumber(redis.call('HGET', KEYS[1], 'top'))
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local res = {epoch, top, '0-0', 0}
if #last > 0 then res[3] = last[1][1] end
local since = tonumber(ARGV[3])
if since < 0 then res[4] = -1; return res end
if ARGV[2] ~= epoch or since > top then return res end
local missing = top - since
if missing == 0 then res[4] = 1; return res end
if missing > tonumber(ARGV[4]) then return res end
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', missing)
if #entries < missing then return res end
local oldest = entries[missing]
-- fields: f frame e epoch o offset; every message replayed must still be in history_ttl
if oldest[2][4] ~= epoch or tonumber(oldest[2][6]) ~= since + 1 then return res end
if id_ms(oldest[1]) < now_ms() - tonumber(ARGV[6]) then return res end
res[4] = 1
for i = missing, 1, -1 do res[#res + 1] = entries[i][2][2] end
return res
"""

# KEYS meta, stream. ARGV candidate epoch, followed epoch, followed top, id of the last entry read,
# key ttl ms. Is the history this instance follows still there? Returns {epoch, moved}: moved 1
# when the follower must start over in `epoch` (from its first entry). History lost or rolled
# back (top below ours, or our last entry gone while older ones remain) makes a new epoch.
CHECK = _PRELUDE + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  renew(KEYS[1], KEYS[2], ARGV[1], 'lost')
  epoch = ARGV[1]
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if epoch ~= ARGV[2] then return {epoch, 1} end
local lost = tonumber(redis.call('HGET', KEYS[1], 'top')) < tonumber(ARGV[3])
if not lost and ARGV[4] ~= '0-0' then
  local at = redis.call('XRANGE', KEYS[2], ARGV[4], ARGV[4])
  if #at == 0 then
    local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
    lost = #first > 0 and id_less(first[1][1], ARGV[4])
  else
    lost = tonumber(at[1][2][6]) ~= tonumber(ARGV[3])
  end
end
if lost then
  renew(KEYS[1], KEYS[2], ARGV[1], 'lost')
  return {ARGV[1], 1}
end
return {epoch, 0}
"""

# KEYS meta, stream. ARGV new epoch, key ttl ms.
RESET = _PRELUDE + """
renew(KEYS[1], KEYS[2], ARGV[1], 'reset')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return ARGV[1]
"""


# KEYS lease. ARGV holder, ttl ms. Returns 1 renewed, 2 taken, 0 held by another.
CLAIM = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""

# KEYS lease. ARGV holder.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def redact(url: str) -> str:
    """The URL without its password (stats, logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + host))


def check_url(url: str) -> str | None:
    """None when redis-py accepts the URL, else what is wrong (for the one-line config error)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "must be 'memory' or a redis://, rediss:// or unix:// URL"
    try:
        aioredis.ConnectionPool.from_url(url)
    except (ValueError, TypeError) as exc:
        return f"is not a Redis URL redis-py accepts ({exc})"
    return None


def _unless_cancelled() -> None:
    """redis-py can turn the cancellation of a command into a connection error: a task being
    cancelled must still end (shutdown waits for it), and a cancelled command says nothing about the link."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        *,
        history_size: int,
        history_ttl: float,
        max_recovery_messages: int,
        key_ttl: float,
        prefix: str = "stablews",
        timeout: float = 5.0,
        instance_id: str = "",
        policy: RecoveryPolicy | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.history_ttl_ms = int(history_ttl * 1000)
        self.max_replay = min(history_size, max_recovery_messages)
        self.key_ttl_ms = int(key_ttl * 1000)
        self.stream_cap = max(history_size, MIN_STREAM_LENGTH)
        self.prefix = prefix
        self.timeout = timeout
        self.wake_key = f"{prefix}:wake:{instance_id.replace('{', '').replace('}', '') or new_epoch()}"
        self._wall = wall_clock
        self._on_event = on_event
        # The link never gives up: without a breaker, attempts go on at the backoff cap.
        policy = policy or RecoveryPolicy()
        policy = replace(policy, enable_auto_recovery=True)
        if not policy.enable_circuit_breaker:
            policy = replace(policy, max_retries=2**31)
        self.recovery = Recovery(policy, on_circuit_change=self._circuit_changed)
        self.followers: dict[str, StreamFollower] = {}  # by stream key
        self._positioning: dict[str, asyncio.Event] = {}  # stream key -> first snapshot in flight
        self.state = "connecting"  # connecting | ready | down
        self.last_error: str | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._checking: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._commands: aioredis.Redis | None = None
        self._reader_pool: aioredis.ConnectionPool | None = None
        self._scripts: dict[str, Any] = {}
        self._pipeline: CommandPipeline = None  # type: ignore[assignment]  # made in start()
        self._publish_sha = ""
        self._wake_id = "0-0"
        # figures
        self.published_total = 0
        self.publish_failures = 0
        self.entries_read = 0
        self.resets_total = 0
        self.discontinuities: Counter[str] = Counter()

    # ------------------------------------------------------------ keys

    def keys(self, channel: str) -> tuple[str, str]:
        tag = f"{self.prefix}:{{{channel}}}"
        return f"{tag}:m", f"{tag}:s"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._tasks:
            return
        retry = Retry(NoBackoff(), 0)  # failures go to the recovery machinery, not a hidden retry
        common: dict[str, Any] = {"decode_responses": True, "retry": retry, "socket_connect_timeout": self.timeout}
        # Commands queue for a pooled connection without a deadline (timeout=None): the wait is
        # load, not a broken link, and each command is bounded by socket_timeout once it runs.
        # With a deadline, a burst of resumes (thousands of snapshots) would time out in the
        # queue and be taken for Redis going away.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=POOL_SIZE, timeout=None, socket_timeout=self.timeout, **common
        )
        self._commands = aioredis.Redis(connection_pool=pool)
        # RESP3, so the reply's shape is fixed whatever the client's default: {stream: [[id, [fields]]]}.
        self._reader_pool = aioredis.ConnectionPool.from_url(
            self.url, socket_timeout=BLOCK_MS / 1000 + self.timeout, protocol=3, **common
        )
        # Publications: one connection, pipelined; each answer is bounded by the pipeline itself.
        self._pipeline = CommandPipeline(
            aioredis.ConnectionPool.from_url(self.url, socket_timeout=None, **common),
            self.timeout, self._fail, self._publish_failed,
        )
        scripts = (("snapshot", SNAPSHOT), ("check", CHECK), ("reset", RESET), ("claim", CLAIM),
                   ("release", RELEASE))
        for name, text in scripts:
            self._scripts[name] = self._commands.register_script(text)
        self._tasks = [
            asyncio.create_task(self._supervise(), name="redis link"),
            asyncio.create_task(self._read(), name="redis reader"),
        ]

    async def stop(self) -> None:
        self._ready.clear()  # refuse from now on: nothing new starts on clients being closed
        self.state = "closed"
        tasks, self._tasks = [*self._tasks, *self._background], []
        if self._checking is not None:
            tasks.append(self._checking)
        for task in tasks:
            # Again until it ends: redis-py may swallow one cancellation inside a command.
            for _ in range(50):
                task.cancel()
                done, _pending = await asyncio.wait({task}, timeout=0.1)
                if done:
                    break
            with contextlib.suppress(asyncio.CancelledError, Exception):
                if task.done():
                    task.result()
        if self._pipeline is not None:
            await self._pipeline.stop(RedisConnectionError("the broker stopped"))
        if self._commands is not None:
            with contextlib.suppress(Exception):
                await self._commands.aclose()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def why_unavailable(self) -> str:
        return f"redis {self.state}: {self.last_error or 'not connected yet'}"

    # ------------------------------------------------------------ the link

    async def _supervise(self) -> None:
        """Connect, verify, re-check every followed stream, serve; on a failure start over."""
        recovery = self.recovery
        assert self._commands is not None
        while True:
            delay = recovery.next_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            if not recovery.start_attempt():
                continue
            try:
                async with asyncio.timeout(self.timeout * 2):
                    await self._commands.ping()  # the reader connects its own connection when it is ready
                    self._publish_sha = await self._commands.script_load(PUBLISH)
                    await self._pipeline.start()
                    last = await self._commands.xrevrange(self.wake_key, count=1)
                    self._wake_id = last[0][0] if last else "0-0"
                await self._check(list(self.followers.values()))
            except Exception as exc:  # Redis errors, and a bug: either way this attempt failed
                _unless_cancelled()
                if not isinstance(exc, ANY_ERROR):
                    log.exception("redis link attempt failed", extra={"broker": redact(self.url)})
                self.last_error = _describe(exc)
                recovery.failed()
                log.warning("redis unavailable", extra={"broker": redact(self.url), "error": self.last_error,
                                                        "circuit": str(recovery.circuit_state)})
                continue
            recovered_in = recovery.succeeded()
            self.state = "ready"
            self._lost.clear()
            self._ready.set()
            log.info("redis connected", extra={"broker": redact(self.url), "recovered_in_s": recovered_in})
            if recovered_in is not None:
                self._emit("connection_recovered", {"broker": "redis", "recovered_in_s": round(recovered_in, 4),
                                                    "channels": len(self.followers)})
            await self._lost.wait()
            recovery.lost()

    def _fail(self, exc: BaseException) -> None:
        """A command found the link broken: not ready until the supervisor has it back."""
        self.last_error = _describe(exc)
        if self._ready.is_set():
            self._ready.clear()
            self.state = "down"
            log.warning("redis connection lost", extra={"broker": redact(self.url), "error": self.last_error})
            self._lost.set()

    def _circuit_changed(self, old: CircuitState, new: CircuitState) -> None:
        log.warning("redis circuit %s", new, extra={"broker": redact(self.url), "last_error": self.last_error})
        if new is CircuitState.OPEN:
            breaker = self.recovery.breaker
            self._emit("circuit_breaker_opened", {"broker": "redis", "failures": breaker.consecutive_failures,
                                                  "retry_after_s": round(breaker.retry_after(), 3)})

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if self._on_event is not None:
            self._on_event(event, payload)

    def _unavailable(self, exc: BaseException | None = None) -> BrokerUnavailable:
        if exc is not None:
            _unless_cancelled()
        if exc is not None and isinstance(exc, LINK_ERRORS):
            self._fail(exc)
        elif exc is not None:
            log.error("redis refused a command: %s", _describe(exc), extra={"broker": redact(self.url)})
            return BrokerUnavailable(f"redis: {_describe(exc)}")
        return BrokerUnavailable(self.why_unavailable())

    # ------------------------------------------------------------ publish

    def publish_nowait(self, channel: str, data: Any) -> asyncio.Future[PublishResult]:
        """Start a publication; its result (or BrokerUnavailable) comes on the future. Publications
        asked for in one loop iteration go to Redis in one write, in the order asked."""
        data_json = encode_data(data)  # before anything else: bad data is the caller's error
        if not self._ready.is_set():
            self.publish_failures += 1
            raise self._unavailable()
        ts_ms = int(self._wall() * 1000)
        head, tail = protocol.publication_parts(channel, data_json, ts_ms)
        meta, stream = self.keys(channel)

        def settle(reply: list[Any]) -> PublishResult:
            self.published_total += 1
            return PublishResult(channel, str(reply[0]), int(reply[1]), ts_ms)

        return self._pipeline.call(
            ("EVALSHA", self._publish_sha, 2, meta, stream, new_epoch(), head, tail, self.stream_cap,
             self.key_ttl_ms, self.history_ttl_ms),
            settle,
        )

    async def publish(self, channel: str, data: Any) -> PublishResult:
        return await self.publish_nowait(channel, data)

    def _publish_failed(self, exc: BaseException) -> BrokerUnavailable:
        """What a publisher gets when its publication failed (the pipeline's translation)."""
        self.publish_failures += 1
        # The link broke, or the script cache was flushed: either way the link starts over (and reloads it).
        if isinstance(exc, (NoScriptError, *LINK_ERRORS)):
            self._fail(exc)
            return BrokerUnavailable(self.why_unavailable())
        log.error("redis refused a publication: %s", _describe(exc), extra={"broker": redact(self.url)})
        return BrokerUnavailable(f"redis: {_describe(exc)}")

    async def reset(self, channel: str) -> str:
        if not self._ready.is_set():
            raise self._unavailable()
        try:
            epoch = await self._scripts["reset"](keys=self.keys(channel), args=[new_epoch(), self.key_ttl_ms])
        except ANY_ERROR as exc:
            raise self._unavailable(exc) from None
        self.resets_total += 1
        return str(epoch)

    # ------------------------------------------------------------ leases

    shared = True

    async def claim(self, name: str, holder: str, ttl: float) -> bool:
        if not self._ready.is_set():
            raise self._unavailable()
        try:
            held = await self._scripts["claim"](keys=[f"{self.prefix}:lease:{name}"], args=[holder, int(ttl * 1000)])
        except ANY_ERROR as exc:
            raise self._unavailable(exc) from None
        return int(held) > 0

    async def release(self, name: str, holder: str) -> None:
        if self._ready.is_set():
            with contextlib.suppress(*ANY_ERROR):
                await self._scripts["release"](keys=[f"{self.prefix}:lease:{name}"], args=[holder])

    # ------------------------------------------------------------ subscribe

    async def subscribe(
        self, channel: str, subscriber: Subscriber, since: Position | None
    ) -> SubscribeResult:
        if not self._ready.is_set():
            raise self._unavailable()
        meta, key = self.keys(channel)
        follower = self.followers.get(key)
        if follower is None:
            follower = self.followers[key] = StreamFollower(channel, key)
        join = follower.join(subscriber)
        first = False
        try:
            # One first snapshot at a time: the ones after it are level with where reading starts.
            while not follower.positioned and key in self._positioning:
                await self._positioning[key].wait()
            first = not follower.positioned
            if first:
                self._positioning[key] = asyncio.Event()
            reply = await self._scripts["snapshot"](
                keys=(meta, key),
                args=[
                    new_epoch(),
                    since.epoch if since is not None else "",
                    since.offset if since is not None else -1,
                    self.max_replay,
                    self.key_ttl_ms,
                    self.history_ttl_ms,
                ],
            )
        except BaseException as exc:
            follower.cancel(join)
            self._forget_if_empty(follower)
            if isinstance(exc, ANY_ERROR):
                raise self._unavailable(exc) from None
            raise
        finally:
            if first:
                self._positioning.pop(key).set()
        epoch, top, last_id, recovered = str(reply[0]), int(reply[1]), str(reply[2]), int(reply[3])
        if first and self.followers.get(key) is follower:
            follower.position(epoch, top, last_id)
            self._wake()
        live = follower.settle(join, epoch, top)
        return SubscribeResult(epoch, top, None if recovered < 0 else bool(recovered), list(reply[4:]), live)

    def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        follower = self.followers.get(self.keys(channel)[1])
        if follower is not None:
            follower.leave(subscriber)
            self._forget_if_empty(follower)

    def _forget_if_empty(self, follower: StreamFollower) -> None:
        # The reader stops reading it at its next round.
        if follower.empty and self.followers.get(follower.key) is follower:
            del self.followers[follower.key]

    def _wake(self) -> None:
        """Interrupt the reader's blocking read so it reads a newly followed stream at once."""
        async def wake() -> None:
            assert self._commands is not None
            try:
                await self._commands.xadd(self.wake_key, {"w": "1"}, maxlen=10, approximate=False)
                await self._commands.pexpire(self.wake_key, 60_000)
            except LINK_ERRORS as exc:
                _unless_cancelled()
                self._fail(exc)
            except RedisError as exc:
                log.warning("redis wake failed: %s", _describe(exc))

        task = asyncio.get_running_loop().create_task(wake())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ the reader

    async def _read(self) -> None:
        """One loop for all followed channels: read what is new, fan it out here.

        The reader has a connection of its own, spoken to directly (one command at a time):
        its replies are taken as Redis sends them (entry fields in their written order: f, e, o
        and for a marker r), without the client's per-entry dictionaries and wrappers."""
        assert self._reader_pool is not None
        conn = self._reader_pool.make_connection()
        followers = self.followers
        try:
            while True:
                _unless_cancelled()
                await self._ready.wait()
                asked = {follower.key: follower.last_id for follower in followers.values() if follower.positioned}
                try:
                    if not conn.is_connected:
                        await conn.connect()
                    await conn.send_command("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS",
                                            self.wake_key, *asked, self._wake_id, *asked.values())
                    reply = await conn.read_response()
                except LINK_ERRORS as exc:
                    _unless_cancelled()
                    await conn.disconnect(nowait=True)
                    self._fail(exc)
                    continue
                except RedisError as exc:  # e.g. a key of another type under our prefix
                    _unless_cancelled()
                    log.error("redis read failed: %s", _describe(exc), extra={"broker": redact(self.url)})
                    self._fail(exc)
                    continue
                try:
                    self._fan_out(reply, asked)
                except Exception as exc:  # a bug must not stop delivery for good: start over, checked
                    log.exception("redis reader failed", extra={"broker": redact(self.url)})
                    self._fail(exc)
        finally:
            await conn.disconnect(nowait=True)

    def _fan_out(self, reply: dict[str, Any] | None, asked: dict[str, str]) -> None:
        """Hand each entry read to its follower (and so to the local subscribers), in stream order."""
        followers = self.followers
        for key, entries in (reply or {}).items():
            if key == self.wake_key:
                self._wake_id = entries[-1][0]
                continue
            follower = followers.get(key)
            # Moved (checked, re-created) while the read was out: read again from where it is now.
            if follower is None or follower.last_id != asked.get(key):
                continue
            advance = follower.advance
            for _entry_id, fields in entries:
                frame = fields[1]
                if frame:
                    if advance(fields[3], int(fields[5]), frame) > Step.NEXT:
                        self.discontinuities["gap"] += 1  # read after it was trimmed
                elif advance(fields[3], int(fields[5]), None) > Step.NEXT:
                    reset = len(fields) > 7 and fields[7] == "reset"
                    self.discontinuities["reset" if reset else "new_epoch"] += 1
            follower.last_id = entries[-1][0]
            self.entries_read += len(entries)

    # ------------------------------------------------------------ checks

    def sweep(self) -> None:
        """Every health sweep: check the followed streams (history lost without a disconnect, a
        flush say) and keep their keys alive while anyone here listens."""
        if self._ready.is_set() and (self._checking is None or self._checking.done()):
            self._checking = asyncio.get_running_loop().create_task(self._checked())

    async def _checked(self) -> None:
        try:
            await self._check(list(self.followers.values()))
        except LINK_ERRORS as exc:
            _unless_cancelled()
            self._fail(exc)
        except RedisError as exc:
            log.warning("redis check failed: %s", _describe(exc))

    async def _check(self, followers: list[StreamFollower]) -> None:
        followers = [f for f in followers if f.positioned]
        if not followers:
            return
        assert self._commands is not None
        script = self._scripts["check"]
        async with self._commands.pipeline(transaction=False) as pipe:
            for follower in followers:
                meta = follower.key[:-1] + "m"
                await script(
                    keys=(meta, follower.key),
                    args=[new_epoch(), follower.epoch, follower.top, follower.last_id, self.key_ttl_ms],
                    client=pipe,
                )
            replies = await pipe.execute()
        moved_any = False
        for follower, (epoch, moved) in zip(followers, replies, strict=True):
            # Start over in the new epoch, from its first entry (read next), unless reading got there already.
            if int(moved) and follower.advance(str(epoch), 0, None) is not Step.SEEN:
                self.discontinuities["new_epoch"] += 1
                follower.last_id = "0-0"
                moved_any = True
        if moved_any and self._ready.is_set():
            self._wake()

    # ------------------------------------------------------------ figures

    def stats(self) -> dict[str, Any]:
        followers = self.followers.values()
        return {
            "type": "redis",
            "url": redact(self.url),
            "ready": self.ready,
            "state": self.state,
            "last_error": self.last_error,
            "circuit_state": str(self.recovery.circuit_state),
            "channels": len(self.followers),
            "subscriptions": sum(len(f.subscribers) + len(f.joins) for f in followers),
            "published_total": self.published_total,
            "publish_failures_total": self.publish_failures,
            "entries_read_total": self.entries_read,
            "resets_total": self.resets_total,
            "discontinuities": {reason: self.discontinuities[reason] for reason in ("reset", "new_epoch", "gap")},
            "recovery": self.recovery.stats(),
        }
