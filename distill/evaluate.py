"""Scoring models on the held-out test set: teacher vs student vs the undistilled student, each
answer decoded under the task's constraint (:func:`answer_requests`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgedistill.distill.teacher import ChatRequest, Teacher

from edgedistill.intervals import agreement_ci, fmt_ci, fmt_difference, fmt_p, within_noise
from edgedistill.metrics import agreement
from edgedistill.task import Messages, Task


def answer_requests(task: Task, inputs: list[str], messages_fn: Callable[[str], Messages]) -> list[ChatRequest]:
    """Greedy answer requests for each input, in the given prompt format (``task.teacher_messages``
    or ``task.student_messages``), within the task's output budget, in the task's answer shape: a
    local model (the student, the undistilled student, a local teacher) decodes under the task's
    constraint as serve does, so the scores are what the served model delivers; an API teacher is
    sent the schema as response_format (``teacher_api``)."""
    return [ChatRequest(messages=messages_fn(x), max_tokens=task.output_budget, temperature=0.0, constrain_to=task) for x in inputs]


def decoded_as(model: Teacher, reqs: list[ChatRequest]) -> str:
    """How a model's answers were asked for: ``"constraint"`` (decoded under the task's constraint),
    ``"response_format"`` (an API sent the schema) or ``"prompt"`` (the prompt alone)."""
    fmt = model.answer_format(reqs[0]) if reqs else {}
    return "constraint" if "constraint" in fmt else "response_format" if "response_format" in fmt else "prompt"


def add_agreement(scores: dict[str, Any], preds: list[Any], teacher_preds: list[Any]) -> None:
    scores["agreement_with_teacher"] = agreement(preds, teacher_preds)
    scores["agreement_with_teacher_ci"] = agreement_ci(preds, teacher_preds)


def add_vs_teacher(task: Task, scores: dict[str, Any], golds: list[Any], preds: list[Any], teacher_preds: list[Any]) -> None:
    """``vs_teacher``: this model minus the teacher on the same rows, on the task's primary metric,
    with its 95 % interval and a paired test (``Task.compare``)."""
    scores["vs_teacher"] = task.compare(golds, preds, teacher_preds)


def table_markdown(spec: Any, results: dict[str, dict[str, Any]]) -> str:
    """A readable markdown table of the evaluation, one row per model: each metric with its 95 %
    interval, the difference from the teacher on the primary metric (a paired test), and ``n``;
    then a line saying which differences are within noise."""
    keys = list(dict.fromkeys(k for s in results.values() for k, v in s.items() if isinstance(v, float)))
    main = spec.task.metric
    keys = [main] + [k for k in keys if k != main]
    head = "| model | params | " + " | ".join(keys) + f" | {main} vs teacher | invalid | n |"
    sep = "|" + "---|" * (len(keys) + 5)
    lines = [head, sep]
    for name, s in results.items():
        params = f"{s['params'] / 1e6:.1f}M" if s.get("params") else "-"
        vals = " | ".join(fmt_ci(s[k], s.get(f"{k}_ci")) if isinstance(s.get(k), float) else "-" for k in keys)
        lines.append(f"| {name} | {params} | {vals} | {fmt_difference(s.get('vs_teacher'))} | {s.get('invalid_answers', '-')} | {s.get('n', '-')} |")
    return "\n".join(lines) + "\n" + noise_note(results, main)


def noise_note(results: dict[str, dict[str, Any]], metric: str) -> str:
    """One line: which models' differences from the teacher are within noise (p >= 0.05)."""
    cmp = {name: s["vs_teacher"] for name, s in results.items() if s.get("vs_teacher")}
    if not cmp:
        return ""
    said = [f"{name} {d['diff']:+.3f} ({'within noise' if within_noise(d) else 'a real difference'}, {fmt_p(d['p_value'])})"
            for name, d in cmp.items()]
    test = ", ".join(dict.fromkeys(d["test"].replace("_", " ") for d in cmp.values()))
    return (f"\nIn parentheses: 95 % intervals (Wilson for proportions, bootstrap otherwise). {metric} vs the teacher on the "
            f"same rows ({test}): {'; '.join(said)}.\n")
