"""Handing prompts to the engine: bounded (429 past the queue, with a Retry-After from the recent
latency), cancelled when the client goes away (499), an engine failure a 503."""

from __future__ import annotations

import asyncio
import math
import time

from edgedistill.serve.engine import GenParams, QueueFull, RequestHandle, SeqResult
from edgedistill.serve.errors import APIError
from edgedistill.serve.state import State
from fastapi import Request


def check_ready(st: State) -> None:
    if not st.engine.ready:
        raise APIError(503, f"engine not ready: {st.engine.failed or 'starting'}", code="not_ready")


def submit(st: State, prompts: list[list[int]], params: list[GenParams]) -> RequestHandle:
    most = st.engine.max_queue + st.engine.runner.n_slots
    if len(prompts) > most:  # would be refused even by an idle server: not a 429
        raise APIError(
            400, f"n x prompts is {len(prompts)}; this server takes at most {most} at once", code="invalid_value", param="n"
        )
    try:
        return st.engine.submit(prompts, params, asyncio.get_running_loop())
    except QueueFull:
        st.metrics.rejected.labels("queue_full").inc()
        backlog = st.engine.waiting + st.engine.active
        retry = max(1, math.ceil(st.avg_latency_s * backlog / max(st.engine.runner.n_slots, 1)))
        raise APIError(
            429,
            f"server busy: {st.engine.waiting} requests queued; retry after {retry}s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        ) from None


async def run(st: State, request: Request | None, prompts: list[list[int]], params: list[GenParams]) -> list[SeqResult]:
    """Submit and wait for every sequence's result (``request``: stop when its client disconnects)."""
    check_ready(st)
    handle = submit(st, prompts, params)
    try:
        return await _unless_disconnected(request, handle.results())
    except RuntimeError as e:
        st.engine.cancel(handle)
        raise APIError(503, f"engine failed: {e}", code="engine_error") from None
    except (asyncio.CancelledError, APIError):  # the client went away: free the slots now
        st.engine.cancel(handle)
        raise


async def _unless_disconnected(request: Request | None, work):
    """Await ``work``, or stop when the client disconnects (499): a client that gave up on a long
    answer must not keep its slot until the answer is done. (Streams get this from Starlette.)"""
    task = asyncio.ensure_future(work)
    if request is None:
        return await task

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only disconnect comes
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise APIError(499, "client closed the request", code="client_closed_request")


def note_latency(st: State, t0: float) -> None:
    """The moving average of request latency that the 429's Retry-After is computed from."""
    dt = time.perf_counter() - t0
    st.avg_latency_s = 0.9 * st.avg_latency_s + 0.1 * dt
