"""edgedistill.intervals: Wilson and bootstrap intervals of every task metric, and paired tests."""

from __future__ import annotations

import random

import pytest

from edgedistill import intervals as I
from edgedistill import metrics as M
from edgedistill.task import Task


def _classification(seed: int = 1, n: int = 200, n_labels: int = 20, right: float = 0.9):
    rng = random.Random(seed)
    labels = [f"l{i}" for i in range(n_labels)]
    golds = [rng.choice(labels) for _ in range(n)]
    preds = [g if rng.random() < right else rng.choice([*labels, None]) for g in golds]
    return labels, golds, preds


def test_wilson_on_hand_cases():
    assert I.proportion_ci(0, 10) == [0.0, 0.2776]  # 1.96^2 / (10 + 1.96^2) = 0.2775...
    assert I.proportion_ci(10, 10) == [0.7224, 1.0]
    lo, hi = I.proportion_ci(190, 200)  # 0.95 on 200 rows: statsmodels' wilson gives (0.91042, 0.97262)
    assert lo == pytest.approx(0.9104, abs=1e-4) and hi == pytest.approx(0.9727, abs=1e-4)
    assert I.proportion_ci(0, 0) == [0.0, 1.0]
    assert I.outward(0.12341, 0.56781) == [0.1234, 0.5679]  # rounded outwards, never inwards


def test_mcnemar_exact_on_hand_cases():
    assert I.mcnemar_exact(0, 0) == 1.0
    assert I.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert I.mcnemar_exact(0, 10) == I.mcnemar_exact(10, 0)
    assert I.mcnemar_exact(3, 3) == 1.0
    assert I.mcnemar_exact(5, 1) == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)


def test_newcombe_interval_contains_the_difference_and_is_wider_with_more_discordance():
    lo, hi = I.newcombe_paired_interval(90, 5, 5, 100)
    assert lo < 0 < hi
    lo2, hi2 = I.newcombe_paired_interval(70, 25, 25, 80)
    assert hi2 - lo2 > hi - lo
    lo3, hi3 = I.newcombe_paired_interval(80, 20, 0, 100)  # a is right on 20 more rows
    assert 0 < lo3 < 0.1 < hi3


@pytest.mark.parametrize("task_type", ["classification", "extraction", "tool_call", "qa", "generation"])
def test_row_statistics_reproduce_every_metric(task_type):
    golds, preds, labels = _rows(task_type)
    scores = M.task_scores(task_type, golds, preds, labels)
    for m in M.type_metrics(task_type):
        assert I.row_stats(task_type, m, golds, preds, labels).point() == pytest.approx(scores[m], abs=1e-9), m


def _rows(task_type: str):
    rng = random.Random(3)
    if task_type == "classification":
        labels, golds, preds = _classification()
        return golds, preds, labels
    if task_type == "extraction":
        golds = [{"a": rng.choice("xyz"), "b": rng.randint(0, 3)} if rng.random() < 0.8 else {} for _ in range(120)]
        preds = [dict(g) if rng.random() < 0.7 else rng.choice([{"a": "q"}, None, {}]) for g in golds]
        return golds, preds, None
    if task_type == "tool_call":
        golds = [{"name": "f", "arguments": {"x": 1}}, {}, {"name": "g", "arguments": {"y": "a", "z": 2}}] * 40
        preds = [dict(g) if rng.random() < 0.7 else rng.choice([{}, None, {"name": "f", "arguments": {"x": 2}}]) for g in golds]
        return golds, preds, None
    golds = ["the cat sat on the mat", "a dog barked", "blue sky", "red"] * 30
    preds = [g if rng.random() < 0.6 else rng.choice(["cat dog", None, "the sky is blue"]) for g in golds]
    return golds, preds, None


@pytest.mark.parametrize("task_type", ["classification", "extraction", "tool_call", "qa", "generation"])
def test_intervals_are_deterministic_and_contain_the_estimate(task_type):
    golds, preds, labels = _rows(task_type)
    scores = M.task_scores(task_type, golds, preds, labels)
    first = I.score_intervals(task_type, golds, preds, labels)
    assert first == I.score_intervals(task_type, golds, preds, labels)  # fixed seed: the same every time
    for m in M.type_metrics(task_type):
        lo, hi = first[f"{m}_ci"]
        assert 0.0 <= lo <= scores[m] <= hi <= 1.0, m
        assert hi - lo < 0.5, m  # informative at ~120-200 rows
        assert hi - lo > 0.0, m


