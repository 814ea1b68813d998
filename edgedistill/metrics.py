"""Task metrics shared by ``distill eval``, ``compress``, ``serve`` and ``bench``. Torch-free (numpy only).

Conventions, the same in every function:

* ``golds`` and ``preds`` are parallel sequences; a length mismatch is a ``ValueError``.
* A prediction of ``None`` is an invalid answer (unparseable output): it is always wrong and, for
  structured outputs, has no slots.
* Empty inputs give ``0.0`` for every metric (and ``n == 0``), never a ``ZeroDivisionError``.
* A ratio whose denominator is zero is ``0.0`` (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

CLASSIFICATION = "classification"
STRUCTURED = ("extraction", "tool_call")
TEXT = ("qa", "generation")

_WS = re.compile(r"\s+")


# --- normalisation -----------------------------------------------------------------------------
def _is_edge_junk(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] in "PS"


def normalize_text(text: Any) -> str:
    """Unicode NFKC, casefold, whitespace collapsed, punctuation/symbols stripped at both ends.

    ``"  Where is my CARD?! "`` -> ``"where is my card"``. Inner punctuation is kept, so
    ``"don't"`` and ``"dont"`` stay different.
    """
    s = _WS.sub(" ", unicodedata.normalize("NFKC", str(text)).casefold())
    start, end = 0, len(s)
    while start < end and _is_edge_junk(s[start]):
        start += 1
    while end > start and _is_edge_junk(s[end - 1]):
        end -= 1
    return s[start:end]


def _canon(value: Any, fold: bool = True) -> Any:
    """A JSON-ready canonical form: dict keys sorted (by json.dumps), strings stripped and casefolded
    (``fold``), integral floats made ints so ``2`` and ``2.0`` compare equal."""
    if isinstance(value, dict):
        return {str(k): _canon(v, fold) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v, fold) for v in value]
    if isinstance(value, str):
        return _WS.sub(" ", value.strip().casefold()) if fold else value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def canonical_json(value: Any, fold: bool = True) -> str:
    """One string per value up to key order (and, with ``fold``, string case/whitespace)."""
    return json.dumps(_canon(value, fold), sort_keys=True, ensure_ascii=False, default=str)


def _check(golds: Sequence[Any], preds: Sequence[Any]) -> int:
    if len(golds) != len(preds):
        raise ValueError(f"golds has {len(golds)} items but preds has {len(preds)}")
    return len(golds)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


# --- classification ----------------------------------------------------------------------------
def accuracy(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Fraction of predictions equal to the gold answer (``None`` is always wrong)."""
    n = _check(golds, preds)
    return _ratio(sum(p is not None and p == g for g, p in zip(golds, preds)), n)


