"""Fuzzing the protocol core: `parse` answers any input with a message or a ProtocolError of a
documented code, accepts exactly what protocol.md allows, and server messages survive
`encode` and `split_frame`.

test_protocol.py has the examples and the plain "only ProtocolError" properties. This file adds
an oracle written from protocol.md, independent of protocol.py (`check`), hostile
shapes (raw bytes, nesting to ~110 levels, huge numbers, NaN, long strings, every code point)
and every input limit at and just over its value.
"""

from __future__ import annotations

import json
import math
import string
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablews import protocol
from stablews.protocol import (
    DEFAULT_LIMITS,
    ErrorCode,
    Hello,
    Limits,
    Ping,
    Pong,
    Position,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    parse,
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAFE_INT = 2**53 - 1
MESSAGE_TYPES = ("hello", "subscribe", "unsubscribe", "publish", "ping", "pong")
MESSAGE_CLASSES = {"hello": Hello, "subscribe": Subscribe, "unsubscribe": Unsubscribe, "publish": Publish,
                   "ping": Ping, "pong": Pong}
# protocol.md "Errors": the codes a refusal of one frame can carry (the others need a connection).
PARSE_CODES = frozenset({ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE, ErrorCode.TOO_LARGE})
MAX_ERROR_TEXT = 400  # an error message never echoes more than short, bounded pieces of the input
MAX_REF_TYPE = 32  # protocol.md: the type is the ref when it is a string of at most 32 characters
PARSE_SECONDS = 2.0  # "never hangs": a 64 KiB frame is parsed in milliseconds
CHANNEL_FIRST = frozenset(string.ascii_letters + string.digits)
CHANNEL_REST = CHANNEL_FIRST | frozenset("_.:/-")
PEER_LIMITS = Limits(max_message_bytes=16)


# ------------------------------------------------------------------ the oracle: protocol.md


@dataclass(frozen=True)
class Decoded:
    """The JSON of a frame as the standard library reads it, with what the limits look at."""

    value: Any
    longest_number: int  # characters of the longest number literal
    constant: bool  # NaN, Infinity or -Infinity: not JSON (RFC 8259)
    overflow: bool  # a number literal beyond the float range
    depth: float  # containers inside one another, the message itself included (inf: too deep to decode)


def decode(text: str) -> Decoded | None:
    """None when `text` is not JSON at all."""
    longest = 0
    constant = overflow = False

    def on_int(literal: str) -> int:
        nonlocal longest
        longest = max(longest, len(literal))
        return int(literal) if len(literal) < 4000 else 0  # int() refuses 4300+ digits: the length is what counts

    def on_float(literal: str) -> float:
        nonlocal longest, overflow
        longest = max(longest, len(literal))
        value = float(literal)
        overflow |= math.isinf(value)
        return value

    def on_constant(name: str) -> float:
        nonlocal constant
        constant = True
        return 0.0

    decoder = json.JSONDecoder(parse_int=on_int, parse_float=on_float, parse_constant=on_constant)
    try:
        value = decoder.decode(text)
    except RecursionError:
        return Decoded(None, longest, constant, overflow, math.inf)
    except ValueError:
        return None
    return Decoded(value, longest, constant, overflow, depth_of(value))


def depth_of(value: Any) -> int:
    deepest = 0
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        todo.extend((child, level + 1) for child in item)
    return deepest


def is_channel(value: Any, limits: Limits) -> bool:
    """protocol.md: 1 to 128 characters of `A-Z a-z 0-9 _ . : / -`, starting with a letter or digit."""
    return (
        isinstance(value, str)
        and 1 <= len(value) <= limits.max_channel_length
        and value[0] in CHANNEL_FIRST
        and all(c in CHANNEL_REST for c in value)
    )


def is_id(value: Any, limits: Limits) -> bool:
    """protocol.md: a string of 1 to 128 characters, or an integer within +/-(2^53 - 1); not true/false."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -SAFE_INT <= value <= SAFE_INT
    return isinstance(value, str) and 1 <= len(value) <= limits.max_id_length


def is_position(value: Any, limits: Limits) -> bool:
    """protocol.md: {"epoch": string of 1 to 64 characters, "offset": integer 0 to 2^53 - 1}."""
    if not isinstance(value, dict):
        return False
    epoch, offset = value.get("epoch"), value.get("offset")
    return (
        isinstance(epoch, str)
        and 1 <= len(epoch) <= limits.max_epoch_length
        and isinstance(offset, int)
        and not isinstance(offset, bool)
        and 0 <= offset <= SAFE_INT
    )


def short_string_or_absent(obj: dict[str, Any], key: str, max_length: int) -> bool:
    value = obj.get(key)
    return value is None or (isinstance(value, str) and len(value) <= max_length)


def documented_problem(obj: Any, limits: Limits) -> str | None:
    """Why protocol.md refuses this decoded message, or None when it is a valid client message."""
    if not isinstance(obj, dict):
        return "not an object"
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        return "unknown type"
    if kind == "hello":
        if not short_string_or_absent(obj, "token", limits.max_token_length):
            return "token"
        if not short_string_or_absent(obj, "previous_trace_id", 64):
            return "previous_trace_id"
        resume = obj.get("resume")
        if resume is not None and not (
            isinstance(resume, dict)
            and len(resume) <= limits.max_resume_channels
            and all(is_channel(name, limits) and is_position(pos, limits) for name, pos in resume.items())
        ):
            return "resume"
        return None
    if kind in ("ping", "pong"):
        return None if is_id(obj.get("id"), limits) else "id"
    if not is_channel(obj.get("channel"), limits):
        return "channel"
    if kind == "subscribe" and obj.get("since") is not None and not is_position(obj["since"], limits):
        return "since"
    if kind == "publish":
        if "data" not in obj:
            return "data"
        if obj.get("id") is not None and not is_id(obj["id"], limits):
            return "id"
    return None


def documented_ref(obj: Any, limits: Limits) -> str | int | None:
    """protocol.md `ref` rules for a message that failed validation."""
    if not isinstance(obj, dict):
        return None
    ident = obj.get("id")
    if is_id(ident, limits):
        return ident
    kind = obj.get("type")
    return kind if isinstance(kind, str) and len(kind) <= MAX_REF_TYPE else None


# ------------------------------------------------------------------ checking one frame


def check(text: str, limits: Limits = DEFAULT_LIMITS) -> protocol.ClientMessage | ProtocolError:
    """Parse `text`: only ProtocolError may escape, quickly, and the outcome is protocol.md's."""
    started = time.perf_counter()
    try:
        outcome: protocol.ClientMessage | ProtocolError = parse(text, limits)
    except ProtocolError as exc:
        outcome = exc
    elapsed = time.perf_counter() - started
    assert elapsed < PARSE_SECONDS, f"parse took {elapsed:.2f}s on {len(text)} characters"
    if isinstance(outcome, ProtocolError):
        check_refusal(outcome, limits)

    if len(text.encode("utf-8", "surrogatepass")) > limits.max_message_bytes:
        assert isinstance(outcome, ProtocolError)
        assert outcome.code is ErrorCode.TOO_LARGE and outcome.ref is None
        return outcome
    assert not (isinstance(outcome, ProtocolError) and outcome.code is ErrorCode.TOO_LARGE), "too_large within limit"

    decoded = decode(text)
    if decoded is None:
        assert isinstance(outcome, ProtocolError), f"accepted text that is not JSON: {text[:80]!r}"
        assert outcome.code is ErrorCode.BAD_JSON and outcome.ref is None, outcome.code
        return outcome
    if (
        decoded.constant
        or decoded.overflow
        or decoded.longest_number > limits.max_number_length
        or decoded.depth > limits.max_json_depth
    ):
        # Refused while decoding. NaN is "not JSON" (bad_json), too deep for the decoder is bad_json too;
        # a long number, a float out of range or depth over max_json_depth is bad_message. The message
        # was never fully read, so there may be no ref (protocol.md does not list this case yet).
        assert isinstance(outcome, ProtocolError), f"accepted over a decoding limit: {text[:120]!r}"
        assert outcome.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE), outcome.code
        assert outcome.ref is None or outcome.ref == documented_ref(decoded.value, limits)
        return outcome

    problem = documented_problem(decoded.value, limits)
    if problem is not None:
        assert isinstance(outcome, ProtocolError), f"accepted, but protocol.md refuses it ({problem}): {text[:120]!r}"
        assert outcome.code is ErrorCode.BAD_MESSAGE, (problem, outcome.code, outcome.message)
        expected_ref = documented_ref(decoded.value, limits)
        assert outcome.ref == expected_ref and type(outcome.ref) is type(expected_ref), (outcome.ref, expected_ref)
        return outcome
    assert not isinstance(outcome, ProtocolError), f"refused a valid message: {outcome.message}: {text[:120]!r}"
    check_accepted(outcome, decoded.value, limits)
    return outcome


