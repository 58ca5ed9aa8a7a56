"""Settings: every option of configuration.md, its default and its parser.

Precedence: command-line flag > `STABLEWS_<NAME>` environment > TOML file >
default. A bad value raises `ConfigError` whose text is the one line the
command prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "STABLEWS_"


class ConfigError(ValueError):
    """A configuration value that cannot be used; str() is one clear line."""


# ------------------------------------------------------------ value parsers

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, None: 1}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string with a unit: 500ms, 30s, 5m, 1h."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError


def parse_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError
    return int(str(value).strip()) if not isinstance(value, int) else value


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        raise ValueError
    return tuple(v for v in items if v)


@dataclass(frozen=True, slots=True)
class Kind:
    parse: Callable[[Any], Any]
    accepts: str


DURATION = Kind(parse_duration, "a duration such as 500ms, 30s, 5m or a number of seconds")
SIZE = Kind(parse_size, "a size in bytes such as 65536, 64KiB or 1MiB")
BOOL = Kind(parse_bool, "true or false")
INT = Kind(parse_int, "a whole number")
FLOAT = Kind(parse_float, "a number")
STR = Kind(parse_str, "a string")
LIST = Kind(parse_list, "a comma-separated list")


def _opt(
    default: Any, kind: Kind, help: str, group: str, check: Callable[[Any], str | None] | None = None,
    *, secret: bool = False,
) -> Any:
    return field(
        default=default, metadata={"kind": kind, "help": help, "group": group, "check": check, "secret": secret}
    )


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _at_least(n: int) -> Callable[[float], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}"


def _ratio(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0-65535"


def _path(v: str) -> str | None:
    return None if v.startswith("/") else "must start with /"


def _broker(v: str) -> str | None:
    if v == "memory":
        return None
    from .redis_broker import check_url  # the URL forms live with the broker

    return check_url(v)


def _key_prefix(v: str) -> str | None:
    if not v or len(v) > 64 or any(c in v for c in "{} \t\n"):
        return "must be 1-64 characters without braces or spaces (channel names are the keys' hash tags)"
    return None


def _upstreams(v: tuple[str, ...]) -> str | None:
    from .relay import check_upstreams  # the syntax lives with the relays

    return check_upstreams(v)


MIN_SECRET_LENGTH = 32  # HS256 wants a key of at least 256 bits (RFC 7518 3.2)


def _secret(v: str) -> str | None:
    if v and len(v.encode()) < MIN_SECRET_LENGTH:
        return f"must be at least {MIN_SECRET_LENGTH} bytes long (HS256 needs a 256-bit secret)"
    return None


def _public_key(v: str) -> str | None:
    if not v:
        return None
    from .auth import Authenticator  # the key format lives with the verifier

    try:
        Authenticator(public_key=v)
    except ValueError as exc:
        return str(exc)
    return None


def _trace_url(v: str) -> str | None:
    if not v:
        return None
    if not v.startswith(("http://", "https://")) or "{trace_id}" not in v or len(v) > 2048:
        return "must be an http(s) address with {trace_id} where the trace id goes (at most 2048 characters)"
    return None


def _score(v: float) -> str | None:
    return None if 0 <= v <= 100 else "must be between 0 and 100"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    # Stability manager
    heartbeat_interval: float = _opt(30.0, DURATION, "server ping period", "stability", _positive)
    heartbeat_timeout: float = _opt(10.0, DURATION, "a pong later than this counts as missed", "stability", _positive)
    max_missed_heartbeats: int = _opt(2, INT, "consecutive misses before close 4000", "stability", _at_least(1))
    connection_timeout: float = _opt(300.0, DURATION, "no inbound traffic at all -> close 4001", "stability", _positive)
    health_check_interval: float = _opt(
        60.0, DURATION, "sweep that scores every connection and raises events", "stability", _positive
    )
    stale_connection_threshold: float = _opt(
        600.0, DURATION, "no application traffic this long -> stale; closed records older are dropped",
        "stability", _positive,
    )
    close_stale: bool = _opt(False, BOOL, "close stale connections (4001) at the health sweep", "stability")
    unhealthy_score: float = _opt(50.0, FLOAT, "a connection scoring below this is unhealthy", "stability", _score)
    degraded_ratio: float = _opt(
        0.1, FLOAT, "unhealthy share (or missed-heartbeat rate) at which the service is degraded", "stability", _ratio
    )
    unhealthy_ratio: float = _opt(0.5, FLOAT, "unhealthy share at which the service is unhealthy", "stability", _ratio)
    closed_records_max: int = _opt(1000, INT, "records of closed connections kept", "stability", _at_least(0))
    max_bad_messages: int = _opt(
        10, INT, "bad messages within a minute before close 1008", "stability", _at_least(1)
    )
    enable_auto_recovery: bool = _opt(True, BOOL, "clients and upstreams reconnect and resume", "stability")
    enable_connection_pooling: bool = _opt(
        True, BOOL, "upstream relays share one connection per upstream URL", "stability"
    )
    max_reconnect_attempts: int = _opt(
        5, INT, "accepted for compatibility; attempts are governed by max_retries", "stability", _at_least(0)
    )
    reconnect_delay: float = _opt(
        1.0, DURATION, "upper bound of the reconnect advice after_ms (slow consumer, overload); least shutdown spread",
        "stability", _positive,
    )
    max_reconnect_delay: float = _opt(
        30.0, DURATION, "cap of the reconnect advice spread at shutdown", "stability", _positive
    )

    # Connection recovery (client and upstream relay)
    max_retries: int = _opt(5, INT, "attempts per reconnect episode", "recovery", _at_least(0))
    initial_delay: float = _opt(1.0, DURATION, "first backoff", "recovery", _positive)
    max_delay: float = _opt(30.0, DURATION, "backoff cap", "recovery", _positive)
    backoff_multiplier: float = _opt(2.0, FLOAT, "backoff growth factor", "recovery", _at_least(1))
    jitter_max: float = _opt(1.0, DURATION, "random extra delay, uniform in [0, jitter_max]", "recovery", _at_least(0))
    enable_circuit_breaker: bool = _opt(True, BOOL, "open the circuit after repeated failures", "recovery")
    circuit_breaker_threshold: int = _opt(
        5, INT, "consecutive failures that open the circuit", "recovery", _at_least(1)
    )
    circuit_breaker_timeout: float = _opt(60.0, DURATION, "open -> half-open after this", "recovery", _positive)

    # Server
    host: str = _opt("127.0.0.1", STR, "address to listen on", "server")
    port: int = _opt(8000, INT, "port to listen on (0: any free port)", "server", _port)
    ws_path: str = _opt("/ws", STR, "WebSocket path", "server", _path)
    hello_timeout: float = _opt(10.0, DURATION, "no hello this long -> close 4002", "server", _positive)
    max_message_bytes: int = _opt(64 * 1024, SIZE, "largest client frame (1009 above)", "server", _at_least(64))
    max_frame_bytes: int = _opt(
        64 * 1024, SIZE, "largest coalesced server frame (a single larger message goes alone)", "server", _at_least(256)
    )
    max_connections: int = _opt(10000, INT, "live connections before 1013", "server", _at_least(1))
    max_channels_per_connection: int = _opt(100, INT, "channels one connection may join", "server", _at_least(1))
    send_queue_max: int = _opt(
        1000, INT, "queued frames per connection before the slow-consumer close 4003", "server", _at_least(1)
    )
    history_size: int = _opt(1000, INT, "messages kept per channel for recovery", "server", _at_least(0))
    history_ttl: float = _opt(600.0, DURATION, "how long a message stays in history", "server", _positive)
    max_recovery_messages: int = _opt(
        1000, INT, "most messages one recovery replays (else recovered: false)", "server", _at_least(0)
    )
    client_publish: bool = _opt(False, BOOL, "clients may publish", "server")
    allowed_origins: tuple[str, ...] = _opt((), LIST, "Origin values accepted at the handshake (empty: any)", "server")
    api_key: str = _opt("", STR, "key for POST /api/v1/publish and the admin endpoints", "server", secret=True)
    auth_secret: str = _opt(
        "", STR, "HS256 secret (32+ bytes): tokens are required and verified with it", "server", _secret,
        secret=True,
    )
    auth_public_key: str = _opt(
        "", STR, "RS256 public key (PEM text or file path): tokens are required and verified with it", "server",
        _public_key,
    )
    auth_issuer: str = _opt("", STR, "required token issuer (iss), when set", "server")
    auth_audience: str = _opt("", STR, "required token audience (aud), when set", "server")
    auth_leeway: float = _opt(0.0, DURATION, "clock skew allowed on exp and nbf", "server", _at_least(0))
    max_connections_per_address: int = _opt(
        0, INT, "live connections from one client address before 1013 (0: no limit)", "server", _at_least(0)
    )
    rate_limit: float = _opt(
        500.0, FLOAT, "inbound messages per second per connection (0: no limit)", "server", _at_least(0)
    )
    rate_limit_burst: int = _opt(
        1000, INT, "messages a connection may send at once; as many refused in a row close it 4008", "server",
        _at_least(1),
    )
    shutdown_timeout: float = _opt(10.0, DURATION, "drain deadline on SIGTERM/SIGINT", "server", _positive)
    close_timeout: float = _opt(
        5.0, DURATION, "how long a close may wait on a peer that does not read", "server", _positive
    )
    broker: str = _opt(
        "memory", STR, "channel broker: memory, or redis://host:port/db for several instances", "server", _broker,
        secret=True,  # a Redis URL may carry a password
    )
    broker_prefix: str = _opt("stablews", STR, "prefix of the Redis keys (several deployments, one Redis)", "server",
                              _key_prefix)
    lease_ttl: float = _opt(
        10.0, DURATION, "with a shared broker: how soon another instance takes over the demo feed or a relay of "
        "one that died", "server", _positive,
    )
    broker_timeout: float = _opt(
        5.0, DURATION, "a Redis command slower than this fails (the broker is then unavailable)", "server", _positive
    )
    demo_feed: bool = _opt(True, BOOL, "publish the demo.ticker channel", "server")
    demo_feed_rate: float = _opt(5.0, FLOAT, "demo.ticker messages per second", "server", _positive)
    instance_id: str = _opt("", STR, "this instance's id (default host-pid)", "server")
    upstreams: tuple[str, ...] = _opt(
        (), LIST, "upstream feeds relayed into local channels: URL#channel or URL#upstream>local;… (json+ws:// for "
        "a plain JSON feed)", "server", _upstreams,
    )
    status_page: bool = _opt(
        True, BOOL, "serve the status page at / and the browser client at /client/stablews.js", "server"
    )
    per_message_deflate: bool = _opt(False, BOOL, "offer permessage-deflate (~40 KB per connection)", "server")
    log_level: str = _opt("info", STR, "debug, info, warning or error", "server")
    metrics_enabled: bool = _opt(True, BOOL, "serve Prometheus metrics at GET /metrics", "telemetry")
    heartbeat_span_ratio: float = _opt(
        0.01, FLOAT, "share of successful heartbeats recorded as ws.heartbeat spans (late and missed: all)",
        "telemetry", _ratio,
    )
    flight_recorder_size: int = _opt(
        1000, INT, "abnormal closes kept for GET /api/v1/websocket/drops", "telemetry", _at_least(1)
    )
    trace_url: str = _opt(
        "", STR, "trace view address with {trace_id}: the status page links each drop to its trace", "telemetry",
        _trace_url,
    )
    event_loop_lag_interval: float = _opt(
        0.5, DURATION, "how often the event-loop lag is sampled (0: off)", "telemetry", _at_least(0)
    )

    def __post_init__(self) -> None:
        if not self.instance_id:
            object.__setattr__(self, "instance_id", _default_instance_id())
        if self.heartbeat_timeout > self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout:g}s) must not exceed "
                f"heartbeat_interval ({self.heartbeat_interval:g}s)"
            )
        if self.max_delay < self.initial_delay:
            raise ConfigError("max_delay must be at least initial_delay")
        if self.max_reconnect_delay < self.reconnect_delay:
            raise ConfigError("max_reconnect_delay must be at least reconnect_delay")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level: must be one of debug, info, warning, error")
        if self.degraded_ratio > self.unhealthy_ratio:
            raise ConfigError("degraded_ratio must not exceed unhealthy_ratio")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


OPTIONS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


def convert(name: str, raw: Any, source: str) -> Any:
    """Parse and check one option value; ConfigError names the option and what it accepts."""
    option = OPTIONS.get(name)
    if option is None:
        raise ConfigError(f"unknown option '{name}' in {source}")
    kind: Kind = option.metadata["kind"]
    shown = "a value not shown here" if option.metadata["secret"] else repr(raw)  # never echo a secret
    try:
        value = kind.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}: expected {kind.accepts}, got {shown} (from {source})") from None
    check = option.metadata["check"]
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{name}: {problem}, got {shown} (from {source})")
    return value


def _flatten_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    """Options may sit at the top level or in tables ([stability], [server] …)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from (in rising precedence) `base`, a TOML file, the environment and flags."""
    values: dict[str, Any] = {}
    for name, raw in (base or {}).items():
        values[name] = convert(name, raw, "defaults")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        for name, raw in _flatten_toml(data).items():
            values[name] = convert(name, raw, config_file)
    environ = os.environ if env is None else env
    for name in OPTIONS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = convert(name, environ[key], key)
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = convert(name, raw, "--" + name.replace("_", "-"))
    return Settings(**values)
