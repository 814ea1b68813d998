"""Task metrics shared by ``distill eval``, ``compress``, ``serve`` and ``bench``. Torch-free (numpy only).

Conventions, the same in every function:

* ``golds`` and ``preds`` are parallel sequences; a length mismatch is a ``ValueError``.
* A prediction of ``None`` is an invalid answer (unparseable output): it is always wrong and, for
  structured outputs, has no slots.
* Empty inputs give ``0.0`` for every metric (and ``n == 0``), never a ``ZeroDivisionError``.
* A ratio whose denominator is zero is ``0.0`` (scikit-learn's ``zero_division=0``), except the
  micro F1s (slots, arguments) of rows that have nothing to extract and were answered with nothing:
  that is a perfect answer, ``1.0``.

Each task type has its metrics (:data:`TYPE_METRICS`), the first being the primary one a gate or a
comparison uses unless the task spec chooses another of the list (``edgedistill.task.Task.metric``):

* classification: ``accuracy``, ``macro_f1``;
* extraction: micro ``slot_f1`` with ``slot_precision`` and ``slot_recall``, ``exact_match`` of the object;
* tool_call: ``exact_match`` of the whole call, ``name_accuracy``, micro ``argument_f1`` (with precision
  and recall); a call is ``{"name": ..., "arguments": {...}}`` and "no call" is ``{}`` (or a null name);
* qa: ``token_f1`` and ``exact_match``, both after SQuAD's answer normalisation;
* generation: ``chrf`` (sacrebleu's corpus chrF, divided by 100) and ``exact_match``.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

CLASSIFICATION = "classification"
STRUCTURED = ("extraction", "tool_call")
TEXT = ("qa", "generation")
TYPE_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "extraction": ("slot_f1", "slot_precision", "slot_recall", "exact_match"),
    "tool_call": ("exact_match", "name_accuracy", "argument_f1", "argument_precision", "argument_recall"),
    "qa": ("token_f1", "exact_match"),
    "generation": ("chrf", "exact_match"),
}

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


def _micro_prf(rows: Iterable[tuple[set[Any], set[Any] | None]]) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over (gold items, predicted items) per row; predicted ``None``
    is an invalid answer: no items, and on a row with nothing to find it is one false positive (it
    is never a right answer). Rows that have nothing to find, all answered with nothing: 1.0."""
    tp = n_pred = n_gold = n = 0
    for gs, ps in rows:
        n += 1
        t, np_, ng = micro_counts(gs, ps)
        tp, n_pred, n_gold = tp + t, n_pred + np_, n_gold + ng
    return micro_prf_from_counts(tp, n_pred, n_gold, n)


def micro_counts(gs: set[Any], ps: set[Any] | None) -> tuple[int, int, int]:
    """One row's (true positives, predicted items, gold items) under :func:`_micro_prf`'s rules."""
    if ps is None:
        return 0, 0 if gs else 1, len(gs)
    return len(gs & ps), len(ps), len(gs)


def micro_prf_from_counts(tp: float, n_pred: float, n_gold: float, n: float) -> tuple[float, float, float]:
    """Micro precision, recall and F1 from counts summed over ``n`` rows (see :func:`_micro_prf`)."""
    if n and not n_pred and not n_gold:
        return 1.0, 1.0, 1.0
    return _ratio(tp, n_pred), _ratio(tp, n_gold), _ratio(2 * tp, n_pred + n_gold)


def slot_prf(golds: Sequence[Any], preds: Sequence[Any]) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over (key, normalised value) pairs, summed over all rows.

    An input with nothing to extract counts: an empty object is right (it adds no error), an
    invented field is a false positive. An invalid (``None``/non-object) prediction has no slots:
    it lowers recall, and on a row with nothing to extract it is a false positive."""
    return _micro_prf(slot_sets(golds, preds))


def slot_sets(golds: Sequence[Any], preds: Sequence[Any]) -> list[tuple[set[Any], set[Any] | None]]:
    """Per row, (gold slots, predicted slots or None for an invalid answer): what :func:`slot_prf` counts."""
    _check(golds, preds)
    return [(_slots(g), _slots(p) if isinstance(p, dict) else None) for g, p in zip(golds, preds)]


def slot_f1(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Micro F1 over slots; see :func:`slot_prf`."""
    return slot_prf(golds, preds)[2]


