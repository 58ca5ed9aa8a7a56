"""The core does not import telemetry libraries: telemetry plugs in through hooks (architecture.md)."""

from __future__ import annotations

import subprocess
import sys

CORE = ("protocol", "connection", "stability", "endpoint", "broker", "hooks", "outbound", "scheduler", "health",
        "recovery", "auth", "config")

PROBE = f"""
import sys
for name in {CORE!r}:
    __import__("stablews." + name)
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("opentelemetry", "prometheus_client"))))
"""


def test_the_core_imports_neither_opentelemetry_nor_prometheus_client() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_a_server_without_otel_variables_loads_no_opentelemetry() -> None:
    """Nothing configured, no SDK: the tracing hooks are not installed and OpenTelemetry is not even imported."""
    probe = """
import os, sys
for key in [k for k in os.environ if k.startswith("OTEL_")]:
    del os.environ[key]
from stablews.app import StableServer
server = StableServer()
assert server.telemetry.tracing is None
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", out.stdout
