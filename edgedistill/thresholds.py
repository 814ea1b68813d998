"""The cascade's threshold rule, in one place: compress (thresholds stored in an artifact's
manifest) and bench (the sweep) both choose with it.

A row goes to the teacher when its confidence is below the threshold, or always at a threshold of 1
(the server's rule; a row without a confidence is always unsure), so the fallback rate never
decreases as the threshold rises. The quality at a threshold is ``score`` over the mixed answers
(the student's where it kept the row, the teacher's where it fell back); without ``score`` the
answers are booleans (is this answer right) and the quality is their mean.

A threshold is chosen for a target with a finite-sample correction, not on the rows' point estimate:
the cascade's quality on ``n`` rows counts as ``n / (n + 1)`` of what it measured, as if one more row
had been answered wrong (conformal risk control, Angelopoulos et al., ICLR 2024: with the loss
``1 - quality`` of a row in [0, 1] and never rising as the threshold rises -- true when the teacher's
answers are the reference, as in compress -- the threshold so chosen keeps the expected quality on
new rows from the same traffic at or above the target; for a quality that is not a mean over rows,
such as micro F1, the same correction is applied as an approximation). On 118 rows a 99 % target
then needs every kept row right (117/118 measures 0.9915 but counts 0.983); a target no threshold
meets goes to the most accurate threshold, the one that falls back most on a tie: with the teacher's
answers as the reference that is 1 (always the teacher), since ``t / (1 - t)`` rows are the fewest
that can show a target ``t`` at all (99 for 99 %).

Torch-free (serve and compress import it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

Score = Callable[[list[Any]], float]

TARGETS = (0.95, 0.98, 0.99)  # the targets an artifact's manifest carries thresholds for
RECOMMENDED_TARGET = 0.99  # the one `edgedistill serve ARTIFACT` uses by default
THRESHOLD_RULE = "cheapest threshold with n/(n+1) x quality >= target (conformal risk control)"  # what reports say


def mean_ok(answers: list[Any]) -> float:
    return sum(bool(a) for a in answers) / len(answers) if answers else 0.0


def fallback_mask(threshold: float, conf: Sequence[float | None], n: int) -> list[bool]:
    """Which rows the teacher answers at ``threshold`` (the server's rule)."""
    if len(conf) != n:
        raise ValueError("student, conf and teacher must have the same length")
    if threshold >= 1.0:
        return [True] * n
    return [(0.0 if v is None else float(v)) < threshold for v in conf]  # no confidence: always unsure


def mixed_answers(
    threshold: float, student: Sequence[Any], conf: Sequence[float | None], teacher: Sequence[Any]
) -> tuple[list[Any], list[bool]]:
    """The answers the cascade serves at ``threshold`` and which rows fell back."""
    n = len(student)
    if len(teacher) != n:
        raise ValueError("student, conf and teacher must have the same length")
    fallback = fallback_mask(threshold, conf, n)
    return [t if fb else s for s, t, fb in zip(student, teacher, fallback)], fallback


def _quality_and_rate(
    threshold: float, student: Sequence[Any], conf: Sequence[float | None], teacher: Sequence[Any], score: Score | None = None
) -> tuple[float, float]:
    mixed, fallback = mixed_answers(threshold, student, conf, teacher)
    n = len(mixed)
    return (float((score or mean_ok)(mixed)) if n else 0.0), (sum(fallback) / n if n else 0.0)


def quality_and_rate(
    threshold: float, student: Sequence[Any], conf: Sequence[float | None], teacher: Sequence[Any], score: Score | None = None
) -> tuple[float, float]:
    """The cascade's quality and fallback rate at ``threshold``, each rounded to 4 decimals (so
    that ties between thresholds do not depend on float noise)."""
    acc, rate = _quality_and_rate(threshold, student, conf, teacher, score)
    return round(acc, 4), round(rate, 4)


def bounded_quality(quality: float, n: int) -> float:
    """What a quality measured on ``n`` rows counts as when a threshold is chosen: ``n / (n + 1)``
    of it (the module's docstring); 0 without rows."""
    return n * float(quality) / (n + 1) if n > 0 else 0.0


def rows_needed(target: float) -> int:
    """The fewest rows on which a perfect quality can meet ``target`` (< 1) under the correction."""
    return math.ceil(target / (1.0 - target) - 1e-9)


def unmet_note(recommended: dict[str, Any], n: int | None) -> str:
    """Why the recommended threshold is what it is when its target was not met on ``n`` rows (what
    compress, serve's startup and run's report say)."""
    target = float(recommended.get("target", RECOMMENDED_TARGET))
    need = rows_needed(target)
    why = f"at least {need} rows are needed to show it" if n is None or n < need else "no threshold reaches it there"
    return (f"the recommended target was out of reach: {n if n is not None else '?'} rows of the calibration split cannot "
            f"show the {target:g} target ({why}), so the recommended threshold is {recommended.get('threshold')}, the most "
            "accurate one there; a larger split (the spec's calibration.min_rows) or a lower target "
            "(`edgedistill serve --target 0.95`) lets the student answer more")  # fmt: skip


def candidate_thresholds(conf: Sequence[float | None]) -> list[float]:
    """One threshold per distinct outcome: 0 (nothing falls back), the midpoint between each two
    neighbouring confidences (a threshold on a row's own confidence would sit on the edge), and 1
    (everything falls back)."""
    u = sorted({min(max(float(v), 0.0), 1.0) for v in conf if v is not None})
    mids = [round((a + b) / 2, 6) for a, b in pairwise(u)]
    return sorted({0.0, 1.0, *mids})


def choose_threshold(
    student: Sequence[Any],
    conf: Sequence[float | None],
    teacher: Sequence[Any],
    target: float,
    score: Score | None = None,
    finite_sample: bool = True,
) -> tuple[float, bool]:
    """The threshold with the lowest fallback rate (hence the lowest cost) whose quality on these
    rows, counted as ``n / (n + 1)`` of it (``bounded_quality``; ``finite_sample=False``: as
    measured, for comparing with another measurement on the same rows), is at least ``target``;
    ties go to the lower threshold. When none reaches it, the most accurate one, falling back most
    on a tie (``met`` is False)."""
    n = len(student)
    if n == 0:
        return 1.0, False  # nothing shows anything: the teacher
    best: tuple[float, float] | None = None
    most: tuple[float, float, float] | None = None
    for th in candidate_thresholds(conf):
        raw, raw_rate = _quality_and_rate(th, student, conf, teacher, score)
        acc, rate = round(raw, 4), round(raw_rate, 4)
        # the correction on the unrounded quality; as measured, the rounded one (as reports give it)
        counted = bounded_quality(raw, n) if finite_sample else acc
        if counted >= target - 1e-9 and (best is None or rate < best[1]):
            best = (th, rate)
        key = (acc, rate, th)
        if most is None or key > most:
            most = key
    if best is not None:
        return best[0], True
    return (most[2] if most else 1.0), False


def target_thresholds(
    student: Sequence[Any],
    conf: Sequence[float | None],
    teacher: Sequence[Any],
    targets: Sequence[float] = TARGETS,
    score: Score | None = None,
) -> list[dict[str, Any]]:
    """For each target (a fraction of the teacher's quality on these rows), the cheapest threshold
    that reaches it (``choose_threshold``): ``{"target", "threshold", "fallback_rate", "agreement",
    "agreement_counted", "met"}`` (``agreement``: the cascade's quality there as measured;
    ``agreement_counted``: as the rule counts it, ``n / (n + 1)`` of that). A higher target never
    gets a lower threshold."""
    n = len(student)
    teacher_q = (score or mean_ok)(list(teacher)) if len(teacher) else 0.0
    out = []
    for target in sorted(targets):
        th, met = choose_threshold(student, conf, teacher, target * teacher_q, score)
        acc, rate = quality_and_rate(th, student, conf, teacher, score)
        out.append({"target": target, "threshold": round(th, 6), "fallback_rate": rate, "agreement": acc,
                    "agreement_counted": round(bounded_quality(acc, n), 4), "met": met})  # fmt: skip
    return out


CURVE_POINTS = 60  # a manifest's curve: at most about this many points (plus the targets' thresholds)


def threshold_curve(
    student: Sequence[Any],
    conf: Sequence[float | None],
    teacher: Sequence[Any],
    score: Score | None = None,
    keep: Sequence[float] = (),
    max_points: int = CURVE_POINTS,
) -> list[dict[str, float]]:
    """The cascade on these rows at the candidate thresholds, ``[{"threshold", "fallback_rate",
    "agreement"}]`` sorted by threshold (``agreement``: the quality there, the teacher's answers
    being the reference). Thinned to ``max_points`` spread evenly over the candidates (each adds at
    least one fallback row, so evenly in fallback rate), always keeping 0, 1 and the thresholds in
    ``keep`` (e.g. the targets' ones), so those are read back exactly."""
    cands = candidate_thresholds(conf)
    step = max(1, -(-len(cands) // max(max_points, 2)))  # ceil: at most max_points of them
    picked = set(cands[::step]) | {cands[-1]} | {round(float(t), 6) for t in keep}
    out = []
    for th in sorted(picked):
        agreement, rate = quality_and_rate(th, student, conf, teacher, score)
        out.append({"threshold": round(th, 6), "fallback_rate": rate, "agreement": agreement})
    return out


def curve_point_at(curve: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The curve's point that stands for ``threshold``: the one with the largest threshold at or
    below it (between two neighbouring confidences every threshold sends the same rows back, the
    server's rule ``confidence < threshold``); None for an empty curve or one starting above it."""
    below = [p for p in curve if float(p["threshold"]) <= threshold + 1e-12]
    return max(below, key=lambda p: float(p["threshold"])) if below else None