# --- tool calls --------------------------------------------------------------------------------
def _call(value: Any) -> dict[str, Any] | None:
    """A tool-call answer in canonical form: ``{"name", "arguments"}`` for a call (arguments given
    as a JSON string, as OpenAI's ``tool_calls`` carry them, are parsed), ``{}`` for "no call" (an
    empty object or a null/empty name); None for a value that is not an object. Other keys are
    ignored."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if name is None or (isinstance(name, str) and not name.strip()):
        return {}
    args = value.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return {"name": str(name).strip(), "arguments": {} if args is None else args}


def call_matches(gold: Any, pred: Any) -> bool:
    """The whole call is right: the same function and the same arguments, normalised as
    :func:`answer_matches` does (key order, string case and whitespace, ``2 == 2.0``); a "no call"
    gold is matched by a "no call" answer."""
    g, p = _call(gold), _call(pred)
    return g is not None and p is not None and canonical_json(g) == canonical_json(p)


def name_accuracy(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Fraction of answers that call the gold function (case-insensitive), or make no call where the gold makes none."""
    n = _check(golds, preds)
    return _ratio(sum(name_matches(g, p) for g, p in zip(golds, preds)), n)


def name_matches(gold: Any, pred: Any) -> bool:
    """The answer calls the gold function (case-insensitive), or makes no call where the gold makes none."""
    g, p = _call(gold), _call(pred)
    return g is not None and p is not None and canonical_json(g.get("name")) == canonical_json(p.get("name"))


