"""The suite's figures: ratios, goals, the regression check of --compare, histogram quantiles."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from figures import Figure, compare, histogram_quantile, median, percentile


def test_ratio_and_goal_on_the_ratio_or_on_the_value() -> None:
    fast = Figure("f", "fan-out", "msgs/s", 300.0, 100.0, "bare", "higher", ">= 1.5")
    assert fast.ratio == 3.0 and fast.met is True
    assert Figure("f", "fan-out", "msgs/s", 140.0, 100.0, "bare", "higher", ">= 1.5").met is False
    small = Figure("m", "memory", "bytes", 23_000.0, 24_000.0, "target", "lower", "<= 24000", "value")
    assert small.met is True
    assert Figure("m", "memory", "bytes", 25_000.0, None, "-", "lower", "<= 24000", "value").met is False
    assert Figure("x", "x", "", None, 1.0, "b", "higher", ">= 1").met is False  # not measured is not met
    assert Figure("x", "x", "", 1.0, 0.0, "b", "higher").ratio is None
    assert Figure("x", "x", "", 1.0, 2.0, "b", "higher").met is None  # no goal


def as_json(key: str, value: float | None, better: str) -> dict[str, object]:
    return Figure(key, key, "", value, 1.0, "b", better).as_json()  # type: ignore[arg-type]


def test_compare_flags_only_what_is_more_than_ten_percent_worse_in_its_own_direction() -> None:
    recorded = [as_json("rate", 100.0, "higher"), as_json("time", 10.0, "lower"), as_json("gone", 1.0, "higher"),
                as_json("same", 5.0, "lower")]
    current = [as_json("rate", 89.0, "higher"), as_json("time", 10.9, "lower"), as_json("same", 5.0, "lower")]
    regressions, missing = compare(current, recorded)
    assert [r.key for r in regressions] == ["rate"]
    assert regressions[0].worse_by == pytest.approx(0.11)
    assert "11% worse" in regressions[0].text()
    assert missing == ["gone"]
    better = [as_json("rate", 150.0, "higher"), as_json("time", 2.0, "lower")]
    assert compare(better, recorded[:2]) == ([], [])
    slower = [as_json("time", 11.5, "lower")]
    assert [r.key for r in compare(slower, recorded)[0]] == ["time"]


def test_quantiles() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert median([None, math.nan]) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    assert percentile([], 0.5) is None
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001)
    assert histogram_quantile(buckets, 0.95) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile([(1.0, 0.0), (math.inf, 0.0)], 0.99) is None
    assert histogram_quantile([(1.0, 0.0), (math.inf, 5.0)], 0.99) == 1.0  # beyond the last bound: its edge
