"""Tokens without I/O: channel patterns, the verification matrix (HS256 and RS256),
key loading and its configuration errors, `issue()`, and the `stablews token` command."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from stablews import config
from stablews.auth import (
    MAX_PATTERN_LENGTH,
    MAX_PATTERNS,
    OPEN,
    Authenticator,
    AuthError,
    Grants,
    issue,
    load_public_key,
    pattern_matches,
)
from stablews.config import ConfigError

SECRET = "unit-test-secret-for-hs256-0123456789abcdef"
OTHER_SECRET = "another-unit-test-secret-hs256-0123456789ab"
CLAIMS: dict[str, Any] = {"sub": "alice", "channels": ["md.*", "demo.ticker"], "publish": ["md.>"]}
NO_ENV: dict[str, str] = {}


# ------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class KeyPair:
    private_pem: str
    public_pem: str


@functools.cache
def keypair(n: int = 0) -> KeyPair:
    """RSA key pair number n, generated once per test run."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(private.decode(), public.decode())


def ec_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A JWT built by hand: HMAC-SHA256 over it with hmac_key, or an empty signature."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims (5 minutes left) with overrides; an override of None removes the claim."""
    now = int(time.time())
    values: dict[str, Any] = {"iat": now, "nbf": now, "exp": now + 300, **CLAIMS}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def refusal(auth: Authenticator, token: str) -> str:
    """The AuthError message for token, checked to be one short line; lower-cased."""
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    message = str(info.value)
    assert message, "an AuthError must say why"
    assert "\n" not in message and "\r" not in message
    assert len(message) <= 120, message
    return message.lower()


@dataclass(frozen=True)
class Scheme:
    """One way of configuring the verifier, and how to sign tokens it accepts or refuses."""

    name: str
    auth: Callable[..., Authenticator]  # keyword options (issuer, audience, leeway …) -> verifier
    sign: Callable[[dict[str, Any]], str]  # claims -> token it accepts
    sign_other: Callable[[dict[str, Any]], str]  # claims -> token signed with the wrong key
    issue_key: str
    algorithm: str


def hs256_scheme() -> Scheme:
    return Scheme(
        "HS256",
        lambda **kw: Authenticator(SECRET, **kw),
        lambda c: jwt.encode(c, SECRET, algorithm="HS256"),
        lambda c: jwt.encode(c, OTHER_SECRET, algorithm="HS256"),
        SECRET,
        "HS256",
    )


def rs256_scheme(public_key: str, name: str) -> Scheme:
    return Scheme(
        name,
        lambda **kw: Authenticator(public_key=public_key, **kw),
        lambda c: jwt.encode(c, keypair(0).private_pem, algorithm="RS256"),
        lambda c: jwt.encode(c, keypair(1).private_pem, algorithm="RS256"),
        keypair(0).private_pem,
        "RS256",
    )


@pytest.fixture
def public_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "public.pem"
    path.write_text(keypair(0).public_pem)
    return path


@pytest.fixture(params=["HS256", "RS256-pem-text", "RS256-pem-file"])
def scheme(request: pytest.FixtureRequest, public_key_file: Path) -> Scheme:
    if request.param == "HS256":
        return hs256_scheme()
    if request.param == "RS256-pem-text":
        return rs256_scheme(keypair(0).public_pem, request.param)
    return rs256_scheme(str(public_key_file), request.param)


# ====================================================================== 1. patterns

