"""recovery.py with a fake clock and injected random sources: backoff, breaker, episodes, stats, policy."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablews.config import Settings, load
from stablews.recovery import Backoff, CircuitBreaker, CircuitState, GiveUp, Recovery, RecoveryPolicy

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


# ------------------------------------------------------------------ helpers


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fraction:
    """A random source whose uniform(a, b) always returns a + fraction * (b - a)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + self.fraction * (b - a)


class Changes(list):
    """on_change callback that records (old, new) pairs."""

    def __call__(self, old: CircuitState, new: CircuitState) -> None:
        self.append((old, new))


def expected_base(initial: float, multiplier: float, maximum: float, attempt: int) -> float:
    """The documented rule min(initial * multiplier**attempt, max_delay), without overflowing."""
    try:
        return min(initial * multiplier**attempt, maximum)
    except OverflowError:
        return maximum


def make_recovery(
    clock: FakeClock | None = None, rng: object | None = None, changes: Changes | None = None, **options: object
) -> Recovery:
    policy = dataclasses.replace(RecoveryPolicy(), **options)
    return Recovery(policy, clock=clock or FakeClock(), rng=rng or Fraction(0.0), on_circuit_change=changes)


def fail_attempt(recovery: Recovery, clock: FakeClock) -> float:
    """Wait next_delay on the fake clock, start an attempt and report it failed; returns the delay."""
    delay = recovery.next_delay()
    clock.advance(delay)
    assert recovery.start_attempt() is True
    recovery.failed()
    return delay


# ------------------------------------------------------------------ backoff: properties

initial_delays = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
multipliers = st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False)
cap_factors = st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False)
jitters = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    initial=initial_delays, multiplier=multipliers, factor=cap_factors, jitter=jitters,
    attempt=st.integers(min_value=0, max_value=60), rng=st.randoms(use_true_random=False),
)
def test_delay_lies_between_base_and_base_plus_jitter(initial, multiplier, factor, jitter, attempt, rng):
    maximum = initial * factor
    backoff = Backoff(initial, multiplier, maximum, jitter, rng)
    base = expected_base(initial, multiplier, maximum, attempt)
    assert math.isclose(backoff.base(attempt), base, rel_tol=1e-9)
    delay = backoff.delay(attempt)
    slack = 1e-9 * (base + jitter)
    assert base - slack <= delay <= base + jitter + slack


@settings(max_examples=300, deadline=None)
@given(
    initial=initial_delays, multiplier=multipliers, factor=cap_factors, jitter=jitters,
    attempt=st.integers(min_value=0, max_value=60), fraction=fractions,
)
def test_delay_adds_exactly_the_drawn_jitter(initial, multiplier, factor, jitter, attempt, fraction):
    maximum = initial * factor
    rng = Fraction(fraction)
    delay = Backoff(initial, multiplier, maximum, jitter, rng).delay(attempt)
    base = expected_base(initial, multiplier, maximum, attempt)
    assert math.isclose(delay, base + fraction * jitter, rel_tol=1e-9, abs_tol=1e-12)
    if jitter > 0:
        assert rng.calls == [(0.0, jitter)]


@settings(max_examples=300, deadline=None)
@given(initial=initial_delays, multiplier=multipliers, factor=cap_factors)
def test_base_is_non_decreasing_and_never_exceeds_the_cap(initial, multiplier, factor):
    maximum = initial * factor
    backoff = Backoff(initial, multiplier, maximum, 0.0, random.Random(0))
    bases = [backoff.base(n) for n in range(62)]
    assert bases[0] == pytest.approx(min(initial, maximum), rel=1e-12)
    assert all(a <= b for a, b in itertools.pairwise(bases))
    assert all(b <= maximum for b in bases)
    # Once the uncapped value reaches the cap, the cap is what is returned, exactly.
    for n, b in enumerate(bases):
        if expected_base(initial, multiplier, math.inf, n) >= maximum * (1 + 1e-9):
            assert b == maximum


