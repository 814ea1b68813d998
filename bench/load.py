"""Load patterns: closed loop at a fixed concurrency, open loop with Poisson arrivals.

``send(i)`` makes request number ``i`` (its prompt is ``i`` modulo the prompt list) and returns its
:class:`~edgedistill.bench.client.Sample`. Warm-up requests are sent by the caller beforehand and never reach
these functions' results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np
from edgedistill.bench.client import Sample

Send = Callable[[int], Awaitable[Sample]]
OnDone = Callable[[Sample], None]


def _noop(_: Sample) -> None:
    return None


async def closed_loop(send: Send, n: int, concurrency: int, on_done: OnDone = _noop) -> list[Sample]:
    """``concurrency`` clients, each sending its next request as soon as its last one is answered,
    until ``n`` requests have been sent."""
    counter = iter(range(n))
    out: list[Sample] = []

    async def client() -> None:
        for i in counter:  # a shared iterator: each request number is taken once
            s = await send(i)
            out.append(s)
            on_done(s)

    await asyncio.gather(*[client() for _ in range(min(concurrency, n))])
    return sorted(out, key=lambda s: s.start)


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Send times (seconds from the start) of ``n`` requests arriving at ``rate`` per second on
    average, exponential gaps (a Poisson process); the first request goes at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


async def open_loop(send: Send, n: int, rate: float, seed: int = 0, on_done: OnDone = _noop) -> list[Sample]:
    """Requests sent at Poisson arrival times whether or not earlier ones are answered (no
    back-pressure: an overloaded server shows it as growing latency and errors)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out: list[Sample] = []

    async def one(i: int) -> None:
        s = await send(i)
        out.append(s)
        on_done(s)

    tasks = []
    for i, at in enumerate(poisson_arrivals(n, rate, seed)):
        delay = t0 + float(at) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return sorted(out, key=lambda s: s.start)


async def fixed_pool(send: Send, n: int, concurrency: int, on_done: OnDone = _noop) -> list[Sample]:
    """Every request once at a bounded concurrency, in request order (test-set passes)."""
    return sorted(await closed_loop(send, n, concurrency, on_done), key=lambda s: s.index)
