"""The `stablews` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, config, logs
from .config import OPTIONS, ConfigError

# The options `stablews client` reads (flags and STABLEWS_<NAME>).
CLIENT_OPTIONS = (*(n for n, o in OPTIONS.items() if o.metadata["group"] == "recovery"), "enable_auto_recovery")


def _add_option_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    groups = {
        "stability": parser.add_argument_group("stability manager"),
        "recovery": parser.add_argument_group("connection recovery"),
        "server": parser.add_argument_group("server"),
        "telemetry": parser.add_argument_group("telemetry"),
    }
    for name, option in OPTIONS.items():
        if only is not None and name not in only:
            continue
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
    client = commands.add_parser(
        "client",
        help="subscribe and print every publication as a JSON line",
        description="Connect with the project's client (heartbeats, reconnect, resume) and print every received "
        "publication as one JSON line on stdout; lifecycle events go to stderr. Runs until interrupted.",
    )
    client.add_argument("url", help="the server's WebSocket URL, e.g. ws://127.0.0.1:8000/ws")
    client.add_argument("--channel", action="append", required=True, metavar="C", help="channel (repeatable)")
    client.add_argument("--token", help="token for the hello (when the server checks tokens)")
    client.add_argument("--url", dest="more_urls", action="append", default=[], metavar="URL",
                        help="another instance to move to on failure (repeatable)")
    client.add_argument("--count", type=int, metavar="N", help="exit 0 after N publications")
    client.add_argument("--open-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="handshake and welcome deadline per attempt (default 10)")
    _add_option_flags(client, CLIENT_OPTIONS)
    loadtest = commands.add_parser(
        "loadtest",
        help="many clients, optional chaos; reports messages lost and duplicated",
        description="Run many recovering clients (the project's client) against URL, optionally publishing and "
        "injecting faults (drops, frozen and stalled clients), and print a summary: delivery rate, latency, "
        "messages lost and duplicated, reconnects, resumes, resyncs. Exit 0 when nothing was lost or duplicated, "
        "1 otherwise, 2 for a bad option. Progress lines go to stderr. See docs/loadtest.md.",
    )
    _loadtest_arguments(loadtest)
    _add_option_flags(loadtest, CLIENT_OPTIONS)
    # Listed for --help; main() hands `bench` and everything after it to the suite, which has its own flags.
    commands.add_parser(
        "bench",
        help="the benchmark suite: every figure against a baseline in the same run (stablews bench --help)",
        add_help=False,
    )
    token = commands.add_parser(
        "token",
        help="print a signed token the service accepts",
        description="Print a signed token: HS256 with --secret (the server's auth_secret), or RS256 with "
        "--private-key (the server verifies with the matching auth_public_key).",
    )
    key = token.add_mutually_exclusive_group()
    key.add_argument("--secret", help="HS256 secret (default: STABLEWS_AUTH_SECRET)")
    key.add_argument("--private-key", metavar="FILE", help="RS256 private key, PEM")
    token.add_argument("--sub", help="subject: who holds the token")
    token.add_argument("--channels", nargs="+", action="extend", default=[], metavar="PATTERN",
                       help="channel patterns it may subscribe to (md.*, md.>, >)")
    token.add_argument("--publish", nargs="+", action="extend", default=[], metavar="PATTERN",
                       help="channel patterns it may publish to")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 12h (default 1h)")
    token.add_argument("--issuer", default="", help="iss claim (when the server sets auth_issuer)")
    token.add_argument("--audience", default="", help="aud claim (when the server sets auth_audience)")
    return parser


def _loadtest_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `stablews loadtest`, kept as text: loadtest.parse_options checks them (one line, exit 2)."""
    add = parser.add_argument
    add("url", nargs="+", help="the server's WebSocket URL, e.g. ws://127.0.0.1:8000/ws; several (repeated or "
        "comma-separated) for several instances: clients start on them round robin and move on when one fails")
    add("--clients", default="50", metavar="N", help="recovering clients (default 50)")
    add("--processes", default="auto", metavar="N", help="processes running the clients; auto = 1 up to 2000 "
        "clients, else 1 per 2000 up to the CPU count, and enough for the open-file limit (default auto)")
    add("--channels", default="demo.ticker", metavar="C1,C2", help="channels every client joins (default demo.ticker)")
    add("--publish-rate", default="0", metavar="R", help="messages/s the tool publishes over the socket, round robin "
        "over the channels; 0 = rely on the server's feed (default 0; needs client_publish on the server)")
    add("--payload-bytes", default="64", metavar="N", help="size of the padding in each published message (default 64)")
    add("--duration", default="60s", metavar="SECONDS", help="length of the run; 0 = until interrupted (default 60s)")
    add("--ramp", default="auto", metavar="SECONDS", help="clients start evenly over this time; auto = 5s, or a "
        "tenth of a shorter --duration (default auto)")
    add("--drop-rate", default="0.2", metavar="R", help="abrupt TCP drops per second across all clients (default 0.2)")
    add("--freeze-ratio", default="0.1", metavar="F", help="share of clients that stop reading and answering "
        "heartbeats once, so the server closes them 4000 (default 0.1)")
    add("--freeze-seconds", default="auto", metavar="SECONDS", help="length of a freeze; auto = 2 x (heartbeat "
        "interval + timeout) + 1s from the server's welcome (default auto)")
    add("--stall-ratio", default="0", metavar="F", help="share of clients that stop reading the socket once: slow "
        "consumers, closed 4003 when the server's send queue fills first (heavy traffic), else 4000 (default 0)")
    add("--stall-seconds", default="auto", metavar="SECONDS", help="length of a stall (default auto, as a freeze)")
    add("--token", help="token for every client (when the server checks tokens)")
    add("--json", action="store_true", help="print the summary as one JSON object")
    add("--seed", metavar="S", help="seed of the chaos and jitter choices (default: random)")
    add("--progress-interval", default="5s", metavar="SECONDS", help="progress line period on stderr; 0 = none "
        "(default 5s)")
    add("--open-timeout", default="10s", metavar="SECONDS", help="handshake and welcome deadline per attempt "
        "(default 10s)")
    add("--worker", action="store_true", help=argparse.SUPPRESS)  # a worker process: its spec comes on stdin

    def one_line_error(message: str) -> None:  # argparse prints the usage too: one line is enough here
        parser.exit(2, f"stablews loadtest: {message} (see stablews loadtest --help)\n")

    parser.error = one_line_error  # type: ignore[method-assign]


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}


