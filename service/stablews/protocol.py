"""The wire protocol, version 1, without I/O.

Parsing turns one client frame (a str) into a typed message or raises
`ProtocolError` with the protocol's error code; encoding turns server
messages into compact JSON text. Nothing here touches sockets or asyncio, so
every rule of protocol.md can be tested with plain values.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

SUBPROTOCOL = "stablews.v1"
VERSION = 1


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    OVERLOADED = 1013
    HEARTBEAT_TIMEOUT = 4000
    IDLE_TIMEOUT = 4001
    HELLO_TIMEOUT = 4002
    SLOW_CONSUMER = 4003
    RATE_LIMITED = 4008
    UNAUTHORIZED = 4401


class CloseCause(StrEnum):
    """Why a connection ended: the `cause` label and `stablews.close.cause`."""

    NORMAL = "normal"
    CLIENT_GONE = "client_gone"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    HELLO_TIMEOUT = "hello_timeout"
    SLOW_CONSUMER = "slow_consumer"
    SHUTDOWN = "shutdown"
    POLICY_VIOLATION = "policy_violation"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    BROKER_UNAVAILABLE = "broker_unavailable"
    ERROR = "error"


# The close code the server sends for each cause it initiates.
CLOSE_CODE_FOR_CAUSE: dict[CloseCause, CloseCode] = {
    CloseCause.NORMAL: CloseCode.NORMAL,
    CloseCause.HEARTBEAT_TIMEOUT: CloseCode.HEARTBEAT_TIMEOUT,
    CloseCause.IDLE_TIMEOUT: CloseCode.IDLE_TIMEOUT,
    CloseCause.HELLO_TIMEOUT: CloseCode.HELLO_TIMEOUT,
    CloseCause.SLOW_CONSUMER: CloseCode.SLOW_CONSUMER,
    CloseCause.SHUTDOWN: CloseCode.GOING_AWAY,
    CloseCause.POLICY_VIOLATION: CloseCode.POLICY_VIOLATION,
    CloseCause.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    CloseCause.RATE_LIMITED: CloseCode.RATE_LIMITED,
    CloseCause.TOO_LARGE: CloseCode.TOO_LARGE,
    CloseCause.OVERLOADED: CloseCode.OVERLOADED,
    CloseCause.BROKER_UNAVAILABLE: CloseCode.OVERLOADED,  # 1013: try again later
    CloseCause.ERROR: CloseCode.INTERNAL_ERROR,
}

# Closes that are part of normal operation; everything else is "abnormal"
# (it goes to the drop records and counts against the stability SLO).
NORMAL_CAUSES = frozenset({CloseCause.NORMAL, CloseCause.SHUTDOWN})


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    NOT_SUBSCRIBED = "not_subscribed"
    UNAVAILABLE = "unavailable"  # the broker cannot serve the request now (an extension)
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A client message the server answers with an `error` message."""

    def __init__(
        self, code: ErrorCode, message: str, ref: str | int | None = None, channel: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.channel = channel


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits the parser enforces (see configuration.md)."""

    max_message_bytes: int = 64 * 1024
    max_channel_length: int = 128
    max_id_length: int = 128
    max_token_length: int = 8192
    max_resume_channels: int = 100
    max_epoch_length: int = 64
    max_json_depth: int = 32  # arrays/objects inside one another, the message itself included
    max_number_length: int = 32  # characters of one number literal (a 64-bit id has 20)


DEFAULT_LIMITS = Limits()

# Channel names: letters, digits and `_ . : / -`, starting with a letter or
# digit. `*` and `>` stay free for grant patterns.
_CHANNEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/\-]*")
_MAX_SAFE_INT = 2**53 - 1


@dataclass(frozen=True, slots=True)
class Position:
    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None = None
    client: str | None = None
    resume: dict[str, Position] | None = None
    previous_trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    since: Position | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    channel: str
    data: Any
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | int


@dataclass(frozen=True, slots=True)
class Pong:
    id: str | int


ClientMessage = Hello | Subscribe | Unsubscribe | Publish | Ping | Pong


def text_size(text: str) -> int:
    """UTF-8 size of `text`, without encoding it when it is plain ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def parse(text: str, limits: Limits = DEFAULT_LIMITS) -> ClientMessage:
    """Parse one client frame; raise ProtocolError with the code to answer."""
    if text_size(text) > limits.max_message_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"message exceeds max_message_bytes ({limits.max_message_bytes})"
        )
    try:
        obj = _decoder(limits.max_number_length).decode(text)
    except _NumberError as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"invalid JSON: {_short(exc)}") from None
    # Counting brackets is C-fast; only a message that could be too deep is walked.
    if text.count("[") + text.count("{") > limits.max_json_depth and _depth(obj) > limits.max_json_depth:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"JSON nested deeper than {limits.max_json_depth} levels")
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    kind = obj.get("type")
    ref = _ref(obj)
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        shown = kind if isinstance(kind, str) and len(kind) <= 32 else None
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {shown!r}", ref)
    try:
        return parser(obj, limits)
    except _FieldError as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{kind}: {exc}", ref) from None


