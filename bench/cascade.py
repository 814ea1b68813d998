"""The cascade sweep, offline: for each threshold, which rows the teacher would answer, the accuracy
that gives, the fallback rate and the cost per 1k requests; and the cheapest threshold that reaches
a target accuracy, chosen on one split and reported on another.

Inputs per test row: is the student's own answer right, its served confidence, is the teacher's
answer right. A row goes to the teacher when ``confidence < threshold`` or ``threshold >= 1`` --
the server's rule -- so the fallback rate and the cost never decrease as the threshold rises.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
from edgedistill.bench.cost import cascade_cost_per_1k, sig

GRID = tuple(round(x, 2) for x in np.linspace(0.0, 1.0, 21))


def _arrays(student_ok: Sequence[bool], conf: Sequence[float | None], teacher_ok: Sequence[bool]):
    s = np.asarray(student_ok, dtype=bool)
    c = np.asarray([0.0 if v is None else v for v in conf], dtype=float)  # no confidence: always unsure
    t = np.asarray(teacher_ok, dtype=bool)
    if not s.shape == c.shape == t.shape:
        raise ValueError("student_ok, conf and teacher_ok must have the same length")
    return s, c, t


def point(
    threshold: float,
    student_ok: Sequence[bool],
    conf: Sequence[float | None],
    teacher_ok: Sequence[bool],
    student_cost: float | None = None,
    teacher_cost: float | None = None,
) -> dict[str, Any]:
    """Accuracy, fallback rate and cost per 1k of the cascade at one threshold."""
    s, c, t = _arrays(student_ok, conf, teacher_ok)
    n = len(s)
    fallback = np.ones(n, dtype=bool) if threshold >= 1.0 else c < threshold
    acc = float(np.where(fallback, t, s).mean()) if n else 0.0
    rate = float(fallback.mean()) if n else 0.0
    cost = cascade_cost_per_1k(student_cost, rate, teacher_cost)
    return {
        "threshold": round(float(threshold), 6),
        "accuracy": round(acc, 4),
        "fallback_rate": round(rate, 4),
        "cost_per_1k_usd": sig(cost),
        "n": n,
    }


def candidate_thresholds(conf: Sequence[float | None]) -> list[float]:
    """One threshold per distinct outcome: 0 (nothing falls back), the midpoint between each two
    neighbouring confidences (a threshold on a row's own confidence would sit on the edge), and 1
    (everything falls back)."""
    u = sorted({min(max(float(v), 0.0), 1.0) for v in conf if v is not None})
    mids = [round((a + b) / 2, 6) for a, b in pairwise(u)]
    return sorted({0.0, 1.0, *mids})


def choose_threshold(
    student_ok: Sequence[bool], conf: Sequence[float | None], teacher_ok: Sequence[bool], target: float
) -> tuple[float, bool]:
    """The threshold with the lowest fallback rate (hence the lowest cost) whose accuracy on these
    rows is at least ``target``; ties go to the lower threshold. When no threshold reaches it, the
    most accurate one (``met`` is False)."""
    best: tuple[float, float] | None = None
    most: tuple[float, float, float] | None = None
    for th in candidate_thresholds(conf):
        p = point(th, student_ok, conf, teacher_ok)
        if p["accuracy"] >= target - 1e-12 and (best is None or p["fallback_rate"] < best[1]):
            best = (th, p["fallback_rate"])
        key = (p["accuracy"], -p["fallback_rate"], -th)
        if most is None or key > most:
            most = key
    if best is not None:
        return best[0], True
    return (-most[2] if most else 1.0), False


def sweep(
    splits: dict[str, tuple[Sequence[bool], Sequence[float | None], Sequence[bool]]],
    *,
    calibration_key: str,
    report_key: str,
    target: float | None,
    target_relative: float,
    student_cost: float | None,
    teacher_cost: float | None,
) -> dict[str, Any]:
    """Choose the threshold on ``splits[calibration_key]``, report it on ``splits[report_key]``.

    Each value is ``(student_ok, confidence, teacher_ok)`` per row. Without an absolute ``target``
    the target is ``target_relative`` times the teacher's accuracy on the calibration rows.
    """
    cal, rep = splits[calibration_key], splits[report_key]
    teacher_cal_acc = float(np.mean(cal[2])) if len(cal[2]) else 0.0
    goal = target if target is not None else target_relative * teacher_cal_acc
    th, met = choose_threshold(*cal, goal)
    grid = sorted(set(GRID) | {round(th, 6)})
    rows = []
    for g in grid:
        rows.append(
            {
                "threshold": g,
                "calibration": point(g, *cal, student_cost, teacher_cost),
                "test": point(g, *rep, student_cost, teacher_cost),
            }
        )
    return {
        "target_accuracy": round(goal, 4),
        "target_basis": "absolute" if target is not None else f"{target_relative:g} x teacher accuracy on the calibration split",
        "teacher_accuracy_calibration": round(teacher_cal_acc, 4),
        "teacher_accuracy_test": round(float(np.mean(rep[2])), 4) if len(rep[2]) else 0.0,
        "student_accuracy_test": round(float(np.mean(rep[0])), 4) if len(rep[0]) else 0.0,
        "student_cost_per_1k_usd": student_cost,
        "teacher_cost_per_1k_usd": teacher_cost,
        "chosen": {
            "threshold": round(th, 6),
            "target_met_on_calibration": met,
            "calibration": point(th, *cal, student_cost, teacher_cost),
            "test": point(th, *rep, student_cost, teacher_cost),
        },
        "sweep": rows,
    }
