"""The `upstreams` entry syntax and its configuration errors."""

from __future__ import annotations

import pytest

from stablews.config import ConfigError, load
from stablews.relay import Route, parse_upstream


def test_stablews_entry_maps_channels() -> None:
    spec = parse_upstream("ws://md-1:8000/ws#prices>md.prices; trades")
    assert spec.kind == "stablews" and spec.url == "ws://md-1:8000/ws"
    assert spec.routes == (Route("prices", "md.prices"), Route("trades", "trades"))


def test_json_entry_routes_by_key_or_everything() -> None:
    spec = parse_upstream("json+wss://feed.example/x?s=1#type=trade>md.trades;*>md.other")
    assert spec.kind == "json" and spec.url == "wss://feed.example/x?s=1"
    assert spec.routes == (Route("type=trade", "md.trades"), Route("*", "md.other"))
    assert parse_upstream("json+ws://f/x#md.raw").routes == (Route("*", "md.raw"),)


def test_json_route_matches_top_level_and_dotted_keys() -> None:
    assert Route("type=trade", "x").matches({"type": "trade"})
    assert not Route("type=trade", "x").matches({"type": "quote"})
    assert not Route("type=trade", "x").matches(["type", "trade"])
    assert Route("data.side=buy", "x").matches({"data": {"side": "buy"}})
    assert not Route("data.side=buy", "x").matches({"data": "side"})
    assert Route("n=3", "x").matches({"n": 3})  # non-strings compare by their JSON text
    assert Route("*", "x").matches(42)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("http://host/ws#a", "not a ws:// or wss:// URL"),
        ("ws:///ws#a", "not a ws:// or wss:// URL"),
        ("ws://host/ws", "names no channel"),
        ("ws://host/ws#;", "names no channel"),
        ("ws://host/ws#a>bad channel", "not a valid channel name"),
        ("ws://host/ws#-a>b", "not a valid channel name"),
        ("json+ws://host/ws#trade>md", "a JSON feed route is"),
    ],
)
def test_bad_entries_are_refused_with_a_reason(entry: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_upstream(entry)
    with pytest.raises(ConfigError) as caught:
        load(flags={"upstreams": entry}, env={})
    line = str(caught.value)
    assert line.startswith("upstreams: ") and says in line and "\n" not in line


def test_upstreams_from_environment_are_a_comma_separated_list() -> None:
    settings = load(env={"STABLEWS_UPSTREAMS": "ws://a:1/ws#x>y;z, json+ws://b:2/f#feed"})
    assert settings.upstreams == ("ws://a:1/ws#x>y;z", "json+ws://b:2/f#feed")


def test_a_token_in_a_stablews_url_is_taken_out_of_it() -> None:
    spec = parse_upstream("ws://md-1:8000/ws?region=eu&token=abc.def.ghi#prices")
    assert spec.url == "ws://md-1:8000/ws?region=eu"  # what stats, health and logs show
    assert spec.token == "abc.def.ghi"  # what the relay's client sends (Authorization and hello)
    assert parse_upstream("ws://md-1:8000/ws#prices").token is None


def test_a_json_feed_url_keeps_its_query() -> None:
    spec = parse_upstream("json+ws://feed.example/x?token=theirs#*>md.all")
    assert spec.url == "ws://feed.example/x?token=theirs" and spec.token is None
