"""edgedistill.metrics against small hand-computed cases."""

from __future__ import annotations

import pytest

from edgedistill.metrics import (
    TYPE_METRICS,
    accuracy,
    agreement,
    call_matches,
    canonical_json,
    chrf,
    exact_match,
    expected_calibration_error,
    macro_f1,
    normalize_text,
    per_label_f1,
    primary_metric,
    qa_matches,
    reliability_bins,
    slot_f1,
    slot_prf,
    squad_normalize,
    task_scores,
    token_f1,
    type_metrics,
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
    assert s == {"slot_f1": 0.5, "slot_precision": 0.5, "slot_recall": 0.5, "exact_match": 0.0, "n": 1}
    assert list(task_scores("tool_call", [], [])) == [*TYPE_METRICS["tool_call"], "n"]
    assert task_scores("qa", ["Paris"], [" paris "]) == {"token_f1": 1.0, "exact_match": 1.0, "n": 1}
    assert task_scores("generation", [], []) == {"chrf": 0.0, "exact_match": 0.0, "n": 0}
    assert task_scores("classification", [], []) == {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}
    primaries = {t: primary_metric(t) for t in TYPE_METRICS}
    assert primaries == {"classification": "accuracy", "extraction": "slot_f1", "tool_call": "exact_match",
                         "qa": "token_f1", "generation": "chrf"}
    for t in TYPE_METRICS:  # every metric a type lists is one task_scores computes, in that order
        assert list(task_scores(t, [], [])) == [*type_metrics(t), "n"]
    with pytest.raises(ValueError):
        task_scores("poetry", [], [])
    with pytest.raises(ValueError):
        primary_metric("poetry")


def test_extraction_empty_answer_is_right_and_an_invented_field_is_a_false_positive():
    golds = [{"people": 2}, {}, {}]
    # row 2: nothing to extract, answered with nothing: right; row 3: an invented field
    preds = [{"people": 2}, {}, {"time": "7pm"}]
    s = task_scores("extraction", golds, preds)
    assert s["exact_match"] == approx(2 / 3)
    assert (s["slot_precision"], s["slot_recall"], s["slot_f1"]) == approx((1 / 2, 1.0, 2 / 3))  # tp 1, predicted 2, gold 1
    # nothing to extract anywhere, nothing answered: perfect, not 0/0
    assert slot_prf([{}, {"note": None}], [{}, {}]) == (1.0, 1.0, 1.0)
    assert task_scores("extraction", [{}, {}], [{}, {}])["exact_match"] == 1.0
    # an invalid answer is never right: where there was nothing to extract it is a false positive
    assert slot_prf([{}, {}], [{}, None]) == (0.0, 0.0, 0.0)
    assert slot_prf([{}], ["not json"]) == (0.0, 0.0, 0.0)


CALL = {"name": "book_table", "arguments": {"people": 2, "time": "7pm"}}


def test_tool_call_exact_match_name_and_argument_f1():
    golds = [CALL, CALL, CALL, {}]
    preds = [
        {"arguments": {"time": "7PM", "people": 2.0}, "name": "Book_Table"},  # the same call, normalised
        {"name": "book_table", "arguments": {"people": 3, "time": "7pm"}},  # a wrong argument
        {"name": "cancel", "arguments": {"people": 2, "time": "7pm"}},  # the wrong function
        {"name": "book_table", "arguments": {"people": 1}},  # a call where none was asked for
    ]
    s = task_scores("tool_call", golds, preds)
    assert s["exact_match"] == 0.25 and s["name_accuracy"] == 0.5
    # gold pairs 2+2+2+0 = 6; predicted 2+2+2+1 = 7; right 2+1+2 = 5
    assert (s["argument_precision"], s["argument_recall"], s["argument_f1"]) == approx((5 / 7, 5 / 6, 10 / 13))
    assert call_matches(CALL, {"name": "book_table", "arguments": '{"time": "7pm", "people": 2}'})  # OpenAI's JSON-text arguments


def test_tool_call_no_call_is_a_legitimate_answer():
    golds = [{}, {"name": None}, CALL]
    preds = [{"name": None, "arguments": {}}, {}, {}]  # two right "no call"s, one missed call
    s = task_scores("tool_call", golds, preds)
    assert s["exact_match"] == approx(2 / 3) and s["name_accuracy"] == approx(2 / 3)
    assert (s["argument_precision"], s["argument_recall"], s["argument_f1"]) == (0.0, 0.0, 0.0)  # the missed call's 2 pairs
    assert task_scores("tool_call", [{}, {}], [{}, {}])["argument_f1"] == 1.0
    assert not call_matches({}, None) and not call_matches({}, "no") and not call_matches(CALL, {})
    assert task_scores("tool_call", [{}], [None])["argument_precision"] == 0.0  # invalid is not "no call"


def test_qa_token_f1_squad_values():
    # SQuAD's normalisation: case, punctuation and the articles a/an/the go
    assert squad_normalize("The  Eiffel-Tower, Paris!") == "eiffeltower paris"
    assert squad_normalize("an apple a day") == "apple day"
    # the official script's F1: bag-of-tokens overlap; "Denver Broncos" vs "the Broncos": p 1, r 1/2
    s = task_scores("qa", ["Denver Broncos", "Denver Broncos", "Saint Bernadette Soubirous"],
                    ["the Broncos", "Denver Broncos.", "Bernadette"])
    assert s["token_f1"] == approx((2 / 3 + 1.0 + 0.5) / 3) and s["exact_match"] == approx(1 / 3)
    assert token_f1(["a"], [""]) == 1.0  # both empty after normalisation: SQuAD v2 scores 1
    assert token_f1(["Paris"], [""]) == 0.0 and token_f1(["Paris"], [None]) == 0.0
    assert qa_matches("the Eiffel Tower", "Eiffel tower.") and not qa_matches("Paris", None)


def test_chrf_is_sacrebleu_on_a_0_to_1_scale():
    pytest.importorskip("sacrebleu")
    text = ["The cat sat on the mat.", "A quick brown fox."]
    assert chrf(text, text) == approx(1.0)
    assert chrf(text, ["zzzz qqqq", "xxxx"]) < 0.05
    assert 0.3 < chrf(["The cat sat on the mat."], ["The cat sat on a mat"]) < 1.0
    assert chrf(["abc"], [None]) == 0.0 and chrf([], []) == 0.0


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
