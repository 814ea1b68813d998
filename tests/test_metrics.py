"""edgedistill.metrics against small hand-computed cases."""

from __future__ import annotations

import pytest

from edgedistill.metrics import (
    accuracy,
    agreement,
    canonical_json,
    exact_match,
    expected_calibration_error,
    macro_f1,
    normalize_text,
    per_label_f1,
    primary_metric,
    reliability_bins,
    slot_f1,
    slot_prf,
    task_scores,
)

approx = pytest.approx


def test_accuracy():
    assert accuracy(["a", "b", "c", "a"], ["a", "b", "a", None]) == 0.5
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def _manual_macro_f1(golds, preds, label_set):
    f1s = []
    for lab in label_set:
        tp = sum(g == lab and p == lab for g, p in zip(golds, preds))
        fp = sum(g != lab and p == lab for g, p in zip(golds, preds))
        fn = sum(g == lab and p != lab for g, p in zip(golds, preds))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def test_macro_f1_hand_computed():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", None]  # None: invalid answer, a miss for "c"
    # a: tp1 fp0 fn1 -> 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 fn1 -> 0
    assert macro_f1(golds, preds) == approx(4 / 9)
    assert macro_f1(golds, preds) == approx(_manual_macro_f1(golds, preds, ["a", "b", "c"]))
    per = per_label_f1(golds, preds)
    assert per["a"] == {"precision": 1.0, "recall": 0.5, "f1": approx(2 / 3), "support": 2}
    assert per["c"]["support"] == 1 and per["c"]["f1"] == 0.0


def test_macro_f1_union_of_gold_and_predicted_labels():
    # Like scikit-learn: an invalid predicted string becomes a class with F1 0 when labels is None.
    golds = ["a", "a", "b", "b"]
    preds = ["a", "zzz", "b", "b"]
    # a: tp1 fn1 -> 2/3; b: tp2 -> 1; zzz: fp1 -> 0
    assert macro_f1(golds, preds) == approx((2 / 3 + 1 + 0) / 3)
    assert macro_f1(golds, preds) == approx(_manual_macro_f1(golds, preds, ["a", "b", "zzz"]))
    # With the label list, "zzz" is just a wrong answer: a miss for "a", no class of its own.
    assert macro_f1(golds, preds, labels=["a", "b"]) == approx((2 / 3 + 1) / 2)


def test_macro_f1_with_labels_without_support():
    golds = ["a", "b", "b"]
    preds = ["a", "b", "c"]
    # labels list: a -> 1; b: tp1 fn1 -> 2/3; c: fp1 -> 0; d: no support, no prediction -> 0
    assert macro_f1(golds, preds, labels=["a", "b", "c", "d"]) == approx((1 + 2 / 3 + 0 + 0) / 4)
    assert macro_f1(golds, preds, labels=["a", "b", "c", "d"]) == approx(_manual_macro_f1(golds, preds, ["a", "b", "c", "d"]))
    # a gold label missing from the list is still averaged over
    assert macro_f1(golds, preds, labels=["a"]) == approx((1 + 2 / 3) / 2)


def test_macro_f1_matches_sklearn_when_installed():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    golds = ["a", "b", "c", "a", "b", "c", "a", "a"]
    preds = ["a", "c", "c", "b", "b", "c", "a", "x"]
    assert macro_f1(golds, preds) == approx(sklearn_metrics.f1_score(golds, preds, average="macro", zero_division=0))


def test_macro_f1_perfect_and_empty():
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    assert macro_f1([], []) == 0.0
    assert macro_f1([], [], labels=["a", "b"]) == 0.0


def test_normalize_text():
    assert normalize_text("  Where is my CARD?! ") == "where is my card"
    assert normalize_text("a\t\n b") == "a b"
    assert normalize_text("don't") != normalize_text("dont")
    assert normalize_text("...") == ""


def test_exact_match_json_and_text():
    golds = [{"people": 2, "time": "7pm"}, {"people": 3, "time": "8pm"}, {"people": 4, "time": "9pm"}, {"a": [1, 2]}]
    preds = [{"time": " 7PM ", "people": 2.0}, {"people": 3, "time": "9pm"}, None, {"a": [1, 2]}]
    assert exact_match(golds, preds) == 0.5
    assert exact_match(["Paris", "Rome"], ["paris.", "Milan"]) == 0.5
    assert exact_match([], []) == 0.0
    assert canonical_json({"b": 1, "a": "X"}) == canonical_json({"a": "x", "b": 1.0})


