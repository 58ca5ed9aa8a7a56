"""Telemetry: the flight recorder, Prometheus metrics, OpenTelemetry traces and the
event-loop lag monitor. All of it is fed by the core's lifecycle hooks (hooks.py); the
core never imports this package, OpenTelemetry or prometheus_client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .drops import DropRecorder
from .looplag import LoopLagMonitor

if TYPE_CHECKING:
    from ..app import StableServer
    from .metrics import PrometheusMetrics
    from .tracing import ConnectionTracing

log = logging.getLogger("stablews.telemetry")


class Telemetry:
    """What one server instance records. Tracing is on when a tracer provider is given (tests)
    or the `OTEL_*` environment configures an exporter; otherwise it costs nothing."""

    def __init__(
        self, server: StableServer, *, tracer_provider: Any = None, environ: Mapping[str, str] | None = None
    ) -> None:
        settings = server.settings
        hooks = server.manager.hooks
        self.tracing: ConnectionTracing | None = None
        from .tracing import ConnectionTracing, provider_from_environment

        provider = tracer_provider if tracer_provider is not None else provider_from_environment(settings, environ)
        if provider is not None:
            # First: its on_open sets the trace and span ids the other hooks record.
            self.tracing = ConnectionTracing(server, provider)
            hooks.add(self.tracing)
        self.drops = DropRecorder(settings.flight_recorder_size)
        hooks.add(self.drops)
        self.metrics: PrometheusMetrics | None = None
        if settings.metrics_enabled:
            from .metrics import PrometheusMetrics

            self.metrics = PrometheusMetrics(server)
            hooks.add(self.metrics)
            # Only the delivery-latency histogram needs the flusher's per-pass timing.
            server.manager.flusher.report = hooks.on_delivery
        self.loop_lag = LoopLagMonitor(settings.event_loop_lag_interval, self._loop_lag)

    def _loop_lag(self, lag: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_loop_lag(lag)

    def start(self) -> None:
        self.loop_lag.start()

    async def stop(self) -> None:
        """After the drain: stop sampling, end and export what tracing still holds."""
        self.loop_lag.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)

    def stats(self) -> dict[str, Any]:
        return {
            "tracing": self.tracing is not None,
            "metrics": self.metrics is not None,
            "event_loop_lag": {
                "last_ms": round(self.loop_lag.last * 1000, 2),
                "max_ms": round(self.loop_lag.max * 1000, 2),
                "samples": self.loop_lag.samples,
            },
            "drops_recorded": self.drops.recorded_total,
        }
