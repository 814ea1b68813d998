"""`edgedistill run`'s report.json / report.md: every number with its sample size and 95 % interval,
the student vs the teacher and each artifact vs the FP student with a paired test, and a line saying
which differences are within noise. The stage outputs are made with the stages' own scoring code."""

from __future__ import annotations

import json

import pytest
import yaml
from edgedistill.bench import quality
from edgedistill.distill.evaluate import add_agreement, add_vs_teacher
from edgedistill.run.report import build_report, report_markdown

from edgedistill.manifest import write_json_atomic
from edgedistill.spec import load_spec

LABELS = ["a", "b"]
N = 200
GOLDS = [LABELS[i % 2] for i in range(N)]


def _answers(wrong_every: int) -> list[str]:
    return [("b" if g == "a" else "a") if wrong_every and i % wrong_every == 0 else g for i, g in enumerate(GOLDS)]


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": g}) + "\n" for i, g in enumerate(GOLDS)))
    spec = {
        "name": "tiny", "type": "classification", "instructions": "Classify.", "labels": LABELS,
        "seeds": [{"input": f"seed {i}", "output": LABELS[i % 2]} for i in range(10)],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"},
        "student": {"path": "base"},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    spec = load_spec(tmp_path / "task.yaml")
    task = spec.task
    out = tmp_path / "out"

    # distill's evaluation: teacher right on all but every 50th row, the student on all but every 20th
    t_preds, teacher = task.score_answers(GOLDS, _answers(50))
    results = {"teacher": teacher}
    for name, every in (("student", 20), ("undistilled student", 2)):
        preds, results[name] = task.score_answers(GOLDS, _answers(every))
        add_agreement(results[name], preds, t_preds)
        add_vs_teacher(task, results[name], GOLDS, preds, t_preds)
        results[name]["params"] = 1000
    write_json_atomic(out / "distill.json", {"eval": results})

    # compress: the FP student (wrong every 20th row) vs a q8_0 equal to it and a q4 wrong on 25 more rows
    fp = _answers(20)
    rows = []
    for name, preds in (("gguf-q8_0", fp), ("gguf-q4_k_m", [("b" if g == "a" else "a") if i % 8 == 1 else p
                                                             for i, (g, p) in enumerate(zip(GOLDS, fp, strict=True))])):
        s = task.scores(GOLDS, preds)
        d = task.compare(GOLDS, fp, preds)
        rows.append({"name": name, "format": "gguf", "bits": 8, "path": "x", "size_mb": 1.0, "accuracy": s["accuracy"],
                     "accuracy_ci": s["accuracy_ci"], "n": s["n"], "drop": d["diff"], "drop_ci": d["diff_ci"],
                     "drop_p_value": d["p_value"], "drop_test": d["test"], "token_agreement": 0.9, "tokens_per_s": 10.0, "passed": True})
    write_json_atomic(out / "artifacts" / "compress.json", {"artifacts": rows})
    # the quantized-teacher baseline, gated by the same compress code against the FP teacher: q4 vs fp
    write_json_atomic(out / "teacher_artifacts" / "compress.json", {"artifacts": [{**rows[1], "name": "gguf-q4_k_m"}]})

    # bench: the cascade's served answers vs the teacher's
    t_ans = quality.Answers(t_preds, [None] * N, ["student"] * N, 0)
    c_ans = quality.Answers(_answers(40), [0.9] * N, ["teacher" if i % 10 == 0 else "student" for i in range(N)], 0)
    q = {"teacher": quality.scores(task, GOLDS, t_ans, None), "cascade": quality.scores(task, GOLDS, c_ans, t_ans)}
    row = {"name": "cascade", "concurrency": 1, "output_tokens_per_s": 50.0, "latency_ms": {"p50": 10.0}, "cost_per_1k_usd": 0.01}
    write_json_atomic(out / "bench" / "report.json", {"results": [row], "quality": q, "cascade": {}})
    return spec, out


def test_report_json_carries_intervals_sizes_and_paired_tests(run_dir):
    spec, out = run_dir
    rep = build_report(spec, out, {})
    json.dumps(rep)  # JSON-ready
    for key, acc in (("teacher", 0.98), ("student", 0.95), ("undistilled", 0.5)):
        m = rep[key]
        assert m["accuracy"] == pytest.approx(acc) and isinstance(m["accuracy"], float) and m["n"] == N
        assert m["accuracy_ci"][0] < acc < m["accuracy_ci"][1]
        assert len(m["macro_f1_ci"]) == 2
    vs = rep["student"]["vs_teacher"]
    # every 20th row wrong vs every 50th: only the student is wrong on 8 rows (20, 40, 60, ...), only the
    # teacher on 2 (50, 150): 0.95 vs 0.98 on 200 rows is within noise (exact McNemar 2 * P(X <= 2), X ~ Bin(10, 1/2))
    assert vs["diff"] == pytest.approx(-0.03) and vs["test"] == "mcnemar_exact" and vs["discordant"] == [2, 8]
    assert vs["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024, abs=1e-4) and vs["within_noise"]
    assert rep["undistilled"]["vs_teacher"]["p_value"] < 1e-6
    assert rep["student"]["agreement_with_teacher_ci"][0] < rep["student"]["agreement_with_teacher"]

    q8, q4 = rep["artifacts"]
    assert q8["drop_vs_fp"] == 0 and q8["drop_vs_fp_p_value"] == 1.0 and q8["drop_vs_fp_ci"][0] < 0 < q8["drop_vs_fp_ci"][1]
    assert q4["drop_vs_fp"] == pytest.approx(0.125) and q4["drop_vs_fp_p_value"] < 0.001 and q4["drop_vs_fp_ci"][0] > 0
    assert q4["n"] == N and q4["accuracy_ci"][0] < q4["accuracy"] < q4["accuracy_ci"][1] and q4["drop_vs_fp_test"] == "mcnemar_exact"

    (qt,) = rep["quantized_teacher"]
    assert qt["name"] == "teacher-gguf-q4_k_m" and qt["drop_vs_teacher"] == q4["drop_vs_fp"]
    assert qt["drop_vs_teacher_ci"] == q4["drop_vs_fp_ci"] and qt["drop_vs_teacher_p_value"] == q4["drop_vs_fp_p_value"]
    assert qt["accuracy_ci"] == q4["accuracy_ci"] and qt["n"] == N

    c = rep["cascade"]
    assert c["accuracy"] == pytest.approx(0.975) and c["n"] == N and c["accuracy_ci"][0] < 0.975 < c["accuracy_ci"][1]
    assert c["fallback_rate"] == pytest.approx(0.1) and c["fallback_rate_ci"][0] < 0.1 < c["fallback_rate_ci"][1]
    assert c["vs_teacher"]["metric"] == "accuracy" and c["vs_teacher"]["within_noise"]


def test_report_markdown_shows_intervals_and_which_differences_are_noise(run_dir):
    spec, out = run_dir
    md = report_markdown(build_report(spec, out, {}))
    assert "| student | 0.0M | 0.950 (0.91–0.97) | -0.030 (" in md and "| 200 |" in md
    assert "| gguf-q8_0 | 8 | 1.0 | 0.950 (0.91–0.97) | +0.000 (" in md and ", p 1 |" in md
    assert ("Paired tests on the same rows (p >= 0.05 is noise): within noise: student vs teacher, gguf-q8_0 vs FP; "
            "a real difference: undistilled vs teacher, gguf-q4_k_m vs FP, teacher-gguf-q4_k_m vs teacher.") in md
    assert "| teacher-gguf-q4_k_m | 8 | 1.0 | 0.825 (0.77–0.87) | -0.125 (-0.18–-0.08), p < 0.001 |" in md


def test_an_extraction_report_names_the_types_metrics(tmp_path):
    """Every row of an extraction run's report carries slot_f1, exact_match, ... under their names
    (with intervals), not only the primary metric as `accuracy`."""
    from edgedistill.compress.pipeline import type_metrics_of

    golds = [{"people": "2"}, {}, {"time": "7pm", "people": "4"}, {}] * 10
    preds = [{"people": "2"}, {}, {"time": "8pm", "people": "4"}, {"date": "today"}] * 10
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": g}) + "\n" for i, g in enumerate(golds)))
    raw = {"name": "slots", "type": "extraction", "instructions": "Extract.",
           "output_schema": {"type": "object", "properties": {"people": {"type": "string"}, "time": {"type": "string"}, "date": {"type": "string"}}},
           "seeds": [{"input": f"seed {i}", "output": {}} for i in range(10)], "test_set": {"path": "test.jsonl"},
           "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"}, "student": {"path": "base"}}  # fmt: skip
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(raw))
    spec = load_spec(tmp_path / "task.yaml")
    out = tmp_path / "out"
    texts = [json.dumps(p) for p in preds]
    _, scores = spec.task.score_answers(golds, texts)
    write_json_atomic(out / "distill.json", {"eval": {"teacher": scores, "student": scores}})
    row = {"name": "gguf-q4_k_m", "format": "gguf", "bits": 4, "path": "x", "passed": True, **type_metrics_of(spec.task, scores)}
    write_json_atomic(out / "artifacts" / "compress.json", {"artifacts": [row]})
    rep = build_report(spec, out, {"stages": {}})
    # per 4 rows: 3 gold slots, 4 predicted (a wrong time, an invented date), 2 right: P 2/4, R 2/3, F1 4/7
    for entry in (rep["student"], rep["artifacts"][0]):
        assert entry["slot_f1"] == pytest.approx(4 / 7) and entry["exact_match"] == pytest.approx(0.5)
        assert len(entry["slot_f1_ci"]) == 2 and entry["slot_f1_ci"][0] <= entry["slot_f1"] <= entry["slot_f1_ci"][1]
        assert "slot_precision" in entry and "exact_match_ci" in entry
    assert rep["artifacts"][0]["accuracy"] == rep["artifacts"][0]["slot_f1"]  # `accuracy` holds the primary metric