def _bench(argv: Sequence[str]) -> int:
    """`stablews bench`: bench/suite.py of the source tree, run in place of this process (signals go straight to it)."""
    suite = Path(__file__).resolve().parents[2] / "bench" / "suite.py"
    if not suite.is_file():
        print(f"stablews bench: the suite is part of the source tree and {suite} is not there: run it from a "
              "checkout installed with `pip install -e .`", file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, str(suite), *argv])
    return 2  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "loadtest":
            print(f"stablews loadtest: unrecognized arguments: {' '.join(extra)} (see stablews loadtest --help)",
                  file=sys.stderr)
            return 2
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "serve":
        try:
            settings = config.load(flags=_flags(args), config_file=args.config)
        except ConfigError as exc:
            print(f"stablews: invalid configuration: {exc}", file=sys.stderr)
            return 2
        logs.configure(settings.log_level)
        from .server import run

        return run(settings)
    if args.command in ("client", "loadtest"):  # both run the project's client with the recovery options
        try:
            settings = config.load(flags=_flags(args), env=_client_env())
        except ConfigError as exc:
            who = "stablews loadtest" if args.command == "loadtest" else "stablews"  # as each has always said
            print(f"{who}: invalid configuration: {exc}", file=sys.stderr)
            return 2
        if args.command == "loadtest":
            from .loadtest import run_loadtest

            return run_loadtest(args, settings)
        from .tail import run_client

        return run_client(args, settings)
    if args.command == "token":
        return _token(args)
    return 2


def _token(args: argparse.Namespace) -> int:
    from .auth import issue

    try:
        ttl = config.parse_duration(args.ttl)
        if ttl < 1:
            raise ValueError
    except ValueError:
        print(f"stablews: --ttl: expected a duration of at least 1s such as 30m or 1h, got {args.ttl!r}",
              file=sys.stderr)
        return 2
    if args.private_key:
        try:
            with open(args.private_key) as fh:
                key, algorithm = fh.read(), "RS256"
        except OSError as exc:
            print(f"stablews: cannot read {args.private_key}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        key, algorithm = args.secret or os.environ.get(config.ENV_PREFIX + "AUTH_SECRET", ""), "HS256"
        if not key:
            print("stablews: give --secret (or STABLEWS_AUTH_SECRET) or --private-key", file=sys.stderr)
            return 2
        if len(key.encode()) < config.MIN_SECRET_LENGTH:
            print(f"stablews: --secret: must be at least {config.MIN_SECRET_LENGTH} bytes long "
                  "(HS256 needs a 256-bit secret)", file=sys.stderr)
            return 2
    try:
        token = issue(key, algorithm=algorithm, subject=args.sub, channels=args.channels, publish=args.publish,
                      ttl=ttl, issuer=args.issuer, audience=args.audience)
    except Exception as exc:  # the library raises several types for a key it cannot use
        what = "not an RSA private key in PEM form" if algorithm == "RS256" else str(exc)
        print(f"stablews: cannot sign: {what} ({exc.__class__.__name__})", file=sys.stderr)
        return 2
    if not args.channels and not args.publish:
        print("stablews: note: the token grants no channel (add --channels PATTERN)", file=sys.stderr)
    print(token)
    return 0


def _client_env() -> dict[str, str]:
    """Only the client's options from the environment: a server variable cannot break the client."""
    names = {config.ENV_PREFIX + name.upper() for name in CLIENT_OPTIONS}
    return {key: value for key, value in os.environ.items() if key in names}


if __name__ == "__main__":
    sys.exit(main())