def check_refusal(exc: ProtocolError, limits: Limits) -> None:
    assert exc.code in PARSE_CODES
    assert isinstance(exc.message, str) and 0 < len(exc.message) <= MAX_ERROR_TEXT, exc.message
    ref = exc.ref
    assert ref is None or is_id(ref, limits) or (isinstance(ref, str) and len(ref) <= MAX_REF_TYPE), ref
    # the answer is one ASCII line any client can split and read back
    frame = protocol.error(exc.code, exc.message, ref)
    assert frame.isascii() and "\n" not in frame
    expected = {"type": "error", "code": exc.code.value, "message": exc.message}
    if ref is not None:
        expected["ref"] = ref
    assert protocol.split_frame(frame) == [expected]


def check_accepted(message: protocol.ClientMessage, obj: dict[str, Any], limits: Limits) -> None:
    """The parsed message holds what the frame said, and each value obeys protocol.md."""
    assert type(message) is MESSAGE_CLASSES[obj["type"]]
    if isinstance(message, Hello):
        assert message.token == obj.get("token")
        assert message.previous_trace_id == obj.get("previous_trace_id")
        client = obj.get("client")
        if client is None:
            assert message.client is None
        else:
            assert isinstance(message.client, str) and len(message.client) <= 128
            shown = client if isinstance(client, str) else json.dumps(client, separators=(",", ":"))
            assert message.client == shown[:128]
        if obj.get("resume") is None:
            assert message.resume is None
        else:
            assert message.resume == {name: Position(p["epoch"], p["offset"]) for name, p in obj["resume"].items()}
            assert len(message.resume) <= limits.max_resume_channels
            assert all(is_channel(name, limits) for name in message.resume)
    elif isinstance(message, Ping | Pong):
        assert is_id(message.id, limits)
        assert message.id == obj["id"] and type(message.id) is type(obj["id"])
        assert protocol.split_frame(protocol.pong(message.id)) == [{"type": "pong", "id": message.id}]
    else:
        assert is_channel(message.channel, limits) and message.channel == obj["channel"]
        if isinstance(message, Subscribe):
            since = obj.get("since")
            assert message.since == (None if since is None else Position(since["epoch"], since["offset"]))
        if isinstance(message, Publish):
            assert message.id is None or is_id(message.id, limits)
            assert message.id == obj.get("id")
            assert message.data == obj["data"]
            # accepted data can always be published: no NaN, every string sendable as UTF-8
            data_json = protocol.encode_json(message.data)
            frame = protocol.encode_publication(message.channel, "e", 1, data_json, 0)
            frame.encode("utf-8")
            assert protocol.split_frame(frame)[0]["data"] == message.data


