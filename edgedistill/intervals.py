"""How far a metric on ``n`` held-out rows can be trusted: 95 % intervals for every task metric,
and paired tests for two models answering the same rows. Torch-free (numpy).

The rules, the same in every stage and report:

* a per-row proportion (``accuracy``, ``exact_match``, ``name_accuracy``, agreement, a fallback
  rate) gets Wilson's score interval (:func:`edgedistill.metrics.wilson_interval`);
* every other metric (``macro_f1``, the micro F1s with their precision and recall, ``token_f1``,
  ``chrf``) a bias-corrected percentile bootstrap over rows: :data:`RESAMPLES` resamples drawn with
  the fixed seed :data:`SEED`, so the same answers give the same interval on every run and machine.
  Each resample recomputes the metric (micro counts summed, corpus chrF from summed n-gram counts;
  macro F1 over the sample's label set less the labels a resample lost every row of: scoring those
  0 would pull every resample down when there are many labels on few rows).
  An interval is widened, if ever needed, to include its estimate. Macro F1 with few rows per
  label is itself biased low and its interval too narrow: simulated (100 trials), 10 labels on
  200 rows covered the metric's mean at that size 99 % of the time, 77 labels on 200 rows 76 %;
* two models on the same rows (``diff = a - b``): for a proportion, the exact McNemar test (a
  two-sided binomial test on the rows where exactly one of them is right) with Newcombe's interval
  for a paired difference of proportions (his method 10, built from Wilson intervals); for every
  other metric a paired bootstrap (the same resampled rows for both): the percentile interval of
  the differences, and a p-value twice the smaller share of them on either side of zero (simulated
  under no difference, 10 labels on 200 rows: p < 0.05 in 2.7 % of trials for accuracy, 3.7 % for
  macro F1, i.e. both tests err on the side of "noise").

Interval ends are rounded outwards to 4 decimals, p-values to 4 significant digits; a difference
is :func:`within_noise` when its p-value is at least 0.05. An empty sample gives ``[0.0, 1.0]`` (a
difference ``[-1.0, 1.0]``, p 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from edgedistill import metrics as M

RESAMPLES = 1000
SEED = 0
ALPHA = 0.05
PROPORTIONS = frozenset({"accuracy", "exact_match", "name_accuracy"})
_CHUNK = 100  # resamples drawn at once (bounds memory on large test sets)
_NORMAL = NormalDist()


# --- data-agnostic statistics ------------------------------------------------------------------
def outward(lo: float, hi: float, digits: int = 4) -> list[float]:
    """``[lo, hi]`` rounded outwards (lo down, hi up) to ``digits`` decimals."""
    f = 10**digits
    return [math.floor(round(lo * f, 6)) / f, math.ceil(round(hi * f, 6)) / f]


def proportion_ci(successes: int, n: int) -> list[float]:
    """The 95 % Wilson interval of ``successes`` out of ``n``, as ``[low, high]``."""
    return outward(*M.wilson_interval(successes, n))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the ``b + c`` discordant pairs."""
    k, m = min(b, c), b + c
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m)


