"""The drift scenario's pieces (examples/banking77/drift*.py), without servers or models: the
traffic (deterministic, three disjoint sets, the task's intents only, never a test-set row, the
drifted ones in the e-mail style) and the report built from fake /metrics scrapes."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from edgedistill.bench.cost import cascade_cost_per_1k, local_cost_per_1k

from edgedistill.errors import UserError
from edgedistill.intervals import proportion_ci
from edgedistill.metrics import normalize_text
from edgedistill.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "banking77"
sys.path.insert(0, str(EXAMPLE))
import drift_report as dr
import drift_traffic as dt

LABELS = ["card_arrival", "change_pin", "exchange_rate"]
DEV = ["how long does my card take to arrive", "can i change my pin at an atm", "what rate do you use for dollars",
       "my card has not come yet", "is there a fee for exchanging money"]
VOCAB = [
    "account", "app", "balance", "bank", "branch", "cash", "code", "debit", "euro", "fee", "form", "help", "issue",
    "limit", "login", "money", "month", "name", "number", "online", "order", "phone", "plastic", "post", "question",
    "reason", "refund", "request", "salary", "screen", "secure", "service", "statement", "support", "swift",
    "terminal", "travel", "update", "wallet", "week",
]


def fake_spec(tmp_path: Path) -> Path:
    rng = random.Random(0)
    rows = ["text,category"]
    for label in [*LABELS, "age_limit"]:  # age_limit: not one of the task's intents
        for _ in range(40):
            rows.append(" ".join(rng.sample(VOCAB, 7)).capitalize() + "?," + label)
    rows += [f"{DEV[0]},card_arrival",  # a dev text in the train split: never sent
             f"so {DEV[1]} please or not,change_pin"]  # contains a whole dev text: contaminated, never sent
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("text,category\n" + "".join(f"{t},{lab}\n" for t, lab in zip(DEV, LABELS + LABELS)))
    seeds = [{"input": f"seed question number {i} about {VOCAB[i]}", "output": LABELS[i % 3]} for i in range(12)]
    spec = {"name": "fake-b77", "type": "classification", "instructions": "Classify.", "labels": LABELS, "seeds": seeds,
            "test_set": {"path": "dev.csv", "input_field": "text", "output_field": "category"},
            "pool": {"path": "train.csv", "input_field": "text", "output_field": None, "filter_field": "category"},
            "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "student": {"path": "student"}}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "task.yaml"


SIZES = {"before": 15, "drifted": 30, "fresh": 30}


def test_the_three_sets_are_disjoint_balanced_of_the_tasks_intents_and_never_test_rows(tmp_path):
    spec = load_spec(fake_spec(tmp_path))
    sets = dt.make_sets(spec, SIZES)
    assert {k: len(v) for k, v in sets.items()} == SIZES
    sources = [r.source for v in sets.values() for r in v]
    assert len(sources) == len(set(sources))  # each train row used once
    dev = [normalize_text(t) for t in DEV]
    for rows in sets.values():
        counts = Counter(r.label for r in rows)
        assert set(counts) <= set(LABELS) and max(counts.values()) - min(counts.values()) <= 1
        for r in rows:
            assert normalize_text(r.source) not in dev and not any(d in normalize_text(r.text) for d in dev)
    assert all(r.text == r.source for r in sets["before"])
    for r in sets["drifted"] + sets["fresh"]:
        lines = r.text.split("\n")
        assert len(lines) == 5 and lines[0] in dt.GREETINGS and lines[1] in dt.CONTEXTS and lines[3] in dt.SIGNOFFS
        assert r.text == r.text.lower() and lines[2] != r.source.lower()  # lower case, with typos
    # every row passes distill's own validation against the test set (so the retrain can use it)
    for rows in sets.values():
        assert all(dt.usable(spec, [r.text for r in rows], [r.label for r in rows]))


def test_the_traffic_is_deterministic_for_a_seed(tmp_path):
    spec = load_spec(fake_spec(tmp_path))
    assert dt.make_sets(spec, SIZES) == dt.make_sets(spec, SIZES)
    assert dt.make_sets(spec, SIZES, seed=1) != dt.make_sets(spec, SIZES)
    text = "Where is the card I ordered last week?"
    assert dt.restyle(text) == dt.restyle(text) and dt.restyle(text, 1) != dt.restyle(text)


def test_asking_for_more_rows_than_the_split_has_is_a_one_line_error(tmp_path):
    spec = load_spec(fake_spec(tmp_path))
    with pytest.raises(UserError, match="ask for fewer rows per set"):
        dt.make_sets(spec, {"before": 100, "drifted": 100, "fresh": 100})


def test_the_real_task_reads_banking77_train_rows_and_no_dev_row():
    data = ROOT.parent / "shared" / "data" / "banking77"
    if not (data / "train.csv").exists():
        pytest.skip("BANKING77 is not in ../shared/data")
    spec = load_spec(EXAMPLE / "task.yaml")
    rows = dt.train_rows(spec)
    dev = {normalize_text(e.input) for e in spec.load_test_set()}
    assert len(rows) > 1000 and {lab for _, lab in rows} == set(spec.labels)
    assert not any(normalize_text(t) in dev for t, _ in rows)


# ---- the report from fake scrapes --------------------------------------------------------------

def scrape(fallbacks: int, compared: int, failed: int, drift: float, rate: float, est: tuple[float, float, float]) -> str:
    return "\n".join([
        "# HELP edgedistill_fallbacks_total Requests sent to the teacher, by outcome",
        "# TYPE edgedistill_fallbacks_total counter",
        f'edgedistill_fallbacks_total{{outcome="teacher",reason="low_confidence"}} {fallbacks - 1}.0',
        'edgedistill_fallbacks_total{outcome="teacher_failed",reason="low_confidence"} 1.0',
        f'edgedistill_shadow_requests_total{{outcome="compared"}} {compared}.0',
        f'edgedistill_shadow_requests_total{{outcome="failed"}} {failed}.0',
        'edgedistill_shadow_requests_total{outcome="dropped"} 0.0',
        f"edgedistill_confidence_drift {drift}",
        f"edgedistill_fallback_rate {rate}",
        *(f'edgedistill_shadow_agreement{{bound="{b}"}} {v}' for b, v in zip(("estimate", "low", "high"), est)),
        "edgedistill_traffic_log_records_total 8.0",
    ])


def answers(n: int, correct: int, agree: int, by_teacher: int) -> list[dict]:
    out = []
    for i in range(n):
        served = "a"
        out.append({"label": "a" if i < correct else "b", "served": served, "teacher": "a" if i < agree else "c",
                    "answered_by": "teacher" if i < by_teacher else "student", "latency_s": 0.5 if i < by_teacher else 0.25,
                    "teacher_latency_s": 0.5})
    return out


def same(a, b) -> bool:
    return a is not None and a == b


PHASES = [
    {"name": "before", "set": "before", "artifact": "art/q4", "metrics": scrape(1, 2, 0, 0.02, 0.125, (1.0, 0.8, 1.0)),
     "answers": answers(8, 8, 8, 1)},
    {"name": "during", "set": "drifted", "artifact": "art/q4", "metrics": scrape(4, 1, 1, 0.4, 0.5, (0.9, 0.7, 0.95)),
     "answers": answers(8, 6, 7, 4)},
    {"name": "after", "set": "fresh", "artifact": "retrain-1/q4", "metrics": scrape(2, 1, 0, 0.1, 0.25, (0.95, 0.8, 1.0)),
     "answers": answers(8, 7, 7, 2)},
]


def test_parse_metrics_reads_labels_and_skips_comments():
    m = dr.parse_metrics('# HELP x y\nx{a="1",b="q\\"z"} 2.5\ny NaN\nz{k="v"} 3\nbroken line\n')
    assert dr.value(m, "x", a="1", b='q\\"z') == 2.5 and math.isnan(dr.value(m, "y")) and dr.value(m, "z", k="v") == 3
    assert dr.total(m, "x") == 2.5 and dr.value(m, "missing") is None


def test_a_phase_row_holds_the_live_numbers_and_the_truth():
    row = dr.summarize(PHASES[1], same, usd_per_hour=0.36)
    assert row["n"] == 8 and row["drift_score"] == 0.4 and row["live_fallback_rate"] == 0.5
    assert row["live_agreement"] == {"estimate": 0.9, "ci": [0.7, 0.95], "shadow_checks": 1}
    assert row["fallback_rate"] == {"value": 0.5, "ci": proportion_ci(4, 8), "k": 4, "n": 8}  # every request sent to the teacher
    assert row["accuracy"] == {"value": 6 / 8, "ci": proportion_ci(6, 8), "k": 6, "n": 8}
    assert row["true_agreement"]["value"] == 7 / 8 and row["true_agreement"]["ci"] == proportion_ci(7, 8)
    assert row["teacher_calls"]["total"] == 4 + 1 + 1 and row["teacher_calls"]["shadow"] == 2 and row["answered_by_teacher"] == 4
    student, teacher = local_cost_per_1k(0.36, 1 / 0.25), local_cost_per_1k(0.36, 1 / 0.5)
    assert row["cost_per_1k_usd"] == pytest.approx(cascade_cost_per_1k(student, 6 / 8, teacher), rel=1e-5)
    assert row["cost_basis"]["student_s_per_request"] == 0.25 and row["cost_basis"]["teacher_s_per_request"] == 0.5


def test_the_report_checks_what_the_scenario_must_show_and_writes_the_table():
    rep = dr.build_report(PHASES, same, 0.36, task="banking77-10", retrain={"promoted": True, "reason": "accuracy 0.95 >= 0.94",
                                                                            "command": "edgedistill retrain ...", "report": "r.md"})
    assert [p["phase"] for p in rep["phases"]] == ["before", "during", "after"]
    assert [c["ok"] for c in rep["checks"]] == [True, True, True, True, True]
    md = dr.report_markdown(rep)
    assert md.count("\n| before |") + md.count("\n| during |") + md.count("\n| after |") == 3
    assert "**PROMOTED**" in md and "0.400" in md and "0.900 (0.70–0.95)" in md.replace("-", "–")
    worse = [PHASES[0], PHASES[1], {**PHASES[2], "metrics": scrape(5, 1, 0, 0.5, 0.625, (0.9, 0.7, 0.95)), "answers": answers(8, 0, 7, 5)}]
    rep = dr.build_report(worse, same, 0.36, retrain={"promoted": False, "reason": "worse"})
    assert [c["ok"] for c in rep["checks"]] == [True, True, False, False, False]
    assert "**NOT PROMOTED**" in dr.report_markdown(rep)


def test_drift_without_a_finished_run_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, str(EXAMPLE / "drift.py"), "--run", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [(f"error: {tmp_path / 'nothing'} has no report.json: run `make demo` first "
                                             "(or pass --run RUN, a finished `edgedistill run`)")]


# ---- the shadow verdicts against the truth, and the old artifact on the same rows ---------------

def test_shadow_truth_puts_the_logs_verdicts_beside_the_direct_truth_on_the_same_requests():
    ans = [{"request_id": f"r{i}", "label": "a", "served": "a", "teacher": "a" if i != 2 else "b", "answered_by": "student"}
           for i in range(6)]
    log = [{"request_id": "r0", "shadow": True, "shadow_agrees": True},
           {"request_id": "r2", "shadow": True, "shadow_agrees": True},  # the log says agrees, the direct question says not
           {"request_id": "r3", "shadow": True, "shadow_agrees": None},  # a check that failed: no verdict
           {"request_id": "r4", "shadow": False}]
    t = dr.shadow_truth({"answers": ans, "log": log}, same)
    assert t["n"] == 2 and t["verdicts_differ"] == 1
    assert t["shadow_agrees"]["k"] == 2 and t["direct_agrees"]["k"] == 1
    assert t["all_student_answers"] == {"value": 5 / 6, "ci": proportion_ci(5, 6), "k": 5, "n": 6}
    assert dr.shadow_truth({"answers": ans, "log": []}, same) is None


def fresh(student_ok: list[bool], conf: list[float], teacher_ok: list[bool]) -> list[dict]:
    return [{"label": "a", "student": "a" if s else "x", "confidence": c, "teacher": "a" if t else "y", "served": "a",
             "answered_by": "student", "latency_s": 0.25, "teacher_latency_s": 0.5} for s, c, t in zip(student_ok, conf, teacher_ok)]


def test_same_rows_compares_the_old_artifact_at_the_new_ones_accuracy_paired_per_row():
    teacher = [True] * 10
    # the new student: wrong on rows 0-1 only, and unsure exactly there
    new = fresh([False, False] + [True] * 8, [0.3, 0.4] + [0.9] * 8, teacher)
    # the old student: wrong on rows 0-4, and sure of row 4 (it must send 9 rows back to fix all five)
    old = fresh([False] * 4 + [False] + [True] * 5, [0.1, 0.2, 0.3, 0.35, 0.95] + [0.5, 0.6, 0.7, 0.8, 0.9], teacher)
    after = {"name": "after", "set": "fresh", "artifact": "new/q4", "threshold": 0.5, "answers": new}
    sr = dr.same_rows(after, {"artifact": "old/q4", "threshold": 0.25, "answers": old}, same)
    assert sr["n"] == 10 and sr["teacher_accuracy"]["value"] == 1.0
    assert sr["new"]["served"] == {"threshold": 0.5, "fallback_rate": 0.2, "accuracy": 1.0}
    assert sr["old"]["served"] == {"threshold": 0.25, "fallback_rate": 0.2, "accuracy": 0.7}
    assert sr["old"]["student_accuracy"]["k"] == 5 and sr["new"]["student_accuracy"]["k"] == 8
    at = sr["old"]["at_new_accuracy"]
    assert at["met"] and at["accuracy"] == 1.0 and at["fallback_rate"] == 1.0  # row 4 (0.95) is the most sure of all
    assert sr["fallback_difference"]["diff"] == -0.8 and sr["fallback_difference"]["p_value"] < 0.05
    rep = dr.build_report([*PHASES[:2], {**PHASES[2], **after}], same, 0.36, retrain={"promoted": True, "reason": "ok"},
                          old_on_fresh={"artifact": "old/q4", "threshold": 0.25, "answers": old})
    assert "old_on_fresh" not in rep and rep["same_rows"] == sr and rep["checks"][-1]["ok"] is True
    assert "## The old and the new artifact on the same fresh rows" in dr.report_markdown(rep)
    # the fake PHASES' after answers are 8 rows without own answers: same_rows needs the same rows
    with pytest.raises(ValueError):
        dr.same_rows({**PHASES[2], "threshold": 0.5}, {"artifact": "o", "threshold": 0.2, "answers": old}, same)


def test_the_same_rows_check_fails_when_the_new_student_needs_more_fallback_than_the_old():
    teacher = [True] * 10
    good = fresh([True] * 9 + [False], [0.9] * 9 + [0.2], teacher)
    bad = fresh([True] * 9 + [False], [0.9] * 10, teacher)  # as right, but sure of its mistake
    rows = {"after": {}}
    sr = dr.same_rows({"set": "fresh", "artifact": "new", "threshold": 0.95, "answers": bad},
                      {"artifact": "old", "threshold": 0.5, "answers": good}, same)
    assert sr["new"]["served"]["fallback_rate"] == 1.0 and sr["old"]["at_new_accuracy"]["fallback_rate"] == 0.1
    assert dr.checks(rows, True, sr)[-1]["ok"] is False
    sr = dr.same_rows({"set": "fresh", "artifact": "new", "threshold": 0.5, "answers": good},
                      {"artifact": "old", "threshold": 0.5, "answers": bad}, same)
    assert dr.checks(rows, True, sr)[-1]["ok"] is True
    md = "\n".join(dr.same_rows_markdown(sr))
    assert "| old old |" in md and "| new new |" in md and "McNemar" in md
