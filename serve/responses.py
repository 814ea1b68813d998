"""The typed answers of chat and completions (``serve.types`` models, the ones the OpenAPI document
shows): the student's choices with their logprobs, or the teacher's answer in our shape."""

from __future__ import annotations

import time
from typing import Any

from edgedistill.serve.cascade import Decision, valid_usage
from edgedistill.serve.engine import SeqResult
from edgedistill.serve.state import State
from edgedistill.serve.tools import ToolSpec, parse_answer
from edgedistill.serve.types import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    EdgedistillInfo,
    ToolCall,
    ToolCallMessage,
    Usage,
)


def usage(results: list[SeqResult], n: int) -> Usage:
    """The prompt once per prompt (not per choice), every choice's completion."""
    prompt = sum(r.prompt_tokens for r in results[:: max(n, 1)])
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _answer(kind: str, rid: str, model: str, choices: list, used: Usage | None, fingerprint: str | None, info: EdgedistillInfo):
    cls = ChatCompletion if kind == "chat" else Completion
    return cls(
        id=rid,
        object="chat.completion" if kind == "chat" else "text_completion",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=used,
        system_fingerprint=fingerprint,
        edgedistill=info,
    )


def student_answer(
    st: State, kind: str, req, rid: str, results: list[SeqResult], info: EdgedistillInfo, tools: ToolSpec | None = None
):
    """The student's choices; with ``tools``, each choice's generic-format JSON as a tool call or text."""
    choices: list[ChatChoice | CompletionChoice] = []
    for i, r in enumerate(results):
        if kind == "chat":
            lp = {"content": r.logprobs, "refusal": None} if req.logprobs else None
            message, finish = _chat_message(r, tools)
            choices.append(ChatChoice(index=i, message=message, logprobs=lp, finish_reason=finish))
        else:
            text = r.text
            if req.echo:
                p = req.prompts()[i // req.n]
                text = (p if isinstance(p, str) else _detok(st, p)) + text
            lp = _completion_logprobs(r) if req.logprobs is not None else None
            choices.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=r.finish_reason))
    return _answer(kind, rid, st.model_id, choices, usage(results, req.n), None, info)


def _chat_message(r: SeqResult, tools: ToolSpec | None) -> tuple[AssistantMessage, str]:
    parsed = parse_answer(r.text, tools) if tools is not None else None
    if parsed is None:  # text, or a tool-call answer cut off by max_tokens: served as generated
        return AssistantMessage(role="assistant", content=r.text), r.finish_reason
    if parsed.tool_calls:
        calls = [ToolCall(**c) for c in parsed.tool_calls]
        return ToolCallMessage(role="assistant", content=None, tool_calls=calls), "tool_calls"
    return AssistantMessage(role="assistant", content=parsed.content), r.finish_reason


def teacher_answer(st: State, kind: str, rid: str, d: Decision):
    """The teacher's answer in our response shape: its choices' text (checked by FallbackTeacher.post) and
    nothing of it we cannot vouch for (a teacher's odd usage or logprobs must not break a client)."""
    t = d.teacher_data or {}
    choices: list[ChatChoice | CompletionChoice] = []
    for i, ch in enumerate(t.get("choices", [])):
        finish = ch.get("finish_reason") if isinstance(ch.get("finish_reason"), str) else "stop"
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        if kind == "chat":
            msg = ch["message"]
            if msg.get("tool_calls"):  # checked by FallbackTeacher.post; passed on without the teacher's extras
                calls = [ToolCall(id=c["id"], type="function", function=c["function"]) for c in msg["tool_calls"]]
                content = msg["content"] if isinstance(msg.get("content"), str) else None
                message: AssistantMessage = ToolCallMessage(role="assistant", content=content, tool_calls=calls)
            else:
                message = AssistantMessage(role="assistant", content=msg["content"])
            choices.append(ChatChoice(index=i, message=message, logprobs=lp, finish_reason=finish))
        else:
            choices.append(CompletionChoice(index=i, text=ch["text"], logprobs=lp, finish_reason=finish))
    used = valid_usage(t.get("usage"))
    fingerprint = t.get("system_fingerprint")
    model = str(t.get("model") or (st.teacher.model if st.teacher else "teacher"))
    info = d.info()
    return _answer(kind, rid, model, choices, None if used is None else Usage(**used), fingerprint if isinstance(fingerprint, str) else None, info)


def _detok(st: State, tokens: list[int]) -> str:
    return b"".join(st.engine.runner.pieces[t] for t in tokens).decode("utf-8", "replace")


def _completion_logprobs(r: SeqResult) -> dict[str, Any]:
    tokens, offsets, off = [], [], 0
    for e in r.logprobs:
        tokens.append(e["token"])
        offsets.append(off)
        off += len(e["token"])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in r.logprobs],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in r.logprobs],
        "text_offset": offsets,
    }