def test_slot_f1_micro():
    golds = [{"people": 2, "time": "7pm", "date": "today"}, {"people": 4, "time": "9pm"}, {"people": 1, "time": "noon"}]
    preds = [{"people": 2, "time": "7PM", "date": "tomorrow"}, None, {"people": 1, "time": "noon", "name": "bo"}]
    # gold slots 3+2+2=7, predicted 3+0+3=6, correct 2+0+2=4
    p, r, f = slot_prf(golds, preds)
    assert p == approx(4 / 6) and r == approx(4 / 7) and f == approx(2 * 4 / (6 + 7))
    assert slot_f1(golds, preds) == f
    assert slot_prf([], []) == (0.0, 0.0, 0.0)


def test_slot_f1_nested_and_null():
    gold = {"name": "book", "arguments": {"people": 2, "time": "7pm"}, "note": None}
    pred = {"name": "Book", "arguments": {"people": 2, "time": "8pm"}}
    # slots: name, arguments.people, arguments.time; "note": null is no slot
    assert slot_prf([gold], [pred]) == approx((2 / 3, 2 / 3, 2 / 3))
    assert slot_prf([gold], ["not json"]) == (0.0, 0.0, 0.0)


def test_agreement():
    assert agreement(["a", "b", "c", None], ["a", "B", "c", None]) == 0.5
    assert agreement([{"x": 1, "y": 2}], [{"y": 2, "x": 1}]) == 1.0
    assert agreement([], []) == 0.0


def test_task_scores_and_primary_metric():
    s = task_scores("classification", ["a", "b"], ["a", "a"], labels=["a", "b"])
    # a: tp1 fp1 -> 2/3; b: fn1 -> 0
    assert s == {"accuracy": 0.5, "macro_f1": approx(1 / 3), "n": 2}
    s = task_scores("extraction", [{"a": 1, "b": 2}], [{"a": 1, "b": 3}])
    assert s == {"exact_match": 0.0, "slot_f1": 0.5, "slot_precision": 0.5, "slot_recall": 0.5, "n": 1}
    assert set(task_scores("tool_call", [], [])) == {"exact_match", "slot_f1", "slot_precision", "slot_recall", "n"}
    assert task_scores("qa", ["Paris"], [" paris "]) == {"exact_match": 1.0, "n": 1}
    assert task_scores("generation", [], []) == {"exact_match": 0.0, "n": 0}
    assert task_scores("classification", [], []) == {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    assert primary_metric("classification") == "accuracy"
    for t in ("extraction", "tool_call", "qa", "generation"):
        assert primary_metric(t) == "exact_match"
    with pytest.raises(ValueError):
        task_scores("poetry", [], [])


def test_calibration_hand_computed():
    conf = [0.95, 0.9, 0.85, 0.6, 0.55, 0.3]
    corr = [True, True, False, True, False, False]
    # bins of width 0.5: (0, .5]: {0.3: wrong} -> |0 - 0.3| * 1
    # (.5, 1]: conf mean (0.95+0.9+0.85+0.6+0.55)/5 = 0.77, acc 3/5 -> |0.6 - 0.77| * 5
    assert expected_calibration_error(conf, corr, n_bins=2) == approx((0.3 + 0.17 * 5) / 6)
    bins = reliability_bins(conf, corr, n_bins=2)
    assert [b["count"] for b in bins] == [1, 5]
    assert bins[1]["confidence"] == approx(0.77) and bins[1]["accuracy"] == approx(0.6)
    assert bins[0]["lo"] == 0.0 and bins[1]["hi"] == 1.0


def test_calibration_bin_edges_and_empty():
    # bins are (lo, hi]: 0.3 lies in (0.2, 0.3], 0.0 in the first bin, 1.0 in the last
    bins = reliability_bins([0.3, 0.0, 1.0], [1, 0, 1], n_bins=10)
    assert [b["count"] for b in bins] == [1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert bins[4] == {"lo": 0.4, "hi": 0.5, "count": 0, "confidence": 0.0, "accuracy": 0.0}
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([], []) == 0.0
    assert len(reliability_bins([], [])) == 10
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])
