"""One request to an OpenAI-compatible endpoint, timed the way vLLM's benchmark times it.

A streamed chat completion (``stream_options.include_usage``): the time to the first chunk carrying
text (TTFT), the time of every later text chunk (inter-token latency), the end of the stream
(end-to-end latency), the token counts from the final usage chunk when the server sends one, and
the ``edgedistill`` object an edgedistill server adds to its last chunk. A server that ignores
``stream`` and answers one JSON body is measured too (its TTFT is then its latency).

Requests go through :class:`~edgedistill.openai_client.OpenAIClient` over the caller's
``httpx.AsyncClient`` (its pool and timeouts), without retries; each chunk's arrival time is the
client's ``time.perf_counter()`` stamp.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx
from edgedistill.bench.config import Endpoint

from edgedistill.conversation import TaskInput, input_text
from edgedistill.errors import UserError
from edgedistill.openai_client import OpenAIClient, OpenAIError


@dataclass
class Sample:
    """What one request did. Times are ``time.perf_counter()`` seconds."""

    index: int  # the prompt's index (the test-set row when a task is given)
    start: float
    end: float = 0.0
    error: str | None = None  # None: a 200 answer, fully received
    first_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk carrying text
    text: str = ""
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    prompt_chars: int = 0
    answered_by: str | None = None  # edgedistill servers: "student" / "teacher"
    confidence: float | None = None
    threshold: float | None = None
    fallback_reason: str | None = None
    teacher_error: str | None = None  # edgedistill servers: the teacher was asked and failed (or its breaker was open)
    value: Any = None  # /v1/predict: the parsed answer the server returned

    @property
    def teacher_called(self) -> bool:
        """An edgedistill server asked its teacher for this request: it answered, or the call failed
        (a timeout, an error: paid for all the same). A breaker that was open called nobody."""
        return self.answered_by == "teacher" or (self.teacher_error is not None and self.teacher_error != "circuit_open")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def chunks(self) -> int:
        return len(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        """The server's count when it gave one, else one token per text chunk."""
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    def itl_s(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]

    def tpot_s(self) -> float | None:
        """vLLM's time per output token: (latency - TTFT) / (output tokens - 1). None when the answer
        came in one chunk (a held stream, a non-streaming server): no decoding was seen."""
        if self.first_token is None or self.output_tokens < 2 or self.chunks < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)


def _api(client: httpx.AsyncClient, ep: Endpoint) -> OpenAIClient:
    """The endpoint's API over the caller's pool; an answer is a 200, as the samples count it."""
    return OpenAIClient(ep.url, ep.api_key, http=client, ok_statuses={200}, clock=time.perf_counter)


def _sample_error(e: OpenAIError) -> str:
    """A sample's ``error``: timeout, http_<status>, connection:<httpx error>, stream_error, bad_response."""
    if e.reason == "unreachable":
        return f"connection:{e.cause}"
    if e.reason in ("bad_json", "bad_response"):
        return "bad_response"
    return e.reason


async def discover(client: httpx.AsyncClient, ep: Endpoint) -> Endpoint:
    """Fill in the model name (GET /models unless NAME=URL#model) and whether it is an edgedistill server."""
    try:
        data = (await _api(client, ep).get_json("/models", timeout_s=30)).get("data")
        error = None if data else "HTTP 200"
    except OpenAIError as e:
        data = None
        error = f"HTTP {e.status}" if e.reason.startswith("http_") else f"{e.cause}: {e.detail}"
    except AttributeError as e:
        data, error = None, f"{type(e).__name__}: {e}"
    if data:
        entry = next((d for d in data if d.get("id") == ep.model), data[0]) if ep.model else data[0]
        ep.model = ep.model or str(entry.get("id"))
        meta = entry.get("edgedistill")
        if isinstance(meta, dict):
            ep.edgedistill = True
            ep.predict = bool(meta.get("task"))
            if isinstance(meta.get("teacher"), bool):
                ep.has_teacher = meta["teacher"]
            if isinstance(meta.get("threshold"), int | float) and not isinstance(meta.get("threshold"), bool):
                ep.threshold = float(meta["threshold"])
    elif not ep.model:
        raise UserError(
            f"endpoint {ep.name}: GET {ep.url}/models failed ({error}); is the server up? or name the model: {ep.name}=URL#model"
        )
    return ep


