"""Under plain uvicorn (`uvicorn --factory stablews.app:create_app`), SIGTERM still
drains: advice then 1001, not uvicorn's 1012 to everyone at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from websockets.asyncio.client import connect

from support import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sigterm_under_plain_uvicorn_drains_with_advice_and_1001() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "stablews.app:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--ws", "websockets-sansio"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"STABLEWS_DEMO_FEED_RATE": "50", "STABLEWS_RECONNECT_DELAY": "0.5s",
             **{k: v for k, v in os.environ.items() if not k.startswith("STABLEWS_")}},
    )
    try:
        async def ready() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(ready, 20, "uvicorn to serve the app")
        sockets = []
        for _ in range(5):
            ws = await connect(f"ws://127.0.0.1:{port}/ws")
            await ws.send('{"type":"hello"}')
            await ws.send('{"type":"subscribe","channel":"demo.ticker"}')
            sockets.append(ws)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for ws in sockets:
            control = []
            async with asyncio.timeout(15):
                async for frame in ws:
                    control += [m for m in map(json.loads, frame.split("\n")) if m["type"] not in ("message", "ping")]
            kinds = [m["type"] for m in control]
            assert kinds[-1] == "reconnect" and control[-1]["reason"] == "shutdown", kinds
            assert 0 <= control[-1]["after_ms"] <= 500
            assert ws.close_code == 1001, ws.close_code
        proc.wait(15)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