PATTERN_CASES = [
    # exact
    ("md.btc", "md.btc", True),
    ("md.btc", "md.eth", False),
    ("md.btc", "md", False),  # pattern longer than the channel
    ("md", "md.btc", False),  # pattern shorter than the channel
    ("md.btc", "md.btc.trades", False),
    ("md.bt", "md.btc", False),  # a segment matches whole, not by prefix
    ("MD.btc", "md.btc", False),  # case matters
    ("demo.ticker", "demo.ticker", True),
    # `*`: exactly one segment
    ("*", "md", True),
    ("*", "md.btc", False),
    ("md.*", "md.btc", True),
    ("md.*", "md", False),
    ("md.*", "md.a.b", False),
    ("*.ticker", "demo.ticker", True),
    ("*.ticker", "ticker", False),
    ("*.ticker", "a.b.ticker", False),
    ("*.ticker", "demo.trades", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("*.*", "a.b.c", False),
    ("md.*.trades", "md.btc.trades", True),
    ("md.*.trades", "md.btc.quotes", False),
    ("md.*.trades", "md.trades", False),
    # `>` last: one or more trailing segments
    ("md.>", "md.btc", True),
    ("md.>", "md.a.b", True),
    ("md.>", "md.a.b.c.d.e", True),
    ("md.>", "md", False),
    ("md.>", "mdx.btc", False),
    ("md.>", "other.btc", False),
    ("md.*.>", "md.btc", False),
    ("md.*.>", "md.btc.x", True),
    ("md.*.>", "md.btc.x.y", True),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    # `>` alone: everything
    (">", "md", True),
    (">", "md.btc", True),
    (">", "a.b.c.d", True),
    # wildcards only as whole segments; `>` anywhere but last is a literal segment
    ("md*", "mdx", False),
    ("md.b*", "md.btc", False),
    ("md>", "md.x", False),
    ("md.b>", "md.btc.x", False),
    ("a.>.b", "a.x.b", False),
    ("a.>.b", "a.>.b", True),
    # empty segments are segments
    ("md..x", "md..x", True),
    ("md..x", "md.x", False),
    ("md.x", "md..x", False),
    ("md.*.x", "md..x", True),
]


@pytest.mark.parametrize(("pattern", "channel", "expected"), PATTERN_CASES)
def test_pattern_table(pattern: str, channel: str, expected: bool) -> None:
    assert pattern_matches(pattern, channel) is expected


SEGMENT = st.text(alphabet="abcxyz019_-:/", max_size=4)  # may be empty; never `.`, `*` or `>`
SEGMENTS = st.lists(SEGMENT, min_size=1, max_size=6)


def join(segments: list[str]) -> str:
    return ".".join(segments)


@given(SEGMENTS)
def test_a_pattern_equal_to_the_channel_matches(segments: list[str]) -> None:
    assert pattern_matches(join(segments), join(segments))


@given(st.text(max_size=40))
def test_gt_alone_matches_everything(channel: str) -> None:
    assert pattern_matches(">", channel)


@given(SEGMENTS, st.data())
def test_a_star_in_place_of_any_segment_still_matches(segments: list[str], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(segments) - 1))
    pattern = [*segments[:i], "*", *segments[i + 1 :]]
    assert pattern_matches(join(pattern), join(segments))


@given(SEGMENTS, SEGMENTS)
def test_a_pattern_without_wildcards_matches_only_itself(pattern: list[str], channel: list[str]) -> None:
    assert pattern_matches(join(pattern), join(channel)) is (pattern == channel)


@given(st.integers(1, 6), SEGMENTS)
def test_stars_match_exactly_as_many_segments(stars: int, channel: list[str]) -> None:
    assert pattern_matches(join(["*"] * stars), join(channel)) is (len(channel) == stars)


@given(SEGMENTS, st.data())
def test_prefix_gt_matches_exactly_longer_channels_with_that_prefix(prefix: list[str], data: st.DataObject) -> None:
    channel = data.draw(
        st.one_of(
            SEGMENTS,  # anything
            st.lists(SEGMENT, max_size=4).map(lambda more: prefix + more),  # the prefix, perhaps extended
            st.integers(0, len(prefix) - 1).map(lambda n: [*prefix[:n], "zz"]),  # diverges inside the prefix
        )
    )
    expected = len(channel) > len(prefix) and channel[: len(prefix)] == prefix
    assert pattern_matches(join([*prefix, ">"]), join(channel)) is expected


def test_grants_check_subscribe_and_publish_separately() -> None:
    grants = Grants("alice", ("md.*", "demo.ticker"), ("md.>",), None)
    assert grants.may_subscribe("md.btc") and grants.may_subscribe("demo.ticker")
    assert not grants.may_subscribe("md.btc.trades") and not grants.may_subscribe("admin")
    assert grants.may_publish("md.btc.trades") and grants.may_publish("md.btc")
    assert not grants.may_publish("demo.ticker")
    nothing = Grants(None, (), (), None)
    assert not nothing.may_subscribe("md.btc") and not nothing.may_publish("md.btc")


@given(st.text(alphabet="abc.", min_size=1, max_size=20))
def test_open_grants_allow_everything(channel: str) -> None:
    assert OPEN.may_subscribe(channel) and OPEN.may_publish(channel)


# ====================================================================== 2. verify


def test_a_valid_token_gives_its_grants(scheme: Scheme) -> None:
    c = claims()
    grants = scheme.auth().verify(scheme.sign(c))
    assert grants == Grants("alice", ("md.*", "demo.ticker"), ("md.>",), float(c["exp"]))
    assert isinstance(grants.expires_at, float)


def test_a_token_without_sub_or_grants_is_valid_and_grants_nothing(scheme: Scheme) -> None:
    grants = scheme.auth().verify(scheme.sign(claims(sub=None, channels=None, publish=None)))
    assert grants.subject is None and grants.subscribe == () and grants.publish == ()


def test_a_long_subject_is_cut_to_128_characters(scheme: Scheme) -> None:
    assert scheme.auth().verify(scheme.sign(claims(sub="x" * 1000))).subject == "x" * 128