@settings(max_examples=200, deadline=None)
@given(
    initial=initial_delays, multiplier=st.floats(min_value=1.5, max_value=1e300), factor=cap_factors,
    attempt=st.integers(min_value=61, max_value=10**12),
)
def test_huge_attempts_stay_at_the_cap_without_overflow(initial, multiplier, factor, attempt):
    maximum = initial * factor
    backoff = Backoff(initial, multiplier, maximum, 0.0, random.Random(0))
    assert backoff.base(attempt) == maximum
    assert backoff.delay(attempt) == maximum
    assert math.isfinite(backoff.delay(attempt))


@settings(max_examples=200, deadline=None)
@given(
    initial=initial_delays, multiplier=multipliers, factor=cap_factors,
    attempt=st.integers(min_value=0, max_value=60), rng=st.randoms(use_true_random=False),
)
def test_without_jitter_the_delay_is_the_base(initial, multiplier, factor, attempt, rng):
    maximum = initial * factor
    backoff = Backoff(initial, multiplier, maximum, 0.0, rng)
    assert backoff.delay(attempt) == backoff.base(attempt)
    assert math.isclose(backoff.delay(attempt), expected_base(initial, multiplier, maximum, attempt), rel_tol=1e-9)


# ------------------------------------------------------------------ backoff: concrete values


