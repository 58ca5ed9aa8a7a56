"""Connection health score, classification and fleet assessment."""

from __future__ import annotations

import itertools

import pytest

from stablews.config import Settings
from stablews.health import (
    EWMA_WEIGHT,
    HEALTHY,
    MISS_CAPS,
    STALE,
    UNHEALTHY,
    assess_fleet,
    classify,
    ewma,
    score,
)

PERFECT = {
    "heartbeat_success": 1.0,
    "rtt_ewma": None,
    "heartbeat_timeout": 10.0,
    "error_ratio": 0.0,
    "queue_depth": 0,
    "send_queue_max": 1000,
    "missed_in_a_row": 0,
}


def score_with(**changes) -> float:
    return score(**{**PERFECT, **changes})


# ------------------------------------------------------------------ score


def test_perfect_connection_scores_100():
    assert score_with() == 100.0
    assert score_with(rtt_ewma=0.0) == 100.0


@pytest.mark.parametrize(("success", "expected"), [(1.0, 100.0), (0.5, 80.0), (0.0, 60.0), (0.25, 70.0)])
def test_heartbeat_success_weighs_40_percent(success, expected):
    assert score_with(heartbeat_success=success) == expected


@pytest.mark.parametrize(("rtt", "expected"), [(0.0, 100.0), (2.5, 95.0), (5.0, 90.0), (10.0, 80.0), (25.0, 80.0)])
def test_rtt_relative_to_heartbeat_timeout_weighs_20_percent(rtt, expected):
    assert score_with(rtt_ewma=rtt) == expected


def test_no_rtt_sample_scores_full_rtt_term():
    assert score_with(rtt_ewma=None) == score_with(rtt_ewma=0.0) == 100.0


@pytest.mark.parametrize(("errors", "expected"), [(0.0, 100.0), (0.25, 95.0), (0.5, 90.0), (1.0, 80.0)])
def test_error_ratio_weighs_20_percent(errors, expected):
    assert score_with(error_ratio=errors) == expected


@pytest.mark.parametrize(("depth", "expected"), [(0, 100.0), (100, 98.0), (500, 90.0), (1000, 80.0), (5000, 80.0)])
def test_send_backlog_weighs_20_percent(depth, expected):
    assert score_with(queue_depth=depth) == expected


def test_all_terms_at_worst_score_zero():
    assert score_with(heartbeat_success=0.0, rtt_ewma=10.0, error_ratio=1.0, queue_depth=1000) == 0.0


def test_terms_combine():
    # 100 * (0.4*0.5 + 0.2*0.5 + 0.2*0.75 + 0.2*0.9) = 63
    assert score_with(heartbeat_success=0.5, rtt_ewma=5.0, error_ratio=0.25, queue_depth=100) == 63.0


def test_terms_are_clamped():
    assert score_with(heartbeat_success=1.5, error_ratio=-1.0, rtt_ewma=-3.0) == 100.0
    assert score_with(heartbeat_success=-1.0) == 60.0


def test_score_is_rounded_to_one_decimal():
    value = score_with(heartbeat_success=1 / 3)
    assert value == 73.3


def test_miss_caps_shape():
    # no miss: no cap; each further miss in a row caps lower; the last cap
    # applies to any longer run of misses
    assert MISS_CAPS[0] == 100.0
    assert all(a > b for a, b in itertools.pairwise(MISS_CAPS))
    assert len(MISS_CAPS) >= 3


@pytest.mark.parametrize("missed", [0, 1, 2, 3, 50])
def test_consecutive_misses_cap_the_score(missed):
    cap = MISS_CAPS[min(missed, len(MISS_CAPS) - 1)]
    assert score_with(missed_in_a_row=missed) == cap
    assert score_with(missed_in_a_row=missed) <= score_with(missed_in_a_row=max(missed - 1, 0))


def test_more_misses_never_raise_the_score():
    scores = [score_with(missed_in_a_row=n) for n in range(10)]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == 100.0
    assert scores[1] < 100.0


def test_cap_does_not_raise_a_lower_score():
    low = score_with(heartbeat_success=0.0, rtt_ewma=10.0, error_ratio=0.4, queue_depth=1000)
    assert low == 12.0
    assert low < min(MISS_CAPS)
    for missed in range(5):
        assert (
            score_with(heartbeat_success=0.0, rtt_ewma=10.0, error_ratio=0.4, queue_depth=1000, missed_in_a_row=missed)
            == 12.0
        )


def test_peer_that_stops_answering_is_unhealthy_before_it_is_closed():
    # docstring: "a peer that stops answering becomes unhealthy before it is
    # closed" -- with the default settings the close (4000) comes at
    # max_missed_heartbeats misses in a row, so one miss fewer must already be
    # unhealthy, even for an otherwise perfect connection.
    defaults = Settings()
    before_close = defaults.max_missed_heartbeats - 1
    assert before_close >= 1
    value = score_with(missed_in_a_row=before_close)
    assert classify(value, 0.0, defaults.unhealthy_score, defaults.stale_connection_threshold) == UNHEALTHY


