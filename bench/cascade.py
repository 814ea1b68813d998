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
from itertools import pairwise
from typing import Any

import numpy as np
from edgedistill.bench.cost import cascade_cost_per_1k, sig

from edgedistill.intervals import proportion_ci

GRID = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))


Score = Callable[[list[Any]], float]
Interval = Callable[[list[Any]], list[float]]


def _mean_ok(answers: list[Any]) -> float:
    return float(np.mean(np.asarray(answers, dtype=bool))) if answers else 0.0


def _wilson_ok(answers: list[Any]) -> list[float]:
    return proportion_ci(sum(bool(a) for a in answers), len(answers))


def _fallback(threshold: float, conf: Sequence[float | None], n: int) -> list[bool]:
    if len(conf) != n:
        raise ValueError("student, conf and teacher must have the same length")
    if threshold >= 1.0:
        return [True] * n
    return [(0.0 if v is None else float(v)) < threshold for v in conf]  # no confidence: always unsure


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
    if len(teacher) != n:
        raise ValueError("student, conf and teacher must have the same length")
    fallback = _fallback(threshold, conf, n)
    mixed = [t if fb else s for s, t, fb in zip(student, teacher, fallback)]
    acc = (score or _mean_ok)(mixed) if n else 0.0
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


def candidate_thresholds(conf: Sequence[float | None]) -> list[float]:
    """One threshold per distinct outcome: 0 (nothing falls back), the midpoint between each two
    neighbouring confidences (a threshold on a row's own confidence would sit on the edge), and 1
    (everything falls back)."""
    u = sorted({min(max(float(v), 0.0), 1.0) for v in conf if v is not None})
    mids = [round((a + b) / 2, 6) for a, b in pairwise(u)]
    return sorted({0.0, 1.0, *mids})


def choose_threshold(
    student: Sequence[Any], conf: Sequence[float | None], teacher: Sequence[Any], target: float, score: Score | None = None
) -> tuple[float, bool]:
    """The threshold with the lowest fallback rate (hence the lowest cost) whose quality on these
    rows is at least ``target``; ties go to the lower threshold. When no threshold reaches it, the
    best one (``met`` is False)."""
    best: tuple[float, float] | None = None
    most: tuple[float, float, float] | None = None
    for th in candidate_thresholds(conf):
        p = point(th, student, conf, teacher, score=score)
        if p["accuracy"] >= target - 1e-12 and (best is None or p["fallback_rate"] < best[1]):
            best = (th, p["fallback_rate"])
        key = (p["accuracy"], -p["fallback_rate"], -th)
        if most is None or key > most:
            most = key
    if best is not None:
        return best[0], True
    return (-most[2] if most else 1.0), False


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
) -> dict[str, Any]:
    """Choose the threshold on ``splits[calibration_key]``, report it on ``splits[report_key]``.

    Each value is ``(student answers, confidence, teacher answers)`` per row, scored by ``score``
    (see the module's docstring); ``metric`` is the name of what ``score`` computes. Without an
    absolute ``target`` the target is ``target_relative`` times the teacher's quality on the
    calibration rows. The quality keys keep the name ``accuracy`` (``metric`` says what it is).
    The chosen threshold's points and the student's and teacher's test quality carry their 95 %
    intervals (``interval`` over answers; without ``score``, Wilson's of the booleans)."""
    sc = score or _mean_ok
    ci = interval or (_wilson_ok if score is None else None)
    cal, rep = splits[calibration_key], splits[report_key]

    def of(answers: Sequence[Any]) -> float:
        return round(float(sc(list(answers))), 4) if len(answers) else 0.0

    teacher_cal_acc = of(cal[2])
    goal = target if target is not None else target_relative * teacher_cal_acc
    th, met = choose_threshold(*cal, goal, score=score)
    grid = sorted(set(GRID) | {round(th, 6)})
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
        "sweep": rows,
    }