def test_each_artifacts_calibration_and_the_cascades_threshold(run_dir):
    """report.json: each artifact's test-split ECE before/after calibration (from compress.json), and
    the cascade at the threshold it was served at: the artifact's recommended one, unless the spec's
    bench.cascade_threshold is set."""
    spec, out = run_dir
    path = out / "artifacts" / "compress.json"
    summary = json.loads(path.read_text())
    cal = {"method": "temperature_scaling", "temperature": 1.7, "n": 130, "ece_before": 0.2, "ece_after": 0.02,
           "test": {"ece_before": 0.12, "ece_after": 0.03, "n": N}, "recommended": {"target": 0.99, "threshold": 0.83}}  # fmt: skip
    summary["artifacts"][1] |= {"ece_before": 0.12, "ece_after": 0.03, "calibration": cal}
    write_json_atomic(path, summary)
    rep = build_report(spec, out, {})
    q8, q4 = rep["artifacts"]
    assert q8["calibration"] is None  # compressed before calibration existed
    assert q4["calibration"] == {"method": "temperature_scaling", "ece_before": 0.12, "ece_after": 0.03, "n": N, "temperature": 1.7,
                                 "recommended_threshold": 0.83}  # fmt: skip
    c = rep["cascade"]
    assert (c["artifact"], c["threshold"], c["threshold_source"]) == ("gguf-q4_k_m", 0.83, "recommended (target 0.99)")
    md = report_markdown(rep)
    assert "| 0.120 → 0.030 | pass |" in md and "at threshold 0.83 (recommended (target 0.99))" in md

    spec.bench.cascade_threshold = 0.9  # set in the spec: it wins
    c = build_report(spec, out, {})["cascade"]
    assert (c["threshold"], c["threshold_source"]) == (0.9, "threshold")


