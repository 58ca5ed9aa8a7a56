"""Authentication and authorisation over the wire: tokens from the header, the
query string or hello; the refusal matrix; grants for subscribe and publish;
expiry during a connection; origins; the API key on every endpoint that needs it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from stablews.auth import issue
from stablews.client import ClientClosed, StableClient
from stablews.recovery import RecoveryPolicy
from support import Client, ServerProcess

SECRET = "test-secret-for-hs256-0123456789abcdef"
OTHER_SECRET = "another-secret-for-hs256-0123456789abcd"


def token(**overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 300, "channels": ["md.*", "demo.ticker"],
                              "publish": ["md.>"]}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, SECRET, algorithm="HS256")


@pytest.fixture
def auth_server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--auth-secret", SECRET, "--client-publish", "true", "--demo-feed-rate", "20")


async def open_client(server: ServerProcess, *, header: str | None = None, query: str | None = None) -> Client:
    url = server.ws + (f"?token={query}" if query is not None else "")
    headers = {"Authorization": f"Bearer {header}"} if header is not None else {}
    return await Client.connect(url, additional_headers=headers)


async def hello(client: Client, **fields: Any) -> dict[str, Any]:
    await client.send({"type": "hello", **fields})
    return await client.recv()


async def expect_unauthorized(client: Client, needle: str) -> None:
    error = await client.recv_type("error")
    assert error["code"] == "unauthorized" and needle in error["message"], error
    assert await client.wait_closed() == 4401


NOW = int(time.time())
BAD_TOKENS = {
    "missing": (None, "a token is required"),
    "malformed": ("not-a-token", "malformed"),
    "wrong signature": (jwt.encode({"exp": NOW + 300}, OTHER_SECRET, algorithm="HS256"), "signature"),
    "expired": (token(exp=NOW - 60, iat=NOW - 400), "expired"),
    "not yet valid": (token(nbf=NOW + 600), "not valid yet"),
    "no expiry": (token(exp=None), "'exp'"),
    "alg none": (jwt.encode({"exp": NOW + 300}, None, algorithm="none"), "algorithm"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_hello_without_a_good_token_is_refused_4401(auth_server: ServerProcess, case: str) -> None:
    bad, needle = BAD_TOKENS[case]
    client = await open_client(auth_server)
    await client.send({"type": "hello", **({"token": bad} if bad is not None else {})})
    await expect_unauthorized(client, needle)


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_bad_handshake_token_is_refused_before_hello(auth_server: ServerProcess, where: str) -> None:
    bad = BAD_TOKENS["expired"][0]
    client = await open_client(auth_server, **{where: bad})
    await expect_unauthorized(client, "expired")


@pytest.mark.parametrize("where", ["header", "query", "hello"])
async def test_a_good_token_from_each_place_is_accepted(auth_server: ServerProcess, where: str) -> None:
    good = token()
    client = await open_client(auth_server, **({where: good} if where != "hello" else {}))
    welcome = await hello(client, **({"token": good} if where == "hello" else {}))
    assert welcome["type"] == "welcome"
    await client.send({"type": "subscribe", "channel": "demo.ticker"})
    subscribed = await client.recv_type("subscribed")
    assert subscribed["channel"] == "demo.ticker"
    assert (await client.recv_type("message"))["channel"] == "demo.ticker"
    await client.close()


async def test_grants_decide_subscribe_and_publish_and_the_connection_stays(auth_server: ServerProcess) -> None:
    client = await open_client(auth_server, header=token())
    await hello(client)
    await client.send({"type": "subscribe", "channel": "private.stuff"})
    refused = await client.recv_type("error")
    assert refused["code"] == "forbidden" and refused["channel"] == "private.stuff"
    await client.send({"type": "subscribe", "channel": "md.btc"})  # md.* grants it
    assert (await client.recv_type("subscribed"))["channel"] == "md.btc"
    await client.send({"type": "subscribe", "channel": "md.btc.trades"})  # * is one segment only
    assert (await client.recv_type("error"))["code"] == "forbidden"
    await client.send({"type": "publish", "channel": "demo.ticker", "data": 1, "id": "p1"})
    refused = await client.recv_type("error")
    assert refused["code"] == "forbidden" and refused["ref"] == "p1"
    await client.send({"type": "publish", "channel": "md.btc", "data": {"px": 1}, "id": "p2"})  # md.> grants it
    answers = {m["type"]: m for m in [await client.recv(), await client.recv()]}  # fan-out may come first
    assert answers["published"]["id"] == "p2" and answers["message"]["data"] == {"px": 1}
    # Refusals of grants are answers, not bad input: many of them do not close the connection.
    for i in range(15):
        await client.send({"type": "subscribe", "channel": f"other.{i}"})
        assert (await client.recv_type("error"))["code"] == "forbidden"
    await client.send({"type": "ping", "id": "still-here"})
    assert (await client.recv_type("pong"))["id"] == "still-here"
    await client.close()


async def test_resume_of_a_channel_not_granted_is_refused_and_the_rest_resumes(auth_server: ServerProcess) -> None:
    client = await open_client(auth_server, header=token())
    welcome = await hello(client, resume={"private.x": {"epoch": "e", "offset": 1},
                                          "demo.ticker": {"epoch": "e", "offset": 1}})
    assert welcome["type"] == "welcome"
    refused = await client.recv_type("error")
    assert refused["code"] == "forbidden" and refused["channel"] == "private.x"
    subscribed = await client.recv_type("subscribed")
    assert subscribed["channel"] == "demo.ticker" and subscribed["recovered"] is False
    await client.close()


async def test_a_token_that_expires_during_the_connection_ends_it_4401(auth_server: ServerProcess) -> None:
    short = token(exp=int(time.time()) + 2)
    client = await open_client(auth_server, header=short)
    assert (await hello(client))["type"] == "welcome"
    started = time.monotonic()
    await expect_unauthorized(client, "expired")
    assert time.monotonic() - started < 2 + 5  # at expiry, not at some later heartbeat (interval 30 s)


async def test_rs256_tokens_verify_with_the_public_key(start_server: Callable[..., ServerProcess],
                                                       tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    server = start_server("--auth-public-key", str(public), "--demo-feed-rate", "20")
    good = issue(private_pem, algorithm="RS256", subject="bot", channels=["demo.>"])
    client = await open_client(server, query=good)
    assert (await hello(client))["type"] == "welcome"
    await client.close()
    # An HS256 token "signed" with the public key text: the classic confusion, refused.
    forged = jwt.encode({"exp": int(time.time()) + 60, "channels": [">"]}, "x" * 40, algorithm="HS256")
    client = await open_client(server, header=forged)
    await expect_unauthorized(client, "algorithm")


async def test_the_project_client_stops_on_4401_and_does_not_retry(auth_server: ServerProcess) -> None:
    client = StableClient(auth_server.ws, channels=["demo.ticker"], token=BAD_TOKENS["expired"][0],
                          policy=RecoveryPolicy(initial_delay=0.02, jitter_max=0.0))
    await client.connect()
    async with asyncio.timeout(10):
        await client.wait_closed()
    assert isinstance(client.error, ClientClosed) and client.error.code == 4401
    assert client.recovery_stats()["attempts"] == 1
    async with StableClient(auth_server.ws, channels=["demo.ticker"], token=token()) as good:
        async with asyncio.timeout(10):
            assert (await good.__anext__())["channel"] == "demo.ticker"


# ------------------------------------------------------------ origins and the API key


async def test_origins_allowed_and_refused(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--allowed-origins", "https://app.example.com,https://ops.example.com")
    # Browsers always send Origin; a request without one is not a browser's (a bot, a relay), and the
    # check (which protects browsers' users from other sites) lets it through.
    for origin in ("https://app.example.com", "https://ops.example.com", None):
        async with connect(server.ws, origin=origin) as ws:  # type: ignore[arg-type]
            await ws.send('{"type":"hello"}')
            assert '"welcome"' in await ws.recv()
    for origin in ("https://evil.example.com", "null", "https://app.example.com.evil.example"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws, origin=origin):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(timeout=10) as http:
        stats = (await http.get(f"{server.http}/api/v1/websocket/stats")).json()
    assert stats["refused"]["origin"] == 3


ADMIN = [("GET", "/api/v1/websocket/connections"), ("GET", "/api/v1/websocket/connections/nope"),
         ("DELETE", "/api/v1/websocket/connections/nope"), ("POST", "/api/v1/publish")]


async def test_the_api_key_guards_every_admin_and_publish_endpoint(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--api-key", "k3y")
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        for method, path in ADMIN:
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "k3y-but-longer"}):
                reply = await http.request(method, path, headers=headers, json={"channel": "a", "data": 1})
                assert reply.status_code == 401, (method, path, headers, reply.text)
            reply = await http.request(method, path, headers={"X-API-Key": "k3y"}, json={"channel": "a", "data": 1})
            assert reply.status_code in (200, 404), (method, path, reply.text)  # 404: no such connection
        for path in ("/healthz", "/readyz", "/api/v1/websocket/health", "/api/v1/websocket/stats"):
            assert (await http.get(path)).status_code == 200, path  # probes need no key
