"""Settings: defaults from configuration.md, value parsing, precedence, errors."""

from __future__ import annotations

import pytest

from stablews.config import ConfigError, Settings, load, parse_duration

NO_ENV: dict[str, str] = {}


def load_with(**kwargs) -> Settings:
    kwargs.setdefault("env", NO_ENV)
    return load(**kwargs)


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_with(**kwargs)
    text = str(info.value)
    assert "\n" not in text
    assert text.strip() == text and text
    return text


# ------------------------------------------------------------------ defaults

DOCUMENTED_DEFAULTS = {
    # stability manager
    "heartbeat_interval": 30.0,
    "heartbeat_timeout": 10.0,
    "max_missed_heartbeats": 2,
    "connection_timeout": 300.0,
    "health_check_interval": 60.0,
    "stale_connection_threshold": 600.0,
    "enable_auto_recovery": True,
    "enable_connection_pooling": True,
    "max_reconnect_attempts": 5,
    "reconnect_delay": 1.0,
    "max_reconnect_delay": 30.0,
    # connection recovery
    "max_retries": 5,
    "initial_delay": 1.0,
    "max_delay": 30.0,
    "backoff_multiplier": 2.0,
    "jitter_max": 1.0,
    "enable_circuit_breaker": True,
    "circuit_breaker_threshold": 5,
    "circuit_breaker_timeout": 60.0,
    # server
    "ws_path": "/ws",
    "hello_timeout": 10.0,
    "max_message_bytes": 65536,
    "client_publish": False,
    "broker": "memory",
    "demo_feed": True,
    "demo_feed_rate": 5.0,
    "status_page": True,
    "trace_url": "",
}


@pytest.mark.parametrize(("name", "expected"), sorted(DOCUMENTED_DEFAULTS.items()))
def test_default_matches_configuration_md(name, expected):
    loaded = load_with()
    assert getattr(loaded, name) == expected
    assert type(getattr(loaded, name)) is type(expected)
    assert getattr(Settings(), name) == expected


def test_load_ignores_process_environment_when_env_given(monkeypatch):
    monkeypatch.setenv("STABLEWS_HEARTBEAT_INTERVAL", "99s")
    assert load(env={}).heartbeat_interval == 30.0
    assert load().heartbeat_interval == 99.0


def test_instance_id_has_a_default():
    assert load_with().instance_id
    assert load_with(flags={"instance_id": "node-7"}).instance_id == "node-7"


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2", 2.0),
        ("1.5", 1.5),
        ("1.5s", 1.5),
        (" 30s ", 30.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["", "abc", "5x", "s", "-5s", "5 minutes", "1,5s", True, None])
def test_parse_duration_rejects(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    ("raw", "seconds"), [("500ms", 0.5), ("45s", 45.0), ("2m", 120.0), ("1h", 3600.0), ("12", 12.0)]
)
def test_duration_option_from_env(raw, seconds):
    loaded = load_with(env={"STABLEWS_CONNECTION_TIMEOUT": raw})
    assert loaded.connection_timeout == pytest.approx(seconds)


def test_duration_option_from_flag_number():
    assert load_with(flags={"hello_timeout": 3}).hello_timeout == 3.0
    assert load_with(flags={"hello_timeout": "250ms"}).hello_timeout == 0.25


@pytest.mark.parametrize(("raw", "size"), [("65536", 65536), ("64KiB", 65536), ("1MiB", 1048576), ("2kb", 2000)])
def test_size_option(raw, size):
    assert load_with(env={"STABLEWS_MAX_MESSAGE_BYTES": raw}).max_message_bytes == size


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("yes", True), ("off", False), ("0", False)])
def test_bool_option_from_env(raw, value):
    assert load_with(env={"STABLEWS_CLIENT_PUBLISH": raw}).client_publish is value


def test_list_option_from_env():
    loaded = load_with(env={"STABLEWS_ALLOWED_ORIGINS": "https://a.example, https://b.example,"})
    assert loaded.allowed_origins == ("https://a.example", "https://b.example")


# ------------------------------------------------------------------ precedence


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "stablews.toml"
    path.write_text(text)
    return str(path)