def argument_prf(golds: Sequence[Any], preds: Sequence[Any]) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over (argument, normalised value) pairs of the calls, as
    :func:`slot_prf` (a "no call" has no arguments; arguments of a call nobody asked for are false positives)."""
    return _micro_prf(argument_sets(golds, preds))


def argument_sets(golds: Sequence[Any], preds: Sequence[Any]) -> list[tuple[set[Any], set[Any] | None]]:
    """Per row, (gold arguments, predicted arguments or None for an invalid answer): what :func:`argument_prf` counts."""
    _check(golds, preds)
    rows = []
    for g, p in zip(golds, preds):
        gc, pc = _call(g), _call(p)
        rows.append((_slots((gc or {}).get("arguments")), None if pc is None else _slots(pc.get("arguments"))))
    return rows


# --- qa: SQuAD's answer normalisation and token F1 ---------------------------------------------
# The logic of the official SQuAD evaluation script (evaluate-v2.0.py, Rajpurkar et al.):
# normalize_answer, compute_exact and compute_f1, an empty answer scoring 1 only against an empty gold.
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def squad_normalize(text: Any) -> str:
    """Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed (SQuAD's ``normalize_answer``)."""
    s = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def qa_matches(gold: Any, pred: Any) -> bool:
    """SQuAD's exact match: equal after :func:`squad_normalize` (``None`` never matches)."""
    return pred is not None and squad_normalize(gold) == squad_normalize(pred)


def row_token_f1(gold: Any, pred: Any) -> float:
    """One row's SQuAD token F1 (``None`` scores 0)."""
    if pred is None:
        return 0.0
    g, p = squad_normalize(gold).split(), squad_normalize(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Mean over rows of SQuAD's token F1 (bag-of-tokens overlap after :func:`squad_normalize`)."""
    n = _check(golds, preds)
    return _ratio(sum(row_token_f1(g, p) for g, p in zip(golds, preds)), n)


# --- generation: chrF --------------------------------------------------------------------------
def chrf(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """sacrebleu's corpus-level chrF (character n-gram F-score, Popović 2015; default settings),
    divided by 100 so it lies in [0, 1] like every other metric; ``None`` is an empty answer."""
    n = _check(golds, preds)
    if not n:
        return 0.0
    hyps = ["" if p is None else str(p) for p in preds]
    return float(_chrf_metric().corpus_score(hyps, [[str(g) for g in golds]]).score) / 100.0


def _chrf_metric() -> Any:
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        from edgedistill.errors import UserError

        raise UserError("generation's metric chrF needs sacrebleu: pip install 'edgedistill[distill]' (or pip install sacrebleu)") from None
    return CHRF()


def chrf_statistics(golds: Sequence[Any], preds: Sequence[Any]) -> tuple[np.ndarray, Callable[[Sequence[float]], float]]:
    """Per row, sacrebleu's chrF n-gram counts (hypothesis, reference, matched, per order), and the
    function that turns counts summed over rows into the corpus chrF (/ 100): :func:`chrf` is that
    function of all rows' sums, so a bootstrap can resample rows without re-tokenising them."""
    _check(golds, preds)
    metric = _chrf_metric()
    hyps = ["" if p is None else str(p) for p in preds]
    stats = metric._extract_corpus_statistics(hyps, [[str(g) for g in golds]])
    return np.asarray(stats, dtype=float).reshape(len(hyps), -1), lambda sums: float(metric._compute_f_score(list(sums))) / 100.0


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


def type_metrics(task_type: str) -> tuple[str, ...]:
    """The metrics of a task type, the primary one first."""
    if task_type not in TYPE_METRICS:
        raise ValueError(f"unknown task type {task_type!r}")
    return TYPE_METRICS[task_type]


def primary_metric(task_type: str) -> str:
    """The metric a gate or a comparison uses for a task type unless the spec chooses another of
    :func:`type_metrics` (stages ask ``Task.metric``, which knows the spec's choice)."""
    return type_metrics(task_type)[0]


def answer_correct(task_type: str, gold: Any, pred: Any) -> bool:
    """One answer is right, per task type (``Task.is_correct``; ``None`` never is): classification,
    the same label; extraction and generation, :func:`answer_matches`; tool_call,
    :func:`call_matches`; qa, SQuAD's exact match (:func:`qa_matches`)."""
    if pred is None:
        return False
    if task_type == CLASSIFICATION:
        return pred == gold
    if task_type == "tool_call":
        return call_matches(gold, pred)
    if task_type == "qa":
        return qa_matches(gold, pred)
    return answer_matches(gold, pred)


def task_scores(
    task_type: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None
) -> dict[str, float | int]:
    """All the metrics of a task type (:data:`TYPE_METRICS`, in that order), plus ``n``. Every
    type's ``exact_match`` is the mean of :func:`answer_correct`."""
    n = _check(golds, preds)
    names = type_metrics(task_type)
    if task_type == CLASSIFICATION:
        return {"accuracy": accuracy(golds, preds), "macro_f1": macro_f1(golds, preds, labels), "n": n}
    out: dict[str, float | int] = {}
    em = _ratio(sum(answer_correct(task_type, g, p) for g, p in zip(golds, preds)), n)
    if task_type == "extraction":
        p, r, f = slot_prf(golds, preds)
        out = {"slot_f1": f, "slot_precision": p, "slot_recall": r, "exact_match": em}
    elif task_type == "tool_call":
        p, r, f = argument_prf(golds, preds)
        out = {"exact_match": em, "name_accuracy": name_accuracy(golds, preds), "argument_f1": f,
               "argument_precision": p, "argument_recall": r}
    elif task_type == "qa":
        out = {"token_f1": token_f1(golds, preds), "exact_match": em}
    else:
        out = {"chrf": chrf(golds, preds), "exact_match": em}
    return {**{k: out[k] for k in names}, "n": n}


def task_score(task_type: str, metric: str, golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any] | None = None) -> float:
    """One metric of a task type over parsed answers (a cascade's quality at one threshold)."""
    return float(task_scores(task_type, golds, preds, labels)[metric])


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
