"""The cascade's cost includes the teacher calls it makes: a cascade (our app on loopback, the fake
numpy student) behind a loopback fake teacher, on a test file whose hard rows are all at its end
(as a file sorted by label puts one intent's rows last). A known share of the rows falls back; the
load rows must show it and pay the teacher for it, also when the teacher fails (a call is paid
for whether or not its answer is used)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from edgedistill.bench.config import build_config
from edgedistill.bench.quality import load_order
from edgedistill.bench.run import run_bench

from tests.serve_fakes import FakeTeacher
from tests.test_bench import LABELS, live, make_app, task_view

N = 16
HARD = range(12, 16)  # the last quarter of the file: the student is unsure there
API_PRICE = (0.15, 0.60)  # the teacher's $ per 1M input, output tokens; FakeTeacher reports 3 + 4 tokens


def script(prompt: str) -> tuple[str, float]:
    m = re.search(r"user: q(\d+) about (\w+)", prompt)
    if m is None:
        return "card_arrival", 20.0
    i, gold = int(m[1]), m[2]
    return (gold, 1.0) if i in HARD else (gold, 20.0)  # peak 1: a label-set confidence well under 0.95


def write_spec(tmp_path):
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps({"input": f"q{i} about {LABELS[i % 3]}", "output": LABELS[i % 3]}) + "\n" for i in range(N))
    )
    spec = {
        "name": "intents", "type": "classification", "instructions": "Classify the banking query.", "labels": LABELS,
        "seeds": [{"input": f"seed {i}", "output": LABELS[i % 3]} for i in range(10)], "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "teacher"}, "student": {"path": "student"},
    }  # fmt: skip
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_load_order_samples_the_whole_test_set():
    order = load_order(N, 0)
    assert sorted(order) == list(range(N)) and order == load_order(N, 0)
    assert sorted(order[: N // 2]) != list(range(N // 2))  # half the requests are not the file's first half


@pytest.mark.parametrize("teacher_status", [200, 500], ids=["teacher answers", "teacher fails"])
def test_cascade_load_rows_pay_for_the_teacher_calls(tmp_path, teacher_status):
    spec = write_spec(tmp_path)
    with FakeTeacher(reply="card_linking") as api, FakeTeacher(reply="card_linking", status=teacher_status) as behind:
        app = make_app(
            "student", script=script, task=task_view(), teacher_url=behind.url, teacher_model="big", threshold=0.95,
            breaker_failures=1000,  # every failing call is a call: no breaker skipping the teacher here
        )  # fmt: skip
        with live(app) as ours:
            cfg = build_config(
                [f"teacher={api.url}#teacher", f"ours={ours}"], out=tmp_path / "o", task=spec, concurrency="4",
                requests=N, warmup=0, price=["teacher=0.15,0.60", "ours=0.10/h"], teacher="teacher", progress=False,
            )  # fmt: skip
            rep = run_bench(cfg)
    row = next(r for r in rep["results"] if r["name"] == "ours")
    sent = load_order(N, 0)
    share = sum(i in HARD for i in sent) / len(sent)
    assert share > 0
    assert row["teacher_call_rate"] == pytest.approx(share, abs=1e-4)
    assert row["fallback_rate"] == pytest.approx(share if teacher_status == 200 else 0.0, abs=1e-4)
    t_cost = 1000 * (3 * API_PRICE[0] + 4 * API_PRICE[1]) / 1e6
    own = row["own_cost_per_1k_usd"]
    assert row["cost_per_1k_usd"] == pytest.approx(own + share * t_cost, rel=1e-4) and row["cost_per_1k_usd"] > own
    assert "teacher calls at this load level" in row["cost_basis"]  # the test set as served reports no teacher call here
    # the test set as served (/v1/predict, the sweep's route): exactly the hard quarter went to the teacher
    q = rep["quality"]["ours"]
    assert q["fallback_rate"] == pytest.approx(len(HARD) / N if teacher_status == 200 else 0.0, abs=1e-4)


def test_cascade_student_part_is_priced_from_the_same_artifact_served_alone(tmp_path):
    """A cascade's own throughput includes its requests' waits on the teacher, which the teacher's share
    already pays for: where the bench also measures the same artifact with no teacher behind it, the
    student's part of the cascade's cost is that one's, at the same load level."""
    spec = write_spec(tmp_path)
    with FakeTeacher(reply="card_linking") as api, FakeTeacher(reply="card_linking", delay_s=0.05) as behind:
        cascade = make_app("student", script=script, task=task_view(), teacher_url=behind.url, teacher_model="big", threshold=0.95)
        alone = make_app("student", script=script, task=task_view())
        with live(cascade) as ours, live(alone) as solo:
            cfg = build_config(
                [f"teacher={api.url}#teacher", f"ours={ours}", f"solo={solo}"], out=tmp_path / "o", task=spec,
                concurrency="1,4", requests=N, warmup=0, price=["teacher=0.15,0.60", "ours=0.10/h", "solo=0.10/h"],
                teacher="teacher", progress=False,
            )  # fmt: skip
            for name in ("ours", "solo"):
                cfg.endpoint(name).artifact = str(tmp_path / "artifacts" / "gguf-q4_k_m")  # as edgedistill run sets it
            rep = run_bench(cfg)
    t_cost = 1000 * (3 * API_PRICE[0] + 4 * API_PRICE[1]) / 1e6
    rows = [r for r in rep["results"] if r["name"] == "ours"]
    assert {r["concurrency"] for r in rows} == {1, 4}
    for row in rows:
        solo_row = next(r for r in rep["results"] if r["name"] == "solo" and r["concurrency"] == row["concurrency"])
        assert solo_row["teacher_call_rate"] == 0 and solo_row["cost_per_1k_usd"] == solo_row["own_cost_per_1k_usd"]
        share = row["teacher_call_rate"]
        assert share > 0
        assert row["cost_per_1k_usd"] == pytest.approx(solo_row["own_cost_per_1k_usd"] + share * t_cost, rel=1e-3)
        assert row["cost_basis"].startswith("cascade: student alone (solo)")