def test_a_single_string_pattern_is_one_pattern(scheme: Scheme) -> None:
    grants = scheme.auth().verify(scheme.sign(claims(channels="md.*", publish="md.>")))
    assert grants.subscribe == ("md.*",) and grants.publish == ("md.>",)


def test_a_missing_token_is_refused(scheme: Scheme) -> None:
    assert "required" in refusal(scheme.auth(), "")


@pytest.mark.parametrize(
    "token",
    ["abc", "a.b.c", "a.b", "a.b.c.d", "...", "eyJ.eyJ.sig", "ü.ü.ü", "\x00\x01\x02", "🔑" * 10, " " * 5,
     b64url(b"[1, 2]") + ".e30.", b64url(b'"text"') + ".e30.", b64url(b"{not json") + ".e30."],
)
def test_a_malformed_token_is_refused(scheme: Scheme, token: str) -> None:
    message = refusal(scheme.auth(), token)
    assert "malformed" in message or "invalid" in message or "not accepted" in message


def test_a_token_signed_with_another_key_is_refused(scheme: Scheme) -> None:
    assert "signature" in refusal(scheme.auth(), scheme.sign_other(claims()))


def test_a_token_with_altered_claims_is_refused(scheme: Scheme) -> None:
    header, _, signature = scheme.sign(claims()).split(".")
    wider = b64url(json.dumps(claims(channels=[">"])).encode())
    assert "signature" in refusal(scheme.auth(), f"{header}.{wider}.{signature}")


def test_an_expired_token_is_refused(scheme: Scheme) -> None:
    now = int(time.time())
    assert "expired" in refusal(scheme.auth(), scheme.sign(claims(iat=now - 600, nbf=now - 600, exp=now - 60)))


def test_a_token_not_valid_yet_is_refused(scheme: Scheme) -> None:
    now = int(time.time())
    assert "not valid yet" in refusal(scheme.auth(), scheme.sign(claims(nbf=now + 60, exp=now + 600)))


def test_a_token_without_exp_is_refused(scheme: Scheme) -> None:
    assert "'exp'" in refusal(scheme.auth(), scheme.sign(claims(exp=None)))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_an_unsigned_alg_none_token_is_refused(scheme: Scheme, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(channels=[">"]))
    assert token.endswith(".")
    assert "not accepted" in refusal(scheme.auth(), token)


def test_pyjwt_alg_none_token_is_refused(scheme: Scheme) -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    assert "not accepted" in refusal(scheme.auth(), token)


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS512", "PS256", "ES256", "EdDSA", "hs256", ""])
def test_other_algorithms_are_refused(scheme: Scheme, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), SECRET.encode())
    assert "not accepted" in refusal(scheme.auth(), token)


@pytest.mark.parametrize("alg", [["HS256"], {"a": 1}, 256, None, True])
def test_a_header_alg_that_is_not_a_string_is_refused(alg: Any) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), SECRET.encode())
    assert "not accepted" in refusal(hs256_scheme().auth(), token)


def test_a_header_without_alg_is_refused() -> None:
    token = forge({"typ": "JWT"}, claims(), SECRET.encode())
    assert "not accepted" in refusal(hs256_scheme().auth(), token)


@pytest.mark.parametrize("public_key_form", ["pem-text", "pem-file"])
def test_hs256_signed_with_the_public_key_is_refused_when_only_rs256_is_configured(
    public_key_form: str, public_key_file: Path
) -> None:
    """Algorithm confusion: the public key is no secret, so it must never serve as an HMAC key."""
    pem = keypair(0).public_pem
    auth = Authenticator(public_key=pem if public_key_form == "pem-text" else str(public_key_file))
    for key in (pem, pem.strip(), pem.replace("\n", "\r\n")):
        token = forge({"alg": "HS256", "typ": "JWT"}, claims(channels=[">"]), key.encode())
        assert "not accepted" in refusal(auth, token)


def test_hs256_signed_with_the_public_key_is_refused_when_both_are_configured() -> None:
    pem = keypair(0).public_pem
    auth = Authenticator(SECRET, pem)
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(channels=[">"]), pem.encode())
    assert "signature" in refusal(auth, token)
    # both algorithms are accepted with their own keys
    assert auth.verify(jwt.encode(claims(), SECRET, algorithm="HS256")).subject == "alice"
    assert auth.verify(jwt.encode(claims(), keypair(0).private_pem, algorithm="RS256")).subject == "alice"


def test_an_rs256_token_is_refused_when_only_hs256_is_configured() -> None:
    token = jwt.encode(claims(), keypair(0).private_pem, algorithm="RS256")
    assert "not accepted" in refusal(Authenticator(SECRET), token)


