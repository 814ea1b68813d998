"""Graceful shutdown, as an orchestrator (Kubernetes, systemd, docker stop) expects.

On SIGTERM or SIGINT the server stops taking new work at once but keeps listening: ``/ready``
answers 503 (so the load balancer takes it out of rotation) and every new request on a work route
(``POST /v1/...``) gets a 503 in OpenAI's error shape with ``Retry-After``. What is in flight, queued
or decoding, is finished within ``--shutdown-grace-s`` (default 30 s, like Kubernetes'
``terminationGracePeriodSeconds``). When the grace is over, what is still running is cancelled (the
engine frees its slot or drops it from the queue: ``submission.run``, ``streaming.live_stream``) and
answered with a 503 + ``Retry-After``; a stream whose headers are already sent ends with an error
event, then ``data: [DONE]``. Never a 500, no traceback. Then uvicorn closes the listener, the app's
lifespan shutdown runs ``State.on_shutdown`` (flush callbacks: a traffic log's ``close()``) before the
teacher client and the engine close, and the process exits 0.

A second signal cuts the grace short (what is left gets its 503 now); a third exits without waiting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from edgedistill.serve import errors
from edgedistill.serve.settings import Settings
from edgedistill.serve.state import State

log = logging.getLogger("edgedistill.serve")

RETRY_AFTER_S = 1  # a client's retry goes to another replica, or to this one once it is back
ANSWER_WAIT_S = 5.0  # after the cut: how long the cancelled requests get to send their 503s
BACKSTOP_S = 5  # uvicorn's own timeout_graceful_shutdown, only reached by a connection that hangs


def is_work(scope: dict[str, Any]) -> bool:
    """A request that does work (chat, completions, predict): refused while draining, counted in flight."""
    return scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/")


def _headers() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}


class Drain:
    """The drain's state: requests in flight, the grace, the cut. ``begin()`` starts it (on a signal)."""

    def __init__(self, st: State, grace_s: float):
        self.st = st
        self.grace_s = grace_s
        self.in_flight = 0  # work requests not answered yet
        self.running: set[asyncio.Task] = set()  # their inner tasks (DrainGuard), for the cut to cancel
        self.is_cut = False  # the grace is over: what is still running is cancelled and gets a 503
        self.signals = 0

    def cut(self) -> None:
        self.is_cut = True
        for t in list(self.running):
            t.cancel()

    async def run(self) -> None:
        """Wait for the requests in flight (at most the grace), cut what is left, wait for its 503s."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.grace_s
        while self.in_flight and loop.time() < end and not self.is_cut:
            await asyncio.sleep(0.02)
        if self.in_flight:
            log.warning("shutdown grace (%.1f s) over: answering %d unfinished request(s) with 503", self.grace_s, self.in_flight)
        self.cut()
        end = loop.time() + ANSWER_WAIT_S
        while self.in_flight and loop.time() < end:
            await asyncio.sleep(0.02)

    def message(self) -> str:
        return f"server shutting down: the request did not finish within the shutdown grace ({self.grace_s:g} s); retry it"


class DrainGuard:
    """ASGI middleware: refuses new work while draining, counts what is in flight, and at the cut
    cancels what is still running and answers it with a 503 (or ends its stream with an error event)."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send):
        if not is_work(scope):
            return await self.app(scope, receive, send)
        d = self.drain
        if d.st.draining:
            d.st.metrics.rejected.labels("shutting_down").inc()
            msg = "server shutting down: not taking new requests; retry (another replica, or this one once restarted)"
            resp = errors.error_response(503, msg, "server_shutting_down", headers=_headers())
            return await resp(scope, receive, send)
        sent = {"started": False, "sse": False, "complete": False}

        async def _send(message):
            if message["type"] == "http.response.start":
                sent["started"] = True
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                sent["sse"] = ctype.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["complete"] = True
            await send(message)

        d.in_flight += 1
        try:
            task = asyncio.ensure_future(self.app(scope, receive, _send))
            d.running.add(task)
            try:
                await asyncio.wait({task})  # the inner task's cancellation (the cut) does not propagate here
            finally:
                d.running.discard(task)
                if not task.done():  # we were cancelled (uvicorn's backstop): so is the request
                    task.cancel()
            if not task.cancelled():
                return task.result()
            if not d.is_cut:
                raise asyncio.CancelledError
            # cancelled by the cut: the engine has dropped it from the queue or freed its slot
            # (submission.run, streaming.live_stream)
            await self._answer_cut(sent, scope, receive, send)
        finally:
            d.in_flight -= 1

    async def _answer_cut(self, sent: dict[str, bool], scope, receive, send) -> None:
        if sent["complete"]:
            return
        if not sent["started"]:
            resp = errors.error_response(503, self.drain.message(), "server_shutting_down", headers=_headers())
            return await resp(scope, receive, send)
        tail = b""
        if sent["sse"]:  # the 200 is sent: the stream says what happened in band, then ends as streams end
            from edgedistill.serve.streaming import DONE, sse

            tail = sse(errors.error_body(503, self.drain.message(), "server_shutting_down")) + DONE
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def run_hooks(hooks: list[Callable[[], Any]]) -> None:
    """``State.on_shutdown``, in order; a failing hook is logged and the next one still runs."""
    for hook in hooks:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception as e:  # noqa: BLE001 -- one broken flush must not keep the others from running
            log.error("shutdown hook %s failed: %s: %s", getattr(hook, "__qualname__", hook), type(e).__name__, e)


class GracefulServer(uvicorn.Server):
    """uvicorn's server with the drain: a signal starts ``Drain.run`` instead of closing the listener
    at once, and a graceful shutdown exits 0 (uvicorn would re-raise the signal: status 143)."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        d = self.drain
        d.signals += 1
        if self._loop is None or d.signals > 2:
            self.should_exit = True
            self.force_exit = d.signals > 2
            return
        if d.signals == 2:  # again: cut the grace short
            self._loop.call_soon_threadsafe(d.cut)
            return
        d.st.draining = True  # set here, not in the loop: /ready answers 503 from the next request on
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, name: str) -> None:
        d = self.drain  # logged here, in the loop, not in the signal handler (which may interrupt a log call)
        log.warning(
            "%s: draining -- no new requests; %d in flight get up to %g s (%s again: stop them now)",
            name, d.in_flight, d.grace_s, name,
        )  # fmt: skip

        async def drain_then_exit() -> None:
            t0 = time.perf_counter()
            try:
                await self.drain.run()
            finally:
                log.info("drained in %.1f s; shutting down", time.perf_counter() - t0)
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def serve_app(app, settings: Settings) -> None:
    """Run ``app`` (from ``create_app``) under uvicorn with the graceful shutdown; exits 3 if it cannot start."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=BACKSTOP_S
    )
    server = GracefulServer(config, app.state.drain)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the port is taken, or the lifespan startup failed
