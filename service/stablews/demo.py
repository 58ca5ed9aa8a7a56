"""The `demo.ticker` feed: a few symbols on a random walk, so a new user sees data flow."""

from __future__ import annotations

import asyncio
import logging
import random

from .broker import Broker, BrokerUnavailable

log = logging.getLogger("stablews.demo")

DEMO_CHANNEL = "demo.ticker"
SYMBOLS = {"BTC-USD": 64000.0, "ETH-USD": 3100.0, "SOL-USD": 145.0, "EUR-USD": 1.08}


async def run_demo_feed(broker: Broker, rate: float, channel: str = DEMO_CHANNEL) -> None:
    """Publish `rate` messages per second until cancelled (paced on the loop clock, no drift)."""
    loop = asyncio.get_running_loop()
    prices = dict(SYMBOLS)
    symbols = list(prices)
    period = 1.0 / rate
    start = loop.time()
    seq = 0
    rng = random.Random()
    failed = 0  # publications lost in the current outage: said once when it starts, once when it ends
    while True:
        seq += 1
        symbol = symbols[seq % len(symbols)]
        price = prices[symbol] * (1 + rng.gauss(0, 0.0005))
        prices[symbol] = price
        try:
            await broker.publish(channel, {"symbol": symbol, "price": round(price, 6), "seq": seq})
            if failed:
                log.info("demo feed: publishing again", extra={"lost": failed})
                failed = 0
        except BrokerUnavailable as exc:
            if not failed:
                log.warning("demo feed: publish failed (said once until it works again): %s", exc)
            failed += 1
        delay = start + seq * period - loop.time()
        if delay < -1.0:  # fell far behind (loop stalled): do not burst to catch up
            start = loop.time() - seq * period
            delay = 0
        await asyncio.sleep(max(0.0, delay))