def test_an_hs256_token_is_refused_when_only_rs256_is_configured() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert "not accepted" in refusal(Authenticator(public_key=keypair(0).public_pem), token)


def test_the_issuer_is_checked_when_configured(scheme: Scheme) -> None:
    auth = scheme.auth(issuer="https://issuer.example")
    assert auth.verify(scheme.sign(claims(iss="https://issuer.example"))).subject == "alice"
    assert "issuer" in refusal(auth, scheme.sign(claims(iss="https://evil.example")))
    assert "'iss'" in refusal(auth, scheme.sign(claims()))
    # not configured: any issuer, or none, is accepted
    assert scheme.auth().verify(scheme.sign(claims(iss="https://anyone.example"))).subject == "alice"


def test_the_audience_is_checked_when_configured(scheme: Scheme) -> None:
    auth = scheme.auth(audience="stablews")
    assert auth.verify(scheme.sign(claims(aud="stablews"))).subject == "alice"
    assert auth.verify(scheme.sign(claims(aud=["other", "stablews"]))).subject == "alice"
    assert "audience" in refusal(auth, scheme.sign(claims(aud="other")))
    assert "audience" in refusal(auth, scheme.sign(claims(aud=["other", "more"])))
    assert "'aud'" in refusal(auth, scheme.sign(claims()))
    # not configured: a token naming an audience is still accepted
    assert scheme.auth().verify(scheme.sign(claims(aud="whatever"))).subject == "alice"


def test_leeway_covers_a_recently_expired_token(scheme: Scheme) -> None:
    now = int(time.time())
    token = scheme.sign(claims(iat=now - 300, nbf=now - 300, exp=now - 2))
    assert scheme.auth(leeway=5).verify(token).expires_at == now - 2
    assert "expired" in refusal(scheme.auth(leeway=0), token)
    assert "expired" in refusal(scheme.auth(), token)


def test_leeway_covers_a_token_valid_from_just_now(scheme: Scheme) -> None:
    now = int(time.time())
    token = scheme.sign(claims(iat=now, nbf=now + 2, exp=now + 300))
    assert scheme.auth(leeway=5).verify(token).subject == "alice"
    assert "not valid yet" in refusal(scheme.auth(leeway=0), token)


@pytest.mark.parametrize("claim", ["channels", "publish"])
@pytest.mark.parametrize(
    "value",
    [
        {"md.*": True},
        42,
        True,
        ["md.*", 1],
        [None],
        [["md.*"]],
        [{"p": "md.*"}],
        [""],
        ["x" * (MAX_PATTERN_LENGTH + 1)],
        ["md.*"] * (MAX_PATTERNS + 1),
    ],
    ids=["dict", "int", "bool", "non-string", "null", "nested-list", "object", "empty", "too-long", "too-many"],
)
def test_bad_grant_claims_are_refused(scheme: Scheme, claim: str, value: Any) -> None:
    message = refusal(scheme.auth(), scheme.sign(claims(**{claim: value})))
    assert f"'{claim}'" in message and "list" in message


def test_grant_claims_at_the_limits_are_accepted(scheme: Scheme) -> None:
    many = [f"md.{i}" for i in range(MAX_PATTERNS)]
    longest = "x" * MAX_PATTERN_LENGTH
    grants = scheme.auth().verify(scheme.sign(claims(channels=many, publish=[longest])))
    assert grants.subscribe == tuple(many) and grants.publish == (longest,)


@pytest.mark.parametrize("sub", [5, ["alice"], {"name": "alice"}])
def test_a_subject_that_is_not_a_string_is_refused(scheme: Scheme, sub: Any) -> None:
    refusal(scheme.auth(), scheme.sign(claims(sub=sub)))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_time_claim_that_is_not_a_number_is_refused(scheme: Scheme, claim: str) -> None:
    refusal(scheme.auth(), scheme.sign(claims(**{claim: "soon"})))
    refusal(scheme.auth(), scheme.sign(claims(**{claim: [1]})))


def test_a_token_longer_than_max_token_length_is_refused(scheme: Scheme) -> None:
    token = scheme.sign(claims())
    assert scheme.auth(max_token_length=len(token)).verify(token).subject == "alice"
    assert "too long" in refusal(scheme.auth(max_token_length=len(token) - 1), token)


def test_the_default_max_token_length_refuses_a_huge_valid_token(scheme: Scheme) -> None:
    token = scheme.sign(claims(sub="x" * 9000))
    assert len(token) > 8192
    assert "too long" in refusal(scheme.auth(), token)
    assert "too long" in refusal(scheme.auth(), "a" * 100_000)


