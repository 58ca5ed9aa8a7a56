"""`redis-server` as a real process for the tests: Debian's package, a free loopback port, its files
in the test's tmp dir. It can be killed and started again on the same port (with or without
persistence), which is how the tests make Redis fail."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from promkit import binary, free_port

START_DEADLINE = 15.0


def redis_binary(name: str = "redis-server") -> str:
    return binary(name, "redis-server")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server. `persistent`: an append-only file synced on every write, so a restart
    keeps everything; otherwise nothing survives a restart (no RDB, no AOF)."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.executable = redis_binary()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = free_port()
            if self.start():
                return
        raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> bool:
        """Start on `self.port`; False when it exited (the port was taken)."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        args = [
            self.executable, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
            "--daemonize", "no", "--logfile", str(self.log), "--protected-mode", "yes", *persistence,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _ping(self.port):
                return True
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError(f"redis-server did not answer within {START_DEADLINE}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        if not self.start():
            raise RuntimeError(f"redis-server did not start again on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
