from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from redis_server import RedisServer
from support import ServerProcess

# Tests open many sockets; make sure the soft limit is not the bottleneck.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < min(_hard, 8192):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 8192), _hard))


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start `stablews serve` processes; every one is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh `redis-server` on a free loopback port (nothing persisted), stopped at teardown."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