def test_ewma():
    assert EWMA_WEIGHT == 0.3
    assert ewma(1.0, 0.0) == pytest.approx(0.7)
    assert ewma(0.7, 0.0) == pytest.approx(0.49)
    assert ewma(0.0, 1.0) == pytest.approx(0.3)
    assert ewma(0.5, 0.5) == 0.5


# ------------------------------------------------------------------ classify


def test_classify_healthy():
    assert classify(100.0, 0.0, 50.0, 600.0) == HEALTHY


def test_classify_unhealthy_below_threshold():
    assert classify(49.9, 0.0, 50.0, 600.0) == UNHEALTHY
    assert classify(50.0, 0.0, 50.0, 600.0) == HEALTHY


def test_classify_stale_at_threshold():
    assert classify(100.0, 599.9, 50.0, 600.0) == HEALTHY
    assert classify(100.0, 600.0, 50.0, 600.0) == STALE


def test_stale_wins_over_unhealthy():
    assert classify(10.0, 700.0, 50.0, 600.0) == STALE


def test_unhealthy_wins_over_healthy():
    assert classify(10.0, 100.0, 50.0, 600.0) == UNHEALTHY


# ------------------------------------------------------------------ fleet


def fleet(healthy=0, unhealthy=0, stale=0, sent=0, missed=0, degraded_ratio=0.1, unhealthy_ratio=0.5):
    return assess_fleet(healthy, unhealthy, stale, sent, missed, degraded_ratio, unhealthy_ratio)


def test_empty_fleet_is_healthy():
    result = fleet()
    assert result.status == "healthy"
    assert result.total == 0
    assert result.unhealthy_ratio == 0.0
    assert result.reasons == ()


def test_all_healthy():
    result = fleet(healthy=10, sent=100)
    assert result.status == "healthy"
    assert (result.total, result.healthy, result.unhealthy, result.stale) == (10, 10, 0, 0)
    assert result.reasons == ()


def test_just_below_degraded_threshold_is_healthy():
    result = fleet(healthy=91, unhealthy=9)
    assert result.status == "healthy"
    assert result.unhealthy_ratio == 0.09


def test_degraded_at_threshold():
    result = fleet(healthy=9, unhealthy=1)
    assert result.status == "degraded"
    assert result.unhealthy_ratio == 0.1
    assert len(result.reasons) == 1
    assert "10%" in result.reasons[0]


def test_just_below_unhealthy_threshold_is_degraded():
    assert fleet(healthy=51, unhealthy=49).status == "degraded"


def test_unhealthy_at_threshold():
    result = fleet(healthy=5, unhealthy=5)
    assert result.status == "unhealthy"
    assert result.unhealthy_ratio == 0.5
    assert "50%" in result.reasons[0]


def test_stale_counts_in_total_but_not_as_unhealthy():
    result = fleet(healthy=1, unhealthy=1, stale=8)
    assert result.total == 10
    assert result.stale == 8
    assert result.unhealthy_ratio == 0.1
    assert result.status == "degraded"


def test_missed_heartbeat_ratio_makes_it_degraded():
    result = fleet(healthy=10, sent=100, missed=10)
    assert result.status == "degraded"
    assert result.missed_heartbeat_ratio == 0.1
    assert len(result.reasons) == 1
    assert "heartbeats missed" in result.reasons[0]


def test_missed_heartbeat_ratio_below_threshold_stays_healthy():
    result = fleet(healthy=10, sent=100, missed=9)
    assert result.status == "healthy"
    assert result.missed_heartbeat_ratio == 0.09


def test_missed_heartbeats_do_not_lower_an_unhealthy_fleet_and_add_a_reason():
    result = fleet(healthy=1, unhealthy=9, sent=10, missed=5)
    assert result.status == "unhealthy"
    assert len(result.reasons) == 2


def test_missed_heartbeats_with_no_connections_still_degrade():
    result = fleet(sent=10, missed=10)
    assert result.status == "degraded"
    assert result.missed_heartbeat_ratio == 1.0


def test_no_heartbeats_sent_means_no_missed_ratio():
    result = fleet(healthy=3, sent=0, missed=0)
    assert result.missed_heartbeat_ratio == 0.0
    assert result.status == "healthy"


def test_custom_thresholds():
    assert fleet(healthy=8, unhealthy=2, degraded_ratio=0.25, unhealthy_ratio=0.75).status == "healthy"
    assert fleet(healthy=7, unhealthy=3, degraded_ratio=0.25, unhealthy_ratio=0.75).status == "degraded"
    assert fleet(healthy=2, unhealthy=8, degraded_ratio=0.25, unhealthy_ratio=0.75).status == "unhealthy"