def newcombe_paired_interval(a: int, b: int, c: int, d: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of ``p1 - p2`` for paired proportions (Newcombe 1998, method 10).

    ``a``: both right, ``b``: only the first right, ``c``: only the second right, ``d``: neither."""
    n = a + b + c + d
    if n == 0:
        return (-1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = M.wilson_interval(a + b, n, z)
    l2, u2 = M.wilson_interval(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den else 0.0
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return (max(-1.0, diff - dl), min(1.0, diff + du))


@dataclass(frozen=True)
class RowStats:
    """A metric as per-row counts (``rows``, n x k) and the function of their column sums (m x k ->
    m values) that gives the metric: the metric of the sample is ``value(rows.sum(0))``."""

    rows: np.ndarray
    value: Callable[[np.ndarray], np.ndarray]

    def point(self) -> float:
        return float(self.value(self.rows.sum(axis=0, keepdims=True))[0])


def _resampled_sums(stats: Sequence[RowStats], n: int) -> Iterator[list[np.ndarray]]:
    """Column sums of each ``stats`` over the same resamples of the ``n`` rows (with replacement)."""
    rng = np.random.default_rng(SEED)
    for start in range(0, RESAMPLES, _CHUNK):
        m = min(_CHUNK, RESAMPLES - start)
        idx = rng.integers(0, n, size=(m, n))
        counts = np.bincount((idx + n * np.arange(m)[:, None]).ravel(), minlength=m * n).reshape(m, n).astype(float)
        yield [counts @ s.rows for s in stats]


def bootstrap_values(stats: RowStats) -> np.ndarray:
    """The metric on each of the :data:`RESAMPLES` fixed-seed resamples of the rows."""
    return np.concatenate([stats.value(sums[0]) for sums in _resampled_sums([stats], len(stats.rows))])


def bootstrap_interval(stats: RowStats) -> list[float]:
    """The 95 % bias-corrected percentile bootstrap interval of a metric (Efron's BC: the
    percentiles shifted by how far the resamples sit below or above the estimate), widened to
    include the estimate."""
    if not len(stats.rows):
        return [0.0, 1.0]
    values, point = bootstrap_values(stats), stats.point()
    share_below = (np.sum(values < point) + 0.5 * np.sum(values == point)) / len(values)
    z0 = _NORMAL.inv_cdf(min(max(float(share_below), 1 / len(values)), 1 - 1 / len(values)))
    z = _NORMAL.inv_cdf(1 - ALPHA / 2)
    lo, hi = np.percentile(values, [100 * _NORMAL.cdf(2 * z0 - z), 100 * _NORMAL.cdf(2 * z0 + z)])
    return outward(min(float(lo), point), max(float(hi), point))


def paired_bootstrap(a: RowStats, b: RowStats) -> tuple[float, list[float], float]:
    """(a - b, its 95 % percentile interval, two-sided p-value) over the same resampled rows."""
    n = len(a.rows)
    diff = a.point() - b.point()
    if n == 0:
        return 0.0, [-1.0, 1.0], 1.0
    d = np.concatenate([a.value(sa) - b.value(sb) for sa, sb in _resampled_sums([a, b], n)])
    lo, hi = np.percentile(d, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2.0 * (tail + 1) / (len(d) + 1))
    return diff, outward(min(float(lo), diff), max(float(hi), diff)), p


# --- the task metrics as row statistics ---------------------------------------------------------
def row_correct(task_type: str, metric: str, golds: Sequence[Any], preds: Sequence[Any]) -> list[bool]:
    """Per row, whether it counts towards a proportion metric (:data:`PROPORTIONS`)."""
    M._check(golds, preds)
    if metric == "accuracy":
        return [p is not None and p == g for g, p in zip(golds, preds)]
    if metric == "exact_match":
        return [M.answer_correct(task_type, g, p) for g, p in zip(golds, preds)]
    if metric == "name_accuracy":
        return [M.name_matches(g, p) for g, p in zip(golds, preds)]
    raise ValueError(f"{metric!r} is not a per-row proportion")


def _micro(rows: list[tuple[set[Any], set[Any] | None]], which: int) -> RowStats:
    counts = np.asarray([(*M.micro_counts(g, p), 1) for g, p in rows], dtype=float).reshape(-1, 4)

    def value(s: np.ndarray) -> np.ndarray:
        return np.asarray([M.micro_prf_from_counts(*row)[which] for row in s])

    return RowStats(counts, value)


def _macro_f1(golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None) -> RowStats:
    label_set = list(M.per_label_f1(golds, preds, labels))  # the label set macro_f1 averages over
    pos = {lab: i for i, lab in enumerate(label_set)}
    k = len(label_set)
    rows = np.zeros((len(golds), 3 * k))  # tp | fp | fn per label
    for r, (g, p) in enumerate(zip(golds, preds)):
        if p is not None and p == g:
            rows[r, pos[g]] += 1
            continue
        if g in pos:
            rows[r, 2 * k + pos[g]] += 1
        if p is not None and p in pos:
            rows[r, k + pos[p]] += 1

    seen = rows.reshape(len(golds), 3, k).sum(axis=(0, 1)) > 0  # labels with rows or predictions in the sample

    def value(s: np.ndarray) -> np.ndarray:
        tp, fp, fn = s[:, :k], s[:, k : 2 * k], s[:, 2 * k :]
        den = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
        # a label the sample has but a resample lost is left out of that resample's average (as
        # macro_f1 without a label list would), not scored 0; a listed label the sample never had stays a 0
        kept = (den > 0) | ~seen
        return np.divide((f1 * kept).sum(axis=1), kept.sum(axis=1), out=np.zeros(len(s)), where=kept.sum(axis=1) > 0)

    return RowStats(rows, value)


def _mean(values: Sequence[float]) -> RowStats:
    rows = np.asarray([(v, 1.0) for v in values], dtype=float).reshape(-1, 2)
    return RowStats(rows, lambda s: np.divide(s[:, 0], s[:, 1], out=np.zeros(len(s)), where=s[:, 1] > 0))


def row_stats(task_type: str, metric: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> RowStats:
    """A task metric (:data:`edgedistill.metrics.TYPE_METRICS`) as per-row counts; its
    :meth:`RowStats.point` equals the metric of ``edgedistill.metrics.task_scores``."""
    M._check(golds, preds)
    if metric in PROPORTIONS:
        return _mean([float(c) for c in row_correct(task_type, metric, golds, preds)])
    if metric == "macro_f1":
        return _macro_f1(golds, preds, labels)
    which = {"precision": 0, "recall": 1, "f1": 2}
    if metric.startswith("slot_"):
        return _micro(M.slot_sets(golds, preds), which[metric.removeprefix("slot_")])
    if metric.startswith("argument_"):
        return _micro(M.argument_sets(golds, preds), which[metric.removeprefix("argument_")])
    if metric == "token_f1":
        return _mean([M.row_token_f1(g, p) for g, p in zip(golds, preds)])
    if metric == "chrf":
        if not golds:
            return RowStats(np.zeros((0, 1)), lambda s: np.zeros(len(s)))
        counts, score = M.chrf_statistics(golds, preds)
        return RowStats(counts, lambda s: np.asarray([score(row) for row in s]))
    raise ValueError(f"no interval rule for metric {metric!r}")


# --- what the stages call ------------------------------------------------------------------------
def metric_interval(task_type: str, metric: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> list[float]:
    """The 95 % interval ``[low, high]`` of one task metric over parsed answers (rules: module docstring)."""
    if metric in PROPORTIONS:
        ok = row_correct(task_type, metric, golds, preds)
        return proportion_ci(sum(ok), len(ok))
    return bootstrap_interval(row_stats(task_type, metric, golds, preds, labels))


def score_intervals(task_type: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> dict[str, list[float]]:
    """``{"<metric>_ci": [low, high]}`` for every metric of the task type."""
    return {f"{m}_ci": metric_interval(task_type, m, golds, preds, labels) for m in M.type_metrics(task_type)}


def with_intervals(task_type: str, scores: dict[str, Any], golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """``scores`` (``task_scores``'s dict) with each metric's ``<metric>_ci`` placed right after it."""
    cis = score_intervals(task_type, golds, preds, labels)
    out: dict[str, Any] = {}
    for k, v in scores.items():
        out[k] = v
        if f"{k}_ci" in cis:
            out[f"{k}_ci"] = cis[f"{k}_ci"]
    return out


def agreement_ci(preds_a: Sequence[Any], preds_b: Sequence[Any]) -> list[float]:
    """The Wilson interval of :func:`edgedistill.metrics.agreement` (a per-row proportion)."""
    n = len(preds_a)
    return proportion_ci(round(M.agreement(preds_a, preds_b) * n), n)


def paired_difference(
    task_type: str, metric: str, golds: Sequence[Any], preds_a: Sequence[Any], preds_b: Sequence[Any], labels: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Model a minus model b on the same rows, for one metric: ``{"metric", "diff", "diff_ci",
    "p_value", "test", "n", "within_noise"}`` (McNemar adds ``discordant``: [only a right, only b right])."""
    M._check(golds, preds_b)
    n = M._check(golds, preds_a)
    out: dict[str, Any] = {"metric": metric}
    if metric in PROPORTIONS:
        ca, cb = row_correct(task_type, metric, golds, preds_a), row_correct(task_type, metric, golds, preds_b)
        both = sum(x and y for x, y in zip(ca, cb))
        b = sum(x and not y for x, y in zip(ca, cb))
        c = sum(y and not x for x, y in zip(ca, cb))
        diff, ci, p = (b - c) / n if n else 0.0, outward(*newcombe_paired_interval(both, b, c, n - both - b - c)), mcnemar_exact(b, c)
        out.update(test="mcnemar_exact", discordant=[b, c])
    else:
        diff, ci, p = paired_bootstrap(row_stats(task_type, metric, golds, preds_a, labels), row_stats(task_type, metric, golds, preds_b, labels))
        out["test"] = "paired_bootstrap"
    out.update(diff=round(diff, 4), diff_ci=ci, p_value=float(f"{p:.4g}"), n=n, within_noise=p >= ALPHA)
    return out


def within_noise(comparison: dict[str, Any] | None) -> bool | None:
    """Whether a :func:`paired_difference` is indistinguishable from noise (p >= 0.05); None without one."""
    if not comparison or comparison.get("p_value") is None:
        return None
    return comparison["p_value"] >= ALPHA


def fmt_ci(value: Any, ci: Any, digits: int = 3, ci_digits: int = 2, sign: str = "") -> str:
    """``"0.950 (0.91–0.97)"``: a number with its interval, for the markdown tables (``-`` when
    missing; ``sign="+"`` writes differences as ``+0.010 (-0.02–+0.04)``)."""
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        return str(value)
    def num(v: float, d: int) -> str:
        return f"{round(v, d) + 0.0:{sign}.{d}f}"  # + 0.0: what rounds to -0 prints as 0

    s = num(value, digits)
    if isinstance(ci, list | tuple) and len(ci) == 2:
        s += f" ({num(ci[0], ci_digits)}–{num(ci[1], ci_digits)})"
    return s


def fmt_difference(d: dict[str, Any] | None) -> str:
    """``"-0.010 (-0.04–+0.02), p 0.61"``: a :func:`paired_difference` for the markdown tables."""
    if not d or d.get("diff") is None:
        return "-"
    return f"{fmt_ci(d['diff'], d.get('diff_ci'), sign='+')}, {fmt_p(d['p_value'])}"


def fmt_p(p: float | None) -> str:
    """``"p 0.11"``, ``"p 1"``, ``"p < 0.001"``."""
    return "p -" if p is None else "p < 0.001" if p < 0.001 else f"p {p:.2g}"
