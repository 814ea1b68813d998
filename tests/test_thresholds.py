"""The cascade's threshold rule (``edgedistill.thresholds``): a target is met on the rows counted as
n/(n+1) of what they measure (conformal risk control), so a small calibration split cannot meet a
high target by luck -- the BANKING77 demo's q4_k_m agreed with the teacher on 117 of 118 rows and
was served at threshold 0 (never asking the teacher) under the point-estimate rule."""

from __future__ import annotations

import random

import pytest

from edgedistill.thresholds import bounded_quality, choose_threshold, rows_needed, target_thresholds


def rows(n_right_sure: int, wrong_conf: list[float]) -> tuple[list[bool], list[float]]:
    """Right answers at confidence 0.99, wrong ones at the given confidences."""
    ok = [True] * n_right_sure + [False] * len(wrong_conf)
    conf = [0.99] * n_right_sure + wrong_conf
    return ok, conf


def test_one_wrong_row_in_118_does_not_meet_99_percent():
    ok, conf = rows(117, [0.95])  # measured 0.9915 at threshold 0
    teacher = [True] * len(ok)
    assert choose_threshold(ok, conf, teacher, 0.99, finite_sample=False) == (0.0, True)  # the point estimate: never ask
    th, met = choose_threshold(ok, conf, teacher, 0.99)
    assert met and 0.95 < th < 0.99  # the wrong row goes to the teacher, the sure ones stay
    assert choose_threshold(ok, conf, teacher, 0.98) == (0.0, True)  # 117/119 = 0.983: one wrong row is allowed at 98 %


def test_a_split_too_small_for_the_target_sends_everything_to_the_teacher():
    assert (rows_needed(0.99), rows_needed(0.98), rows_needed(0.95)) == (99, 49, 19)
    for n, met in ((98, False), (99, True)):
        ok, conf = rows(n, [])  # all right: still only n/(n+1)
        assert bounded_quality(1.0, n) == pytest.approx(n / (n + 1))
        assert choose_threshold(ok, conf, [True] * n, 0.99) == ((0.0, True) if met else (1.0, False))
    ok, conf = rows(38, [0.3, 0.6])
    th = target_thresholds(ok, conf, [True] * 40)
    assert [(t["target"], t["met"]) for t in th] == [(0.95, True), (0.98, False), (0.99, False)]
    # 95 %: 39/40 right counts 39/41 = 0.951, so the fairly sure wrong row (0.6) may stay
    assert (th[0]["fallback_rate"], th[0]["agreement"], th[0]["agreement_counted"]) == (0.025, 0.975, round(39 / 41, 4))
    assert all(t["threshold"] == 1.0 and t["fallback_rate"] == 1.0 for t in th[1:])  # the most accurate: always the teacher


def test_boundary_cases_are_judged_on_the_unrounded_quality():
    ok, conf = rows(297, [0.5, 0.6])  # 297/299 counts exactly 297/300 = 0.99
    assert choose_threshold(ok, conf, [True] * 299, 0.99) == (0.0, True)
    ok, conf = rows(296, [0.5, 0.6, 0.7])  # 296/299 counts 0.9867: the least sure wrong row goes to the teacher
    assert choose_threshold(ok, conf, [True] * 299, 0.99) == (0.55, True)
    assert choose_threshold([], [], [], 0.0) == (1.0, False)  # no rows show anything


def test_the_chosen_threshold_keeps_its_target_on_new_rows_on_average():
    """Simulated traffic whose true quality at every threshold is known: over many calibration
    splits of 118 rows, the rule's thresholds keep the expected quality on new rows at or above 99 %;
    the point estimate's fall below it (it meets the target by luck on about half the splits)."""

    def wrong(c: float) -> float:  # the student's chance of disagreeing, falling with its confidence (2.7 % overall)
        return 0.08 * (1 - c) ** 2

    def true_quality(t: float) -> float:  # 1 - P(kept and wrong) = 1 - integral_t^1 wrong(c) dc
        return 1.0 if t >= 1 else 1 - 0.08 * (1 - t) ** 3 / 3

    rng = random.Random(0)
    splits = []
    for _ in range(200):
        conf = [rng.random() for _ in range(118)]
        splits.append(([rng.random() >= wrong(c) for c in conf], conf))
    teacher = [True] * 118

    def mean_quality(finite_sample: bool) -> float:
        return sum(true_quality(choose_threshold(ok, conf, teacher, 0.99, finite_sample=finite_sample)[0]) for ok, conf in splits) / len(splits)

    assert true_quality(0.0) < 0.99  # the student alone misses the target
    assert mean_quality(True) >= 0.99
    assert mean_quality(False) < 0.988
