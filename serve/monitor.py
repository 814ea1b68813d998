"""Live monitoring of the cascade: how often it falls back, how far the student's confidence has
drifted from the calibration split's, and how often the SERVED answers agree with the teacher.

The estimator and the drift score are small pure functions (``served_agreement``, ``psi``,
``histogram_counts``); ``LiveMonitor`` keeps the sliding windows a server feeds them and sets the
``/metrics`` gauges.

The agreement of the served answers is estimated by stratum: an answer the teacher gave agrees
with the teacher by definition; the student's answers are estimated from the shadow checks, a
random sample of them (``serve --shadow-rate P``) that the teacher also answered. Given how many
were checked, the checked ones are a simple random sample of the student's answers, so their
agreement rate is an unbiased estimate of all the student's answers', and the served estimate
``(T + S * a / k) / (T + S)`` is unbiased too.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from edgedistill.serve.metrics import Metrics

from edgedistill.intervals import proportion_ci

FALLBACK_WINDOW = 500  # recent answers behind edgedistill_fallback_rate
CONFIDENCE_WINDOW = 500  # recent confidences behind edgedistill_confidence_drift
AGREEMENT_WINDOW = 5000  # recent answers behind edgedistill_shadow_agreement (the shadows are a sample of them)
PSI_FLOOR = 1e-4  # an empty bin's share, so that log(0) never happens


def served_agreement(teacher: int, student: int, agreed: int, checked: int) -> tuple[float, float, float]:
    """(estimate, low, high): the agreement with the teacher of ``teacher + student`` served answers,
    ``teacher`` of them the teacher's (agreeing by definition), ``student`` the student's, of which
    ``checked`` were shadow-checked and ``agreed`` agreed. The interval is the 95 % Wilson interval
    of the shadows' agreement, weighted by the student's share. NaN where nothing tells: no answers,
    or student answers but no check yet."""
    n = teacher + student
    if n == 0 or not 0 <= agreed <= checked or (student and not checked):
        return math.nan, math.nan, math.nan
    if student == 0:
        return 1.0, 1.0, 1.0
    lo, hi = proportion_ci(agreed, checked)
    return (teacher + student * agreed / checked) / n, (teacher + student * lo) / n, (teacher + student * hi) / n


def histogram_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the bins ``edges`` make (``[e0, e1), ..., [e_{k-1}, e_k]``; values
    outside go to the first or last bin)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[bin_index(v, edges)] += 1
    return counts


def bin_index(value: float, edges: Sequence[float]) -> int:
    return min(max(bisect.bisect_right(edges, value) - 1, 0), len(edges) - 2)


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """The population stability index of ``actual`` against ``expected`` (counts or shares per bin):
    ``sum((a - e) * ln(a / e))`` over the bins' shares, an empty bin counted as ``floor``. 0 for
    the same distribution; it grows with the shift (0.1: some, 0.25: a large one, by the usual rule
    of thumb). NaN when either side is empty."""
    if len(expected) != len(actual):
        raise ValueError(f"psi: {len(expected)} expected bins but {len(actual)} actual ones")
    te, ta = sum(expected), sum(actual)
    if te <= 0 or ta <= 0:
        return math.nan
    total = 0.0
    for e, a in zip(expected, actual):
        pe, pa = max(e / te, floor), max(a / ta, floor)
        total += (pa - pe) * math.log(pa / pe)
    return total


def reference_histogram(calibration: dict) -> tuple[list[float], list[int]] | None:
    """The calibration split's ``confidence_histogram`` (``edges``, ``counts``) from a manifest's
    calibration block, or None when it has none (or a malformed one)."""
    h = calibration.get("confidence_histogram") if isinstance(calibration, dict) else None
    if not isinstance(h, dict):
        return None
    edges, counts = h.get("edges"), h.get("counts")
    ok = (
        isinstance(edges, list)
        and isinstance(counts, list)
        and len(edges) == len(counts) + 1
        and len(counts) >= 1
        and all(isinstance(e, int | float) for e in edges)
        and all(isinstance(c, int | float) and c >= 0 for c in counts)
        and all(a < b for a, b in itertools.pairwise(edges))
        and sum(counts) > 0
    )
    return ([float(e) for e in edges], [int(c) for c in counts]) if ok else None


@dataclass
class Served:
    """One answer in the agreement window: who answered, and a shadow check's verdict once known."""

    by_teacher: bool
    agreed: bool | None = None
    in_window: bool = True


class LiveMonitor:
    """The sliding windows behind the live gauges, fed one answer at a time on the event loop."""

    def __init__(self, metrics: Metrics, calibration: dict):
        self.metrics = metrics
        self.reference = reference_histogram(calibration)
        self.fallbacks: deque[bool] = deque(maxlen=FALLBACK_WINDOW)
        self.confidences: deque[int] = deque(maxlen=CONFIDENCE_WINDOW)  # bin indexes
        self.bins = [0] * (len(self.reference[0]) - 1) if self.reference else []
        self.served: deque[Served] = deque()
        self.teacher = self.student = self.agreed = self.checked = 0

    def answered(self, sent_to_teacher: bool, by_teacher: bool, confidence: float | None) -> Served:
        """Count one answer; returns its agreement entry, for a shadow check to fill in later."""
        self.fallbacks.append(sent_to_teacher)
        self.metrics.fallback_rate.set(sum(self.fallbacks) / len(self.fallbacks))
        if confidence is not None and self.reference is not None:
            if len(self.confidences) == CONFIDENCE_WINDOW:
                self.bins[self.confidences[0]] -= 1
            i = bin_index(confidence, self.reference[0])
            self.confidences.append(i)
            self.bins[i] += 1
            self.metrics.confidence_drift.set(psi(self.reference[1], self.bins))
        entry = Served(by_teacher)
        self.served.append(entry)
        if by_teacher:
            self.teacher += 1
        else:
            self.student += 1
        if len(self.served) > AGREEMENT_WINDOW:
            self._forget(self.served.popleft())
        self._publish()
        return entry

    def checked_shadow(self, entry: Served, agreed: bool) -> None:
        """A shadow check's verdict on a student answer (ignored once it has left the window)."""
        if not entry.in_window or entry.agreed is not None:
            return
        entry.agreed = agreed
        self.checked += 1
        self.agreed += agreed
        self._publish()

    def _forget(self, e: Served) -> None:
        e.in_window = False
        if e.by_teacher:
            self.teacher -= 1
        else:
            self.student -= 1
        if e.agreed is not None:
            self.checked -= 1
            self.agreed -= e.agreed

    def _publish(self) -> None:
        for bound, v in zip(("estimate", "low", "high"), served_agreement(self.teacher, self.student, self.agreed, self.checked)):
            self.metrics.shadow_agreement.labels(bound).set(v)