def _read_edgedistill(s: Sample, obj: dict[str, Any]) -> None:
    ed = obj.get("edgedistill")
    if isinstance(ed, dict):
        s.answered_by = ed.get("answered_by") or s.answered_by
        s.confidence = ed.get("confidence")
        s.threshold = ed.get("threshold")
        s.fallback_reason = ed.get("fallback_reason")
        s.teacher_error = ed.get("teacher_error")


def _read_usage(s: Sample, obj: dict[str, Any]) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            s.completion_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            s.prompt_tokens = int(usage["prompt_tokens"])


def _on_chunk(s: Sample, obj: dict[str, Any], now: float, parts: list[str]) -> None:
    for ch in obj.get("choices") or []:
        delta = ch.get("delta") or {}
        content = delta.get("content") if "delta" in ch else (ch.get("message") or {}).get("content")
        if content:
            if s.first_token is None:
                s.first_token = now
            s.chunk_times.append(now)
            parts.append(content)
    _read_usage(s, obj)
    _read_edgedistill(s, obj)


STUDENT_ONLY = {"X-Edgedistill-Fallback": "off"}  # edgedistill serve: the student answers, the teacher is never called


async def chat(
    client: httpx.AsyncClient,
    ep: Endpoint,
    messages: list[dict[str, str]],
    max_tokens: int,
    index: int,
    student_only: bool = False,
    response_format: dict[str, Any] | None = None,
) -> Sample:
    """One greedy, streamed chat completion, measured. Never raises for a failed request: see ``error``.
    ``student_only``: ask an edgedistill server for its student's own answer (``STUDENT_ONLY`` headers);
    ``response_format``: OpenAI's, sent as given (a JSON task's, in the task's format)."""
    body: dict[str, Any] = {
        "model": ep.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if response_format is not None:
        body["response_format"] = response_format
    api = _api(client, ep)
    s = Sample(index=index, start=time.perf_counter(), prompt_chars=sum(len(m["content"]) for m in messages))
    parts: list[str] = []
    try:
        async with api.stream("/chat/completions", body, headers=STUDENT_ONLY if student_only else None) as stream:
            s.answered_by = stream.headers.get("x-answered-by")
            async for chunk in stream:
                _on_chunk(s, chunk.data, chunk.received_at, parts)
    except OpenAIError as e:
        if e.headers is not None:  # the server answered, with a status that is not 200
            s.answered_by = e.headers.get("x-answered-by")
        s.error = _sample_error(e)
    except (TypeError, AttributeError):
        s.error = "bad_response"
    s.end = time.perf_counter()
    s.text = "".join(parts)
    return s


async def predict(
    client: httpx.AsyncClient,
    ep: Endpoint,
    text: TaskInput,
    index: int,
    threshold: float | None = None,
    fallback: bool | None = None,
) -> Sample:
    """POST /v1/predict of an edgedistill server; ``fallback=False`` asks for the student's own answer
    (the teacher is never called); a server without that field takes ``threshold=0.0`` (only an
    invalid answer still goes to the teacher)."""
    body: dict[str, Any] = {"input": text}
    if threshold is not None:
        body["threshold"] = threshold
    if fallback is not None:
        body["fallback"] = fallback
    api = _api(client, ep)
    s = Sample(index=index, start=time.perf_counter(), prompt_chars=len(input_text(text)))
    try:
        obj = await api.post_json("/predict", body)
        _read_edgedistill(s, obj)
        s.value = None if obj.get("error") else obj.get("output")
        s.text = obj.get("output") if isinstance(obj.get("output"), str) else json.dumps(obj.get("output"))
    except OpenAIError as e:
        s.error = _sample_error(e)
    except AttributeError:
        s.error = "bad_response"
    s.end = time.perf_counter()
    return s
