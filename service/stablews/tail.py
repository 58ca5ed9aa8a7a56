"""`stablews client`: follow channels and print each publication as a JSON line.

stdout carries only publications (one compact JSON object per line, flushed
as it arrives), so it pipes into jq or grep; lifecycle lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from .client import ClientClosed, StableClient
from .config import Settings
from .recovery import RecoveryPolicy


def _say(event: str, **fields: Any) -> None:
    details = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
    print(f"stablews client: {event}" + (f" {details}" if details else ""), file=sys.stderr, flush=True)


async def _follow(args: argparse.Namespace, settings: Settings) -> int:
    client = StableClient(
        urls=[args.url, *args.more_urls],
        channels=args.channel,
        token=args.token,
        policy=RecoveryPolicy.from_settings(settings),
        open_timeout=args.open_timeout,
        name="stablews-cli",
    )
    out = sys.stdout
    printed = 0
    reader_gone = False
    done = asyncio.Event()

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal printed, reader_gone
        if reader_gone:
            return
        try:
            out.write(json.dumps(msg, separators=(",", ":"), ensure_ascii=False) + "\n")
            out.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted; end normally
            reader_gone = True
            done.set()
            return
        printed += 1
        if args.count is not None and printed >= args.count:
            done.set()

    client.on("message", on_message)
    client.on("connected", lambda i: _say(
        "connected", url=i["url"], connection=i["connection"], server=i["server"], trace_id=i["trace_id"],
        recovered_in=None if i["recovered_in"] is None else f"{i['recovered_in']}s",
    ))
    client.on("disconnected", lambda i: _say("disconnected", code=i.get("code"), reason=json.dumps(i.get("reason"))))
    client.on("reconnecting", lambda i: _say(
        "reconnecting", attempt=i["attempt"], delay=f"{i['delay']}s", url=i["url"], circuit=i["circuit"],
    ))
    client.on("recovered", lambda ch, n: _say("recovered", channel=ch, replayed=n))
    client.on("resync", lambda ch, i: _say(
        "resync needed", channel=ch, reason=i.get("reason"),
        previous=json.dumps(i.get("previous"), separators=(",", ":")),
        current=json.dumps(i.get("current"), separators=(",", ":")),
    ))
    client.on("circuit", lambda state: _say("circuit", state=state))
    client.on("error", lambda m: _say("server error", code=m.get("code"), message=json.dumps(m.get("message"))))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    _say("connecting", url=args.url, channels=",".join(args.channel))
    await client.connect()
    stopper = asyncio.ensure_future(done.wait())
    ended = asyncio.ensure_future(client.wait_closed())
    await asyncio.wait({stopper, ended}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    ended.cancel()
    error = client.error
    await client.close()
    if reader_gone:
        # Nothing more can be written; keep the interpreter from flushing into the closed pipe at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    if error is not None and not done.is_set():
        _say("stopped", reason=json.dumps(str(error)), code=error.code)
        return 1
    _say("closed", messages=printed)
    return 0


def run_client(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_follow(args, settings))
    except ClientClosed as exc:
        _say("stopped", reason=json.dumps(str(exc)))
        return 1