def test_bootstrap_shrinks_with_more_rows():
    labels, golds, preds = _classification(n=100)
    _, golds4, preds4 = _classification(n=1600)
    lo, hi = I.metric_interval("classification", "macro_f1", golds, preds, labels)
    lo4, hi4 = I.metric_interval("classification", "macro_f1", golds4, preds4, labels)
    assert hi4 - lo4 < (hi - lo) * 0.6


def test_macro_f1_interval_is_not_dragged_below_the_estimate_by_lost_labels():
    # 77 labels on 200 rows: a resample loses some labels' every row; scoring them 0 would put
    # nearly every resample below the estimate
    labels, golds, preds = _classification(n=200, n_labels=77)
    point = M.macro_f1(golds, preds, labels)
    lo, hi = I.metric_interval("classification", "macro_f1", golds, preds, labels)
    assert lo < point - 0.01 and hi > point + 0.01


def test_paired_difference_of_proportions_is_mcnemar():
    golds = ["a"] * 100
    a = ["a"] * 100
    b = ["a"] * 90 + ["b"] * 10  # b wrong on 10 rows where a is right, never the other way
    d = I.paired_difference("classification", "accuracy", golds, a, b)
    assert d["test"] == "mcnemar_exact" and d["discordant"] == [10, 0]
    assert d["diff"] == pytest.approx(0.1) and d["p_value"] == pytest.approx(0.002, abs=1e-4)
    assert d["diff_ci"][0] > 0 and d["within_noise"] is False and d["n"] == 100
    same = I.paired_difference("classification", "accuracy", golds, b, b)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["within_noise"] is True
    assert same["diff_ci"][0] < 0 < same["diff_ci"][1]


def test_paired_bootstrap_for_other_metrics():
    labels, golds, preds = _classification()
    worse = [p if i % 4 else "l0" for i, p in enumerate(preds)]  # a quarter of the rows answered "l0"
    d = I.paired_difference("classification", "macro_f1", golds, preds, worse, labels)
    assert d["test"] == "paired_bootstrap" and d["diff"] > 0
    assert d["diff_ci"][0] > 0 and d["p_value"] < 0.01 and not d["within_noise"]
    assert d == I.paired_difference("classification", "macro_f1", golds, preds, worse, labels)
    tie = I.paired_difference("classification", "macro_f1", golds, preds, list(preds), labels)
    assert tie["diff"] == 0 and tie["p_value"] == 1.0 and tie["diff_ci"] == [0.0, 0.0]


def test_empty_and_mismatched_inputs():
    assert I.metric_interval("extraction", "slot_f1", [], []) == [0.0, 1.0]
    assert I.metric_interval("generation", "chrf", [], []) == [0.0, 1.0]
    empty = I.paired_difference("qa", "token_f1", [], [], [])
    assert empty["diff_ci"] == [-1.0, 1.0] and empty["p_value"] == 1.0
    with pytest.raises(ValueError):
        I.paired_difference("classification", "accuracy", ["a"], ["a"], [])
    with pytest.raises(ValueError):
        I.metric_interval("classification", "accuracy", ["a"], [])


def test_task_scores_carry_an_interval_beside_every_metric():
    task = Task(type="classification", instructions="x", labels=["a", "b"])
    preds, scores = task.score_answers(["a", "a", "b", "b"], ["a", "b", "b", "nonsense"])
    assert scores["accuracy"] == 0.5 and isinstance(scores["accuracy"], float) and scores["n"] == 4
    assert scores["accuracy_ci"] == I.proportion_ci(2, 4)
    assert list(scores)[:4] == ["accuracy", "accuracy_ci", "macro_f1", "macro_f1_ci"]
    cmp = task.compare(["a", "a", "b", "b"], preds, ["a", "a", "b", "b"])
    assert cmp["metric"] == "accuracy" and cmp["diff"] == -0.5 and cmp["discordant"] == [0, 2]


def test_fmt_ci():
    assert I.fmt_ci(0.95, [0.9104, 0.9727]) == "0.950 (0.91–0.97)"
    assert I.fmt_ci(0.95, None) == "0.950"
    assert I.fmt_ci(None, [0, 1]) == "-"
    d = {"diff": -0.01, "diff_ci": [-0.0412, 0.0213], "p_value": 0.6072}
    assert I.fmt_difference(d) == "-0.010 (-0.04–+0.02), p 0.61"
    assert I.fmt_difference(None) == "-"
    assert I.fmt_ci(-0.0, [-0.0001, 0.2], sign="+") == "+0.000 (+0.00–+0.20)"  # no "-0.000"
    assert I.fmt_ci(-0.0, None) == "0.000"