def test_a_huge_integer_exp_is_refused_or_accepted_not_a_crash() -> None:
    token = jwt.encode(claims(exp=10**400), SECRET, algorithm="HS256")
    with contextlib.suppress(AuthError):
        Authenticator(SECRET).verify(token)


# --- fuzzing: whatever arrives, verify() answers with Grants or AuthError

VERIFIERS = {
    "HS256": lambda: Authenticator(SECRET),
    "RS256": lambda: Authenticator(public_key=keypair(0).public_pem),
    "both": lambda: Authenticator(SECRET, keypair(0).public_pem, issuer="iss", audience="aud", leeway=1),
}
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verify_or_refuse(auth: Authenticator, token: str) -> Grants | None:
    try:
        return auth.verify(token)
    except AuthError as exc:
        assert "\n" not in str(exc) and 0 < len(str(exc)) <= 120
        return None


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(sorted(VERIFIERS)),
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
        st.lists(st.text(alphabet=B64URL, max_size=80), min_size=1, max_size=5).map(".".join),
    ),
)
def test_random_text_is_refused(which: str, token: str) -> None:
    assert verify_or_refuse(VERIFIERS[which](), token) is None


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**1000), 2**1000)  # beyond float range too
    | st.floats()
    | st.text(max_size=12)
)
JSON = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(VERIFIERS)),
    st.fixed_dictionaries(
        {},
        optional={
            "exp": st.integers(int(time.time()) - 1000, int(time.time()) + 10**6) | JSON,
            "nbf": st.integers(int(time.time()) - 1000, int(time.time()) + 1000) | JSON,
            "iat": JSON,
            "sub": st.text(max_size=200) | JSON,
            "channels": st.lists(st.text(max_size=10), max_size=5) | JSON,
            "publish": st.lists(st.text(max_size=10), max_size=5) | JSON,
            "iss": st.just("iss") | JSON,
            "aud": st.sampled_from(["aud", ["aud", "x"]]) | JSON,
        },
    ),
    st.dictionaries(st.sampled_from(["kid", "typ", "cty", "x5u", "jku", "crit", "b64"]), JSON, max_size=3),
)
def test_correctly_signed_odd_claims_give_grants_or_auth_error(
    which: str, payload: dict[str, Any], extra_header: dict[str, Any]
) -> None:
    key, algorithm = (SECRET, "HS256") if which == "HS256" else (keypair(0).private_pem, "RS256")
    try:
        token = jwt.encode(payload, key, algorithm=algorithm, headers=extra_header)
    except (TypeError, ValueError, jwt.InvalidTokenError):
        return  # not encodable at all
    grants = verify_or_refuse(VERIFIERS[which](), token)
    if grants is not None:
        assert all(isinstance(p, str) and p for p in grants.subscribe + grants.publish)
        assert grants.subject is None or isinstance(grants.subject, str)
        assert isinstance(grants.expires_at, float)


# ====================================================================== 3. construction and configuration


def test_enabled_only_with_a_key(public_key_file: Path) -> None:
    assert not Authenticator().enabled
    assert not Authenticator("", "").enabled
    assert Authenticator(SECRET).enabled
    assert Authenticator(public_key=keypair(0).public_pem).enabled
    assert Authenticator(public_key=str(public_key_file)).enabled
    assert Authenticator(SECRET, keypair(0).public_pem).enabled


def test_from_settings_follows_the_configuration(public_key_file: Path) -> None:
    assert not Authenticator.from_settings(config.load(env=NO_ENV)).enabled
    settings_ = config.load(
        flags={"auth_public_key": str(public_key_file), "auth_issuer": "iss", "auth_audience": "aud",
               "auth_leeway": "5s"},
        env={"STABLEWS_AUTH_SECRET": SECRET},
    )
    auth = Authenticator.from_settings(settings_)
    assert auth.enabled and set(auth.keys) == {"HS256", "RS256"}
    assert (auth.issuer, auth.audience, auth.leeway) == ("iss", "aud", 5.0)
    now = int(time.time())
    token = jwt.encode(claims(iss="iss", aud="aud", exp=now - 2), keypair(0).private_pem, algorithm="RS256")
    assert auth.verify(token).subject == "alice"  # leeway 5s covers it


def test_load_public_key_takes_pem_text_or_a_path(public_key_file: Path) -> None:
    pem = keypair(0).public_pem
    assert load_public_key(pem) == pem
    assert load_public_key("\n  " + pem) == "\n  " + pem
    assert load_public_key(str(public_key_file)) == pem


def test_pem_text_with_surrounding_whitespace_is_accepted() -> None:
    assert Authenticator(public_key="\n  " + keypair(0).public_pem + "\n\n").enabled