def test_run_serves_the_cascade_at_the_recommended_threshold_unless_the_spec_sets_one(run_dir, monkeypatch):
    from edgedistill.run import servers

    spec, out = run_dir
    started: dict[str, list[str]] = {}

    def start(name, cmd, logs):
        started[name] = cmd
        return servers._Server(name, None, logs / f"{name}.log", "http://127.0.0.1:1")

    monkeypatch.setattr(servers, "_start", start)
    monkeypatch.setattr(servers, "_wait_ready", lambda s: None)
    monkeypatch.setattr(servers, "_stop", lambda s: None)
    monkeypatch.setattr("edgedistill.bench.run.run_bench", lambda cfg: {})
    passed = [{"name": "onnx-int8", "format": "onnx", "path": str(out / "a")}, {"name": "gguf-q4_k_m", "format": "onnx", "path": str(out / "b")}]
    servers.serve_and_bench(spec, out.parent / "task.yaml", out, passed, out / "bench")
    cmd = started["cascade"]
    assert "--threshold" not in cmd and cmd[3] == str(out / "b")  # bench.cascade_artifact, at serve's default: the manifest's
    spec.bench.cascade_threshold = 0.8
    servers.serve_and_bench(spec, out.parent / "task.yaml", out, passed, out / "bench")
    assert started["cascade"][-2:] == ["--threshold", "0.8"]


