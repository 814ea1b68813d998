"""compress calibrates every artifact it measures, on the calibration split (teacher labels), with
serve's calibration command (/v1/predict's code path; here a fake numpy model behind serve's engine,
in-process): the manifest's calibration block, its thresholds per target, the test split's ECE,
compress.json/md, reuse and the skip."""

from __future__ import annotations

import json
import types
from itertools import pairwise

import pytest
import yaml
from edgedistill.compress import pipeline
from edgedistill.compress.formats import Built
from edgedistill.serve.engine import Engine

from edgedistill.manifest import read_manifest
from edgedistill.thresholds import CURVE_POINTS, curve_point_at, threshold_curve
from tests.serve_fakes import FakeRunner
from tests.test_compress_pipeline import TEST, Oracle, student  # noqa: F401 -- the fixture

# the calibration split: the student agrees with the teacher's label on 120 rows (sure), and is wrong
# on 2 rows fairly sure and on 8 rows unsure. 95 % agreement lets the 2 through (128/130 counts 128/131
# = 0.977); 98 % and 99 % need all 10 sent to the teacher (130/131 = 0.992).
SURE, FAIRLY, UNSURE = 120, 2, 8
CALIB = ([(f"sure {i} where is my card", "card_arrival", "card_arrival", 20.0) for i in range(SURE)]
         + [(f"fairly {i} new pin", "change_pin", "exchange_rate", 4.0) for i in range(FAIRLY)]
         + [(f"unsure {i} euro rate", "exchange_rate", "change_pin", 0.3) for i in range(UNSURE)])  # fmt: skip
REPLY = {q: (answer, peak) for q, _, answer, peak in CALIB} | {q: (lab, 20.0) for q, lab in TEST}


def script(prompt: str) -> tuple[str, float]:
    text = prompt.split("user: ", 1)[1].split("\n", 1)[0]
    return REPLY[text]