BAD_PEM = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (BAD_PEM, "not an rsa public key"),
        ("-----BEGIN PUBLIC KEY-----", "not an rsa public key"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not an rsa public key"),
        ("garbage", "cannot read garbage"),  # not PEM, so it is a path
        ("/no/such/dir/key.pem", "cannot read /no/such/dir/key.pem"),
    ],
    ids=["bad-pem-body", "pem-header-only", "certificate-garbage", "garbage-text", "missing-path"],
)
def test_a_bad_public_key_is_a_value_error(value: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        Authenticator(public_key=value)
    message = str(info.value)
    assert needle in message.lower() and "\n" not in message


def test_a_public_key_file_with_garbage_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("this is not a key\n")
    with pytest.raises(ValueError, match="not an RSA public key"):
        Authenticator(public_key=str(path))


def test_a_directory_as_public_key_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        Authenticator(public_key=str(tmp_path))


def test_an_ec_public_key_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an RSA public key"):
        Authenticator(public_key=ec_public_pem())


@pytest.mark.parametrize("form", ["pem-text", "pem-file"])
def test_a_private_key_is_not_accepted_as_the_public_key(form: str, tmp_path: Path) -> None:
    private = keypair(0).private_pem
    path = tmp_path / "private.pem"
    path.write_text(private)
    with pytest.raises(ValueError):
        Authenticator(public_key=private if form == "pem-text" else str(path))


def test_a_verifier_built_from_a_private_key_never_crashes() -> None:
    try:
        auth = Authenticator(public_key=keypair(0).private_pem)
    except ValueError:
        return  # refusing the key is fine too
    token = jwt.encode(claims(), keypair(1).private_pem, algorithm="RS256")  # anyone can make this
    with contextlib.suppress(AuthError):
        auth.verify(token)


def config_error(**kwargs: Any) -> str:
    kwargs.setdefault("env", NO_ENV)
    with pytest.raises(ConfigError) as info:
        config.load(**kwargs)
    text = str(info.value)
    assert "\n" not in text and text.strip() == text
    return text


@pytest.mark.parametrize("value", ["garbage", BAD_PEM, "/no/such/key.pem", ec_public_pem()])
def test_config_refuses_a_bad_public_key(value: str) -> None:
    assert config_error(flags={"auth_public_key": value}).startswith("auth_public_key:")
    assert config_error(env={"STABLEWS_AUTH_PUBLIC_KEY": value}).startswith("auth_public_key:")


def test_config_names_the_missing_public_key_file() -> None:
    text = config_error(flags={"auth_public_key": "/no/such/key.pem"})
    assert text.startswith("auth_public_key:") and "/no/such/key.pem" in text and "cannot read" in text


def test_config_refuses_a_public_key_file_with_garbage(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("nope")
    text = config_error(flags={"auth_public_key": str(path)})
    assert text.startswith("auth_public_key:") and "not an RSA public key" in text


def test_config_refuses_a_bad_public_key_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "stablews.toml"
    path.write_text('[server]\nauth_public_key = "/no/such/key.pem"\n')
    assert config_error(config_file=str(path)).startswith("auth_public_key:")


def test_config_accepts_a_public_key_as_text_or_path(public_key_file: Path) -> None:
    pem = keypair(0).public_pem
    assert config.load(flags={"auth_public_key": pem}, env=NO_ENV).auth_public_key == pem
    loaded = config.load(env={"STABLEWS_AUTH_PUBLIC_KEY": str(public_key_file)})
    assert loaded.auth_public_key == str(public_key_file)
    assert Authenticator.from_settings(loaded).enabled


@pytest.mark.parametrize("secret", ["short", "x" * 31, "é" * 15])  # "é" is 2 bytes: 30 bytes
def test_config_refuses_a_short_secret(secret: str) -> None:
    for text in (config_error(flags={"auth_secret": secret}), config_error(env={"STABLEWS_AUTH_SECRET": secret})):
        assert text.startswith("auth_secret:") and "32" in text


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16, SECRET])
def test_config_accepts_a_secret_of_32_bytes(secret: str) -> None:
    loaded = config.load(flags={"auth_secret": secret}, env=NO_ENV)
    assert loaded.auth_secret == secret and Authenticator.from_settings(loaded).enabled


def test_config_auth_defaults() -> None:
    loaded = config.load(env=NO_ENV)
    assert (loaded.auth_secret, loaded.auth_public_key, loaded.auth_issuer, loaded.auth_audience) == ("",) * 4
    assert loaded.auth_leeway == 0.0


def test_config_refuses_a_bad_leeway() -> None:
    assert config_error(flags={"auth_leeway": "soon"}).startswith("auth_leeway:")


# ====================================================================== 4. issue()


