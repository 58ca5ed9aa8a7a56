"""The health score of one connection and the health of the fleet.

score = 100 x (0.4 H + 0.2 R + 0.2 E + 0.2 B), each term in [0, 1]:

- H, heartbeat success: an exponentially weighted average of heartbeat
  outcomes (ok = 1, late or missed = 0; weight 0.3 for the newest). A new
  connection starts at 1. Consecutive misses also cap the score: one miss in
  a row caps it at 40, two or more at 20, so a peer that stops answering
  is unhealthy from its first miss, before it is closed.
- R, round-trip time: 1 - rtt_ewma / heartbeat_timeout, clamped (a pong at the
  deadline scores 0). No sample yet: 1.
- E, error rate: 1 - the weighted share of inbound messages that were
  rejected (same weighting as H).
- B, send backlog: 1 - queued frames / send_queue_max.

A connection is unhealthy below `unhealthy_score` (default 50) and stale when
it has carried no application traffic (anything but heartbeats) for
`stale_connection_threshold`. Stale wins over unhealthy, which wins over healthy.
"""

from __future__ import annotations

from dataclasses import dataclass

EWMA_WEIGHT = 0.3
HEALTHY, UNHEALTHY, STALE = "healthy", "unhealthy", "stale"
MISS_CAPS = (100.0, 40.0, 20.0)


def ewma(previous: float, sample: float, weight: float = EWMA_WEIGHT) -> float:
    return previous + weight * (sample - previous)


def clamp01(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def score(
    heartbeat_success: float,
    rtt_ewma: float | None,
    heartbeat_timeout: float,
    error_ratio: float,
    queue_depth: int,
    send_queue_max: int,
    missed_in_a_row: int,
) -> float:
    h = clamp01(heartbeat_success)
    r = 1.0 if rtt_ewma is None else clamp01(1.0 - rtt_ewma / heartbeat_timeout)
    e = clamp01(1.0 - error_ratio)
    b = clamp01(1.0 - queue_depth / send_queue_max)
    value = 100.0 * (0.4 * h + 0.2 * r + 0.2 * e + 0.2 * b)
    cap = MISS_CAPS[min(missed_in_a_row, len(MISS_CAPS) - 1)]
    return round(min(value, cap), 1)


def classify(score_value: float, idle_app_seconds: float, unhealthy_score: float, stale_after: float) -> str:
    if idle_app_seconds >= stale_after:
        return STALE
    if score_value < unhealthy_score:
        return UNHEALTHY
    return HEALTHY


@dataclass(frozen=True, slots=True)
class FleetHealth:
    status: str  # healthy | degraded | unhealthy
    total: int
    healthy: int
    unhealthy: int
    stale: int
    unhealthy_ratio: float
    missed_heartbeat_ratio: float
    reasons: tuple[str, ...]


def assess_fleet(
    healthy: int,
    unhealthy: int,
    stale: int,
    heartbeats_sent: int,
    heartbeats_missed: int,
    degraded_ratio: float,
    unhealthy_ratio: float,
) -> FleetHealth:
    """Fleet status from the share of unhealthy connections and the recent
    missed-heartbeat rate (misses over heartbeats sent in the last window)."""
    total = healthy + unhealthy + stale
    share = unhealthy / total if total else 0.0
    missed = heartbeats_missed / heartbeats_sent if heartbeats_sent else 0.0
    reasons: list[str] = []
    status = "healthy"
    if unhealthy and share >= unhealthy_ratio:
        status = "unhealthy"
        reasons.append(f"{share:.0%} of connections unhealthy (threshold {unhealthy_ratio:.0%})")
    elif unhealthy and share >= degraded_ratio:
        status = "degraded"
        reasons.append(f"{share:.0%} of connections unhealthy (threshold {degraded_ratio:.0%})")
    if heartbeats_missed and missed >= degraded_ratio:
        if status == "healthy":
            status = "degraded"
        reasons.append(f"{missed:.0%} of recent heartbeats missed (threshold {degraded_ratio:.0%})")
    return FleetHealth(status, total, healthy, unhealthy, stale, round(share, 4), round(missed, 4), tuple(reasons))
