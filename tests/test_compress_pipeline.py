"""`edgedistill compress` orchestration: manifests, reuse, the quality gate and the summary, with
stand-in runtimes whose accuracy we control (the real formats have their own tests)."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from edgedistill.compress import pipeline
from edgedistill.compress.calibration import load_calibration
from edgedistill.compress.formats import Built, parse_formats

from edgedistill.errors import UserError
from edgedistill.manifest import read_manifest

LABELS = ["card_arrival", "exchange_rate", "change_pin"]
TEST = [("where is my card", "card_arrival"), ("the euro rate today", "exchange_rate"), ("new pin please", "change_pin")] * 4


class Oracle:
    """Answers the gold label for a prompt it recognises; wrong on every `wrong_every`-th prompt
    (a stand-in that ignores the constraint, but records which prompts came with one)."""

    constrained: ClassVar[list] = []  # the constraint of each answer asked for, across every Oracle of a test

    def __init__(self, tokenizer, wrong_every: int = 0):
        self.tok, self.wrong_every, self.calls = tokenizer, wrong_every, 0

    def generate(self, prompt_ids, max_new_tokens, *, ignore_eos=False, constraint=None):
        text = self.tok.decode(prompt_ids)
        if ignore_eos:
            assert constraint is None  # speed is measured unconstrained
            return [5] * max_new_tokens
        Oracle.constrained.append(constraint)
        self.calls += 1
        label = next((lab for q, lab in TEST if q in text), "card_arrival")
        if self.wrong_every and self.calls % self.wrong_every == 0:
            label = "no idea"
        return self.tok(label, add_special_tokens=False)["input_ids"][:max_new_tokens] + [self.tok.eos_token_id]

    def close(self):
        pass


@pytest.fixture
def student(tmp_path, tiny_model_dir):
    ck = tmp_path / "run" / "student"
    shutil.copytree(tiny_model_dir, ck)
    data = tmp_path / "run" / "data.jsonl"
    data.write_text("".join(json.dumps({"input": f"{q} {i}", "output": lab}) + "\n" for i, (q, lab) in enumerate(TEST * 2)))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"input": q, "output": lab}) + "\n" for q, lab in TEST))
    spec = {
        "name": "tiny", "type": "classification", "instructions": "Classify.", "labels": LABELS,
        "seeds": [{"input": f"{q} {i}", "output": lab} for i, (q, lab) in enumerate(TEST)],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"},
        "student": {"path": str(ck)},
        "generation": {"label_max_tokens": 8},
        "compress": {"max_accuracy_drop": 0.1, "calibration_samples": 8, "agreement_prompts": 3},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    return ck, data, tmp_path / "task.yaml"


def fake_family(tokenizer_dir, wrong_every: dict[str, int], builds: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def build(src, fmt, out, calib, work):
        builds.append(fmt.name)
        assert calib and all(isinstance(t, str) and "Classify." in t for t in calib)  # task data, chat-rendered
        (out / f"model-{fmt.variant}.bin").write_bytes(b"x" * 1000 * fmt.bits)
        return Built(model_file=f"model-{fmt.variant}.bin", method=f"fake {fmt.variant}", tools={"fake": "1"})

    def load(folder, manifest):
        assert (folder / manifest["model_file"]).exists()
        return Oracle(tok, wrong_every.get(manifest["variant"], 0))

    return types.SimpleNamespace(build=build, load=load)


def run(student, monkeypatch, wrong_every, builds, **kw):
    ck, data, spec = student
    from transformers import AutoTokenizer

    monkeypatch.setattr("edgedistill.runtimes.hf.HFRuntime", lambda folder: Oracle(AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(pipeline, "_module", lambda fmt: fake_family(ck, wrong_every, builds))
    return pipeline.run_compress(ck, formats="gguf:q8_0,gguf:q4_k_m", calibration=data, task=spec, **kw)


def test_artifacts_manifests_gate_and_reuse(student, monkeypatch):
    builds: list[str] = []
    Oracle.constrained = []
    summary = run(student, monkeypatch, {}, builds)
    out = student[0].parent / "artifacts"
    assert builds == ["gguf-q8_0", "gguf-q4_k_m"]
    assert summary["fp"]["accuracy"] == 1.0 and summary["constrained"] is True
    # the test set is answered under the task's label constraint (one object for the run); agreement is not
    given = [c for c in Oracle.constrained if c is not None]
    assert len(given) == 3 * len(TEST)  # the FP reference and two artifacts, every test row
    assert len({id(c) for c in given}) == 1 and type(given[0]).__name__ == "LabelSet"
    assert Oracle.constrained.count(None) == 3 * 3  # the agreement prompts (3 per runtime)
    for row in summary["artifacts"]:
        assert row["passed"] and row["accuracy"] == 1.0 and row["drop"] == 0
        m = read_manifest(out / row["name"], verify=True)
        assert m["kind"] == "artifact" and m["format"] == "gguf" and m["bits"] == row["bits"]
        assert m["inputs"]["checkpoint"] and m["inputs"]["calibration"] and m["tools"] == {"fake": "1"}
        assert m["task"]["name"] == "tiny" and m["gate"]["passed"] and m["size_mb"] == pytest.approx(row["bits"] / 1000, abs=0.005)
        assert m["quality"]["constrained"] is True and m["gate"]["constrained"] is True and row["constrained"] is True
        # sample size, interval, and the drop's paired test vs the FP student on the same rows
        assert row["n"] == len(TEST) and row["accuracy_ci"] == [0.7574, 1.0]  # Wilson, 12 of 12
        assert row["drop_ci"][0] < 0 < row["drop_ci"][1] and row["drop_p_value"] == 1.0 and row["drop_test"] == "mcnemar_exact"
        assert m["gate"]["drop_ci"] == row["drop_ci"] and m["quality"]["drop_test"]["discordant"] == [0, 0]
    assert summary["fp"]["accuracy_ci"] == [0.7574, 1.0] and summary["fp"]["n"] == len(TEST)
    md = (out / "compress.md").read_text()
    assert md.count("| gguf-") == 2 and "1.000 (0.76–1.00)" in md and "within noise: gguf-q8_0, gguf-q4_k_m" in md
    assert "| FP student (transformers) |" in md and "| change vs FP |" in md
    # the same tables for run's quantized-teacher baseline name their reference the FP teacher
    assert "| FP teacher (transformers) |" in pipeline.summary_markdown({**summary, "model": "teacher"})

    builds.clear()
    again = run(student, monkeypatch, {}, builds)
    assert builds == [] and all(r["reused"] for r in again["artifacts"])  # same inputs and settings: nothing rebuilt

    # an artifact measured before the paired test existed is measured again (its answers were not kept), not a KeyError
    for name in ("gguf-q8_0", "gguf-q4_k_m"):
        m = json.loads((out / name / "manifest.json").read_text())
        del m["quality"]["drop_test"]
        (out / name / "manifest.json").write_text(json.dumps(m))
    Oracle.constrained = []
    third = run(student, monkeypatch, {}, builds)
    assert builds == [] and all(r["drop_p_value"] == 1.0 for r in third["artifacts"])
    assert len([c for c in Oracle.constrained if c is not None]) == 2 * len(TEST)  # the two artifacts, not the cached FP


def test_gate_fails_loudly_and_keeps_the_artifact_aside(student, monkeypatch):
    builds: list[str] = []
    with pytest.raises(pipeline.CompressGateFailed, match="gguf-q4_k_m") as e:
        run(student, monkeypatch, {"q4_k_m": 2}, builds)  # half the answers wrong: drop 0.5 > 0.1
    assert e.value.exit_code == 3
    out = student[0].parent / "artifacts"
    assert (out / "gguf-q8_0" / "manifest.json").exists()
    rejected = read_manifest(out / "rejected" / "gguf-q4_k_m", verify=True)
    assert rejected["gate"]["passed"] is False and rejected["gate"]["drop"] == pytest.approx(0.5)
    # wrong on 6 of 12 rows the FP student gets right: exact McNemar 2 / 2^6
    assert rejected["gate"]["drop_p_value"] == pytest.approx(0.0312, abs=1e-4) and rejected["gate"]["drop_ci"][0] > 0
    assert "a real change: gguf-q4_k_m" in (out / "compress.md").read_text()

    summary = run(student, monkeypatch, {"q4_k_m": 2}, builds, keep_failed=True)
    row = {r["name"]: r for r in summary["artifacts"]}["gguf-q4_k_m"]
    assert not row["passed"] and Path(row["path"]) == out / "gguf-q4_k_m"
    assert builds == ["gguf-q8_0", "gguf-q4_k_m"]  # the rejected artifact was reused, not rebuilt


def test_changed_calibration_rebuilds(student, monkeypatch):
    builds: list[str] = []
    run(student, monkeypatch, {}, builds)
    data = student[1]
    data.write_text(data.read_text().replace("where", "when"))
    run(student, monkeypatch, {}, builds)
    assert builds.count("gguf-q8_0") == 2


def test_bad_formats_are_one_line_errors():
    with pytest.raises(UserError, match="unknown format 'tflite'"):
        parse_formats("tflite:int8")
    with pytest.raises(UserError, match="gguf:q8_0"):
        parse_formats("gguf:q3")
    with pytest.raises(UserError, match="twice"):
        parse_formats("onnx:int4,onnx:int4")
    fmts = parse_formats("gguf:q4_k_m, gptq:int4:group_size=64")
    assert [f.name for f in fmts] == ["gguf-q4_k_m", "gptq-int4"] and fmts[1].option("group_size") == "64" and fmts[1].bits == 4


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not an HF checkpoint"):
        pipeline.run_compress(tmp_path)


def test_a_cached_reference_without_the_tasks_metric_is_rescored(tmp_path):
    """A reference.json measured before the task had its metric (qa scored by exact match only) is
    scored again from its stored answers, not re-measured and not a KeyError in the gate."""
    from edgedistill.task import Task

    spec = types.SimpleNamespace(task=Task(type="qa", instructions="x"))
    golds, preds = ["Denver Broncos", "Paris"], ["the Broncos", "Paris"]
    ref = {"key": "k", "scores": {"exact_match": 0.5, "n": 2}, "constrained": False, "tokens_per_s": 1.0, "preds": preds, "tokens": []}
    (tmp_path / "reference.json").write_text(json.dumps(ref))
    got = pipeline._reference(None, None, spec, [], golds, [], tmp_path / "reference.json", "k")
    assert got["scores"]["token_f1"] == pytest.approx((2 / 3 + 1) / 2) and got["scores"]["exact_match"] == 0.5
    assert got["scores"]["exact_match_ci"] == [0.0945, 0.9055] and len(got["scores"]["token_f1_ci"]) == 2  # Wilson 1 of 2


def test_a_build_that_chooses_scores_on_distillation_rows_not_the_calibration_split(student, monkeypatch):
    """A format whose build takes ``score`` (GGUF: with or without the importance matrix) gets the
    task's primary metric of a runtime on distillation rows (teacher labels), never on the calibration
    split: the cascade's thresholds are fitted there, and a build picked for scoring best on it would
    make them look better than they are. The rows' hash joins the artifact's inputs."""
    ck, data, spec = student
    doc = yaml.safe_load(spec.read_text())
    doc.setdefault("compress", {})["calibration_samples"] = 2  # the importance matrix's rows: 2 of the 24
    spec.write_text(yaml.safe_dump(doc))
    split = ck.parent / "data" / "calibration.jsonl"
    split.parent.mkdir()
    in_both = json.loads(data.read_text().splitlines()[5])  # a --calibration file may share rows with the split
    rows = [{"input": f"{q} (held out)", "output": lab} for q, lab in TEST[:3]] * 2 + [in_both]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    scored: list[dict] = []
    asked: list[str] = []
    family = fake_family(ck, {}, [])

    class Recording(Oracle):
        def generate(self, prompt_ids, max_new_tokens, **kw):
            asked.append(self.tok.decode(prompt_ids))
            return super().generate(prompt_ids, max_new_tokens, **kw)

    def build(src, fmt, out, calib, work, score=None):
        scored.append(score(Recording(tok)))  # right on every row
        scored.append(score(Oracle(tok, wrong_every=2)))  # wrong on every second
        return family.build(src, fmt, out, calib, work)

    monkeypatch.setattr("edgedistill.runtimes.hf.HFRuntime", lambda folder: Oracle(AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(pipeline, "_module", lambda fmt: types.SimpleNamespace(build=build, load=family.load))
    summary = pipeline.run_compress(ck, formats="gguf:q4_k_m", calibration=data, task=spec)
    n = len(TEST) * 2 - 2 - 1  # the data file's rows, less the matrix's 2 and the one in the split
    assert scored == [{"metric": "accuracy", "value": 1.0, "n": n}, {"metric": "accuracy", "value": round(11 / 21, 4), "n": n}]
    assert len(asked) == n and not any("held out" in a or in_both["input"] in a for a in asked)
    m = read_manifest(Path(summary["artifacts"][0]["path"]), verify=True)
    assert m["inputs"]["chosen_on"] and m["inputs"]["calibration"]

    split.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:3], in_both]))  # another split, same choice rows: reused
    scored.clear()
    pipeline.run_compress(ck, formats="gguf:q4_k_m", calibration=data, task=spec)
    assert scored == []


def test_choice_rows_come_from_outside_the_quantizers_sample_first(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": "a"}) + "\n" for i in range(30)))
    cal = load_calibration(data, samples=4)
    assert len(cal.rows) == 4 and len(cal.rest) == 26 and not {r["input"] for r in cal.rows} & {r["input"] for r in cal.rest}
    assert cal.choice_rows() == cal.rest and cal.choice_rows(n=21) == cal.rest[:21]  # never the matrix's own rows
    assert cal.choice_rows(exclude={cal.rest[0]["input"]}) == cal.rest[1:]  # nor a row of the calibration split
    assert cal.choice_rows(n=19) == []  # too few to choose on: no choice