def raw_claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def test_issue_round_trip(scheme: Scheme) -> None:
    token = issue(scheme.issue_key, algorithm=scheme.algorithm, subject="bob", channels=["md.*", "x.>"],
                  publish=["md.btc"], issuer="iss", audience="aud")
    assert jwt.get_unverified_header(token)["alg"] == scheme.algorithm
    grants = scheme.auth(issuer="iss", audience="aud").verify(token)
    assert (grants.subject, grants.subscribe, grants.publish) == ("bob", ("md.*", "x.>"), ("md.btc",))
    c = raw_claims(token)
    assert (c["sub"], c["channels"], c["publish"], c["iss"], c["aud"]) == ("bob", ["md.*", "x.>"], ["md.btc"],
                                                                            "iss", "aud")


def test_issue_round_trip_accepts_a_generator_of_channels(scheme: Scheme) -> None:
    token = issue(scheme.issue_key, algorithm=scheme.algorithm, channels=(f"c{i}" for i in range(3)))
    assert scheme.auth().verify(token).subscribe == ("c0", "c1", "c2")


def test_issue_leaves_out_what_is_not_given() -> None:
    c = raw_claims(issue(SECRET))
    assert "sub" not in c and "publish" not in c and "iss" not in c and "aud" not in c
    assert c["channels"] == []
    assert Authenticator(SECRET).verify(issue(SECRET)) == Grants(None, (), (), float(c["exp"]))


def test_issue_times_follow_now_and_ttl() -> None:
    now = time.time() - 1800.7
    c = raw_claims(issue(SECRET, ttl=3600, now=now))
    assert c["iat"] == c["nbf"] == int(now)
    assert c["exp"] == int(now) + 3600
    assert Authenticator(SECRET).verify(issue(SECRET, ttl=3600, now=now)).expires_at == int(now) + 3600


def test_issue_with_now_far_in_the_past_is_expired(scheme: Scheme) -> None:
    token = issue(scheme.issue_key, algorithm=scheme.algorithm, ttl=3600, now=time.time() - 7200)
    assert "expired" in refusal(scheme.auth(), token)


def test_issue_with_now_in_the_future_is_not_valid_yet(scheme: Scheme) -> None:
    token = issue(scheme.issue_key, algorithm=scheme.algorithm, ttl=3600, now=time.time() + 600)
    assert "not valid yet" in refusal(scheme.auth(), token)


def test_issue_default_ttl_is_an_hour() -> None:
    c = raw_claims(issue(SECRET))
    assert c["exp"] - c["iat"] == 3600


def test_issue_tokens_are_refused_by_the_other_scheme() -> None:
    hs = issue(SECRET, channels=[">"])
    rs = issue(keypair(0).private_pem, algorithm="RS256", channels=[">"])
    assert "not accepted" in refusal(Authenticator(public_key=keypair(0).public_pem), hs)
    assert "not accepted" in refusal(Authenticator(SECRET), rs)
    assert "signature" in refusal(Authenticator(public_key=keypair(1).public_pem), rs)
    assert "signature" in refusal(Authenticator(OTHER_SECRET), hs)


# ====================================================================== 5. the `stablews token` command

CLI = [sys.executable, "-m", "stablews", "token"]


def run_token(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**environ, **(env or {})})


def printed_token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1, result.stdout
    token = result.stdout.strip()
    assert token.count(".") == 2 and " " not in token
    return token


