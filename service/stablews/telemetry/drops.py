"""The flight recorder: the most recent abnormal closes, for GET /api/v1/websocket/drops."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from ..hooks import LifecycleHooks
from ..protocol import NORMAL_CAUSES

if TYPE_CHECKING:
    from ..connection import Connection


class DropRecorder(LifecycleHooks):
    """Keeps the last `size` abnormal closes (bounded: the oldest go first), each with what an
    on-call engineer needs to explain it and the trace id to follow it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._drops: deque[dict[str, Any]] = deque(maxlen=size)
        self.recorded_total = 0

    def on_close(self, conn: Connection) -> None:
        if conn.close_cause in NORMAL_CAUSES or conn.passive:
            return
        self.recorded_total += 1
        closed = conn.closed_mono if conn.closed_mono is not None else conn.opened_mono
        self._drops.append({
            "connection": conn.id,
            "at": conn.closed_wall,
            "cause": str(conn.close_cause),
            "code": conn.close_code,
            "initiator": conn.close_initiator,
            "duration_s": round(closed - conn.opened_mono, 3),
            "last_rtt_ms": None if conn.rtt_last is None else round(conn.rtt_last * 1000, 1),
            "rtt_ewma_ms": None if conn.rtt_ewma is None else round(conn.rtt_ewma * 1000, 1),
            "missed_heartbeats": conn.hb_missed,
            "missed_in_a_row": conn.missed_in_a_row,
            "health_score": conn.health_score,
            "messages_in": conn.messages_in,
            "messages_out": conn.messages_out,
            "channels": len(conn.channels),
            "client": {"address": conn.client_address, "name": conn.client_name, "user_agent": conn.user_agent},
            "trace_id": conn.trace_id,
            "span_id": conn.span_id,
        })

    def records(self, limit: int | None = None, cause: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        out = [d for d in reversed(self._drops) if cause is None or d["cause"] == cause]
        return out if limit is None else out[:limit]