class _FieldError(Exception):
    pass


class _NumberError(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@functools.lru_cache(maxsize=8)
def _decoder(max_number_length: int) -> json.JSONDecoder:
    """A decoder that refuses NaN/Infinity, numbers longer than the limit and floats out of range."""

    def parse_int(literal: str) -> int:
        if len(literal) > max_number_length:
            raise _NumberError(f"number longer than {max_number_length} characters")
        return int(literal)

    def parse_float(literal: str) -> float:
        if len(literal) > max_number_length:
            raise _NumberError(f"number longer than {max_number_length} characters")
        value = float(literal)
        if math.isinf(value):
            raise _NumberError(f"number out of range: {literal}")
        return value

    return json.JSONDecoder(parse_int=parse_int, parse_float=parse_float, parse_constant=_reject_constant)


def _depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _short(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


def _ref(obj: dict[str, Any]) -> str | int | None:
    ident = obj.get("id")
    if _is_valid_id(ident, DEFAULT_LIMITS.max_id_length):
        return ident
    kind = obj.get("type")
    return kind if isinstance(kind, str) and len(kind) <= 32 else None


def _is_valid_id(value: Any, max_length: int) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    return isinstance(value, str) and 0 < len(value) <= max_length


def _id(obj: dict[str, Any], limits: Limits, *, required: bool) -> str | int | None:
    value = obj.get("id")
    if value is None and not required:
        return None
    if not _is_valid_id(value, limits.max_id_length):
        raise _FieldError(f"'id' must be a string of 1-{limits.max_id_length} characters or a safe integer")
    return value


def valid_channel(name: Any, limits: Limits = DEFAULT_LIMITS) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= limits.max_channel_length
        and _CHANNEL_RE.fullmatch(name) is not None
    )


def _channel(value: Any, limits: Limits) -> str:
    if not valid_channel(value, limits):
        raise _FieldError(
            f"'channel' must be 1-{limits.max_channel_length} characters of letters, digits and _ . : / -,"
            " starting with a letter or digit"
        )
    return value


def _position(value: Any, limits: Limits, what: str) -> Position:
    if not isinstance(value, dict):
        raise _FieldError(f"{what} must be an object {{epoch, offset}}")
    epoch, offset = value.get("epoch"), value.get("offset")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= limits.max_epoch_length:
        raise _FieldError(f"{what}.epoch must be a non-empty string of at most {limits.max_epoch_length}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= _MAX_SAFE_INT:
        raise _FieldError(f"{what}.offset must be a non-negative integer")
    return Position(epoch, offset)


def _optional_str(obj: dict[str, Any], key: str, max_length: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise _FieldError(f"'{key}' must be a string of at most {max_length} characters")
    return value


def _parse_hello(obj: dict[str, Any], limits: Limits) -> Hello:
    token = _optional_str(obj, "token", limits.max_token_length)
    client = obj.get("client")
    if client is not None:
        # Free-form name/version: kept short, only for display.
        client = (client if isinstance(client, str) else json.dumps(client, separators=(",", ":")))[:128]
    trace = _optional_str(obj, "previous_trace_id", 64)
    resume_obj = obj.get("resume")
    resume: dict[str, Position] | None = None
    if resume_obj is not None:
        if not isinstance(resume_obj, dict):
            raise _FieldError("'resume' must be an object {channel: {epoch, offset}}")
        if len(resume_obj) > limits.max_resume_channels:
            raise _FieldError(f"'resume' names more than {limits.max_resume_channels} channels")
        resume = {
            _channel(name, limits): _position(pos, limits, f"resume[{name!r}]")
            for name, pos in resume_obj.items()
        }
    return Hello(token=token, client=client, resume=resume, previous_trace_id=trace)


def _parse_subscribe(obj: dict[str, Any], limits: Limits) -> Subscribe:
    channel = _channel(obj.get("channel"), limits)
    since = obj.get("since")
    return Subscribe(channel, None if since is None else _position(since, limits, "'since'"))


def _parse_unsubscribe(obj: dict[str, Any], limits: Limits) -> Unsubscribe:
    return Unsubscribe(_channel(obj.get("channel"), limits))


def _parse_publish(obj: dict[str, Any], limits: Limits) -> Publish:
    channel = _channel(obj.get("channel"), limits)
    if "data" not in obj:
        raise _FieldError("'data' is required")
    return Publish(channel, obj["data"], _id(obj, limits, required=False))


def _parse_ping(obj: dict[str, Any], limits: Limits) -> Ping:
    ident = _id(obj, limits, required=True)
    assert ident is not None
    return Ping(ident)


def _parse_pong(obj: dict[str, Any], limits: Limits) -> Pong:
    ident = _id(obj, limits, required=True)
    assert ident is not None
    return Pong(ident)


_PARSERS = {
    "hello": _parse_hello,
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "publish": _parse_publish,
    "ping": _parse_ping,
    "pong": _parse_pong,
}


# ---------------------------------------------------------------- encoding

# ASCII-only output: a lone surrogate that arrived as a JSON escape ("\ud800")
# stays an escape instead of becoming text that cannot be sent as UTF-8.
_encoder = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
encode_json = _encoder.encode


def encode(message: dict[str, Any]) -> str:
    """Encode one server message as compact JSON (no newline: frames join with `\\n`)."""
    return encode_json(message)


def encode_publication(channel: str, epoch: str, offset: int, data_json: str, ts_ms: int) -> str:
    """The `message` frame of one publication. `data_json` is already encoded,
    so a publication is encoded once however many subscribers receive it."""
    return (
        f'{{"type":"message","channel":{encode_json(channel)},"epoch":{encode_json(epoch)},'
        f'"offset":{offset},"data":{data_json},"ts":{ts_ms}}}'
    )


PUBLICATION_MIDDLE = '","offset":'


def publication_parts(channel: str, data_json: str, ts_ms: int) -> tuple[str, str]:
    """`encode_publication` in two pieces around the epoch and offset, for a broker that assigns
    them elsewhere (the Redis broker joins `head + epoch + PUBLICATION_MIDDLE + offset + tail`
    where the offset is assigned). Epochs are plain tokens ([0-9a-f]) that JSON needs no escape for."""
    return (
        f'{{"type":"message","channel":{encode_json(channel)},"epoch":"',
        f',"data":{data_json},"ts":{ts_ms}}}',
    )


def welcome(
    connection: str,
    server: str,
    trace_id: str | None,
    interval_ms: int,
    timeout_ms: int,
    limits: dict[str, Any],
) -> str:
    return encode(
        {
            "type": "welcome",
            "version": VERSION,
            "connection": connection,
            "server": server,
            "trace_id": trace_id,
            "heartbeat": {"interval_ms": interval_ms, "timeout_ms": timeout_ms},
            "limits": limits,
        }
    )


def subscribed(channel: str, epoch: str, offset: int, recovered: bool | None, replayed: int) -> str:
    return encode(
        {
            "type": "subscribed",
            "channel": channel,
            "epoch": epoch,
            "offset": offset,
            "recovered": recovered,
            "replayed": replayed,
        }
    )


def unsubscribed(channel: str, reason: str) -> str:
    return encode({"type": "unsubscribed", "channel": channel, "reason": reason})


def published(ident: str | int | None, channel: str, offset: int) -> str:
    return encode({"type": "published", "id": ident, "channel": channel, "offset": offset})


def ping(ident: int, ts_ms: int) -> str:
    return f'{{"type":"ping","id":{ident},"ts":{ts_ms}}}'


def pong(ident: str | int) -> str:
    return encode({"type": "pong", "id": ident})


def error(code: ErrorCode, message: str, ref: str | int | None = None, channel: str | None = None) -> str:
    body: dict[str, Any] = {"type": "error", "code": str(code), "message": message}
    if ref is not None:
        body["ref"] = ref
    if channel is not None:  # which channel a refusal is about (forbidden, not_subscribed)
        body["channel"] = channel
    return encode(body)


def reconnect(reason: str, after_ms: int) -> str:
    return encode({"type": "reconnect", "reason": reason, "after_ms": after_ms})


def split_frame(frame: str) -> list[dict[str, Any]]:
    """Split a server frame into its messages (what every client must do)."""
    return [json.loads(line) for line in frame.split("\n") if line]