# ------------------------------------------------------------------ strategies

# Every code point, lone surrogates included (a JSON escape such as \ud800 decodes to one).
every_char = st.characters(exclude_categories=())
short_text = st.text(every_char, max_size=40)
long_text = st.builds(lambda piece, n: piece * n, st.text(every_char, min_size=1, max_size=3), st.integers(0, 25_000))
channel_char = st.sampled_from(sorted(CHANNEL_REST))
channel_like = st.text(channel_char | st.sampled_from(" *>é\n"), max_size=130)

huge_ints = st.integers(min_value=-(10**400), max_value=10**400)
edge_ints = st.sampled_from(
    [0, -1, SAFE_INT, SAFE_INT + 1, -SAFE_INT, -SAFE_INT - 1, 2**63, -(2**63), 10**31, 10**32 - 1, 10**32, -(10**31)]
)
floats = st.floats() | st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 1e-308, 0.1])
scalars = st.none() | st.booleans() | st.integers() | huge_ints | edge_ints | floats | short_text
keys = st.sampled_from(["type", "id", "channel", "data", "epoch", "offset"]) | short_text
json_values = st.recursive(
    scalars | long_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


def nest(value: Any, wrappers: list[bool]) -> Any:
    """Wrap `value` once per entry: True in a list, False in an object."""
    for in_list in wrappers:
        value = [value] if in_list else {"n": value}
    return value


deep_values = st.builds(nest, json_values, st.lists(st.booleans(), max_size=110))
any_values = json_values | deep_values

ids = st.one_of(st.text(every_char, max_size=130), st.integers(-SAFE_INT - 3, SAFE_INT + 3), edge_ints,
                st.sampled_from([True, False, None, 1.0, -0.0, "", "x" * 128, "x" * 129]))
positions = st.fixed_dictionaries(
    {"epoch": st.text(every_char, max_size=66) | any_values, "offset": st.integers(-3, SAFE_INT + 3) | any_values}
)
FIELD_VALUES = {
    "id": ids | any_values,
    "channel": channel_like | any_values,
    "since": positions | any_values,
    "data": any_values,
    "token": short_text | long_text | any_values,
    "client": any_values,
    "resume": st.dictionaries(channel_like, positions | any_values, max_size=4) | any_values,
    "previous_trace_id": st.text(every_char, max_size=66) | any_values,
}
message_type = st.sampled_from(MESSAGE_TYPES) | short_text | any_values
messages = st.builds(
    lambda fields, extra: {**extra, **fields},
    st.fixed_dictionaries({"type": message_type}, optional=FIELD_VALUES)
    | st.fixed_dictionaries({}, optional={"type": message_type, **FIELD_VALUES}),
    st.dictionaries(short_text, json_values, max_size=2),
)


def dump(value: Any, ascii_only: bool) -> str:
    """JSON text as a sloppy client writes it: NaN and Infinity included."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)


# ------------------------------------------------------------------ arbitrary input


@FUZZ
@given(st.text(every_char, max_size=200) | long_text)
def test_arbitrary_text(text):
    check(text)
    check(text, PEER_LIMITS)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["surrogateescape", "replace"]))
def test_arbitrary_bytes_decoded_leniently(raw, errors):
    text = raw.decode("utf-8", errors)
    check(text)
    check(text, PEER_LIMITS)


@FUZZ
@given(st.binary(max_size=100), st.sampled_from(MESSAGE_TYPES), st.sampled_from(["surrogateescape", "replace"]))
def test_stray_bytes_inside_a_message(raw, kind, errors):
    junk = raw.decode("utf-8", errors)
    check(f'{{"type":"{kind}","id":"{junk}","channel":"{junk}","data":"{junk}"}}')
    check(f'{{"type":"{kind}","id":1,"channel":"c","data":{junk}}}')


@FUZZ
@given(any_values, st.booleans())
def test_arbitrary_json_values(value, ascii_only):
    check(dump(value, ascii_only))
    check(dump({"type": "publish", "channel": "c", "data": value}, ascii_only))
    check(dump({"type": "hello", "client": value}, ascii_only))


@FUZZ
@given(any_values, st.sampled_from(MESSAGE_TYPES), st.sampled_from([*FIELD_VALUES, "type", "unknown"]))
def test_arbitrary_value_in_each_field(value, kind, field):
    base = {"type": kind, "id": 7, "channel": "c", "data": 1}
    check(dump({**base, field: value}, False))


@FUZZ
@given(messages, st.booleans())
def test_message_shaped_objects(obj, ascii_only):
    check(dump(obj, ascii_only))


NESTINGS = [("[", "]"), ('{"a":', "}"), ('[{"b":', "}]"), ('{"type":"ping","id":1,"x":[', "]}")]


@FEW
@given(st.sampled_from(NESTINGS), st.integers(1, 14_000))
def test_unclosed_and_closed_nesting_of_any_depth(nesting, depth):
    opening, closing = nesting
    check(opening * depth)
    check(opening * depth + "0" + closing * depth)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 65536,
        "[" * 32768 + "]" * 32768,
        '{"a":' * 10900 + "0" + "}" * 10900,
        "[" + "[]," * 21844 + "[]]",
        "9" * 65536,
        "-" + "9" * 65535,
        "0." + "1" * 65534,
        '"' + "\\u0000" * 10922 + '"',
        '{"type":"publish","channel":"c","data":"' + "\\ud800" * 10900 + '"}',
        '{"type":"publish","channel":"c","data":[' + ",".join(["1e308"] * 10900) + "]}",
        '{"type":"publish","channel":"c","data":[' + ",".join(["9" * 32] * 1980) + "]}",
        '{"type":"publish","channel":"c","data":{' + ",".join(f'"k{i}":{{}}' for i in range(5900)) + "}}",
        '{"' + "k" * 65530 + '":1}',
        " " * 65536,
        "\U0001f600" * 16384,
    ],
    ids=lambda text: f"{text[:12]!r}…{len(text)}",
)
def test_worst_case_frames_at_the_size_limit_answer_quickly(text):
    assert len(text.encode("utf-8", "surrogatepass")) <= DEFAULT_LIMITS.max_message_bytes
    check(text)
    check(text + " ")  # one byte more: too_large


# ------------------------------------------------------------------ each limit, at and just over


def padding(room: int, char: str) -> str:
    """Exactly `room` UTF-8 bytes of `char` (then ASCII), safe inside a JSON string."""
    size = len(char.encode())
    return char * (room // size) + "a" * (room % size)


@FUZZ
@given(
    st.integers(64, 70_000) | st.just(DEFAULT_LIMITS.max_message_bytes),
    st.characters(min_codepoint=0x20, exclude_categories=("Cs",), exclude_characters='"\\'),
)
def test_max_message_bytes(limit, char):
    limits = Limits(max_message_bytes=limit)
    head, tail = '{"type":"publish","channel":"c","data":"', '"}'
    text = head + padding(limit - len(head) - len(tail), char) + tail
    assert len(text.encode()) == limit
    accepted = check(text, limits)
    assert isinstance(accepted, Publish)
    assert check(text + " ", limits).code is ErrorCode.TOO_LARGE
    assert check(text[:-2] + char + tail, limits).code is ErrorCode.TOO_LARGE


@st.composite
def channel_of_length(draw, length: int) -> str:
    first = draw(st.sampled_from(sorted(CHANNEL_FIRST)))
    return first + draw(st.text(channel_char, min_size=length - 1, max_size=length - 1))


@FUZZ
@given(st.data(), st.integers(1, 300) | st.just(DEFAULT_LIMITS.max_channel_length))
def test_channel_length(data, limit):
    limits = Limits(max_channel_length=limit)
    for length, valid in ((limit, True), (limit + 1, False)):
        name = data.draw(channel_of_length(length))
        for obj in (
            {"type": "subscribe", "channel": name},
            {"type": "unsubscribe", "channel": name},
            {"type": "publish", "channel": name, "data": None, "id": "p1"},
            {"type": "hello", "resume": {name: {"epoch": "e", "offset": 0}}},
        ):
            outcome = check(json.dumps(obj), limits)
            assert isinstance(outcome, ProtocolError) is not valid, (length, obj["type"])


@FUZZ
@given(st.text(every_char, min_size=DEFAULT_LIMITS.max_id_length + 1, max_size=DEFAULT_LIMITS.max_id_length + 1),
       st.sampled_from(["ping", "pong", "publish"]), st.booleans())
def test_id_length_and_range(text, kind, ascii_only):
    limit = DEFAULT_LIMITS.max_id_length
    base = {"type": kind, "channel": "c", "data": 0}
    for ident, valid in ((text[:limit], True), (text, False), (SAFE_INT, True), (-SAFE_INT, True),
                         (SAFE_INT + 1, False), (-SAFE_INT - 1, False)):
        outcome = check(dump({**base, "id": ident}, ascii_only))
        assert isinstance(outcome, ProtocolError) is not valid, (kind, ident)


@FEW
@given(st.text(every_char, min_size=1, max_size=1), st.integers(0, 9000) | st.just(DEFAULT_LIMITS.max_token_length))
def test_token_length(char, limit):
    limits = Limits(max_token_length=limit)
    assert isinstance(check(dump({"type": "hello", "token": char * limit}, False), limits), Hello)
    refused = check(dump({"type": "hello", "token": char * (limit + 1)}, False), limits)
    assert isinstance(refused, ProtocolError) and refused.ref == "hello"


@FUZZ
@given(st.text(every_char, min_size=65, max_size=65), st.integers(0, SAFE_INT))
def test_epoch_and_previous_trace_id_length(text, offset):
    for value, valid in ((text[:64], True), (text, False), ("", False)):
        outcomes = [
            check(dump({"type": "subscribe", "channel": "c", "since": {"epoch": value, "offset": offset}}, False)),
            check(dump({"type": "hello", "resume": {"c": {"epoch": value, "offset": offset}}}, False)),
        ]
        if value:
            outcomes.append(check(dump({"type": "hello", "previous_trace_id": value}, False)))
        assert [isinstance(o, ProtocolError) for o in outcomes] == [not valid] * len(outcomes), value


@FEW
@given(st.integers(1, 150) | st.just(DEFAULT_LIMITS.max_resume_channels))
def test_resume_channel_count(limit):
    limits = Limits(max_resume_channels=limit)
    for count, valid in ((limit, True), (limit + 1, False)):
        resume = {f"c{i}": {"epoch": "e", "offset": i} for i in range(count)}
        outcome = check(json.dumps({"type": "hello", "resume": resume}), limits)
        assert isinstance(outcome, ProtocolError) is not valid, count


small_leaves = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | st.floats(-1e9, 1e9) | short_text


@FUZZ
@given(
    st.lists(st.booleans(), min_size=DEFAULT_LIMITS.max_json_depth, max_size=DEFAULT_LIMITS.max_json_depth),
    small_leaves,
    st.sampled_from(["publish-data", "ping-extra", "hello-client", "subscribe-extra"]),
)
def test_json_depth_32_and_33(wrappers, leaf, where):
    limit = DEFAULT_LIMITS.max_json_depth
    for extra, valid in ((limit - 1, True), (limit, False)):  # the message object itself is one level
        inner = nest(leaf, wrappers[:extra])
        obj = {
            "publish-data": {"type": "publish", "channel": "c", "data": inner},
            "ping-extra": {"type": "ping", "id": 1, "x": inner},
            "hello-client": {"type": "hello", "client": inner},
            "subscribe-extra": {"type": "subscribe", "channel": "c", "x": inner},
        }[where]
        outcome = check(json.dumps(obj))
        assert isinstance(outcome, ProtocolError) is not valid, (where, extra)
        if not valid:
            assert outcome.code is ErrorCode.BAD_MESSAGE


@FEW
@given(st.integers(1, 60), st.lists(st.booleans(), min_size=60, max_size=60))
def test_json_depth_under_any_limit(limit, wrappers):
    limits = Limits(max_json_depth=limit)
    for depth in (limit, limit + 1):
        obj = {"type": "publish", "channel": "c", "data": nest(0, wrappers[: depth - 1])}
        outcome = check(json.dumps(obj), limits)
        assert isinstance(outcome, ProtocolError) is (depth > limit), depth


@st.composite
def number_literal(draw, length: int) -> str:
    """A finite JSON number of exactly `length` characters: integer, fraction or exponent form."""
    sign = "-" if length > 1 and draw(st.booleans()) else ""
    room = length - len(sign)
    shape = draw(st.sampled_from(["int", "fraction", "exponent"] if room >= 3 else ["int"]))
    if shape == "int":
        return sign + integer_digits(draw, room)
    if shape == "fraction":
        whole = draw(st.integers(1, room - 2))
        return sign + integer_digits(draw, whole) + "." + digit_run(draw, room - whole - 1)
    marker = (draw(st.sampled_from(["e", "E"])) + draw(st.sampled_from(["", "+", "-"])))[: room - 2]
    exponent_digits = draw(st.integers(1, max(1, min(2, room - len(marker) - 1))))
    mantissa = room - len(marker) - exponent_digits
    return sign + integer_digits(draw, mantissa) + marker + digit_run(draw, exponent_digits)


def digit_run(draw, n: int) -> str:
    return draw(st.text(st.sampled_from(string.digits), min_size=n, max_size=n))


def integer_digits(draw, n: int) -> str:
    if n == 1:
        return digit_run(draw, 1)
    return draw(st.sampled_from("123456789")) + digit_run(draw, n - 1)


@FUZZ
@given(st.data(), st.integers(1, 40) | st.just(DEFAULT_LIMITS.max_number_length),
       st.sampled_from(["data", "nested", "ping-extra", "hello-extra"]))
def test_number_length(data, limit, where):
    limits = Limits(max_number_length=limit)
    for length, valid in ((limit, True), (limit + 1, False)):
        literal = data.draw(number_literal(length))
        assert len(literal) == length and math.isfinite(float(literal)), literal
        text = {
            "data": '{"type":"publish","channel":"c","data":%s}',
            "nested": '{"type":"publish","channel":"c","data":{"a":[true,%s]}}',
            "ping-extra": '{"type":"ping","id":"p","n":%s}',
            "hello-extra": '{"type":"hello","x":%s}',
        }[where] % literal
        outcome = check(text, limits)
        assert isinstance(outcome, ProtocolError) is not valid, (literal, limit)
        if not valid:
            assert outcome.code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1e999", "2e308"])
@pytest.mark.parametrize("where", ["data", "id", "offset", "client", "unknown"])
def test_nan_infinity_and_out_of_range_are_refused_everywhere(literal, where):
    text = {
        "data": '{"type":"publish","channel":"c","data":[1,{"v":%s}]}',
        "id": '{"type":"ping","id":%s}',
        "offset": '{"type":"subscribe","channel":"c","since":{"epoch":"e","offset":%s}}',
        "client": '{"type":"hello","client":%s}',
        "unknown": '{"type":"pong","id":1,"x":%s}',
    }[where] % literal
    outcome = check(text)
    assert isinstance(outcome, ProtocolError)
    assert outcome.code in (ErrorCode.BAD_JSON, ErrorCode.BAD_MESSAGE)


def test_floats_in_range_are_kept():
    for literal in ("1e308", "-1e308", "1.7976931348623157e308", "5e-324", "1e-400", "-0.0"):
        outcome = check(f'{{"type":"publish","channel":"c","data":{literal}}}')
        assert isinstance(outcome, Publish) and outcome.data == float(literal)


# ------------------------------------------------------------------ server messages


finite_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1e308, -1e308, 5e-324, -0.0])
server_scalars = st.none() | st.booleans() | st.integers() | huge_ints | finite_floats | short_text
server_values = st.recursive(
    server_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(short_text, children, max_size=4),
    max_leaves=12,
)
server_messages = st.builds(
    lambda body, kind: {**body, "type": kind},
    st.dictionaries(short_text, server_values | st.builds(nest, server_values, st.lists(st.booleans(), max_size=60)),
                    max_size=3),
    st.sampled_from(["welcome", "subscribed", "message", "unsubscribed", "published", "ping", "pong", "error",
                     "reconnect"]) | short_text,
)


@FUZZ
@given(st.lists(server_messages, min_size=1, max_size=5))
def test_encode_and_split_frame_round_trip(messages_out):
    lines = [protocol.encode(message) for message in messages_out]
    for line, message in zip(lines, messages_out, strict=True):
        assert line.isascii() and "\n" not in line
        assert json.loads(line) == message
    frame = "\n".join(lines)
    frame.encode("utf-8")  # a text frame the server can send
    assert protocol.split_frame(frame) == messages_out
    assert protocol.split_frame(frame + "\n") == messages_out


@FUZZ
@given(channel_of_length(20), short_text, st.integers(0, SAFE_INT), server_values, st.integers(0, 2**42),
       short_text, ids.filter(lambda i: i is None or is_id(i, DEFAULT_LIMITS)))
def test_server_encoders_round_trip(channel, epoch, offset, data, ts, text, ident):
    frames = [
        protocol.encode_publication(channel, epoch, offset, protocol.encode_json(data), ts),
        protocol.subscribed(channel, epoch, offset, None, 0),
        protocol.published(ident, channel, offset),
        protocol.error(ErrorCode.BAD_MESSAGE, text, ident),
        protocol.reconnect(text, offset),
    ]
    if ident is not None:
        frames.append(protocol.pong(ident))
    frame = "\n".join(frames)
    assert frame.isascii()
    publication, subscribed, published, error, reconnect, *pong = protocol.split_frame(frame)
    assert publication == {"type": "message", "channel": channel, "epoch": epoch, "offset": offset, "data": data,
                           "ts": ts}
    assert subscribed["epoch"] == epoch and subscribed["offset"] == offset
    assert published == {"type": "published", "id": ident, "channel": channel, "offset": offset}
    expected_ref = {} if ident is None else {"ref": ident}
    assert error == {"type": "error", "code": "bad_message", "message": text} | expected_ref
    assert reconnect == {"type": "reconnect", "reason": text, "after_ms": offset}
    assert pong == ([] if ident is None else [{"type": "pong", "id": ident}])


@FUZZ
@given(server_values, st.lists(st.booleans(), max_size=40), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_encode_refuses_nan_and_infinity_anywhere(value, wrappers, bad):
    poisoned = nest([value, bad], wrappers)
    with pytest.raises(ValueError):
        protocol.encode({"type": "message", "data": poisoned})
    with pytest.raises(ValueError):
        protocol.encode_json(poisoned)
    with pytest.raises(ValueError):
        protocol.encode({"type": "message", "data": {"ok": value, "bad": bad}})
