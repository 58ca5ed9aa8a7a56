"""Signed tokens: who a connection is and which channels it may use.

A token is a JWT signed with HS256 (`auth_secret`) or RS256 (`auth_public_key`
verifies, the issuer keeps the private key). Claims:

    sub       who (shown on the connection)
    exp, nbf  validity window (exp is required)
    channels  channel patterns the holder may subscribe to
    publish   channel patterns the holder may publish to

Patterns are dot-separated like channel names: `*` matches exactly one
segment, `>` as the last segment matches one or more, anything else matches
itself: `md.*` matches `md.btc` (not `md.btc.trades`), `md.>` matches both,
`>` matches every channel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

MAX_PATTERNS = 100
MAX_PATTERN_LENGTH = 256


class AuthError(Exception):
    """A token that cannot be accepted; str() says why in one short line."""


@dataclass(frozen=True, slots=True)
class Grants:
    subject: str | None
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    expires_at: float | None  # wall-clock seconds

    def may_subscribe(self, channel: str) -> bool:
        return any(pattern_matches(p, channel) for p in self.subscribe)

    def may_publish(self, channel: str) -> bool:
        return any(pattern_matches(p, channel) for p in self.publish)


# Everything allowed: what a connection holds when authentication is off.
OPEN = Grants(None, (">",), (">",), None)


def pattern_matches(pattern: str, channel: str) -> bool:
    if pattern == ">":
        return True
    want = pattern.split(".")
    have = channel.split(".")
    for i, part in enumerate(want):
        if part == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (part != "*" and part != have[i]):
            return False
    return len(have) == len(want)


def load_public_key(value: str) -> str:
    """PEM text, or the path of a file holding it."""
    if value.lstrip().startswith("-----BEGIN"):
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None


class Authenticator:
    """Verifies tokens for one server. `enabled` is False when no key is configured."""

    def __init__(
        self,
        secret: str = "",
        public_key: str = "",
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 0.0,
        max_token_length: int = 8192,
    ) -> None:
        self.keys: dict[str, Any] = {}
        if secret:
            self.keys["HS256"] = secret
        if public_key:
            pem = load_public_key(public_key)
            try:
                key = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).prepare_key(pem)
            except Exception as exc:  # the library raises several types for a bad key
                raise ValueError(f"not an RSA public key in PEM form ({exc.__class__.__name__})") from None
            if not isinstance(key, RSAPublicKey):  # a private key here would be a leak, and cannot verify
                raise ValueError("an RSA public key is needed, not a private key")
            self.keys["RS256"] = key
        self.issuer = issuer or None
        self.audience = audience or None
        self.leeway = leeway
        self.max_token_length = max_token_length

    @classmethod
    def from_settings(cls, settings: Any) -> Authenticator:
        return cls(
            settings.auth_secret,
            settings.auth_public_key,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            leeway=settings.auth_leeway,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def verify(self, token: str) -> Grants:
        if not token:
            raise AuthError("a token is required")
        if len(token) > self.max_token_length:
            raise AuthError("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        algorithm = header.get("alg")
        key = self.keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None:  # also refuses "none" and HS256-with-the-public-key confusion
            raise AuthError(f"token algorithm {str(algorithm)[:16]!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {str(exc)[:80]}") from None
        subject = claims.get("sub")
        try:
            expires_at = float(claims["exp"])
        except (OverflowError, ValueError, TypeError):
            raise AuthError("token 'exp' out of range") from None
        return Grants(
            subject=subject[:128] if isinstance(subject, str) else None,
            subscribe=_patterns(claims.get("channels"), "channels"),
            publish=_patterns(claims.get("publish"), "publish"),
            expires_at=expires_at,
        )


def _patterns(value: Any, claim: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LENGTH for p in value)
    ):
        raise AuthError(f"the '{claim}' claim must be a list of at most {MAX_PATTERNS} channel patterns")
    return tuple(value)


def issue(
    key: str,
    *,
    algorithm: str = "HS256",
    subject: str | None = None,
    channels: Iterable[str] = (),
    publish: Sequence[str] = (),
    ttl: float = 3600.0,
    issuer: str = "",
    audience: str = "",
    now: float | None = None,
) -> str:
    """A signed token (HS256 with a secret, RS256 with a private key in PEM form).
    A single pattern may be given as a string; `ttl` is rounded up to whole seconds."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iat": issued, "nbf": issued, "exp": issued + math.ceil(ttl)}
    if subject:
        claims["sub"] = subject
    claims["channels"] = [channels] if isinstance(channels, str) else list(channels)
    if publish:
        claims["publish"] = [publish] if isinstance(publish, str) else list(publish)
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key, algorithm=algorithm)