# the calibration split's curve of the cascade artifact: fallback rate and agreement with the teacher's labels
CURVE = [{"threshold": 0.0, "fallback_rate": 0.0, "agreement": 0.9}, {"threshold": 0.5, "fallback_rate": 0.04, "agreement": 0.96},
         {"threshold": 0.83, "fallback_rate": 0.11, "agreement": 0.995}, {"threshold": 0.92, "fallback_rate": 0.13, "agreement": 0.995},
         {"threshold": 0.95, "fallback_rate": 0.3, "agreement": 1.0},
         {"threshold": 1.0, "fallback_rate": 1.0, "agreement": 1.0}]  # fmt: skip
THRESHOLDS = [{"target": 0.99, "threshold": 0.83, "fallback_rate": 0.11, "agreement": 0.995}]


def with_calibration(out, **cal):
    path = out / "artifacts" / "compress.json"
    summary = json.loads(path.read_text())
    summary["artifacts"][1]["calibration"] = {"n": 130, "thresholds": THRESHOLDS, "recommended": {"target": 0.99, "threshold": 0.83}, **cal}
    write_json_atomic(path, summary)


def test_the_cascades_prediction_at_the_served_threshold_from_the_curve(run_dir):
    """cascade.predicted at the threshold served: the curve's point with the largest threshold at or
    below it; accuracy = agreement x the teacher's test accuracy (0.98). Measured: fallback 0.1,
    accuracy 0.975 on 200 rows."""
    spec, out = run_dir
    with_calibration(out, curve=CURVE)
    c = build_report(spec, out, {})["cascade"]
    p = c["predicted"]
    assert (c["threshold"], p["threshold"], p["target"], p["n"], p["source"]) == (0.83, 0.83, 0.99, 130, "calibration split")
    assert (p["fallback_rate"], p["accuracy"], p["agreement"]) == (0.11, 0.9751, 0.995)
    assert "x the teacher's accuracy on the test split (0.98)" in p["accuracy_basis"]
    assert c["prediction_ok"] is True and c["prediction_error"] == {"fallback_rate": -0.01, "accuracy": -0.0001}
    assert c["prediction_in_interval"] == {"fallback_rate": True, "accuracy": True}

    assert c["target_met"] is None and "out of reach" not in report_markdown(build_report(spec, out, {}))  # an older manifest: unknown
    with_calibration(out, curve=CURVE, recommended={"target": 0.99, "threshold": 1.0, "met": False})
    c = build_report(spec, out, {})["cascade"]
    assert c["threshold"] == 1.0 and c["target_met"] is False
    assert "recommended target was out of reach" in report_markdown(build_report(spec, out, {}))
    with_calibration(out, curve=CURVE)

    spec.bench.cascade_threshold = 0.9  # set by hand: between two curve points, the lower one stands for it
    c = build_report(spec, out, {})["cascade"]
    assert (c["predicted"]["threshold"], c["predicted"]["target"], c["predicted"]["fallback_rate"], c["prediction_ok"]) == (0.9, None, 0.11, True)

    spec.bench.cascade_threshold = 0.96  # 30 % predicted to fall back, 10 % did: a miss far outside the measured interval
    c = build_report(spec, out, {})["cascade"]
    assert (c["predicted"]["fallback_rate"], c["predicted"]["accuracy"]) == (0.3, 0.98)
    assert c["prediction_ok"] is False and c["prediction_error"] == {"fallback_rate": -0.2, "accuracy": -0.005}
    assert c["prediction_in_interval"]["fallback_rate"] is False

    spec.bench.cascade_threshold = 0.5  # 4 % predicted, 10 % measured: 6 points off, outside the interval too
    c = build_report(spec, out, {})["cascade"]
    assert c["prediction_ok"] is False and c["prediction_error"]["fallback_rate"] == 0.06


