"""What a server does with each answer once it is decided: the live monitor's windows
(``serve.monitor``), the traffic log record (``serve.traffic``) and, for a random share of the
student's answers, a shadow check (``serve.shadow``; the record then waits for it, so that there
stays one record per request).

The routes call ``record_answer`` once per answered request, after the response is built;
``close_recording`` (the lifespan's shutdown) cancels the pending shadow checks, writing their
records, and drains the log. Nothing here can fail or change a response: ``record_answer`` never
raises.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edgedistill.serve.cascade import Decision, teacher_body, teacher_value, valid_usage
from edgedistill.serve.engine import SeqResult
from edgedistill.serve.fallback import FallbackTeacher
from edgedistill.serve.shadow import ShadowCall, ShadowJob
from edgedistill.serve.state import State
from edgedistill.serve.traffic import with_input

from edgedistill.conversation import TaskInput
from edgedistill.metrics import answer_correct

log = logging.getLogger("edgedistill.serve")
_warned: set[str] = set()


@dataclass
class Answered:
    """One answered request, as the traffic log records it (shared interface: keep the fields)."""

    route: str
    request_id: str
    input: Any  # the task input (a text or chat messages), or the completions prompt
    student: Any  # the student's answer: /v1/predict's parsed value, else its text
    decision: Decision
    teacher: Any  # the teacher's answer when it answered, same form as ``student``
    t0: float  # time.perf_counter() when the request started
    shadow: ShadowCall | None = None  # how a shadow check asks the teacher and compares (None: not checkable)


def new_request_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def record_answer(st: State, a: Answered) -> None:
    """Count the answer in the live windows, and log it (now, or when its shadow check ends)."""
    try:
        _record(st, a)
    except Exception as e:  # noqa: BLE001 -- monitoring never fails a request
        if "record" not in _warned:
            _warned.add("record")
            log.warning("recording an answer failed (%s: %s); the response is unaffected", type(e).__name__, e)


def _record(st: State, a: Answered) -> None:
    d = a.decision
    by_teacher = d.answered_by == "teacher"
    entry = st.monitor.answered(bool(d.fallback_reason and d.fallback), by_teacher, d.confidence)
    record = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": a.request_id,
        "route": a.route,
        "model": st.model_id,
        "student": a.student,
        "confidence": None if d.confidence is None else round(d.confidence, 6),
        "threshold": d.threshold,
        "answered_by": d.answered_by,
        "teacher": a.teacher if by_teacher else None,
        "shadow": False,
        "fallback_reason": d.fallback_reason,
        "teacher_error": d.teacher_error,
        "latency_ms": round((time.perf_counter() - a.t0) * 1000, 3),
    }
    traffic = st.traffic
    if traffic is not None:
        record = with_input(record, a.input, traffic.inputs)
    if st.shadow is not None and not by_teacher and a.shadow is not None and st.shadow.wanted():

        def done(answer: Any, agreed: bool | None, error: str | None) -> None:
            if agreed is not None:
                st.monitor.checked_shadow(entry, agreed)
            if traffic is not None:
                traffic.submit({**record, "teacher": answer, "shadow": True, "shadow_agrees": agreed, "shadow_error": error})

        st.shadow.submit(ShadowJob(a.shadow, done))
        return
    if traffic is not None:
        traffic.submit(record)


def record_generation(
    st: State, kind: str, rid: str, body: dict[str, Any], results: list[SeqResult], d: Decision, t0: float
) -> None:
    """Chat and completions: the request's messages (or prompt), the student's text (first choice)."""
    try:
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        value = chat_input(st, body.get("messages")) if kind == "chat" else body.get("prompt")
        student = min(results, key=lambda r: r.index).text if results else None
        teacher = answer_text(d.teacher_data, kind) if d.answered_by == "teacher" and d.teacher_data else None
        shadow = generation_shadow(st, kind, body, student)
    except Exception as e:  # noqa: BLE001 -- monitoring never fails a request
        log.warning("recording an answer failed (%s: %s); the response is unaffected", type(e).__name__, e)
        return
    record_answer(st, Answered(route, rid, value, student, d, teacher, t0, shadow))


async def close_recording(st: State) -> None:
    """Shutdown: pending shadow checks cancelled (their records written), the traffic log drained."""
    import asyncio

    if st.shadow is not None:
        await st.shadow.close()
    if st.traffic is not None:
        await asyncio.to_thread(st.traffic.close)


# ---- how a shadow check asks the teacher ----------------------------------------------------------


def predict_shadow(st: State, text: TaskInput, student_value: Any, student_error: str | None) -> ShadowCall:
    """/v1/predict: the fallback's own request; the answers compared by the task's ``same_answer``."""

    async def call(teacher: FallbackTeacher) -> tuple[Any, bool, dict[str, Any] | None]:
        data = await teacher.post("/chat/completions", teacher_body(st, text))
        value, err = teacher_value(st, data, student_error)
        task = st.artifact.task  # type: ignore[union-attr]
        agreed = not err and not student_error and task.same_answer(student_value, value)
        return value, bool(agreed), valid_usage(data.get("usage"))

    return call


def generation_shadow(st: State, kind: str, body: dict[str, Any], student_text: Any) -> ShadowCall:
    """Chat and completions: the same request body; the texts compared as the task's answers (its
    parser and ``same_answer``), or, without a task, as texts (``normalize_text``)."""
    route = "/chat/completions" if kind == "chat" else "/completions"

    async def call(teacher: FallbackTeacher) -> tuple[Any, bool, dict[str, Any] | None]:
        data = await teacher.post(route, body)
        text = answer_text(data, kind)
        return text, same_text_answer(st, student_text, text), valid_usage(data.get("usage"))

    return call


def answer_text(data: dict[str, Any], kind: str) -> Any:
    """The first choice's answer in an OpenAI response (chat: its content, or its tool calls)."""
    ch = data["choices"][0]
    if kind != "chat":
        return ch.get("text")
    msg = ch.get("message") or {}
    return msg.get("content") if msg.get("content") is not None else msg.get("tool_calls")


def same_text_answer(st: State, a: Any, b: Any) -> bool:
    task = st.artifact.task if st.artifact else None
    if not isinstance(a, str) or not isinstance(b, str):
        return a is not None and a == b
    if task is None:
        return answer_correct("generation", a, b)
    (va, ea), (vb, eb) = task.parse_answer(a), task.parse_answer(b)
    return not ea and not eb and task.same_answer(va, vb)


def chat_input(st: State, messages: Any) -> Any:
    """A chat request's messages as the task input: without the task's own system prompt."""
    task = st.artifact.task if st.artifact else None
    if task is None or not isinstance(messages, list) or not messages:
        return messages
    first = messages[0]
    if isinstance(first, dict) and first.get("role") == "system" and _text(first.get("content")) == task.instructions.strip():
        return messages[1:]
    return messages


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):  # OpenAI's content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)).strip()
    return None
