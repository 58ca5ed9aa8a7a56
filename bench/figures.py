"""The suite's unit of report: a figure measured against a baseline from the same run.

Every measure of `stablews bench` (bench/suite.py) returns a `Report`: its figures, whether
what it checked was correct (nothing lost, nothing repeated, every connection accounted for),
the problems found, series for the plots and the raw results. `--compare FILE` matches figures
by `key` and flags the ones more than `REGRESSION` worse than the recorded value, in the
figure's own direction (`better`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Json = dict[str, Any]
Better = Literal["higher", "lower"]

REGRESSION = 0.10  # a figure more than 10 % worse than the recorded one is flagged


@dataclass(frozen=True, slots=True)
class Figure:
    """`value` (ours) against `baseline` (the same figure for the baseline, or a bound) in the same run.

    `ratio` is value / baseline. `goal` is a bound on the ratio (`>= 1.5`, `<= 1.10`) or on the value
    itself when `goal_on` is "value" (`<= 24576` bytes); `met` is None when there is no goal.
    """

    key: str  # stable across runs: what --compare matches on
    label: str
    unit: str
    value: float | None
    baseline: float | None
    baseline_label: str
    better: Better
    goal: str = ""
    goal_on: Literal["ratio", "value"] = "ratio"

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        subject = self.ratio if self.goal_on == "ratio" else self.value
        if subject is None:
            return False
        op, _, bound = self.goal.partition(" ")
        limit = float(bound)
        return subject >= limit if op == ">=" else subject <= limit

    def as_json(self) -> Json:
        out = asdict(self)
        out["ratio"] = None if self.ratio is None else round(self.ratio, 4)
        out["met"] = self.met
        return out


@dataclass(slots=True)
class Report:
    """What one measure of the suite found."""

    measure: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    correct: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: Json = field(default_factory=dict)  # name -> data for the plots
    raw: Json = field(default_factory=dict)
    seconds: float = 0.0

    def problem(self, text: str) -> None:
        """Something that makes the run's correctness claim false (lost, repeated, leaked, failed)."""
        self.correct = False
        self.problems.append(text)

    def as_json(self) -> Json:
        return {
            "measure": self.measure,
            "title": self.title,
            "correct": self.correct,
            "problems": self.problems,
            "notes": self.notes,
            "figures": [f.as_json() for f in self.figures],
            "series": self.series,
            "raw": self.raw,
            "seconds": round(self.seconds, 1),
        }


def median(values: Sequence[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None and math.isfinite(v))
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile from cumulative (upper bound, count) buckets, +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


@dataclass(frozen=True, slots=True)
class Regression:
    key: str
    label: str
    recorded: float
    now: float
    worse_by: float  # 0.12: 12 % worse

    def text(self) -> str:
        return f"{self.label}: {self.now:,.4g} now against {self.recorded:,.4g} recorded ({self.worse_by:.0%} worse)"


def compare(current: Sequence[Json], recorded: Sequence[Json], threshold: float = REGRESSION) -> tuple[
        list[Regression], list[str]]:
    """Figures (as_json dicts) more than `threshold` worse than the recorded ones, and the keys missing now."""
    now = {f["key"]: f for f in current}
    regressions, missing = [], []
    for old in recorded:
        new = now.get(old["key"])
        if new is None or new.get("value") is None:
            missing.append(old["key"])
            continue
        before, after = old.get("value"), new["value"]
        if before is None or before == 0:
            continue
        change = (after - before) / abs(before)
        worse_by = -change if old.get("better") == "higher" else change
        if worse_by > threshold:
            regressions.append(Regression(old["key"], old.get("label", old["key"]), before, after, worse_by))
    return regressions, missing