def failure(result: subprocess.CompletedProcess[str]) -> str:
    """A usage failure: exit 2, nothing on stdout, one line on stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_cli_hs256_token_carries_the_claims() -> None:
    result = run_token("--secret", SECRET, "--sub", "alice", "--channels", "md.*", "demo.ticker",
                       "--publish", "md.>", "--ttl", "30m", "--issuer", "iss", "--audience", "aud")
    token = printed_token(result)
    assert result.stderr == ""
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    grants = Authenticator(SECRET, issuer="iss", audience="aud").verify(token)
    assert (grants.subject, grants.subscribe, grants.publish) == ("alice", ("md.*", "demo.ticker"), ("md.>",))
    c = raw_claims(token)
    assert c["exp"] - c["iat"] == 1800 and abs(c["iat"] - time.time()) < 60
    assert (c["iss"], c["aud"]) == ("iss", "aud")
    assert "signature" in refusal(Authenticator(OTHER_SECRET), token)


def test_cli_repeated_flags_add_up_and_ttl_defaults_to_an_hour() -> None:
    token = printed_token(run_token("--secret", SECRET, "--channels", "a", "b", "--channels", "c",
                                    "--publish", "p", "--publish", "q"))
    grants = Authenticator(SECRET).verify(token)
    assert grants.subscribe == ("a", "b", "c") and grants.publish == ("p", "q")
    c = raw_claims(token)
    assert c["exp"] - c["iat"] == 3600 and "sub" not in c and "iss" not in c and "aud" not in c


def test_cli_private_key_gives_an_rs256_token(tmp_path: Path, public_key_file: Path) -> None:
    private = tmp_path / "private.pem"
    private.write_text(keypair(0).private_pem)
    token = printed_token(run_token("--private-key", str(private), "--sub", "svc", "--channels", ">"))
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    for auth in (Authenticator(public_key=str(public_key_file)), Authenticator(public_key=keypair(0).public_pem)):
        grants = auth.verify(token)
        assert grants.subject == "svc" and grants.subscribe == (">",)
    assert "signature" in refusal(Authenticator(public_key=keypair(1).public_pem), token)
    assert "not accepted" in refusal(Authenticator(SECRET), token)


def test_cli_private_key_wins_over_the_environment_secret(tmp_path: Path) -> None:
    private = tmp_path / "private.pem"
    private.write_text(keypair(0).private_pem)
    token = printed_token(run_token("--private-key", str(private), "--channels", "x",
                                    env={"STABLEWS_AUTH_SECRET": SECRET}))
    assert jwt.get_unverified_header(token)["alg"] == "RS256"


def test_cli_uses_the_environment_secret() -> None:
    token = printed_token(run_token("--sub", "env", "--channels", "x", env={"STABLEWS_AUTH_SECRET": SECRET}))
    assert Authenticator(SECRET).verify(token).subject == "env"


def test_cli_secret_flag_wins_over_the_environment() -> None:
    token = printed_token(run_token("--secret", SECRET, "--channels", "x", env={"STABLEWS_AUTH_SECRET": OTHER_SECRET}))
    assert Authenticator(SECRET).verify(token).subscribe == ("x",)


def test_cli_without_grants_prints_a_note_and_succeeds() -> None:
    result = run_token("--secret", SECRET)
    token = printed_token(result)
    assert result.stderr.count("\n") == 1 and "note" in result.stderr and "--channels" in result.stderr
    assert Authenticator(SECRET).verify(token).subscribe == ()


def test_cli_publish_only_needs_no_note() -> None:
    result = run_token("--secret", SECRET, "--publish", "md.>")
    assert Authenticator(SECRET).verify(printed_token(result)).publish == ("md.>",)
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--secret", "short"], {}),
        (["--secret", "x" * 31], {}),
        (["--secret", "é" * 15], {}),  # 30 bytes
        ([], {"STABLEWS_AUTH_SECRET": "short"}),
    ],
    ids=["short", "31-bytes", "30-bytes-multibyte", "short-env"],
)
def test_cli_refuses_a_short_secret(args: list[str], env: dict[str, str]) -> None:
    assert "32" in failure(run_token(*args, "--channels", "x", env=env))


def test_cli_accepts_a_secret_of_exactly_32_bytes() -> None:
    token = printed_token(run_token("--secret", "é" * 16, "--channels", "x"))
    assert Authenticator("é" * 16).verify(token).subscribe == ("x",)


@pytest.mark.parametrize("env", [{}, {"STABLEWS_AUTH_SECRET": ""}])
def test_cli_refuses_a_missing_secret(env: dict[str, str]) -> None:
    assert "--secret" in failure(run_token("--channels", "x", env=env))


@pytest.mark.parametrize("ttl", ["soon", "0", "0s", "-5m", "1d", ""])
def test_cli_refuses_a_bad_ttl(ttl: str) -> None:
    assert "--ttl" in failure(run_token("--secret", SECRET, "--channels", "x", f"--ttl={ttl}"))


def test_cli_sub_second_ttl_is_refused_or_valid() -> None:
    result = run_token("--secret", SECRET, "--channels", "x", "--ttl", "500ms")
    if result.returncode == 0:
        Authenticator(SECRET).verify(printed_token(result))
    else:
        failure(result)


def test_cli_refuses_an_unreadable_key_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.pem", tmp_path):
        message = failure(run_token("--private-key", str(path), "--channels", "x"))
        assert "cannot read" in message and str(path) in message


@pytest.mark.parametrize("content", ["garbage\n", "public", "ec"])
def test_cli_refuses_a_key_file_that_is_no_private_key(tmp_path: Path, content: str) -> None:
    path = tmp_path / "key.pem"
    if content == "public":
        content = keypair(0).public_pem
    elif content == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        content = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    path.write_text(content)
    failure(run_token("--private-key", str(path), "--channels", "x"))


def test_cli_secret_and_private_key_are_exclusive(tmp_path: Path) -> None:
    result = run_token("--secret", SECRET, "--private-key", str(tmp_path / "k.pem"))
    assert result.returncode == 2 and result.stdout == ""
    assert "not allowed" in result.stderr
