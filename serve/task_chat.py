"""Chat in the task's format: a /v1/chat/completions request that asks the served artifact's task
the way its student was trained (the task's system prompt first, then the input; for a JSON task
the task's own ``response_format`` schema, for a classification no response format) is answered
as /v1/predict answers that input: the same constraint (the labels or the schema), the task's
output budget, the same confidence (``cascade.task_answer``: label-set scores for a
classification, the weakest field of a JSON answer) and, when the student is unsure, the teacher
asked as /v1/predict asks it (the teacher's prompt, in shape). So the cascade a sweep measures on
/v1/predict is the one chat clients get. Any other chat request is plain chat, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgedistill.serve.cascade import Decision, Policy, StudentAnswer, consult_task_teacher, decision, task_answer
from edgedistill.serve.engine import GenParams, SeqResult
from edgedistill.serve.state import State
from edgedistill.serve.structured import canonical, response_schema
from edgedistill.serve.tools import ToolSpec, message_dict
from edgedistill.serve.types import ChatCompletionRequest

from edgedistill.conversation import InputError, TaskInput, check_input


@dataclass(frozen=True)
class TaskChat:
    """A chat request in the task's format: its task input (the messages after the system prompt)."""

    input: TaskInput


def task_chat(st: State, req: ChatCompletionRequest, tools: ToolSpec | None) -> TaskChat | None:
    """The request's task input when it is in the task's format, else None (plain chat). A task
    with tools is left to the tool-call route, whose prompt already is the task's."""
    task = st.artifact.task if st.artifact else None
    if task is None or task.tools or tools is not None:
        return None
    first, rest = req.messages[0], req.messages[1:]
    if first.role != "system" or first.text() != task.instructions.strip() or not rest:
        return None
    schema = response_schema(req)
    if task.structured:
        if schema is None or canonical(schema) != canonical(task.answer_schema()):
            return None
    elif schema is not None:
        return None
    if len(rest) == 1 and rest[0].role == "user" and isinstance(rest[0].content, str):
        return TaskChat(rest[0].content)
    try:
        return TaskChat(check_input([message_dict(m) for m in rest]))
    except InputError:  # not a task input (e.g. a second system message): plain chat
        return None


def task_budget(st: State, wanted: int | None, prompt_len: int) -> int:
    """The task's output budget (/v1/predict's), or less when the request asks for less, clipped to the context."""
    ob = st.artifact.task.output_budget  # type: ignore[union-attr]
    return min(ob if wanted is None else min(wanted, ob), st.engine.runner.ctx_per_slot - prompt_len)


def task_params(st: State, params: GenParams) -> GenParams:
    """The request's sampling parameters under the task's constraint, scored as /v1/predict scores."""
    return replace(params, constraint=st.task_constraint, label_trie=st.label_trie, confidence=True)


def task_confidence(st: State, results: list[SeqResult]) -> tuple[list[StudentAnswer], float, dict[str, float] | None]:
    """Each choice scored as /v1/predict scores its answer; the least confident one decides."""
    answers = [task_answer(st, r, 0) for r in results]
    weakest = min(answers, key=lambda a: a.confidence)
    return answers, weakest.confidence, weakest.fields


async def task_decide(
    st: State, chat: TaskChat, answers: list[StudentAnswer], conf: float, fields, policy: Policy, body: dict[str, Any]
) -> Decision:
    """/v1/predict's decision for the answers: an invalid one goes to the teacher whatever the
    threshold; the teacher gets the task's teacher prompt (the request's other fields kept)."""
    d = decision(st, policy, conf)
    d.fields = fields
    error = next((a.error for a in answers if a.error), None)
    d.fallback_reason = error or d.fallback_reason
    task = st.artifact.task  # type: ignore[union-attr]
    teacher_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "model")}
    teacher_body["messages"] = task.teacher_messages(chat.input)
    await consult_task_teacher(st, d, teacher_body, student_invalid=error is not None)
    return d