def test_toml_top_level_keys(tmp_path):
    path = write_toml(tmp_path, 'heartbeat_interval = "20s"\nmax_retries = 9\nclient_publish = true\n')
    loaded = load_with(config_file=path)
    assert loaded.heartbeat_interval == 20.0
    assert loaded.max_retries == 9
    assert loaded.client_publish is True


def test_toml_keys_inside_tables(tmp_path):
    path = write_toml(
        tmp_path,
        '[stability]\nheartbeat_interval = "45s"\nheartbeat_timeout = 5\n\n'
        '[server]\nws_path = "/socket"\nmax_message_bytes = "1MiB"\n\n'
        "[recovery]\nbackoff_multiplier = 1.5\n",
    )
    loaded = load_with(config_file=path)
    assert loaded.heartbeat_interval == 45.0
    assert loaded.heartbeat_timeout == 5.0
    assert loaded.ws_path == "/socket"
    assert loaded.max_message_bytes == 1024 * 1024
    assert loaded.backoff_multiplier == 1.5


def test_file_beats_default(tmp_path):
    path = write_toml(tmp_path, 'heartbeat_interval = "20s"\n')
    assert load_with(config_file=path).heartbeat_interval == 20.0


def test_env_beats_file(tmp_path):
    path = write_toml(tmp_path, 'heartbeat_interval = "20s"\n')
    loaded = load_with(config_file=path, env={"STABLEWS_HEARTBEAT_INTERVAL": "25s"})
    assert loaded.heartbeat_interval == 25.0


def test_flag_beats_env_and_file(tmp_path):
    path = write_toml(tmp_path, '[stability]\nheartbeat_interval = "20s"\n')
    loaded = load_with(
        config_file=path,
        env={"STABLEWS_HEARTBEAT_INTERVAL": "25s"},
        flags={"heartbeat_interval": "40s"},
    )
    assert loaded.heartbeat_interval == 40.0


def test_flag_none_means_not_given(tmp_path):
    path = write_toml(tmp_path, 'heartbeat_interval = "20s"\n')
    loaded = load_with(config_file=path, env={"STABLEWS_HEARTBEAT_INTERVAL": "25s"}, flags={"heartbeat_interval": None})
    assert loaded.heartbeat_interval == 25.0


def test_each_layer_only_changes_its_own_options(tmp_path):
    path = write_toml(tmp_path, 'max_retries = 7\ninitial_delay = "2s"\n')
    loaded = load_with(config_file=path, env={"STABLEWS_INITIAL_DELAY": "3s"}, flags={"max_delay": "60s"})
    assert loaded.max_retries == 7
    assert loaded.initial_delay == 3.0
    assert loaded.max_delay == 60.0
    assert loaded.heartbeat_interval == 30.0


def test_env_name_is_upper_case_with_prefix():
    assert load_with(env={"STABLEWS_DEMO_FEED": "false"}).demo_feed is False
    assert load_with(env={"stablews_demo_feed": "false", "DEMO_FEED": "false"}).demo_feed is True


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("name", "raw", "accepts"),
    [
        ("heartbeat_interval", "soon", "duration"),
        ("max_missed_heartbeats", "two", "whole number"),
        ("max_missed_heartbeats", "2.5", "whole number"),
        ("enable_auto_recovery", "maybe", "true or false"),
        ("max_message_bytes", "lots", "size"),
        ("backoff_multiplier", "x", "number"),
    ],
)
def test_bad_env_value_names_option_and_what_it_accepts(name, raw, accepts):
    text = config_error(env={"STABLEWS_" + name.upper(): raw})
    assert name in text
    assert accepts in text
    assert repr(raw) in text
    assert "STABLEWS_" + name.upper() in text


def test_bad_flag_value_names_flag():
    text = config_error(flags={"heartbeat_timeout": "never"})
    assert "heartbeat_timeout" in text
    assert "duration" in text
    assert "--heartbeat-timeout" in text


