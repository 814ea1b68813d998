"""Shadow checks (``serve --shadow-rate P``): a random share P of the answers the student gave alone
is also asked of the teacher, off the request path, and the two answers compared by the task's
``same_answer`` rule. That sample is what ``serve.monitor`` estimates the served answers'
agreement from.

A check never slows or fails a request: it is queued after the response is decided (a full queue
drops it), run by a few background tasks, with its own circuit breaker (a failing shadow teacher
cannot open the breaker the fallbacks use), its teacher tokens counted in
``edgedistill_shadow_tokens_total``. Each check ends once (``ShadowJob.finish``): with the teacher's
answer, or with an error (``failed ...``, ``dropped``, ``cancelled`` on shutdown).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edgedistill.serve.fallback import CircuitBreaker, FallbackTeacher, TeacherError
from edgedistill.serve.metrics import Metrics

log = logging.getLogger("edgedistill.serve.shadow")

QUEUE_SIZE = 64  # checks waiting for a worker before new ones are dropped
WORKERS = 2  # checks in flight at once (the teacher's connections the fallbacks keep)

# asks the teacher and compares: (the teacher's answer, whether it agrees, the teacher's usage or None)
ShadowCall = Callable[[FallbackTeacher], Awaitable[tuple[Any, bool, dict[str, Any] | None]]]
# the check's end: (the teacher's answer or None, whether it agrees or None, why there is none or None)
ShadowDone = Callable[[Any, bool | None, str | None], None]


@dataclass
class ShadowJob:
    call: ShadowCall
    done: ShadowDone
    finished: bool = field(default=False)

    def finish(self, answer: Any, agreed: bool | None, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.done(answer, agreed, error)
        except Exception:  # a bookkeeping bug must not kill the workers
            log.exception("shadow check: recording its result failed")


class ShadowChecks:
    """The sampler, the bounded queue and the workers (started with the first check, on the app's loop)."""

    def __init__(self, teacher: FallbackTeacher, rate: float, metrics: Metrics, rng: random.Random | None = None):
        self.teacher = copy.copy(teacher)  # the same client and deadline ...
        if isinstance(getattr(teacher, "breaker", None), CircuitBreaker):  # ... but a breaker of its own
            self.teacher.breaker = CircuitBreaker(teacher.breaker.failures, teacher.breaker.cooldown_s)
        self.rate = rate
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.queue: asyncio.Queue[ShadowJob] | None = None
        self.workers: list[asyncio.Task] = []
        self.closed = False

    def wanted(self) -> bool:
        """Draw whether this student answer is checked (probability ``rate``)."""
        return self.rate > 0 and self.rng.random() < self.rate

    def submit(self, job: ShadowJob) -> None:
        """Queue a check; a full queue (or a closed server) ends it at once as ``dropped``."""
        if self.closed:
            return self._drop(job, "cancelled")
        if self.queue is None:
            self.queue = asyncio.Queue(QUEUE_SIZE)
            self.workers = [asyncio.get_running_loop().create_task(self._work()) for _ in range(WORKERS)]
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self._drop(job, "dropped")

    async def close(self) -> None:
        """Cancel the checks queued or in flight; each still ends (``cancelled``), so its record is written."""
        self.closed = True
        for w in self.workers:
            w.cancel()
        if self.workers:
            await asyncio.gather(*self.workers, return_exceptions=True)
        while self.queue is not None and not self.queue.empty():
            self._drop(self.queue.get_nowait(), "cancelled")

    def _drop(self, job: ShadowJob, why: str) -> None:
        self.metrics.shadow_requests.labels(why).inc()
        job.finish(None, None, why)

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            job = await self.queue.get()
            try:
                answer, agreed, usage = await job.call(self.teacher)
            except asyncio.CancelledError:  # close(): the check ends, its record is written
                self._drop(job, "cancelled")
                raise
            except TeacherError as e:
                self.metrics.shadow_requests.labels("failed").inc()
                job.finish(None, None, f"failed ({e})")
            except Exception as e:  # noqa: BLE001 -- whatever goes wrong, the next check still runs
                self.metrics.shadow_requests.labels("failed").inc()
                job.finish(None, None, f"failed ({type(e).__name__}: {e})")
            else:
                self.metrics.shadow_requests.labels("compared").inc()
                self.metrics.shadow_checks.inc()
                if usage is not None:
                    self.metrics.shadow_tokens.labels("prompt").inc(usage["prompt_tokens"])
                    self.metrics.shadow_tokens.labels("completion").inc(usage["completion_tokens"])
                job.finish(answer, agreed, None)
