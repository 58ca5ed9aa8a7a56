"""Connection recovery without I/O: backoff with jitter, the circuit breaker,
and the reconnect episode that ties them together.

Used by the Python client and by the server's upstream relays. Nothing here
sleeps or connects: callers ask "how long until the next attempt?" and report
what happened. The clock and the random source are injected, so every rule is
testable with plain values.

The rules (configuration.md, "Connection recovery"):

- attempt n of an episode (0-based) waits
  `min(initial_delay * backoff_multiplier**n, max_delay) + uniform(0, jitter_max)`;
  the first attempt waits the server's `reconnect` advice instead, when there was one;
- an episode ends on a verified success, or after `max_retries` failed
  attempts: the circuit opens (or, with the breaker off, recovery gives up);
- the breaker also opens after `circuit_breaker_threshold` consecutive
  failures; after `circuit_breaker_timeout` it half-opens and allows one
  trial attempt; a verified success closes it, a failure opens it again.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

Clock = Callable[[], float]


class Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """The recovery options of configuration.md, as one value."""

    max_retries: int = 5
    initial_delay: float = 1.0
    max_delay: float = 30.0
    backoff_multiplier: float = 2.0
    jitter_max: float = 1.0
    enable_circuit_breaker: bool = True
    circuit_breaker_threshold: int = 5
    circuit_breaker_timeout: float = 60.0
    enable_auto_recovery: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> RecoveryPolicy:
        """Take the recovery options from a `Settings` (or any object with those attributes)."""
        names = cls.__dataclass_fields__
        return cls(**{name: getattr(settings, name) for name in names})


class Backoff:
    """Exponential backoff with additive uniform jitter."""

    __slots__ = ("initial", "jitter_max", "maximum", "multiplier", "rng")

    def __init__(
        self, initial: float, multiplier: float, maximum: float, jitter_max: float, rng: Uniform | None = None
    ) -> None:
        self.initial = initial
        self.multiplier = multiplier
        self.maximum = maximum
        self.jitter_max = jitter_max
        self.rng: Uniform = rng or random.Random()

    def base(self, attempt: int) -> float:
        """The delay before attempt `attempt` (0-based) without jitter: grows, then stays at the cap."""
        delay = self.initial
        for _ in range(attempt):
            delay *= self.multiplier
            if delay >= self.maximum:
                return self.maximum
        return min(delay, self.maximum)

    def delay(self, attempt: int) -> float:
        """base(attempt) plus jitter uniform in [0, jitter_max]."""
        jitter = self.rng.uniform(0.0, self.jitter_max) if self.jitter_max > 0 else 0.0
        return self.base(attempt) + jitter


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed → open after `threshold` consecutive failures → half-open after
    `timeout` (one trial allowed) → closed on a success, open again on a failure.

    `on_change(old, new)` is called on every transition; the open → half-open
    transition happens lazily, when `state` or `allow()` is consulted.
    """

    def __init__(
        self,
        threshold: int,
        timeout: float,
        clock: Clock = time.monotonic,
        on_change: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.timeout = timeout
        self.clock = clock
        self.on_change = on_change
        self._state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.opened_total = 0
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self.clock() - (self.opened_at or 0.0) >= self.timeout:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until an attempt is allowed (0 when one is allowed now)."""
        state = self.state
        if state is CircuitState.OPEN:
            return max(0.0, (self.opened_at or 0.0) + self.timeout - self.clock())
        if state is CircuitState.HALF_OPEN and self._trial_in_flight:
            return self.timeout  # the one trial is running; its outcome decides
        return 0.0

    def allow(self) -> bool:
        """May an attempt start now? In half-open, only one trial at a time."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        """A verified success: closes the circuit from any state."""
        self.consecutive_failures = 0
        self._trial_in_flight = False
        if self._state is not CircuitState.CLOSED:
            self.opened_at = None
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        state = self.state
        self._trial_in_flight = False
        if state is CircuitState.HALF_OPEN or (
            state is CircuitState.CLOSED and self.consecutive_failures >= self.threshold
        ):
            self.trip()

    def trip(self) -> None:
        """Open now (also used when an episode exhausts `max_retries`)."""
        self.opened_at = self.clock()
        self._trial_in_flight = False
        if self._state is not CircuitState.OPEN:
            self.opened_total += 1
            self._set(CircuitState.OPEN)

    def _set(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if self.on_change is not None and old is not new:
            self.on_change(old, new)


class GiveUp(Exception):
    """Recovery is over: auto recovery is off, or the episode failed with the breaker off."""


class Recovery:
    """One connection's recovery: the current episode, the breaker and the statistics.

    Protocol for the caller (client or relay):
        lost(advice)            the connection dropped (advice: `after_ms`/1000, or None)
        wait = next_delay()     seconds to wait before the next attempt (raises GiveUp)
        ... connect, verify ...
        succeeded() / failed()  report the attempt
    """

    def __init__(
        self,
        policy: RecoveryPolicy,
        *,
        clock: Clock = time.monotonic,
        rng: Uniform | None = None,
        on_circuit_change: Callable[[CircuitState, CircuitState], None] | None = None,
        history: int = 100,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.backoff = Backoff(
            policy.initial_delay, policy.backoff_multiplier, policy.max_delay, policy.jitter_max, rng
        )
        self.breaker = CircuitBreaker(
            policy.circuit_breaker_threshold, policy.circuit_breaker_timeout, clock, on_circuit_change
        )
        self.in_episode = False
        self.episode_started: float | None = None
        self.episode_attempts = 0  # failed attempts in this episode
        self._advice: float | None = None
        self.attempts = 0
        self.successes = 0
        self.failures = 0
        self.episodes = 0
        self.gave_up = False
        self.recover_times: deque[float] = deque(maxlen=history)

    # --------------------------------------------------------------- events

    def lost(self, advice: float | None = None) -> None:
        """The connection dropped: a new episode starts (no-op inside one)."""
        if self.in_episode:
            return
        self.in_episode = True
        self.episodes += 1
        self.episode_started = self.clock()
        self.episode_attempts = 0
        self._advice = advice

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; raises GiveUp when there is none."""
        policy = self.policy
        if self.in_episode and not policy.enable_auto_recovery:
            self.gave_up = True
            raise GiveUp("auto recovery is off")
        if policy.enable_circuit_breaker:
            wait = self.breaker.retry_after()
            if wait > 0:
                return wait
        elif self.episode_attempts >= policy.max_retries and self.in_episode:
            self.gave_up = True
            raise GiveUp(f"{self.episode_attempts} attempts failed")
        if self._advice is not None and self.episode_attempts == 0:
            return self._advice
        if not self.in_episode:
            return 0.0  # the first connection: no reason to wait
        return self.backoff.delay(self.episode_attempts)

    def start_attempt(self) -> bool:
        """An attempt is about to start; False when the breaker does not allow it yet."""
        if self.policy.enable_circuit_breaker and not self.breaker.allow():
            return False
        self.attempts += 1
        return True

    def succeeded(self) -> float | None:
        """A verified success. Returns the episode's time to recover (None outside an episode)."""
        self.successes += 1
        self.breaker.record_success()
        recovered_in: float | None = None
        if self.in_episode and self.episode_started is not None:
            recovered_in = self.clock() - self.episode_started
            self.recover_times.append(recovered_in)
        self.in_episode = False
        self.episode_attempts = 0
        self._advice = None
        return recovered_in

    def failed(self) -> None:
        self.failures += 1
        self.episode_attempts += 1
        self._advice = None  # the advice was for the first attempt only, not the one after an open period
        if not self.in_episode:  # the very first connection failed: that starts an episode too
            self.in_episode = True
            self.episodes += 1
            self.episode_started = self.clock()
        if not self.policy.enable_circuit_breaker:
            return
        self.breaker.record_failure()
        if self.episode_attempts >= self.policy.max_retries and self.breaker.state is not CircuitState.OPEN:
            self.breaker.trip()
        if self.breaker.state is CircuitState.OPEN:
            self.episode_attempts = 0  # after the open period, backoff starts again

    # --------------------------------------------------------------- figures

    @property
    def circuit_state(self) -> CircuitState:
        return self.breaker.state if self.policy.enable_circuit_breaker else CircuitState.CLOSED

    def stats(self) -> dict[str, Any]:
        times = list(self.recover_times)
        return {
            "attempts": self.attempts,
            "successes": self.successes,
            "failures": self.failures,
            "success_rate": round(self.successes / self.attempts, 4) if self.attempts else None,
            "episodes": self.episodes,
            "in_episode": self.in_episode,
            "gave_up": self.gave_up,
            "circuit_state": str(self.circuit_state),
            "circuit_opened_total": self.breaker.opened_total,
            "consecutive_failures": self.breaker.consecutive_failures,
            "time_to_recover_seconds": {
                "count": len(times),
                "last": round(times[-1], 4) if times else None,
                "median": round(statistics.median(times), 4) if times else None,
                "max": round(max(times), 4) if times else None,
            },
        }
