"""The teacher behind the student: an OpenAI-compatible API called with httpx, a timeout, and a
circuit breaker. A teacher that fails never fails the request: the caller serves the student's
answer, flagged with ``teacher_error``.
"""

from __future__ import annotations

import time
from typing import Any

import httpx


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

    def record(self, ok: bool) -> None:
        self._trial = False
        if ok:
            self.consecutive = 0
            self.opened_at = None
            return
        self.consecutive += 1
        if self.consecutive >= self.failures:
            self.opened_at = self.clock()


class Teacher:
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
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s), transport=transport, trust_env=False
        )
        self.breaker = breaker or CircuitBreaker()

    async def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST route (``/chat/completions`` or ``/completions``) with the teacher's model name."""
        if not self.breaker.allow():
            raise TeacherError("circuit_open")
        payload = {**body, "model": self.model, "stream": False}
        payload.pop("stream_options", None)
        try:
            r = await self.client.post(route, json=payload)
            if r.status_code != 200:
                raise TeacherError(f"http_{r.status_code}")
            data = r.json()
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
                raise TeacherError("bad_response")
        except httpx.TimeoutException:
            self.breaker.record(False)
            raise TeacherError("timeout") from None
        except httpx.HTTPError as e:
            self.breaker.record(False)
            raise TeacherError(f"unreachable ({type(e).__name__})") from None
        except (TeacherError, ValueError) as e:
            self.breaker.record(False)
            raise TeacherError(str(e) if isinstance(e, TeacherError) else "bad_json") from None
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
