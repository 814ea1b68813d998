"""`edgedistill retrain`: promotion refuses a worse student, and the whole loop on a tiny model.

The loop test distils a tiny student with the loopback keyword teacher (as tests/test_pipeline.py),
compresses it with a stand-in format whose runtime's accuracy the test controls (as
tests/test_compress_pipeline.py: the real formats have their own tests), then retrains from a
hand-made traffic log: real labelling through the cache, real validation, real continued training."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import yaml
from edgedistill.compress import pipeline
from edgedistill.compress.formats import Built
from edgedistill.run.promote import SERVING, current_artifact, decide, recommended_cascade, retrain_markdown
from edgedistill.run.retrain import retrain_folder, run_retrain

from edgedistill.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_compress_pipeline import Oracle
from tests.test_pipeline import WORDS, KeywordTeacher, make_spec
from tests.test_retrain_data import record, write_log


def test_promotion_refuses_a_worse_student_and_takes_an_equal_or_better_one():
    worse = decide("accuracy", 0.80, 0.7999)
    assert worse["promoted"] is False and "worse" in worse["reason"] and "allowed drop 0" in worse["rule"]
    assert decide("accuracy", 0.80, 0.80)["promoted"] is True  # "at least as good": a tie is promoted
    assert decide("accuracy", 0.80, 0.95)["promoted"] is True
    # not built, or failed compress's own gate: never promoted, whatever its score
    failed = decide("accuracy", 0.8, None, built=False, why_not_built="the new gguf-q4_k_m failed compress's gate")
    assert failed == {"promoted": False, "reason": "the new gguf-q4_k_m failed compress's gate", "rule": worse["rule"]}


def test_the_served_artifact_follows_serving_json(tmp_path):
    spec = types.SimpleNamespace(bench=types.SimpleNamespace(cascade_artifact="gguf-q4_k_m"))
    with pytest.raises(UserError, match="no artifacts/compress.json"):
        current_artifact(tmp_path, spec)
    arts = tmp_path / "artifacts"
    for name in ("gguf-q8_0", "gguf-q4_k_m"):
        (arts / name).mkdir(parents=True)
    rows = [{"name": "gguf-q8_0", "path": str(arts / "gguf-q8_0"), "passed": True}, {"name": "gguf-q4_k_m", "path": str(arts / "gguf-q4_k_m"), "passed": False}]
    (arts / "compress.json").write_text(json.dumps({"artifacts": rows}))
    assert current_artifact(tmp_path, spec)["name"] == "gguf-q8_0"  # the cascade's artifact failed its gate: the first that passed
    rows[1]["passed"] = True
    (arts / "compress.json").write_text(json.dumps({"artifacts": rows}))
    cur = current_artifact(tmp_path, spec)
    assert cur == {"artifact": arts / "gguf-q4_k_m", "name": "gguf-q4_k_m", "student": tmp_path / "student", "data": tmp_path / "data"}
    new = tmp_path / "retrain-1" / "artifacts" / "gguf-q4_k_m"
    new.mkdir(parents=True)
    (tmp_path / SERVING).write_text(json.dumps({"artifact": str(new), "student": str(tmp_path / "retrain-1" / "student")}))
    assert current_artifact(tmp_path, spec)["artifact"] == new and current_artifact(tmp_path, spec)["data"] == tmp_path / "data"
    (tmp_path / SERVING).write_text("{oops")
    with pytest.raises(UserError, match="damaged"):
        current_artifact(tmp_path, spec)


def test_recommended_cascade_from_the_manifests_calibration_block():
    cal = {"thresholds": [{"target": 0.95, "threshold": 0.5, "fallback_rate": 0.1, "agreement": 0.96},
                          {"target": 0.99, "threshold": 0.8, "fallback_rate": 0.3, "agreement": 0.991}],
           "recommended": {"target": 0.99, "threshold": 0.8}}
    assert recommended_cascade({"calibration": cal}) == {"target": 0.99, "threshold": 0.8, "fallback_rate": 0.3, "agreement": 0.991}
    assert recommended_cascade({"calibration": {"method": "temperature"}}) is None and recommended_cascade({}) is None


def test_retrain_folders_are_numbered_and_an_unfinished_one_resumed(tmp_path):
    assert retrain_folder(tmp_path) == tmp_path / "retrain-1"
    (tmp_path / "retrain-1").mkdir()
    assert retrain_folder(tmp_path) == tmp_path / "retrain-1"  # no retrain.json: unfinished
    (tmp_path / "retrain-1" / "retrain.json").write_text("{}")
    assert retrain_folder(tmp_path) == tmp_path / "retrain-2"


# --- the loop --------------------------------------------------------------------------------


def oracle_for(student: str, wrong_every: dict[str, int]) -> Oracle:
    """Every test answer right, except for a student whose path contains a key of ``wrong_every``
    (every n-th answer wrong there, the FP student and its artifacts alike)."""
    from transformers import AutoTokenizer

    return Oracle(AutoTokenizer.from_pretrained(student), next((n for key, n in wrong_every.items() if key in str(student)), 0))


def stand_in_format(wrong_every: dict[str, int]):
    """A format whose runtime answers as :func:`oracle_for` its source student."""

    def build(src, fmt, out, calib, work):
        (out / "model.bin").write_bytes(b"x" * 100)
        return Built(model_file="model.bin", method="stand-in", tools={"fake": "1"})

    def load(folder, manifest):
        return oracle_for(manifest["source"]["checkpoint"], wrong_every)

    return types.SimpleNamespace(build=build, load=load)


@pytest.fixture
def teacher():
    t = KeywordTeacher(WORDS)
    yield t
    t.close()


def test_retrain_end_to_end_promotes_then_refuses_a_worse_student(tmp_path, teacher, tiny_model_dir, monkeypatch):
    from edgedistill.distill.pipeline import run_distill

    spec_path = make_spec(tmp_path, teacher.url, tiny_model_dir)
    raw = yaml.safe_load(spec_path.read_text())
    raw["compress"] = {"formats": "gguf:q4_k_m", "calibration_samples": 8, "agreement_prompts": 2}
    spec_path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    wrong_every: dict[str, int] = {}
    monkeypatch.setattr("edgedistill.runtimes.hf.HFRuntime", lambda folder: oracle_for(folder, wrong_every))
    monkeypatch.setattr(pipeline, "_module", lambda fmt: stand_in_format(wrong_every))
    run_distill(spec_path, run)
    pipeline.run_compress(run / "student", calibration=run / "data", task=spec_path, out=run / "artifacts", strict=False)
    old_artifact = run / "artifacts" / "gguf-q4_k_m"
    old_bytes = (old_artifact / "manifest.json").read_bytes()

    log = tmp_path / "log"
    write_log(log, "traffic-0001.jsonl", [
        record("please track the card I ordered last week", "card_arrival"),  # a fallback: the answer is reused
        record([{"role": "user", "content": "I need to reset the pin code on my account"}], "change_pin", route="/v1/chat/completions", shadow=True),
        record("what rate do you give for dollars on a transfer"),  # answered by the student alone: labelled now
        record("where is my card"),  # a test input: contaminated
        '{"time": "2026-12-02T08:00:01Z", "req',  # cut by a crash
        {k: v for k, v in record(None).items() if k != "input"} | {"input_sha256": "cd" * 32},
    ])
    asked_before = len(teacher.asked)

    rep = run_retrain(spec_path, log, run)
    out = run / "retrain-1"
    new_asked = teacher.asked[asked_before:]
    assert sorted(new_asked) == ["what rate do you give for dollars on a transfer", "where is my card"]  # never the reused ones
    t = rep["data"]["traffic"]
    assert t["reused_teacher_answers"] == 2 and t["newly_labelled"] == 2 and t["dropped"] == {"contaminated": 1} and t["kept"] == 3
    assert t["log"]["broken_lines"] == 1 and t["log"]["hash_only"] == 1
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    cal = [json.loads(x) for x in (out / "data" / "calibration.jsonl").read_text().splitlines()]
    held = sum(r["source"] == "traffic" for r in cal)  # half of 3 traffic rows, rounded down: calibration, not training
    assert held == 1 and len(train) == t["old_rows"] + 3 - held and sum(r["source"] == "traffic" for r in train) == 3 - held
    assert rep["continued_from"] == str(run / "student")
    student_manifest = json.loads((out / "student" / "manifest.json").read_text())
    assert student_manifest["continued_from"] == str(run / "student") and student_manifest["data_hash"]
    assert (out / "artifacts" / "gguf-q4_k_m" / "manifest.json").exists()
    # equal on every test row: at least as good, promoted; the old artifact is untouched
    assert rep["old"]["value"] == rep["new"]["value"] == 1.0 and rep["comparison"]["diff"] == 0
    assert rep["decision"]["promoted"] is True
    serving = json.loads((run / SERVING).read_text())
    assert serving["artifact"] == str(out / "artifacts" / "gguf-q4_k_m") and serving["from"] == str(old_artifact) and serving["promoted_at"]
    assert (old_artifact / "manifest.json").read_bytes() == old_bytes
    md = (out / "retrain.md").read_text()
    assert "**PROMOTED**" in md and "2 teacher answers already paid for reused" in md and "contaminated 1" in md
    assert json.loads((out / "retrain.json").read_text())["decision"]["promoted"] is True

    # the next retrain continues from the promoted student, which now answers every 3rd row wrong (its FP
    # student too, so compress's gate vs FP passes): worse than the served one, refused
    wrong_every["retrain-2"] = 3
    asked_before = len(teacher.asked)
    rep2 = run_retrain(spec_path, log, run)
    out2 = run / "retrain-2"
    assert teacher.asked[asked_before:] == []  # every label already paid for: from the cache
    assert rep2["continued_from"] == str(out / "student")
    assert rep2["new"]["value"] < rep2["old"]["value"] == 1.0 and rep2["comparison"]["diff"] < 0
    assert rep2["decision"]["promoted"] is False and "worse" in rep2["decision"]["reason"]
    assert json.loads((run / SERVING).read_text()) == serving  # still the first retrain's artifact
    assert (out2 / "artifacts" / "gguf-q4_k_m").is_dir()  # the refused one is kept, not served
    assert "**NOT PROMOTED**" in (out2 / "retrain.md").read_text() and retrain_markdown(rep2) == (out2 / "retrain.md").read_text()


def test_cli_retrain_bad_input_is_one_line(tmp_path):
    spec_path = make_spec(tmp_path, "http://127.0.0.1:9/v1", Path("/nonexistent"))
    assert_one_line_error(run_cli("retrain", str(spec_path), "--traffic", str(tmp_path / "log"), "--run", str(tmp_path / "nope")), "--run")
