"""serve.monitor's pure functions: the served-agreement estimator (unbiased on a simulated stream
with known truth) and the population stability index."""

from __future__ import annotations

import math

import numpy as np
from edgedistill.serve.monitor import psi, served_agreement


def test_served_agreement_is_unbiased_on_a_simulated_stream():
    estimates, truths, covered = [], [], 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        n = 400
        by_teacher = rng.random(n) < 0.2  # fallbacks agree by definition
        student_agrees = rng.random(n) < 0.85
        shadowed = rng.random(n) < 0.3
        s = ~by_teacher
        truth = (by_teacher.sum() + (s & student_agrees).sum()) / n
        checked = int((s & shadowed).sum())
        agreed = int((s & shadowed & student_agrees).sum())
        est, lo, hi = served_agreement(int(by_teacher.sum()), int(s.sum()), agreed, checked)
        estimates.append(est)
        truths.append(truth)
        covered += lo <= truth <= hi
    err = np.array(estimates) - np.array(truths)
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(len(err))  # statistical, not rounding
    assert covered / len(err) >= 0.9


def test_served_agreement_edges():
    assert served_agreement(5, 0, 0, 0) == (1.0, 1.0, 1.0)
    assert all(math.isnan(v) for v in served_agreement(5, 3, 0, 0))
    assert all(math.isnan(v) for v in served_agreement(0, 0, 0, 0))


def test_psi_is_zero_for_identical_and_grows_with_shift():
    base = [10, 20, 40, 20, 10]
    assert psi(base, base) == 0.0
    assert psi(base, [2 * c for c in base]) == 0.0  # shares, not counts
    shifted = [psi(base, base[k:] + [0] * k) for k in range(1, 4)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    assert math.isnan(psi(base, [0] * 5))
