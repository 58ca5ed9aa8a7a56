"""The `stablews` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, config, logs
from .config import OPTIONS, ConfigError


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    groups = {
        "stability": parser.add_argument_group("stability manager"),
        "recovery": parser.add_argument_group("connection recovery"),
        "server": parser.add_argument_group("server"),
    }
    for name, option in OPTIONS.items():
        group = groups[option.metadata["group"]]
        flag = "--" + name.replace("_", "-")
        kind: config.Kind = option.metadata["kind"]
        default = option.default
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = f"{option.metadata['help']} (default {shown!s}; env {config.ENV_PREFIX}{name.upper()})"
        if kind is config.BOOL:
            group.add_argument(flag, dest=name, nargs="?", const="true", default=None, metavar="BOOL", help=help_text)
            group.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const="false",
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablews", description="Observability-first WebSocket service.")
    parser.add_argument("--version", action="version", version=f"stablews {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service", description="Run the service under uvicorn.")
    serve.add_argument("--config", metavar="FILE", help="TOML file with options (flags and env win)")
    _add_option_flags(serve)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = config.load(flags=_flags(args), config_file=args.config)
        except ConfigError as exc:
            print(f"stablews: invalid configuration: {exc}", file=sys.stderr)
            return 2
        logs.configure(settings.log_level)
        from .server import run

        return run(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
