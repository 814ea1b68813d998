"""Server-sent events of chat and completions: an answer already decided replayed as chunks
(``replay_stream``, student or teacher), or the student's tokens as they are decoded
(``live_stream``, the confidence in the last chunk; the teacher can no longer answer)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from edgedistill.serve import errors
from edgedistill.serve.cascade import Policy, answer_confidence, decision
from edgedistill.serve.engine import RequestHandle, SeqResult
from edgedistill.serve.recording import record_generation
from edgedistill.serve.responses import usage
from edgedistill.serve.state import State
from edgedistill.serve.structured import response_schema
from edgedistill.serve.submission import note_latency
from edgedistill.serve.task_chat import task_confidence
from edgedistill.serve.types import ChatCompletionRequest
from fastapi import Request

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def chunk(
    kind: str, rid: str, model: str, created: int, index: int, text: str | None, finish: str | None, logprobs=None, first=False
) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    lp = None
    if logprobs is not None:
        lp = {
            "tokens": [e["token"] for e in logprobs],
            "token_logprobs": [e["logprob"] for e in logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in logprobs],
            "text_offset": [],
        }
    choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _final(kind: str, rid: str, model: str, created: int) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
    }


async def replay_stream(kind: str, req, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    """A decided answer (student or teacher, as dumped) as SSE chunks: role, content, finish, usage, [DONE]."""
    created, model, rid = payload["created"], payload["model"], payload["id"]
    for ch in payload["choices"]:
        i = ch.get("index", 0)
        text = (ch.get("message") or {}).get("content") if kind == "chat" else ch.get("text")
        calls = (ch.get("message") or {}).get("tool_calls") if kind == "chat" else None
        if calls:
            for c in tool_call_chunks(rid, model, created, i, calls, ch.get("finish_reason") or "tool_calls"):
                yield sse(c)
            continue
        if kind == "chat":
            yield sse(chunk(kind, rid, model, created, i, "", None, first=True))
        lp = None
        if ch.get("logprobs"):
            lp = ch["logprobs"].get("content") if kind == "chat" else None
        yield sse(chunk(kind, rid, model, created, i, text or "", None, logprobs=lp))
        yield sse(chunk(kind, rid, model, created, i, None if kind == "chat" else "", ch.get("finish_reason") or "stop"))
    final = _final(kind, rid, model, created)
    if req.include_usage:
        final["usage"] = payload.get("usage")
    final["edgedistill"] = payload["edgedistill"]
    yield sse(final)
    yield DONE


ARGUMENT_PIECE = 16  # characters of function.arguments per chunk


def tool_call_chunks(rid: str, model: str, created: int, index: int, calls: list[dict], finish: str) -> list[dict]:
    """Decided tool calls as OpenAI streams them: the role (content null), per call a chunk with its
    id, type and name (arguments ""), then its arguments in pieces, then the finish reason."""

    def of(delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}

    out = [of({"role": "assistant", "content": None})]
    for k, c in enumerate(calls):
        head = {"index": k, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}
        out.append(of({"tool_calls": [head]}))
        args = c["function"]["arguments"]
        for a in range(0, len(args), ARGUMENT_PIECE):
            out.append(of({"tool_calls": [{"index": k, "function": {"arguments": args[a : a + ARGUMENT_PIECE]}}]}))
    out.append(of({}, finish))
    return out


async def live_stream(
    st: State,
    request: Request,
    kind: str,
    req,
    rid: str,
    handle: RequestHandle,
    route: str,
    t0: float,
    policy: Policy,
    task_format: bool = False,
    body: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    created, model = int(time.time()), st.model_id
    results: list[SeqResult] = []
    started: set[int] = set()
    first_token_at: float | None = None
    try:
        remaining = handle.n
        while remaining:
            kind_ev, index, payload = await handle.queue.get()
            if kind_ev == "error":  # the 200 is sent: say so in band, then end as every stream ends
                yield sse(errors.error_body(503, f"engine failed: {payload}", "engine_error"))
                yield DONE
                return
            if kind == "chat" and index not in started:
                started.add(index)
                yield sse(chunk(kind, rid, model, created, index, "", None, first=True))
            if kind_ev == "delta":
                if first_token_at is None:
                    first_token_at = time.perf_counter() - t0
                    st.metrics.ttft.labels(route).observe(first_token_at)
                text, lps = payload
                yield sse(chunk(kind, rid, model, created, index, text, None, logprobs=lps if _wants_lp(req) else None))
            elif kind_ev == "done":
                remaining -= 1
                results.append(payload)
                yield sse(chunk(kind, rid, model, created, index, None if kind == "chat" else "", payload.finish_reason))
        if task_format:  # chat in the task's format: /v1/predict's confidence (serve.task_chat)
            _, conf, fields = task_confidence(st, results)
        else:
            structured = isinstance(req, ChatCompletionRequest) and response_schema(req) is not None
            conf, fields = answer_confidence(st, results, structured)
        if conf is not None:
            st.metrics.confidence.labels(route).observe(conf)
        d = decision(st, policy, conf, live=True)  # streamed as decoded: the teacher cannot answer any more
        d.fields = fields
        final = _final(kind, rid, model, created)
        results.sort(key=lambda r: r.index)
        used = usage(results, req.n)
        if req.include_usage:
            final["usage"] = used.model_dump()
        final["edgedistill"] = d.info().model_dump()
        st.metrics.count_answer(d.answered_by, used.prompt_tokens, used.completion_tokens, None)
        note_latency(st, t0)
        record_generation(st, kind, rid, body, results, d, t0)
        yield sse(final)
        yield DONE
    finally:
        if len(results) < handle.n:  # the client went away mid-stream: free its slot now
            st.engine.cancel(handle)


def _wants_lp(req) -> bool:
    return bool(req.logprobs) if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