def test_an_old_manifest_without_a_curve_predicts_only_at_its_thresholds(run_dir):
    spec, out = run_dir
    with_calibration(out)
    c = build_report(spec, out, {})["cascade"]
    assert (c["predicted"]["fallback_rate"], c["predicted"]["accuracy"], c["prediction_ok"]) == (0.11, 0.9751, True)
    spec.bench.cascade_threshold = 0.9
    c = build_report(spec, out, {})["cascade"]
    assert c["predicted"] is None and c["prediction_ok"] is None and c["prediction_error"] is None
    assert "No prediction for this threshold" in report_markdown(build_report(spec, out, {}))


def test_no_measurement_no_verdict(run_dir):
    spec, out = run_dir
    with_calibration(out, curve=CURVE)
    bench = json.loads((out / "bench" / "report.json").read_text())
    del bench["quality"]["cascade"]
    write_json_atomic(out / "bench" / "report.json", bench)
    c = build_report(spec, out, {})["cascade"]
    assert c["predicted"]["fallback_rate"] == 0.11 and c["prediction_ok"] is None
    assert "Prediction not checked" in report_markdown(build_report(spec, out, {}))


def test_report_markdown_shows_predicted_beside_measured(run_dir):
    spec, out = run_dir
    with_calibration(out, curve=CURVE)
    rep = build_report(spec, out, {})
    c = rep["cascade"]
    md = report_markdown(rep)
    assert "Predicted (calibration split, n=130) vs measured (test, n=200) at threshold 0.83:" in md
    fb = c["fallback_rate_ci"]
    assert f"| fallback rate | 0.110 | 0.100 ({fb[0]:.2f}–{fb[1]:.2f}) | -0.010 |" in md
    assert "| accuracy | 0.975 | 0.975 (" in md and "| +0.000 |" in md
    assert "The prediction held: fallback rate and accuracy each within 2 points" in md
    assert "the test split alone cannot settle a 2-point difference" in md  # ±4 points at n=200, p=0.1

    spec.bench.cascade_threshold = 0.96
    md = report_markdown(build_report(spec, out, {}))
    assert ("The prediction missed (more than 2 points): fallback rate off by 20.0 points "
            "(outside the measured interval: a real miss)") in md  # accuracy, 0.5 points off, is not named
    spec.bench.cascade_threshold = 0.93  # 13 % predicted, 10 % measured: 3 points off, but inside the measured interval
    md = report_markdown(build_report(spec, out, {}))
    assert "fallback rate off by 3.0 points (inside the measured interval: within noise)" in md
    spec.bench.cascade_threshold = 0.0  # predicted 0 %, measured 10 %; accuracy 0.9 x 0.98 = 0.882 vs 0.975
    md = report_markdown(build_report(spec, out, {}))
    assert "fallback rate off by 10.0 points (outside" in md and "accuracy off by 9.3 points (outside" in md
