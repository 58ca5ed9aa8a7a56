"""PNG plots of a suite run (matplotlib, no display): one per measure that has something to draw."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from figures import Json

COLOURS = {"bare": "#888888", "stablews": "#1f77b4", "socketio": "#ff7f0e", "off": "#888888", "on": "#1f77b4"}
NAMES = {"bare": "bare Starlette", "stablews": "stablews", "socketio": "python-socketio",
         "off": "telemetry off", "on": "telemetry on"}


def _bars(ax: Axes, values: dict[str, list[Any]], ylabel: str) -> None:
    kinds = [k for k in ("bare", "socketio", "stablews", "off", "on") if k in values]
    for i, kind in enumerate(kinds):
        runs = [v for v in values[kind] if v is not None]
        if not runs:
            continue
        ax.bar(i, sorted(runs)[len(runs) // 2], color=COLOURS[kind], label=NAMES[kind])
        ax.scatter([i] * len(runs), runs, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(kinds)), [NAMES[k] for k in kinds])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def fanout(report: Json, ax: Axes) -> None:
    _bars(ax, report["series"]["delivered_per_second"], "delivered messages/s (median, runs as dots)")
    ax.set_title(report["title"])


def telemetry(report: Json, ax: Axes) -> None:
    _bars(ax, report["series"]["delivered_per_second"], "delivered messages/s (median, runs as dots)")
    ax.set_title(report["title"])


def memory(report: Json, ax: Axes) -> None:
    for kind, points in report["series"]["bytes_per_connection"].items():
        counts = sorted(points, key=int)
        ax.plot([int(n) for n in counts], [(points[n] or 0) / 1024 for n in counts], marker="o",
                color=COLOURS.get(kind), label=NAMES.get(kind, kind))
    ax.set_xlabel("idle connections")
    ax.set_ylabel("resident memory per connection, KiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(report["title"])


def deadpeer(report: Json, ax: Axes) -> None:
    delays = report["series"].get("freeze_to_close_seconds") or []
    bound = report["raw"]["options"]["bound_seconds"]
    ax.hist(delays, bins=30, color=COLOURS["stablews"])
    ax.axvline(bound, color="black", linestyle="--", label=f"configured bound {bound:g} s")
    ax.axvline(bound + 0.5, color="red", linestyle=":", label="bound + 0.5 s")
    ax.set_xlabel("freeze to close, seconds")
    ax.set_ylabel("frozen clients")
    ax.legend()
    ax.set_title(report["title"])


def cdf(ax: Axes, values: list[float], label: str) -> None:
    ordered = sorted(values)
    n = len(ordered)
    ax.plot(ordered, [(i + 1) / n for i in range(n)], color=COLOURS["stablews"], label=label)


def storm(report: Json, ax: Axes) -> None:
    resumes = report["series"].get("resume_seconds") or []
    if resumes:
        cdf(ax, resumes, "clients resumed")
    ax.axvline(15, color="red", linestyle=":", label="target 15 s")
    ax.set_xlabel("seconds from SIGTERM")
    ax.set_ylabel("share of clients resumed")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(report["title"])


def soak(report: Json, ax: Axes) -> None:
    samples = report["series"].get("rss") or []
    ax.plot([t for t, _ in samples], [rss / 2**20 for _, rss in samples], color=COLOURS["stablews"],
            label="server resident memory")
    ax.axvline(report["series"].get("warmup_seconds", 0), color="black", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(report["title"], fontsize=9)


DRAW: dict[str, Callable[[Json, Axes], None]] = {
    "fanout": fanout, "memory": memory, "deadpeer": deadpeer, "storm": storm, "telemetry": telemetry, "soak": soak,
}


def draw(results: Json, directory: Path) -> list[Path]:
    """One PNG per measure of `results`; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for report in results["reports"]:
        painter = DRAW.get(report["measure"])
        if painter is None or not report.get("series"):
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        try:
            painter(report, ax)
            fig.tight_layout()
            path = directory / f"{report['measure']}.png"
            fig.savefig(path)
            written.append(path)
        finally:
            plt.close(fig)
    return written