def per_label_f1(golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> dict[Any, dict[str, float]]:
    """Per-label precision, recall, F1 and support, over the label set used by :func:`macro_f1`."""
    _check(golds, preds)
    if labels is None:
        # scikit-learn's unique_labels(y_true, y_pred): invalid predicted strings become classes
        # (with F1 0); None is "no answer", never a class.
        label_set = list(dict.fromkeys([g for g in golds if g is not None] + [p for p in preds if p is not None]))
    else:
        label_set = list(dict.fromkeys(list(labels) + [g for g in golds if g is not None]))
    tp = dict.fromkeys(label_set, 0)
    fp = dict.fromkeys(label_set, 0)
    fn = dict.fromkeys(label_set, 0)
    for g, p in zip(golds, preds):
        if p is not None and p == g:
            tp[g] += 1
            continue
        if g in fn:
            fn[g] += 1
        if p is not None and p in fp:  # a prediction outside the label list is just wrong
            fp[p] += 1
    out = {}
    for lab in label_set:
        prec = _ratio(tp[lab], tp[lab] + fp[lab])
        rec = _ratio(tp[lab], tp[lab] + fn[lab])
        out[lab] = {
            "precision": prec,
            "recall": rec,
            "f1": _ratio(2 * tp[lab], 2 * tp[lab] + fp[lab] + fn[lab]),
            "support": tp[lab] + fn[lab],
        }
    return out


def macro_f1(golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-label F1.

    The labels averaged over: with ``labels`` given, that list plus any gold label missing from it;
    without, the union of gold and predicted labels (scikit-learn's ``average="macro"``). A label
    with no support and no prediction has F1 0, as in scikit-learn with ``zero_division=0``; an
    invalid prediction (``None`` or a string outside ``labels``) counts as a miss of the gold label.
    """
    per = per_label_f1(golds, preds, labels)
    return _ratio(sum(v["f1"] for v in per.values()), len(per))


# --- structured outputs ------------------------------------------------------------------------
def answer_matches(gold: Any, pred: Any) -> bool:
    """One prediction equals its gold answer after normalisation (``None`` never does): dicts
    compare regardless of key order, string values stripped and casefolded; plain text answers use
    :func:`normalize_text`. ``edgedistill.task.Task.is_correct`` is this rule per task type."""
    if pred is None:
        return False
    if isinstance(gold, str) and isinstance(pred, str):
        return normalize_text(gold) == normalize_text(pred)
    return canonical_json(gold) == canonical_json(pred)


def exact_match(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Fraction of predictions that :func:`answer_matches` their gold answer."""
    n = _check(golds, preds)
    return _ratio(sum(answer_matches(g, p) for g, p in zip(golds, preds)), n)


def _slots(value: Any, prefix: str = "") -> set[tuple[str, str]]:
    """(dotted key, canonical value) pairs of a JSON object; nested objects are flattened, lists are
    one slot, and null values are no slot (same as a missing key)."""
    if not isinstance(value, dict):
        return set()
    out: set[tuple[str, str]] = set()
    for k, v in value.items():
        key = f"{prefix}{k}"
        if v is None:
            continue
        if isinstance(v, dict) and v:
            out |= _slots(v, key + ".")
        else:
            out.add((key, canonical_json(v)))
    return out


def slot_prf(golds: Sequence[Any], preds: Sequence[Any]) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over (key, normalised value) pairs, summed over all rows.
    A ``None``/non-object prediction has no slots (it lowers recall only)."""
    _check(golds, preds)
    tp = n_pred = n_gold = 0
    for g, p in zip(golds, preds):
        gs, ps = _slots(g), _slots(p)
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
    return _ratio(tp, n_pred), _ratio(tp, n_gold), _ratio(2 * tp, n_pred + n_gold)


def slot_f1(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Micro F1 over slots; see :func:`slot_prf`."""
    return slot_prf(golds, preds)[2]


# --- agreement and per-task summaries ----------------------------------------------------------
def agreement(preds_a: Sequence[Any], preds_b: Sequence[Any]) -> float:
    """Fraction of positions where two models gave the identical answer (dict key order ignored,
    strings compared exactly; two ``None`` answers do not agree)."""
    n = _check(preds_a, preds_b)
    same = sum(
        a is not None and b is not None and canonical_json(a, fold=False) == canonical_json(b, fold=False)
        for a, b in zip(preds_a, preds_b)
    )
    return _ratio(same, n)


def primary_metric(task_type: str) -> str:
    """The metric a gate or a comparison uses for a task type."""
    return "accuracy" if task_type == CLASSIFICATION else "exact_match"


def task_scores(
    task_type: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None
) -> dict[str, float | int]:
    """All the metrics of a task type, plus ``n``.

    classification: accuracy, macro_f1; extraction/tool_call: exact_match, slot_f1, slot_precision,
    slot_recall; qa/generation: exact_match (normalised text).
    """
    n = _check(golds, preds)
    if task_type == CLASSIFICATION:
        return {"accuracy": accuracy(golds, preds), "macro_f1": macro_f1(golds, preds, labels), "n": n}
    if task_type in STRUCTURED:
        p, r, f = slot_prf(golds, preds)
        return {"exact_match": exact_match(golds, preds), "slot_f1": f, "slot_precision": p, "slot_recall": r, "n": n}
    if task_type in TEXT:
        return {"exact_match": exact_match(golds, preds), "n": n}
    raise ValueError(f"unknown task type {task_type!r}")


# --- calibration -------------------------------------------------------------------------------
def _calibration_arrays(
    confidences: Sequence[float], correct: Sequence[Any], n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    conf = np.clip(np.asarray(confidences, dtype=float).reshape(-1), 0.0, 1.0)
    corr = np.asarray(correct, dtype=float).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f"confidences has {conf.size} items but correct has {corr.size}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi], the first one [0, hi]: searchsorted(side="left") on the inner edges.
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    return conf, corr, idx


def reliability_bins(confidences: Sequence[float], correct: Sequence[Any], n_bins: int = 10) -> list[dict[str, float | int]]:
    """Equal-width confidence bins for a reliability diagram: for each bin its bounds ``lo``/``hi``,
    ``count``, mean ``confidence`` and ``accuracy`` (both 0.0 for an empty bin; see ``count``)."""
    conf, corr, idx = _calibration_arrays(confidences, correct, n_bins)
    out = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": count,
                "confidence": float(conf[mask].mean()) if count else 0.0,
                "accuracy": float(corr[mask].mean()) if count else 0.0,
            }
        )
    return out


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[Any], n_bins: int = 10) -> float:
    """ECE: the count-weighted mean of |accuracy - mean confidence| over equal-width bins."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    return _ratio(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins), total)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
