"""OpenTelemetry traces of connections (placeholder until the tracer lands)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..hooks import LifecycleHooks


def provider_from_environment(settings: Any, environ: Mapping[str, str] | None = None) -> Any:
    return None


class ConnectionTracing(LifecycleHooks):
    def __init__(self, server: Any, provider: Any) -> None:
        self.server = server
        self.provider = provider

    def shutdown(self) -> None:
        pass
