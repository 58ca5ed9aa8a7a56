"""Prometheus metrics (placeholder until the catalogue lands)."""

from __future__ import annotations

from typing import Any

from ..hooks import LifecycleHooks


class PrometheusMetrics(LifecycleHooks):
    def __init__(self, server: Any) -> None:
        self.server = server

    def observe_loop_lag(self, lag: float) -> None:
        pass

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        return b"", "text/plain; version=0.0.4; charset=utf-8"
