"""The teacher behind the student: an OpenAI-compatible API called through
:class:`~edgedistill.openai_client.OpenAIClient` (one attempt, a deadline for the whole call) behind a
circuit breaker. A teacher that fails never fails the request: the caller serves the student's
answer, flagged with ``teacher_error``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from edgedistill.openai_client import OpenAIClient, OpenAIError


class TeacherError(Exception):
    """The teacher did not give a usable answer (timeout, refused, 5xx, bad JSON, breaker open)."""


class CircuitBreaker:
    """Closed -> (``failures`` in a row) -> open for ``cooldown_s`` -> one trial call (half-open)."""

    def __init__(self, failures: int = 3, cooldown_s: float = 30.0, clock=time.monotonic):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None and self.clock() - self.opened_at < self.cooldown_s

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self.is_open or self._trial:
            return False
        self._trial = True  # half-open: let one call through
        return True

    def abandon(self) -> None:
        """A call that ended without a verdict (cancelled): let the next one be the trial."""
        self._trial = False

    def record(self, ok: bool) -> None:
        self._trial = False
        if ok:
            self.consecutive = 0
            self.opened_at = None
            return
        self.consecutive += 1
        if self.consecutive >= self.failures:
            self.opened_at = self.clock()


def _well_formed(data: Any, chat: bool) -> bool:
    """An OpenAI answer we can pass on: choices with text (chat: ``message.content``, or null content
    with well-formed ``tool_calls``), nothing else checked. Garbage counts as a teacher failure (and
    towards the breaker), never reaches a client."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        return False
    for ch in data["choices"]:
        if not isinstance(ch, dict):
            return False
        if chat:
            msg = ch.get("message")
            if not isinstance(msg, dict):
                return False
            text = msg.get("content")
            calls = msg.get("tool_calls")
            if calls is not None and not well_formed_tool_calls(calls):
                return False
            if text is None and calls:
                continue
        else:
            text = ch.get("text")
        if not isinstance(text, str):
            return False
    return True


def well_formed_tool_calls(calls: Any) -> bool:
    """OpenAI's tool calls: each with a string id, type function, a name and arguments as a string."""
    if not isinstance(calls, list):
        return False
    for c in calls:
        f = c.get("function") if isinstance(c, dict) else None
        if not (
            isinstance(f, dict)
            and isinstance(c.get("id"), str)
            and c.get("type") == "function"
            and isinstance(f.get("name"), str)
            and isinstance(f.get("arguments"), str)
        ):
            return False
    return True


class FallbackTeacher:
    """The teacher a server falls back to: one attempt per call (the student's answer is waiting),
    ``timeout_s`` for the whole call, failures counted by the :class:`CircuitBreaker`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.client = OpenAIClient(
            self.base_url, api_key, timeout_s=timeout_s, ok_statuses={200}, trust_env=False, transport=transport
        )
        self.breaker = breaker or CircuitBreaker()

    async def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST route (``/chat/completions`` or ``/completions``) with the teacher's model name."""
        if not self.breaker.allow():
            raise TeacherError("circuit_open")
        payload = {**body, "model": self.model, "stream": False}
        payload.pop("stream_options", None)
        try:
            # a deadline for the whole call: httpx's timeout is per read, so a teacher that drips
            # one byte at a time would otherwise hold the request forever
            async with asyncio.timeout(self.timeout_s):
                data = await self.client.post_json(route, payload)
            if not _well_formed(data, chat=route.startswith("/chat")):
                raise TeacherError("bad_response")
        except TimeoutError:
            self.breaker.record(False)
            raise TeacherError("timeout") from None
        except OpenAIError as e:
            self.breaker.record(False)
            raise TeacherError(_reason(e)) from None
        except TeacherError:
            self.breaker.record(False)
            raise
        except asyncio.CancelledError:  # the client left: no verdict, but a half-open trial must be freed
            self.breaker.abandon()
            raise
        self.breaker.record(True)
        return data

    async def chat_text(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        data = await self.post("/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})
        content = (data["choices"][0].get("message") or {}).get("content")
        if not isinstance(content, str):
            raise TeacherError("bad_response")
        return content

    async def close(self) -> None:
        await self.client.aclose()


def _reason(e: OpenAIError) -> str:
    """serve's ``teacher_error`` for a failed call: timeout, unreachable (ConnectError), http_503, bad_json."""
    if e.reason == "unreachable":
        return f"unreachable ({e.cause})"
    return e.reason