def test_bad_file_value_names_option_and_file(tmp_path):
    path = write_toml(tmp_path, '[server]\nhello_timeout = "later"\n')
    text = config_error(config_file=path)
    assert "hello_timeout" in text
    assert "duration" in text
    assert path in text


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("heartbeat_interval", "0s", "greater than 0"),
        ("max_missed_heartbeats", "0", "at least 1"),
        ("port", "70000", "0-65535"),
        ("ws_path", "ws", "start with /"),
        ("broker", "postgres://localhost", "redis://"),
        ("broker", "redis://localhost:notaport/0", "not a Redis URL"),
        ("broker_prefix", "a{b}", "braces"),
        ("degraded_ratio", "1.5", "between 0 and 1"),
        ("max_message_bytes", "10", "at least 64"),
        ("demo_feed_rate", "0", "greater than 0"),
        ("trace_url", "http://jaeger:16686/trace/", "{trace_id}"),
        ("trace_url", "javascript:alert({trace_id})", "http(s) address"),
        ("trace_url", "https://t.example/{trace_id}" + "x" * 2048, "2048"),
    ],
)
def test_out_of_range_value_names_option_and_rule(name, raw, problem):
    text = config_error(env={"STABLEWS_" + name.upper(): raw})
    assert name in text
    assert problem in text


def test_a_redis_url_is_a_broker_and_its_password_is_never_echoed():
    assert load_with(env={"STABLEWS_BROKER": "redis://127.0.0.1:6379/0"}).broker == "redis://127.0.0.1:6379/0"
    assert load_with(env={"STABLEWS_BROKER": "rediss://user:pw@cache:6380/2"}).broker.startswith("rediss://")
    text = config_error(env={"STABLEWS_BROKER": "redis://:hunter2@cache:bad/0"})
    assert "broker" in text and "hunter2" not in text


def test_value_with_newline_is_still_one_line():
    text = config_error(env={"STABLEWS_HEARTBEAT_INTERVAL": "30s\nevil"})
    assert "heartbeat_interval" in text


def test_unknown_option_in_toml(tmp_path):
    path = write_toml(tmp_path, "heartbeat_intervall = 5\n")
    text = config_error(config_file=path)
    assert "heartbeat_intervall" in text
    assert "unknown option" in text


def test_unknown_option_inside_toml_table(tmp_path):
    path = write_toml(tmp_path, "[server]\nbogus = 1\n")
    assert "bogus" in config_error(config_file=path)


def test_unknown_flag():
    assert "bogus" in config_error(flags={"bogus": 1})


def test_invalid_toml(tmp_path):
    path = write_toml(tmp_path, "heartbeat_interval = = 5\n")
    text = config_error(config_file=path)
    assert "TOML" in text


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    assert path in config_error(config_file=path)


def test_heartbeat_timeout_above_interval_raises():
    text = config_error(flags={"heartbeat_interval": "5s", "heartbeat_timeout": "6s"})
    assert "heartbeat_timeout" in text
    assert "heartbeat_interval" in text


def test_heartbeat_timeout_equal_to_interval_is_allowed():
    loaded = load_with(flags={"heartbeat_interval": "5s", "heartbeat_timeout": "5s"})
    assert loaded.heartbeat_timeout == loaded.heartbeat_interval == 5.0


def test_heartbeat_timeout_above_interval_across_layers(tmp_path):
    path = write_toml(tmp_path, 'heartbeat_timeout = "20s"\n')
    assert load_with(config_file=path).heartbeat_timeout == 20.0
    text = config_error(config_file=path, env={"STABLEWS_HEARTBEAT_INTERVAL": "15s"})
    assert "heartbeat_timeout" in text


def test_settings_constructor_checks_heartbeat_timeout():
    with pytest.raises(ConfigError):
        Settings(heartbeat_interval=5.0, heartbeat_timeout=10.0)


def test_max_delay_below_initial_delay_raises():
    text = config_error(flags={"initial_delay": "10s", "max_delay": "5s"})
    assert "max_delay" in text


def test_replace_keeps_checks():
    base = load_with()
    assert base.replace(heartbeat_interval=60.0).heartbeat_interval == 60.0
    with pytest.raises(ConfigError):
        base.replace(heartbeat_timeout=31.0)


@pytest.mark.parametrize("name", ["auth_secret", "api_key"])
def test_a_refused_secret_is_never_echoed(name):
    # api_key accepts any string: give it the wrong type through a TOML-like value instead
    raw = "tooshort-s3cr3t" if name == "auth_secret" else 12345
    with pytest.raises(ConfigError) as caught:
        load(flags={name: raw}, env={})
    line = str(caught.value)
    assert line.startswith(f"{name}: ") and str(raw) not in line and "not shown" in line
