"""The cascade sweep, offline: for each threshold, which rows the teacher would answer, the quality
that gives (the task's primary metric), the fallback rate and the cost per 1k requests; and the
cheapest threshold that reaches a target quality, chosen on one split and reported on another.

Inputs per test row: the student's own answer, its served confidence, the teacher's answer. A row
goes to the teacher when ``confidence < threshold`` or ``threshold >= 1`` -- the server's rule --
so the fallback rate and the cost never decrease as the threshold rises. The quality at a threshold
is ``score`` over the mixed answers (student's where it kept the row, teacher's where it fell back):
for the bench, the task's primary metric over (gold, answer) pairs (``Task.score``), so a metric
like slot F1 is computed over the rows as answered, not averaged per row. Without ``score``, the
answers are booleans (is this answer right) and the quality is their mean (accuracy). The quality
is reported under the key ``accuracy`` (the sweep's ``metric`` names it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from edgedistill.bench.cost import cascade_cost_per_1k, sig

from edgedistill.intervals import proportion_ci
from edgedistill.thresholds import THRESHOLD_RULE, Score, candidate_thresholds, choose_threshold, mean_ok, mixed_answers

__all__ = ["GRID", "candidate_thresholds", "choose_threshold", "point", "sweep"]  # the threshold rule lives in edgedistill.thresholds

GRID = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))

Interval = Callable[[list[Any]], list[float]]


def _wilson_ok(answers: list[Any]) -> list[float]:
    return proportion_ci(sum(bool(a) for a in answers), len(answers))


def point(
    threshold: float,
    student: Sequence[Any],
    conf: Sequence[float | None],
    teacher: Sequence[Any],
    student_cost: float | None = None,
    teacher_cost: float | None = None,
    score: Score | None = None,
    interval: Interval | None = None,
) -> dict[str, Any]:
    """Quality (``accuracy``: ``score`` over the mixed answers), fallback rate (with its 95 % Wilson
    interval ``fallback_rate_ci``) and cost per 1k of the cascade at one threshold; with ``interval``
    (the quality's 95 % interval over the mixed answers), ``accuracy_ci`` too."""
    n = len(student)
    mixed, fallback = mixed_answers(threshold, student, conf, teacher)
    acc = (score or mean_ok)(mixed) if n else 0.0
    rate = float(np.mean(fallback)) if n else 0.0
    cost = cascade_cost_per_1k(student_cost, rate, teacher_cost)
    out = {
        "threshold": round(float(threshold), 6),
        "accuracy": round(float(acc), 4),
        "fallback_rate": round(rate, 4),
        "fallback_rate_ci": proportion_ci(sum(fallback), n),
        "cost_per_1k_usd": sig(cost),
        "n": n,
    }
    if interval is not None:
        out["accuracy_ci"] = interval(mixed)
    return out


def sweep(
    splits: dict[str, tuple[Sequence[Any], Sequence[float | None], Sequence[Any]]],
    *,
    calibration_key: str,
    report_key: str,
    target: float | None,
    target_relative: float,
    student_cost: float | None,
    teacher_cost: float | None,
    score: Score | None = None,
    metric: str = "accuracy",
    interval: Interval | None = None,
    served: float | None = None,
) -> dict[str, Any]:
    """Choose the threshold on ``splits[calibration_key]``, report it on ``splits[report_key]``;
    with ``served`` (the threshold the cascade is actually served at), that one's points too
    (``served``, in the grid as well): what pareto.png marks.

    Each value is ``(student answers, confidence, teacher answers)`` per row, scored by ``score``
    (see the module's docstring); ``metric`` is the name of what ``score`` computes. Without an
    absolute ``target`` the target is ``target_relative`` times the teacher's quality on the
    calibration rows. The quality keys keep the name ``accuracy`` (``metric`` says what it is).
    The chosen threshold's points and the student's and teacher's test quality carry their 95 %
    intervals (``interval`` over answers; without ``score``, Wilson's of the booleans)."""
    sc = score or mean_ok
    ci = interval or (_wilson_ok if score is None else None)
    cal, rep = splits[calibration_key], splits[report_key]

    def of(answers: Sequence[Any]) -> float:
        return round(float(sc(list(answers))), 4) if len(answers) else 0.0

    teacher_cal_acc = of(cal[2])
    goal = target if target is not None else target_relative * teacher_cal_acc
    th, met = choose_threshold(*cal, goal, score=score)
    grid = sorted(set(GRID) | {round(th, 6)} | ({round(float(served), 6)} if served is not None else set()))
    rows = []
    for g in grid:
        rows.append(
            {
                "threshold": g,
                "calibration": point(g, *cal, student_cost, teacher_cost, score),
                "test": point(g, *rep, student_cost, teacher_cost, score),
            }
        )
    return {
        "metric": metric,
        "target_accuracy": round(goal, 4),
        "target_basis": "absolute" if target is not None else f"{target_relative:g} x teacher {metric} on the calibration split",
        "threshold_rule": THRESHOLD_RULE,
        "teacher_accuracy_calibration": teacher_cal_acc,
        "teacher_accuracy_test": of(rep[2]),
        "teacher_accuracy_test_ci": ci(list(rep[2])) if ci else None,
        "student_accuracy_test": of(rep[0]),
        "student_accuracy_test_ci": ci(list(rep[0])) if ci else None,
        "student_cost_per_1k_usd": student_cost,
        "teacher_cost_per_1k_usd": teacher_cost,
        "chosen": {
            "threshold": round(th, 6),
            "target_met_on_calibration": met,
            "calibration": point(th, *cal, student_cost, teacher_cost, score, ci),
            "test": point(th, *rep, student_cost, teacher_cost, score, ci),
        },
        "served": (
            {
                "threshold": round(float(served), 6),
                "calibration": point(served, *cal, student_cost, teacher_cost, score, ci),
                "test": point(served, *rep, student_cost, teacher_cost, score, ci),
            }
            if served is not None
            else None
        ),
        "sweep": rows,
    }
