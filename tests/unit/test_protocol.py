"""The wire protocol without I/O: parsing, error codes, encoders, close codes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablews import protocol
from stablews.protocol import (
    CLOSE_CODE_FOR_CAUSE,
    CloseCause,
    CloseCode,
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


def msg(**fields) -> str:
    return json.dumps(fields, ensure_ascii=False)


def parse_error(text: str, limits: Limits = protocol.DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(text, limits)
    return info.value


# ------------------------------------------------------------ valid messages


def test_hello_minimal():
    assert parse(msg(type="hello")) == Hello()


def test_hello_with_every_field():
    text = msg(
        type="hello",
        token="t0k",
        client="py/1.2",
        resume={"a.b": {"epoch": "e1", "offset": 7}, "c": {"epoch": "e2", "offset": 0}},
        previous_trace_id="abc123",
    )
    assert parse(text) == Hello(
        token="t0k",
        client="py/1.2",
        resume={"a.b": Position("e1", 7), "c": Position("e2", 0)},
        previous_trace_id="abc123",
    )


def test_hello_client_object_is_kept_as_compact_json():
    hello = parse(msg(type="hello", client={"name": "py", "version": "1"}))
    assert isinstance(hello, Hello)
    assert hello.client == '{"name":"py","version":"1"}'


def test_subscribe_without_since():
    assert parse(msg(type="subscribe", channel="demo.ticker")) == Subscribe("demo.ticker")


def test_subscribe_with_since():
    text = msg(type="subscribe", channel="room:1/a_b-c", since={"epoch": "ep", "offset": 42})
    assert parse(text) == Subscribe("room:1/a_b-c", Position("ep", 42))


def test_unsubscribe():
    assert parse(msg(type="unsubscribe", channel="x")) == Unsubscribe("x")


@pytest.mark.parametrize("data", [None, 0, "s", [1, 2], {"k": {"n": [True, None]}}])
def test_publish_keeps_any_json_data(data):
    assert parse(msg(type="publish", channel="c", data=data)) == Publish("c", data, None)


def test_publish_with_id():
    assert parse(msg(type="publish", channel="c", data=1, id="m-1")) == Publish("c", 1, "m-1")
    assert parse(msg(type="publish", channel="c", data=1, id=5)) == Publish("c", 1, 5)


@pytest.mark.parametrize("ident", ["abc", 0, 17, -3, 2**53 - 1, "x" * 128])
def test_ping_and_pong_ids(ident):
    assert parse(msg(type="ping", id=ident)) == Ping(ident)
    assert parse(msg(type="pong", id=ident)) == Pong(ident)


def test_channel_at_max_length_is_accepted():
    assert parse(msg(type="subscribe", channel="a" * 128)) == Subscribe("a" * 128)


# ------------------------------------------------------------- error paths


@pytest.mark.parametrize("text", ["", "{", "not json", '{"type": "ping", "id": 1', "[1,]", "{'type': 'ping'}"])
def test_invalid_json_is_bad_json(text):
    assert parse_error(text).code is ErrorCode.BAD_JSON


def test_deeply_nested_input_is_bad_json_not_recursion_error():
    big = Limits(max_message_bytes=10**6)
    assert parse_error("[" * 100000, big).code is ErrorCode.BAD_JSON
    assert parse_error('{"a":' * 50000, big).code is ErrorCode.BAD_JSON


def test_deeply_nested_input_within_default_limit_is_bad_json():
    assert parse_error("[" * 60000).code is ErrorCode.BAD_JSON


@pytest.mark.parametrize("text", ["[]", "1", '"hello"', "null", "true", '[{"type":"ping","id":1}]'])
def test_non_object_is_bad_message(text):
    assert parse_error(text).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("kind", ["nope", "", "PING", "welcome", "message"])
def test_unknown_type_is_bad_message_with_type_as_ref(kind):
    err = parse_error(msg(type=kind))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == kind


def test_unknown_type_ref_prefers_id():
    err = parse_error(msg(type="nope", id="req-9"))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "req-9"


@pytest.mark.parametrize("kind", [None, 1, True, ["ping"], {"t": 1}])
def test_missing_or_non_string_type_is_bad_message(kind):
    text = msg(id=1) if kind is None else msg(type=kind)
    err = parse_error(text)
    assert err.code is ErrorCode.BAD_MESSAGE


def test_overlong_unknown_type_is_not_echoed():
    err = parse_error(msg(type="x" * 33))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref is None
    assert "x" * 33 not in err.message


BAD_CHANNELS = [
    None,
    "",
    "a" * 129,
    "has space",
    "star*",
    "gt>",
    ".leading-dot",
    "-leading-dash",
    "_leading",
    "/root",
    "é",
    "new\nline",
    5,
    ["a"],
    True,
]


@pytest.mark.parametrize("channel", BAD_CHANNELS)
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "publish"])
def test_bad_channel_is_bad_message(kind, channel):
    fields = {"type": kind, "data": 1}
    if channel is not None:
        fields["channel"] = channel
    err = parse_error(json.dumps(fields))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == kind
    assert "channel" in err.message


def test_bad_channel_in_hello_resume_is_bad_message():
    err = parse_error(msg(type="hello", resume={"bad channel": {"epoch": "e", "offset": 1}}))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "hello"


@pytest.mark.parametrize(
    "since",
    [
        {"epoch": "e", "offset": -1},
        {"epoch": "e", "offset": True},
        {"epoch": "e", "offset": False},
        {"epoch": "e", "offset": 1.5},
        {"epoch": "e", "offset": 1.0},
        {"epoch": "e", "offset": "3"},
        {"epoch": "e", "offset": 2**53},
        {"epoch": "e"},
        {"offset": 1},
        {"epoch": "", "offset": 1},
        {"epoch": 5, "offset": 1},
        {"epoch": "e" * 65, "offset": 1},
        [1, 2],
        "e:1",
        7,
    ],
)
def test_bad_since_is_bad_message(since):
    err = parse_error(msg(type="subscribe", channel="c", since=since))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "subscribe"


@pytest.mark.parametrize("position", [{"epoch": "e", "offset": -5}, {"epoch": "e", "offset": True}, "x"])
def test_bad_resume_position_is_bad_message(position):
    err = parse_error(msg(type="hello", resume={"c": position}))
    assert err.code is ErrorCode.BAD_MESSAGE


def test_resume_with_too_many_channels_is_bad_message():
    resume = {f"c{i}": {"epoch": "e", "offset": 1} for i in range(101)}
    err = parse_error(msg(type="hello", resume=resume))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert "100" in err.message


@pytest.mark.parametrize("resume", [[], "c", 1])
def test_resume_not_an_object_is_bad_message(resume):
    assert parse_error(msg(type="hello", resume=resume)).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "fields",
    [
        {"token": 5},
        {"token": "t" * 8193},
        {"previous_trace_id": 1},
        {"previous_trace_id": "a" * 65},
    ],
)
def test_bad_hello_fields_are_bad_message(fields):
    err = parse_error(json.dumps({"type": "hello", **fields}))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "hello"


@pytest.mark.parametrize("ident", [True, False, 1.5, 2.0, "", "x" * 129, 2**53, -(2**53), None, [1], {"a": 1}])
@pytest.mark.parametrize("kind", ["ping", "pong"])
def test_bad_ping_pong_id_is_bad_message(kind, ident):
    fields = {"type": kind}
    if ident is not None:
        fields["id"] = ident
    err = parse_error(json.dumps(fields))
    assert err.code is ErrorCode.BAD_MESSAGE
    # an invalid id cannot be echoed, so the type is the reference
    assert err.ref == kind


@pytest.mark.parametrize("ident", [True, 1.5, "", "x" * 129])
def test_bad_publish_id_is_bad_message(ident):
    err = parse_error(msg(type="publish", channel="c", data=1, id=ident))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "publish"


def test_publish_without_data_is_bad_message_with_id_as_ref():
    err = parse_error(msg(type="publish", channel="c", id="m7"))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == "m7"
    assert "data" in err.message


def test_bad_field_ref_is_the_message_id_when_valid():
    err = parse_error(msg(type="subscribe", channel="bad channel", id=99))
    assert err.code is ErrorCode.BAD_MESSAGE
    assert err.ref == 99


def test_too_large_counts_utf8_bytes():
    limits = Limits(max_message_bytes=100)
    text = msg(type="ping", id="é" * 40)  # 40 characters, 80 bytes of id
    assert len(text) <= 100 < len(text.encode("utf-8"))
    err = parse_error(text, limits)
    assert err.code is ErrorCode.TOO_LARGE
    assert "100" in err.message


def test_too_large_boundary():
    limits = Limits(max_message_bytes=100)
    base = msg(type="ping", id="")
    exact = msg(type="ping", id="a" * (100 - len(base)))
    assert len(exact.encode()) == 100
    assert parse(exact, limits) == Ping("a" * (100 - len(base)))
    over = msg(type="ping", id="a" * (101 - len(base)))
    assert parse_error(over, limits).code is ErrorCode.TOO_LARGE


def test_too_large_wins_over_bad_json():
    assert parse_error("x" * (64 * 1024 + 1)).code is ErrorCode.TOO_LARGE
    assert parse_error("x" * (64 * 1024)).code is ErrorCode.BAD_JSON


def test_too_large_with_astral_characters():
    limits = Limits(max_message_bytes=64)
    text = msg(type="ping", id="\U0001f600" * 12)  # 12 characters, 48 bytes
    assert len(text) < 64 < len(text.encode("utf-8"))
    assert parse_error(text, limits).code is ErrorCode.TOO_LARGE


def test_text_size():
    assert protocol.text_size("abc") == 3
    assert protocol.text_size("é") == 2
    assert protocol.text_size("\U0001f600") == 4


# ------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

FIELD_NAMES = ["type", "id", "channel", "since", "data", "token", "client", "resume", "previous_trace_id", "epoch"]
message_types = st.sampled_from(["hello", "subscribe", "unsubscribe", "publish", "ping", "pong", "other"])

json_objects = st.one_of(
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=6),
    st.builds(
        lambda kind, rest: {**rest, "type": kind},
        message_types,
        st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=5),
    ),
)


def parse_or_protocol_error(text: str, limits: Limits = protocol.DEFAULT_LIMITS) -> None:
    try:
        result = parse(text, limits)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.ref is None or isinstance(exc.ref, str | int)
    else:
        assert isinstance(result, Hello | Subscribe | Unsubscribe | Publish | Ping | Pong)


@settings(max_examples=300)
@given(st.text())
def test_parse_arbitrary_text_only_raises_protocol_error(text):
    parse_or_protocol_error(text)
    parse_or_protocol_error(text, Limits(max_message_bytes=16))


@settings(max_examples=500)
@given(json_objects)
def test_parse_arbitrary_json_objects_only_raises_protocol_error(obj):
    parse_or_protocol_error(json.dumps(obj))


@settings(max_examples=200)
@given(message_types, json_values)
def test_parse_arbitrary_field_values_only_raises_protocol_error(kind, value):
    for field in FIELD_NAMES:
        parse_or_protocol_error(json.dumps({"type": kind, "channel": "c", "data": 1, "id": 1, field: value}))


# ---------------------------------------------------------------- encoders


def test_encode_is_compact_and_round_trips():
    message = {"type": "x", "a": [1, 2], "b": {"c": None}, "s": "text"}
    text = protocol.encode(message)
    assert text == '{"type":"x","a":[1,2],"b":{"c":null},"s":"text"}'
    assert json.loads(text) == message
    non_ascii = {"s": "é\U0001f600", "n": -1.5}
    assert json.loads(protocol.encode(non_ascii)) == non_ascii
    assert "\n" not in protocol.encode({"s": "line\nbreak"})


def test_encode_rejects_nan():
    with pytest.raises(ValueError):
        protocol.encode({"x": float("nan")})


def test_encode_publication_embeds_pre_encoded_data():
    data_json = '{"price":1.5,"tags":["a"]}'
    frame = protocol.encode_publication("demo.ticker", "ep1", 7, data_json, 1700000000123)
    assert data_json in frame
    assert " " not in frame
    assert json.loads(frame) == {
        "type": "message",
        "channel": "demo.ticker",
        "epoch": "ep1",
        "offset": 7,
        "data": {"price": 1.5, "tags": ["a"]},
        "ts": 1700000000123,
    }


def test_encode_publication_escapes_channel_and_epoch():
    frame = protocol.encode_publication('we"ird', 'e"p', 1, "null", 0)
    assert json.loads(frame)["channel"] == 'we"ird'
    assert json.loads(frame)["epoch"] == 'e"p'


def test_welcome_round_trips():
    text = protocol.welcome("c1", "srv", "trace", 30000, 10000, {"max_message_bytes": 65536})
    assert " " not in text
    assert json.loads(text) == {
        "type": "welcome",
        "version": 1,
        "connection": "c1",
        "server": "srv",
        "trace_id": "trace",
        "heartbeat": {"interval_ms": 30000, "timeout_ms": 10000},
        "limits": {"max_message_bytes": 65536},
    }


@pytest.mark.parametrize("recovered", [True, False, None])
def test_subscribed_round_trips(recovered):
    assert json.loads(protocol.subscribed("c", "e", 9, recovered, 3)) == {
        "type": "subscribed",
        "channel": "c",
        "epoch": "e",
        "offset": 9,
        "recovered": recovered,
        "replayed": 3,
    }


def test_other_encoders_round_trip():
    assert json.loads(protocol.unsubscribed("c", "requested")) == {
        "type": "unsubscribed",
        "channel": "c",
        "reason": "requested",
    }
    assert json.loads(protocol.published("m1", "c", 4)) == {
        "type": "published",
        "id": "m1",
        "channel": "c",
        "offset": 4,
    }
    assert json.loads(protocol.ping(3, 1234)) == {"type": "ping", "id": 3, "ts": 1234}
    assert json.loads(protocol.pong("p")) == {"type": "pong", "id": "p"}
    assert json.loads(protocol.pong(8)) == {"type": "pong", "id": 8}
    assert json.loads(protocol.reconnect("shutdown", 1500)) == {
        "type": "reconnect",
        "reason": "shutdown",
        "after_ms": 1500,
    }


def test_error_encoder_with_and_without_ref():
    assert json.loads(protocol.error(ErrorCode.BAD_JSON, "invalid JSON")) == {
        "type": "error",
        "code": "bad_json",
        "message": "invalid JSON",
    }
    assert json.loads(protocol.error(ErrorCode.FORBIDDEN, "no", ref=7)) == {
        "type": "error",
        "code": "forbidden",
        "message": "no",
        "ref": 7,
    }


def test_error_codes_match_protocol_md():
    assert {code.value for code in ErrorCode} == {
        "bad_json",
        "bad_message",
        "too_large",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "not_subscribed",
        "internal",
        "unavailable",  # an extension: the broker cannot serve the request now (docs/protocol.md)
    }


def test_split_frame():
    frames = [protocol.pong(1), protocol.encode_publication("c", "e", 1, "[1]", 5), protocol.ping(2, 6)]
    assert protocol.split_frame("\n".join(frames)) == [
        {"type": "pong", "id": 1},
        {"type": "message", "channel": "c", "epoch": "e", "offset": 1, "data": [1], "ts": 5},
        {"type": "ping", "id": 2, "ts": 6},
    ]
    assert protocol.split_frame(protocol.pong(1)) == [{"type": "pong", "id": 1}]
    assert protocol.split_frame(protocol.pong(1) + "\n") == [{"type": "pong", "id": 1}]


def test_server_messages_survive_a_split():
    text = protocol.encode({"type": "message", "data": "a\nb"})
    assert protocol.split_frame(text + "\n" + text) == [{"type": "message", "data": "a\nb"}] * 2


# ------------------------------------------------------------- close codes


def test_close_codes_match_protocol_md_table():
    assert {code.name: code.value for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "TOO_LARGE": 1009,
        "INTERNAL_ERROR": 1011,
        "OVERLOADED": 1013,
        "HEARTBEAT_TIMEOUT": 4000,
        "IDLE_TIMEOUT": 4001,
        "HELLO_TIMEOUT": 4002,
        "SLOW_CONSUMER": 4003,
        "RATE_LIMITED": 4008,
        "UNAUTHORIZED": 4401,
    }


@pytest.mark.parametrize(
    ("cause", "code"),
    [
        (CloseCause.NORMAL, 1000),
        (CloseCause.SHUTDOWN, 1001),
        (CloseCause.POLICY_VIOLATION, 1008),
        (CloseCause.TOO_LARGE, 1009),
        (CloseCause.ERROR, 1011),
        (CloseCause.OVERLOADED, 1013),
        (CloseCause.HEARTBEAT_TIMEOUT, 4000),
        (CloseCause.IDLE_TIMEOUT, 4001),
        (CloseCause.HELLO_TIMEOUT, 4002),
        (CloseCause.SLOW_CONSUMER, 4003),
        (CloseCause.RATE_LIMITED, 4008),
        (CloseCause.UNAUTHORIZED, 4401),
    ],
)
def test_close_code_for_cause(cause, code):
    assert CLOSE_CODE_FOR_CAUSE[cause] == code


def test_every_server_initiated_cause_has_a_code():
    # client_gone is the only cause the server does not send a close code for
    assert set(CloseCause) - set(CLOSE_CODE_FOR_CAUSE) == {CloseCause.CLIENT_GONE}
    assert set(CLOSE_CODE_FOR_CAUSE.values()) == set(CloseCode)


def test_normal_causes():
    assert {CloseCause.NORMAL, CloseCause.SHUTDOWN} == protocol.NORMAL_CAUSES


# ---------------------------------------------- server text stays valid UTF-8

# A JSON escape such as \ud800 is valid JSON syntax but decodes to a lone
# surrogate, which no UTF-8 WebSocket text frame can carry. Whatever the parser
# accepts must come back out as text the server can actually send.
LONE_SURROGATE_INPUTS = [
    pytest.param(r'{"type":"ping","id":"\ud800"}', "pong", id="ping-id"),
    pytest.param(r'{"type":"nope","id":"\udfff"}', "error-ref", id="error-ref"),
    pytest.param(r'{"type":"publish","channel":"c","data":"\udc00x"}', "publication", id="publish-data"),
]


@pytest.mark.parametrize(("text", "answer"), LONE_SURROGATE_INPUTS)
def test_answers_to_accepted_input_are_valid_utf8(text, answer):
    try:
        message = parse(text)
    except ProtocolError as exc:
        # rejecting the input is fine, as long as the error itself is sendable
        frame = protocol.error(exc.code, exc.message, exc.ref)
    else:
        if answer == "pong":
            frame = protocol.pong(message.id)
        else:
            frame = protocol.encode_publication("c", "e", 1, protocol.encode_json(message.data), 0)
    frame.encode("utf-8")  # raises UnicodeEncodeError when the frame cannot be sent
