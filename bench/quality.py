"""Answers on the held-out test set: the task's metrics, agreement with the teacher, calibration of the
served confidence, and the calibration/report split the cascade sweep uses.

The metrics are edgedistill.metrics' (the same as ``distill`` evaluation); an answer the task's
parser rejects (not a label, not JSON) counts as wrong, and so does a failed request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgedistill.bench.client import Sample

from edgedistill.intervals import agreement_ci, proportion_ci
from edgedistill.metrics import agreement, expected_calibration_error, reliability_bins
from edgedistill.task import Task

GENERIC_PROMPTS = [
    f"Write a short story about {t}."
    for t in ("a cat", "the sea", "a robot", "a city at night", "an old map", "a lighthouse", "a violin", "the moon")
]


def messages_for(task: Task, text: str, teacher: bool) -> list[dict[str, str]]:
    """The teacher is asked as ``distill`` asks it (labels listed); every other endpoint gets the
    student's template (what the student was trained on)."""
    return task.teacher_messages(text) if teacher else task.student_messages(text)


def response_format_for(task: Task | None, edgedistill: bool, teacher: bool) -> dict[str, Any] | None:
    """An edgedistill server is asked in the task's format (the student's messages, and a JSON
    task's ``response_format``): it answers that as its /v1/predict does, with the same confidence
    (serve's task_chat), so the cascade under load is the one the sweep measures. Other endpoints
    get the messages alone, as before."""
    return task.response_format() if task is not None and edgedistill and not teacher and not task.tools else None


def load_order(n: int, seed: int) -> list[int]:
    """The test rows a load level sends, in order (cycled): a fixed-seed shuffle, so the first
    ``--requests`` rows are a sample of the test set and not its first rows (a test file sorted by
    label would otherwise load a cascade with only its easiest rows, and show no teacher calls)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def prompt_messages(task: Task | None, inputs: Sequence[str], i: int, teacher: bool) -> list[dict[str, str]]:
    """Request ``i``'s messages: the test row ``i`` (cycled); without a task, generic prompts."""
    if task is None:
        return [{"role": "user", "content": GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)]}]
    return messages_for(task, inputs[i % len(inputs)], teacher)


def parse(task: Task, s: Sample) -> Any:
    """The answer of a sample, parsed for the task (None: failed or invalid)."""
    if not s.ok:
        return None
    value, err = task.parse_answer(s.text)
    return None if err else value


def student_only(task: Any, s: Sample, predict: bool) -> Any:
    """The student's own answer from a student-only pass (``predict``: /v1/predict, whose parsed value
    the sample holds; else chat). None when failed or invalid, or when the teacher answered anyway: a
    server without the student-only mode (on /v1/predict with threshold 0 only for an invalid student
    answer; in chat for an unsure one, whose student answer is then unknown)."""
    if not s.ok or s.answered_by == "teacher":
        return None
    return s.value if predict else parse(task, s)


@dataclass
class Answers:
    """One endpoint's answers to a list of test rows, in row order."""

    preds: list[Any]
    confidences: list[float | None]
    answered_by: list[str | None]
    errors: int

    @classmethod
    def from_samples(cls, task: Any, samples: Sequence[Sample], predict: bool = False, own: bool = False) -> Answers:
        """``own``: the samples of a student-only pass (see ``student_only``); ``predict``: from
        /v1/predict (as served: the value the server parsed, the teacher's when it answered)."""
        samples = sorted(samples, key=lambda s: s.index)
        if own:
            preds = [student_only(task, s, predict) for s in samples]
        else:
            preds = [(s.value if s.ok else None) if predict else parse(task, s) for s in samples]
        return cls(
            preds,
            [s.confidence if s.ok else None for s in samples],
            [s.answered_by for s in samples],
            sum(not s.ok for s in samples),
        )


def scores(task: Any, golds: Sequence[Any], answers: Answers, teacher: Answers | None) -> dict[str, Any]:
    """Task metrics (each under its name with its 95 % interval ``<name>_ci``, and ``n``; ``metric``
    names the task's primary one, the number tables and plots use), agreement with the teacher, and
    the share the teacher answered (a cascade), each with its interval too; ``vs_teacher``: this
    endpoint minus the teacher on the primary metric over the same rows, with a paired test."""
    out: dict[str, Any] = dict(task.scores(golds, answers.preds))
    out["metric"] = task.metric
    out["errors"] = answers.errors
    out["agreement_with_teacher"] = round(agreement(answers.preds, teacher.preds), 4) if teacher is not None else None
    out["agreement_with_teacher_ci"] = agreement_ci(answers.preds, teacher.preds) if teacher is not None else None
    out["vs_teacher"] = task.compare(list(golds), answers.preds, teacher.preds) if teacher is not None else None
    routed = [a for a in answers.answered_by if a is not None]
    fell_back = sum(a == "teacher" for a in routed)
    out["fallback_rate"] = round(fell_back / len(routed), 4) if routed else None
    out["fallback_rate_ci"] = proportion_ci(fell_back, len(routed)) if routed else None
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def calibration(task: Any, golds: Sequence[Any], answers: Answers, n_bins: int = 10) -> dict[str, Any] | None:
    """ECE and reliability bins of the confidence the endpoint served, against its own answers."""
    pairs = [(c, task.is_correct(p, g)) for g, p, c in zip(golds, answers.preds, answers.confidences) if c is not None]
    if not pairs:
        return None
    conf = [c for c, _ in pairs]
    corr = [k for _, k in pairs]
    return {
        "n": len(pairs),
        "ece": round(expected_calibration_error(conf, corr, n_bins), 4),
        "mean_confidence": round(float(np.mean(conf)), 4),
        "accuracy": round(float(np.mean(corr)), 4),
        "bins": reliability_bins(conf, corr, n_bins),
    }


def split_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed half of the rows to choose on (calibration) and the other half to report on."""
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return sorted(int(i) for i in order[:half]), sorted(int(i) for i in order[half:])
