#!/usr/bin/env python3
"""Write copies of the stablews rule files with short `for:` durations, for end-to-end tests.

The shipped rules wait minutes before an alert fires (`for: 10m` …) and evaluate the
week-long baselines every 5 minutes (`interval: 5m` on one group). A test that drives a
real Prometheus with real traffic wants both short; this rewrites copies and leaves
the shipped files alone:

    python3 alerts/shorten_for.py --for 5s --out /tmp/stablews-rules alerts/*.rules.yml
    prometheus --config.file=... # with rule_files: [/tmp/stablews-rules/*.rules.yml]

- every `for:` longer than --for becomes --for (shorter ones are kept; --for 0s removes the wait);
- group `interval:` lines are removed, so every group runs at the global evaluation_interval
  (--keep-interval keeps them).

Only `for:` and `interval:` lines change; expressions, thresholds and the minimum-traffic
conditions stay as shipped (docs/runbooks.md lists them). No dependency beyond Python 3.
From Python: `shorten(text, "5s")` returns the rewritten text of one rule file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_FOR = re.compile(r"^(?P<indent>\s*)for:\s*(?P<value>[0-9a-z]+)\s*(?P<comment>#.*)?$")
_INTERVAL = re.compile(r"^\s*interval:\s*\S+\s*(#.*)?$")


def seconds(duration: str) -> float:
    """Seconds in a Prometheus duration such as 90s, 1h30m or 500ms."""
    parts = _PART.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def shorten(text: str, for_: str, keep_interval: bool = False) -> str:
    """The rule file `text` with every `for:` capped at `for_` and (unless kept) no group interval."""
    limit = seconds(for_)
    out = []
    for line in text.splitlines(keepends=True):
        match = _FOR.match(line.rstrip("\n"))
        if match and seconds(match["value"]) > limit:
            line = f"{match['indent']}for: {for_}\n"
        elif not keep_interval and _INTERVAL.match(line.rstrip("\n")):
            continue
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="rule files (alerts/*.rules.yml)")
    parser.add_argument("--for", dest="for_", default="5s", help="longest `for:` to keep (default 5s)")
    parser.add_argument("--out", required=True, type=Path, help="directory for the copies (created)")
    parser.add_argument("--keep-interval", action="store_true", help="keep group `interval:` lines")
    args = parser.parse_args(argv)
    try:
        seconds(args.for_)
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.files:
        target = args.out / path.name
        target.write_text(shorten(path.read_text(), args.for_, args.keep_interval))
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