def test_default_backoff_sequence_doubles_then_caps():
    backoff = Backoff(1.0, 2.0, 30.0, 0.0, random.Random(1))
    assert [backoff.base(n) for n in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.base(10**9) == 30.0


def test_multiplier_one_keeps_the_initial_delay():
    backoff = Backoff(0.5, 1.0, 30.0, 0.0, random.Random(1))
    assert [backoff.base(n) for n in (0, 1, 2, 60)] == [0.5, 0.5, 0.5, 0.5]


def test_initial_equal_to_cap_is_the_cap_from_the_start():
    backoff = Backoff(3.0, 4.0, 3.0, 0.0, random.Random(1))
    assert [backoff.base(n) for n in range(4)] == [3.0, 3.0, 3.0, 3.0]


def test_jitter_comes_from_the_injected_random_source():
    backoff = Backoff(1.0, 3.0, 100.0, 2.0, random.Random(42))
    twin = random.Random(42)
    assert backoff.delay(0) == 1.0 + twin.uniform(0.0, 2.0)
    assert backoff.delay(2) == 9.0 + twin.uniform(0.0, 2.0)
    assert backoff.delay(5) == 100.0 + twin.uniform(0.0, 2.0)


def test_jitter_bounds_with_extreme_draws():
    assert Backoff(2.0, 2.0, 30.0, 1.0, Fraction(0.0)).delay(1) == 4.0
    assert Backoff(2.0, 2.0, 30.0, 1.0, Fraction(1.0)).delay(1) == 5.0
    assert Backoff(2.0, 2.0, 30.0, 1.0, Fraction(1.0)).delay(9) == 31.0


def test_default_random_source_is_used_when_none_is_given():
    backoff = Backoff(1.0, 2.0, 30.0, 0.5)
    for _ in range(50):
        assert 8.0 <= backoff.delay(3) <= 8.5


# ------------------------------------------------------------------ circuit breaker


def test_breaker_rejects_a_threshold_below_one():
    with pytest.raises(ValueError):
        CircuitBreaker(0, 10.0, FakeClock())


def test_breaker_starts_closed_and_allows():
    breaker = CircuitBreaker(3, 10.0, FakeClock())
    assert breaker.state is CLOSED
    assert breaker.allow() is True
    assert breaker.allow() is True  # no limit on attempts while closed
    assert breaker.retry_after() == 0.0
    assert breaker.opened_total == 0


def test_breaker_stays_closed_below_the_threshold():
    changes = Changes()
    breaker = CircuitBreaker(3, 10.0, FakeClock(), changes)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 2
    assert breaker.allow() is True
    assert breaker.retry_after() == 0.0
    assert changes == []
    assert breaker.opened_total == 0


def test_breaker_opens_on_exactly_the_threshold_th_failure():
    changes = Changes()
    clock = FakeClock(500.0)
    breaker = CircuitBreaker(3, 10.0, clock, changes)
    for _ in range(2):
        breaker.record_failure()
    assert changes == []
    breaker.record_failure()
    assert breaker.state is OPEN
    assert changes == [(CLOSED, OPEN)]
    assert breaker.opened_total == 1
    assert breaker.opened_at == 500.0
    assert breaker.consecutive_failures == 3


def test_threshold_of_one_opens_on_the_first_failure():
    changes = Changes()
    breaker = CircuitBreaker(1, 10.0, FakeClock(), changes)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert changes == [(CLOSED, OPEN)]


def test_a_success_in_between_resets_the_count():
    changes = Changes()
    breaker = CircuitBreaker(3, 10.0, FakeClock(), changes)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert changes == []
    breaker.record_failure()
    assert breaker.state is OPEN
    assert changes == [(CLOSED, OPEN)]


def test_open_breaker_refuses_and_counts_down_with_the_clock():
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(2, 30.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow() is False
    assert breaker.retry_after() == 30.0
    clock.advance(10.0)
    assert breaker.state is OPEN
    assert breaker.allow() is False
    assert breaker.retry_after() == pytest.approx(20.0)
    clock.advance(19.5)
    assert breaker.allow() is False
    assert breaker.retry_after() == pytest.approx(0.5)
    clock.advance(0.25)
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(0.25)


def test_open_breaker_half_opens_after_the_timeout():
    changes = Changes()
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(1, 30.0, clock, changes)
    breaker.record_failure()
    clock.advance(30.0)
    assert breaker.state is HALF_OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert breaker.retry_after() == 0.0
    assert breaker.opened_total == 1  # half-opening is not another opening


def test_half_open_is_reached_lazily_through_allow():
    changes = Changes()
    clock = FakeClock(0.0)  # opened_at == 0.0 must still count as a real time
    breaker = CircuitBreaker(1, 5.0, clock, changes)
    breaker.record_failure()
    assert breaker.opened_at == 0.0
    clock.advance(4.5)
    assert breaker.allow() is False
    clock.advance(0.5)
    assert changes == [(CLOSED, OPEN)]  # nothing consulted the state yet
    assert breaker.allow() is True
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_allows_exactly_one_trial():
    clock = FakeClock()
    breaker = CircuitBreaker(2, 10.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow() is True
    assert breaker.allow() is False  # the trial is running
    assert breaker.allow() is False
    assert breaker.retry_after() > 0  # no new attempt until the trial reports
    assert breaker.state is HALF_OPEN


def test_half_open_success_closes():
    changes = Changes()
    clock = FakeClock()
    breaker = CircuitBreaker(2, 10.0, clock, changes)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(10.0)
    assert breaker.allow() is True
    breaker.record_success()
    assert breaker.state is CLOSED
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert breaker.consecutive_failures == 0
    assert breaker.opened_at is None
    assert breaker.allow() is True
    assert breaker.allow() is True
    assert breaker.retry_after() == 0.0
    # Closed again: it takes a full threshold of failures to open it again.
    breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_total == 2


def test_half_open_failure_reopens_with_a_fresh_timeout():
    changes = Changes()
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(5, 10.0, clock, changes)
    for _ in range(5):
        breaker.record_failure()
    clock.advance(12.0)  # late: the fresh timeout counts from the trial's failure, not the first opening
    assert breaker.allow() is True
    clock.advance(3.0)  # the trial takes a while
    breaker.record_failure()  # a single failure is enough in half-open
    assert breaker.state is OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    assert breaker.opened_total == 2
    assert breaker.opened_at == 115.0
    assert breaker.allow() is False
    assert breaker.retry_after() == 10.0
    clock.advance(9.0)
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.state is HALF_OPEN
    assert breaker.allow() is True
    assert breaker.allow() is False


def test_trip_opens_now_and_is_counted_once():
    changes = Changes()
    clock = FakeClock(50.0)
    breaker = CircuitBreaker(10, 20.0, clock, changes)
    breaker.trip()
    assert breaker.state is OPEN
    assert breaker.opened_total == 1
    clock.advance(5.0)
    breaker.trip()  # already open: refreshes the open period, no new transition
    assert breaker.opened_total == 1
    assert changes == [(CLOSED, OPEN)]
    assert breaker.retry_after() == 20.0


# ------------------------------------------------------------------ Recovery: delays and episodes


def test_first_connection_does_not_wait():
    recovery = make_recovery(rng=Fraction(1.0))
    assert recovery.next_delay() == 0.0
    assert recovery.start_attempt() is True
    assert recovery.succeeded() is None  # not an episode: nothing recovered
    stats = recovery.stats()
    assert stats["attempts"] == 1
    assert stats["successes"] == 1
    assert stats["episodes"] == 0
    assert stats["time_to_recover_seconds"] == {"count": 0, "last": None, "median": None, "max": None}


def test_first_delay_after_lost_is_the_backoff_of_attempt_zero():
    recovery = make_recovery(initial_delay=1.5, jitter_max=2.0, rng=Fraction(0.25))
    recovery.next_delay()
    recovery.start_attempt()
    recovery.succeeded()
    recovery.lost()
    assert recovery.in_episode is True
    assert recovery.next_delay() == 1.5 + 0.25 * 2.0
    assert recovery.stats()["episodes"] == 1


def test_first_delay_uses_the_seeded_random_source():
    rng = random.Random(7)
    recovery = make_recovery(initial_delay=1.0, jitter_max=1.0, rng=rng)
    recovery.lost()
    assert recovery.next_delay() == 1.0 + random.Random(7).uniform(0.0, 1.0)


def test_advice_replaces_only_the_first_delay():
    clock = FakeClock()
    recovery = make_recovery(clock, jitter_max=1.0, rng=Fraction(0.5), max_retries=10, circuit_breaker_threshold=10)
    recovery.lost(7.5)
    assert recovery.next_delay() == 7.5
    assert recovery.next_delay() == 7.5  # asking again does not consume it
    fail_attempt(recovery, clock)
    assert recovery.next_delay() == 2.0 + 0.5  # attempt 1: initial * 2 + jitter
    fail_attempt(recovery, clock)
    assert recovery.next_delay() == 4.0 + 0.5


def test_advice_of_zero_is_honoured():
    recovery = make_recovery(rng=Fraction(1.0))
    recovery.lost(0.0)
    assert recovery.next_delay() == 0.0


def test_advice_is_not_reused_after_the_circuit_opens():
    """The server's advice is for the first attempt of the episode only, not for the
    attempt after the open period (where backoff starts again at attempt 0)."""
    clock = FakeClock()
    recovery = make_recovery(clock, max_retries=1, circuit_breaker_threshold=5, circuit_breaker_timeout=60.0,
                             initial_delay=1.0, jitter_max=0.0)
    recovery.lost(7.5)
    assert fail_attempt(recovery, clock) == 7.5
    assert recovery.circuit_state is OPEN
    assert recovery.next_delay() == 60.0
    clock.advance(60.0)
    assert recovery.next_delay() == 1.0


def test_lost_inside_an_episode_is_a_no_op():
    clock = FakeClock()
    recovery = make_recovery(clock, jitter_max=0.0)
    recovery.lost()
    fail_attempt(recovery, clock)
    recovery.lost(9.0)  # still the same episode: neither a new episode nor new advice
    assert recovery.next_delay() == 2.0
    assert recovery.stats()["episodes"] == 1


def test_delays_grow_across_failed_attempts():
    clock = FakeClock()
    recovery = make_recovery(clock, jitter_max=0.0, max_retries=10, circuit_breaker_threshold=10)
    recovery.lost()
    delays = [fail_attempt(recovery, clock) for _ in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert recovery.circuit_state is CLOSED


def test_delays_grow_with_jitter_on_top():
    clock = FakeClock()
    recovery = make_recovery(clock, initial_delay=0.5, backoff_multiplier=3.0, max_delay=10.0, jitter_max=0.4,
                             rng=Fraction(0.5), max_retries=10, circuit_breaker_threshold=10)
    recovery.lost()
    delays = [fail_attempt(recovery, clock) for _ in range(5)]
    assert delays == pytest.approx([0.7, 1.7, 4.7, 10.2, 10.2])


def test_a_failed_first_connection_starts_an_episode():
    clock = FakeClock(10.0)
    recovery = make_recovery(clock)
    assert recovery.next_delay() == 0.0
    recovery.start_attempt()
    recovery.failed()
    assert recovery.in_episode is True
    assert recovery.stats()["episodes"] == 1
    assert recovery.next_delay() > 0
    clock.advance(4.0)
    recovery.start_attempt()
    assert recovery.succeeded() == 4.0


def test_max_retries_opens_the_circuit_even_below_the_threshold():
    clock = FakeClock()
    changes = Changes()
    recovery = make_recovery(clock, changes=changes, max_retries=3, circuit_breaker_threshold=10,
                             circuit_breaker_timeout=60.0, jitter_max=0.0)
    recovery.lost()
    fail_attempt(recovery, clock)
    fail_attempt(recovery, clock)
    assert recovery.circuit_state is CLOSED
    fail_attempt(recovery, clock)
    assert recovery.circuit_state is OPEN
    assert changes == [(CLOSED, OPEN)]
    stats = recovery.stats()
    assert stats["circuit_state"] == "open"
    assert stats["circuit_opened_total"] == 1
    assert stats["consecutive_failures"] == 3
    assert stats["gave_up"] is False
    assert recovery.next_delay() == 60.0
    assert recovery.start_attempt() is False
    assert recovery.stats()["attempts"] == 3  # a refused attempt is not an attempt


def test_threshold_below_max_retries_opens_first():
    clock = FakeClock()
    recovery = make_recovery(clock, max_retries=5, circuit_breaker_threshold=2, circuit_breaker_timeout=30.0)
    recovery.lost()
    fail_attempt(recovery, clock)
    assert recovery.circuit_state is CLOSED
    fail_attempt(recovery, clock)
    assert recovery.circuit_state is OPEN
    assert recovery.next_delay() == 30.0


def test_open_circuit_counts_down_then_backoff_starts_again():
    clock = FakeClock()
    recovery = make_recovery(clock, max_retries=3, circuit_breaker_threshold=10, circuit_breaker_timeout=60.0,
                             jitter_max=0.0)
    recovery.lost()
    for _ in range(3):
        fail_attempt(recovery, clock)
    assert recovery.next_delay() == 60.0
    clock.advance(45.0)
    assert recovery.next_delay() == pytest.approx(15.0)
    clock.advance(15.0)
    assert recovery.circuit_state is HALF_OPEN
    assert recovery.next_delay() == 1.0  # attempt 0 again, not attempt 3


def test_half_open_trial_through_recovery_closes_on_success():
    clock = FakeClock(1000.0)
    changes = Changes()
    recovery = make_recovery(clock, changes=changes, max_retries=2, circuit_breaker_threshold=5,
                             circuit_breaker_timeout=60.0, jitter_max=0.0)
    recovery.lost()  # t = 1000
    fail_attempt(recovery, clock)  # waits 1 -> 1001
    fail_attempt(recovery, clock)  # waits 2 -> 1003, circuit opens
    assert recovery.circuit_state is OPEN
    wait = recovery.next_delay()
    assert wait == 60.0
    clock.advance(wait)  # 1063
    delay = recovery.next_delay()
    assert delay == 1.0
    clock.advance(delay)  # 1064
    assert recovery.start_attempt() is True  # the one trial
    assert recovery.start_attempt() is False  # no second attempt while it runs
    clock.advance(0.5)  # connecting and verifying: 1064.5
    assert recovery.succeeded() == 64.5
    assert recovery.circuit_state is CLOSED
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    stats = recovery.stats()
    assert stats["circuit_state"] == "closed"
    assert stats["in_episode"] is False
    assert stats["attempts"] == 3
    assert stats["successes"] == 1
    assert stats["failures"] == 2
    assert stats["consecutive_failures"] == 0
    assert stats["time_to_recover_seconds"] == {"count": 1, "last": 64.5, "median": 64.5, "max": 64.5}
    # The next drop is a fresh episode with a fresh backoff.
    recovery.lost()
    assert recovery.next_delay() == 1.0


def test_half_open_trial_failure_reopens_the_circuit():
    clock = FakeClock()
    changes = Changes()
    recovery = make_recovery(clock, changes=changes, max_retries=2, circuit_breaker_threshold=5,
                             circuit_breaker_timeout=60.0, jitter_max=0.0)
    recovery.lost()
    fail_attempt(recovery, clock)
    fail_attempt(recovery, clock)
    clock.advance(recovery.next_delay())
    fail_attempt(recovery, clock)  # the trial fails
    assert recovery.circuit_state is OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]
    assert recovery.stats()["circuit_opened_total"] == 2
    assert recovery.next_delay() == 60.0
    assert recovery.start_attempt() is False


def test_circuit_change_callback_is_forwarded():
    changes = Changes()
    clock = FakeClock()
    recovery = make_recovery(clock, changes=changes, circuit_breaker_threshold=1)
    recovery.lost()
    fail_attempt(recovery, clock)
    assert changes == [(CLOSED, OPEN)]


# ------------------------------------------------------------------ Recovery: giving up


def test_breaker_off_gives_up_after_max_retries():
    clock = FakeClock()
    recovery = make_recovery(clock, enable_circuit_breaker=False, max_retries=3, circuit_breaker_threshold=1,
                             jitter_max=0.0)
    recovery.lost()
    delays = [fail_attempt(recovery, clock) for _ in range(3)]
    assert delays == [1.0, 2.0, 4.0]
    assert recovery.stats()["gave_up"] is False
    with pytest.raises(GiveUp):
        recovery.next_delay()
    stats = recovery.stats()
    assert stats["gave_up"] is True
    assert stats["circuit_state"] == "closed"  # the breaker is off: never opened, even with threshold 1
    assert stats["circuit_opened_total"] == 0
    assert stats["failures"] == 3


def test_breaker_off_a_success_before_max_retries_ends_the_episode():
    clock = FakeClock()
    recovery = make_recovery(clock, enable_circuit_breaker=False, max_retries=2, jitter_max=0.0)
    recovery.lost()
    fail_attempt(recovery, clock)
    clock.advance(recovery.next_delay())
    recovery.start_attempt()
    recovery.succeeded()
    recovery.lost()  # a new episode has its own max_retries
    assert fail_attempt(recovery, clock) == 1.0
    assert fail_attempt(recovery, clock) == 2.0
    with pytest.raises(GiveUp):
        recovery.next_delay()


def test_auto_recovery_off_gives_up_after_lost():
    recovery = make_recovery(enable_auto_recovery=False)
    assert recovery.next_delay() == 0.0  # the first connection is not a recovery
    recovery.start_attempt()
    recovery.succeeded()
    recovery.lost(3.0)
    with pytest.raises(GiveUp):
        recovery.next_delay()
    assert recovery.stats()["gave_up"] is True


def test_auto_recovery_off_gives_up_after_a_failed_first_connection():
    recovery = make_recovery(enable_auto_recovery=False)
    recovery.start_attempt()
    recovery.failed()
    with pytest.raises(GiveUp):
        recovery.next_delay()


# ------------------------------------------------------------------ Recovery: statistics


def test_succeeded_returns_the_time_to_recover_on_the_fake_clock():
    clock = FakeClock(100.0)
    recovery = make_recovery(clock, jitter_max=0.0)
    recovery.lost()  # t = 100
    fail_attempt(recovery, clock)  # 101
    clock.advance(recovery.next_delay())  # 103
    recovery.start_attempt()
    clock.advance(0.5)
    assert recovery.succeeded() == 3.5
    stats = recovery.stats()
    assert stats["time_to_recover_seconds"] == {"count": 1, "last": 3.5, "median": 3.5, "max": 3.5}
    assert stats["in_episode"] is False


def test_stats_over_several_episodes():
    clock = FakeClock(0.0)
    recovery = make_recovery(clock, jitter_max=0.0)
    assert recovery.stats()["success_rate"] is None  # no attempts yet
    recovery.start_attempt()
    recovery.succeeded()
    # episode 1: recovers in 10 s after 2 failures
    recovery.lost()
    fail_attempt(recovery, clock)
    fail_attempt(recovery, clock)
    clock.advance(7.0)
    recovery.start_attempt()
    assert recovery.succeeded() == 10.0
    # episode 2: recovers in 1/3 s at the first attempt
    recovery.lost(0.0)
    clock.advance(1 / 3)
    recovery.start_attempt()
    recovery.succeeded()
    # episode 3: recovers in 2.5 s after 1 failure
    recovery.lost()
    fail_attempt(recovery, clock)
    clock.advance(1.5)
    recovery.start_attempt()
    recovery.succeeded()
    stats = recovery.stats()
    assert stats["attempts"] == 7
    assert stats["successes"] == 4
    assert stats["failures"] == 3
    assert stats["success_rate"] == 0.5714
    assert stats["episodes"] == 3
    assert stats["in_episode"] is False
    assert stats["gave_up"] is False
    assert stats["circuit_state"] == "closed"
    assert stats["time_to_recover_seconds"] == {"count": 3, "last": 2.5, "median": 2.5, "max": 10.0}
    # a fourth episode makes the count even: the median is the mean of the middle two
    recovery.lost()
    clock.advance(4.0)
    recovery.start_attempt()
    recovery.succeeded()
    ttr = recovery.stats()["time_to_recover_seconds"]
    assert ttr == {"count": 4, "last": 4.0, "median": 3.25, "max": 10.0}


def test_stats_round_to_four_places():
    clock = FakeClock(0.0)
    recovery = make_recovery(clock)
    recovery.lost(0.0)
    clock.advance(1 / 3)
    recovery.start_attempt()
    recovery.succeeded()
    recovery.lost()
    fail_attempt(recovery, clock)
    fail_attempt(recovery, clock)
    recovery.start_attempt()
    recovery.succeeded()
    stats = recovery.stats()
    assert stats["success_rate"] == 0.5
    assert stats["time_to_recover_seconds"]["median"] == 1.6667
    assert stats["time_to_recover_seconds"]["last"] == 3.0
    for _ in range(2):  # 6 attempts, 2 successes
        recovery.start_attempt()
        recovery.failed()
    assert recovery.stats()["success_rate"] == 0.3333
    assert recovery.stats()["time_to_recover_seconds"]["count"] == 2


def test_success_rate_with_one_attempt_in_three():
    clock = FakeClock()
    recovery = make_recovery(clock, max_retries=10, circuit_breaker_threshold=10)
    recovery.lost()
    fail_attempt(recovery, clock)
    fail_attempt(recovery, clock)
    recovery.start_attempt()
    recovery.succeeded()
    assert recovery.stats()["success_rate"] == 0.3333


def test_time_to_recover_history_is_bounded():
    clock = FakeClock(0.0)
    policy = RecoveryPolicy(jitter_max=0.0)
    recovery = Recovery(policy, clock=clock, rng=Fraction(0.0), history=2)
    for seconds in (5.0, 1.0, 2.0):
        recovery.lost(0.0)
        clock.advance(seconds)
        recovery.start_attempt()
        recovery.succeeded()
    ttr = recovery.stats()["time_to_recover_seconds"]
    assert ttr == {"count": 2, "last": 2.0, "median": 1.5, "max": 2.0}


# ------------------------------------------------------------------ RecoveryPolicy

DOCUMENTED = RecoveryPolicy(
    max_retries=5, initial_delay=1.0, max_delay=30.0, backoff_multiplier=2.0, jitter_max=1.0,
    enable_circuit_breaker=True, circuit_breaker_threshold=5, circuit_breaker_timeout=60.0,
    enable_auto_recovery=True,
)


def test_policy_defaults_match_the_configuration():
    policy = RecoveryPolicy()
    assert (
        policy.max_retries, policy.initial_delay, policy.max_delay, policy.backoff_multiplier, policy.jitter_max,
        policy.enable_circuit_breaker, policy.circuit_breaker_threshold, policy.circuit_breaker_timeout,
        policy.enable_auto_recovery,
    ) == (5, 1.0, 30.0, 2.0, 1.0, True, 5, 60.0, True)


def test_from_default_settings_gives_the_documented_defaults():
    assert RecoveryPolicy.from_settings(Settings()) == DOCUMENTED


def test_from_settings_takes_every_recovery_option():
    settings_ = Settings(
        max_retries=7, initial_delay=0.25, max_delay=12.0, backoff_multiplier=3.5, jitter_max=0.0,
        enable_circuit_breaker=False, circuit_breaker_threshold=9, circuit_breaker_timeout=15.0,
        enable_auto_recovery=False,
        # options of other groups must not leak in
        max_reconnect_attempts=11, reconnect_delay=4.0, max_reconnect_delay=40.0,
    )
    policy = RecoveryPolicy.from_settings(settings_)
    assert policy == RecoveryPolicy(
        max_retries=7, initial_delay=0.25, max_delay=12.0, backoff_multiplier=3.5, jitter_max=0.0,
        enable_circuit_breaker=False, circuit_breaker_threshold=9, circuit_breaker_timeout=15.0,
        enable_auto_recovery=False,
    )


def test_from_loaded_settings_uses_parsed_durations():
    env = {
        "STABLEWS_INITIAL_DELAY": "500ms", "STABLEWS_MAX_DELAY": "2m", "STABLEWS_JITTER_MAX": "250ms",
        "STABLEWS_CIRCUIT_BREAKER_TIMEOUT": "1h", "STABLEWS_MAX_RETRIES": "0",
        "STABLEWS_ENABLE_CIRCUIT_BREAKER": "off",
    }
    policy = RecoveryPolicy.from_settings(load(env=env))
    assert policy == dataclasses.replace(
        DOCUMENTED, initial_delay=0.5, max_delay=120.0, jitter_max=0.25, circuit_breaker_timeout=3600.0,
        max_retries=0, enable_circuit_breaker=False,
    )


def test_from_settings_accepts_any_object_with_the_attributes():
    source = SimpleNamespace(**dataclasses.asdict(DOCUMENTED), unrelated="ignored")
    source.max_retries = 2
    assert RecoveryPolicy.from_settings(source) == dataclasses.replace(DOCUMENTED, max_retries=2)


def test_policy_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RecoveryPolicy().max_retries = 3  # type: ignore[misc]


def test_recovery_built_from_settings_follows_them():
    clock = FakeClock()
    policy = RecoveryPolicy.from_settings(Settings(initial_delay=0.5, backoff_multiplier=4.0, max_delay=5.0,
                                                   jitter_max=0.0, max_retries=3, circuit_breaker_threshold=8,
                                                   circuit_breaker_timeout=20.0))
    recovery = Recovery(policy, clock=clock, rng=Fraction(0.0))
    recovery.lost()
    assert [fail_attempt(recovery, clock) for _ in range(3)] == [0.5, 2.0, 5.0]
    assert recovery.circuit_state is OPEN
    assert recovery.next_delay() == 20.0