def gguf_family(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def build(src, fmt, out, calib, work):
        (out / f"model-{fmt.variant}.gguf").write_bytes(b"GGUF" + b"\0" * 100)  # what serve's loader checks
        return Built(model_file=f"model-{fmt.variant}.gguf", method=f"fake {fmt.variant}", tools={"fake": "1"})

    return types.SimpleNamespace(build=build, load=lambda folder, manifest: Oracle(tok))


@pytest.fixture
def engines(monkeypatch):
    """Serve's calibration command, run in this process (compress runs it as its own) on the fake model."""
    from edgedistill.serve import calibrate as serve_calibrate

    made: list[str] = []

    def make_engine(artifact, settings):
        made.append(artifact.name)
        return Engine(FakeRunner(script), max_queue=settings.max_queue)

    def run_calibration(cmd):
        assert cmd[1:3] == ["-m", "edgedistill.serve.calibrate"]
        try:
            serve_calibrate.main(cmd[3:])
        except SystemExit as e:
            return e.code, "error"
        return 0, ""

    monkeypatch.setattr("edgedistill.serve.state._make_engine", make_engine)
    monkeypatch.setattr("edgedistill.compress.calibrate.run_calibration", run_calibration)
    return made


def run(student, monkeypatch):  # noqa: F811
    ck, data, spec = student
    from transformers import AutoTokenizer

    monkeypatch.setattr("edgedistill.runtimes.hf.HFRuntime", lambda folder: Oracle(AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(pipeline, "_module", lambda fmt: gguf_family(ck))
    return pipeline.run_compress(ck, formats="gguf:q8_0", calibration=data, task=spec)


def write_split(student):  # noqa: F811
    spec = yaml.safe_load(student[2].read_text())
    spec["generation"]["label_max_tokens"] = 16  # the fake serve model is byte-level: room for a whole label
    student[2].write_text(yaml.safe_dump(spec))
    folder = student[0].parent / "data"
    folder.mkdir(exist_ok=True)
    rows = [{"id": f"c{i}", "input": q, "output": label} for i, (q, label, _, _) in enumerate(CALIB)]
    (folder / "calibration.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_measured_artifact_gets_its_calibration_block(student, monkeypatch, engines):  # noqa: F811
    write_split(student)
    summary = run(student, monkeypatch)
    out = student[0].parent / "artifacts"
    m = read_manifest(out / "gguf-q8_0", verify=True)
    cal = m["calibration"]
    n = SURE + FAIRLY + UNSURE
    assert cal["split"] == "calibration" and cal["n"] == n and cal["method"] == "temperature_scaling"
    assert cal["temperature"] > 0 and cal["classification"]["temperature"] == cal["temperature"]
    assert 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1 and cal["accuracy"] == round(SURE / n, 4)
    hist = cal["confidence_histogram"]
    assert hist["edges"] == [i / 10 for i in range(11)] and len(hist["counts"]) == 10 and sum(hist["counts"]) == n

    th = cal["thresholds"]
    assert [t["target"] for t in th] == [0.95, 0.98, 0.99]
    assert [t["threshold"] for t in th] == sorted(t["threshold"] for t in th)  # a higher target never a lower threshold
    # 95 %: only the unsure rows go to the teacher; 98 and 99 %: the fairly sure wrong ones too (all the wrong answers)
    assert (th[0]["fallback_rate"], th[0]["agreement"]) == (round(UNSURE / n, 4), round((n - FAIRLY) / n, 4))
    assert all((t["fallback_rate"], t["agreement"]) == (round((FAIRLY + UNSURE) / n, 4), 1.0) for t in th[1:])
    assert th[0]["threshold"] < th[1]["threshold"]
    assert all(t["met"] and t["agreement_counted"] == round(n * t["agreement"] / (n + 1), 4) for t in th)
    assert cal["recommended"] == {"target": 0.99, "threshold": th[2]["threshold"], "met": True} and "n/(n+1)" in cal["threshold_rule"]
    # the curve: the cascade on the split at the candidate thresholds, each target's read back exactly
    curve = cal["curve"]
    assert [p["threshold"] for p in curve] == sorted({p["threshold"] for p in curve}) and curve[0]["threshold"] == 0.0
    assert (curve[0]["fallback_rate"], curve[0]["agreement"]) == (0.0, round(SURE / n, 4)) and curve[-1] == {"threshold": 1.0, "fallback_rate": 1.0, "agreement": 1.0}
    for t in th:
        assert curve_point_at(curve, t["threshold"]) == {k: t[k] for k in ("threshold", "fallback_rate", "agreement")}
    rates = [p["fallback_rate"] for p in curve]
    assert rates == sorted(rates)

    test = cal["test"]
    assert test["n"] == len(TEST) and test["n_unparsed"] == 0 and 0 <= test["ece_before"] <= 1 and 0 <= test["ece_after"] <= 1
    row = summary["artifacts"][0]
    assert (row["ece_before"], row["ece_after"]) == (test["ece_before"], test["ece_after"])
    assert row["calibration"]["recommended"] == cal["recommended"] and row["calibration"]["curve"] == curve
    assert json.loads((out / "compress.json").read_text())["artifacts"][0]["ece_after"] == test["ece_after"]
    md = (out / "compress.md").read_text()
    assert f"{test['ece_before']:.3f} → {test['ece_after']:.3f}" in md and f"| {th[2]['threshold']} |" in md
    assert engines == ["tiny-gguf-q8_0"]

    again = run(student, monkeypatch)  # nothing changed: the stored calibration is reused, no engine built
    assert engines == ["tiny-gguf-q8_0"] and again["artifacts"][0]["calibration"]["recommended"] == cal["recommended"]


def test_no_calibration_split_is_a_note_not_a_failure(student, monkeypatch, engines, capsys):  # noqa: F811
    summary = run(student, monkeypatch)
    row = summary["artifacts"][0]
    assert row["passed"] and row["calibration"] is None and row.get("ece_before") is None and engines == []
    assert "calibration" not in read_manifest(student[0].parent / "artifacts" / "gguf-q8_0")
    assert "no calibration split" in capsys.readouterr().err


def test_the_curve_is_thinned_but_keeps_the_targets_thresholds():
    """300 distinct confidences: at most ~60 points spread evenly in fallback rate, 0 and 1 and the
    kept thresholds exact; the point standing for any threshold is the largest one at or below it."""
    conf = [i / 300 for i in range(300)]
    right = [i % 7 != 0 or i > 150 for i in range(300)]  # is the student's answer right (the teacher's always is)
    teacher = [True] * 300
    keep = [0.123333, 0.501667]  # midpoints between neighbouring confidences, as the targets' thresholds are
    curve = threshold_curve(right, conf, teacher, keep=keep)
    assert len(curve) <= CURVE_POINTS + len(keep) + 1
    ths = [p["threshold"] for p in curve]
    assert ths[0] == 0.0 and ths[-1] == 1.0 and set(keep) <= set(ths)
    rows_back = [round(p["fallback_rate"] * 300) for p in curve]  # rates are rounded to 4 decimals: back to row counts
    assert max(b - a for a, b in pairwise(rows_back)) <= 6  # 301 candidates, every 6th kept
    at = curve_point_at(curve, 0.501667)
    assert (at["fallback_rate"], at["agreement"]) == (round(151 / 300, 4), 1.0)  # rows 0..150 fall back; every wrong one among them
    assert curve_point_at(curve, 0.2)["threshold"] <= 0.2 < curve[ths.index(curve_point_at(curve, 0.2)["threshold"]) + 1]["threshold"]
    assert curve_point_at([], 0.5) is None and curve_point_at(curve[1:], 0.0) is None
