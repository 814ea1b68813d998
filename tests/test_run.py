"""`edgedistill run`: stages skipped when their inputs and outputs are unchanged, rerun (with
everything after them) when not; the report assembled from what the stages wrote. The stages
themselves are stand-ins that write what the real ones write (they have their own tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from edgedistill.run import stages as run_mod

from edgedistill.errors import UserError
from edgedistill.manifest import write_json_atomic, write_manifest

LABELS = ["card_arrival", "exchange_rate"]


@pytest.fixture
def spec_path(tmp_path) -> Path:
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "output": LABELS[i % 2]}) + "\n" for i in range(4)))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    spec = {
        "name": "tiny", "type": "classification", "instructions": "Classify.", "labels": LABELS,
        "seeds": [{"input": f"seed {i}", "output": LABELS[i % 2]} for i in range(10)],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "t"},
        "student": {"path": "base"},
    }
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.fixture(autouse=True)
def prepared(monkeypatch):
    """compress's tool preparation (venvs, sources) that run_all starts in the background: recorded, not run."""
    seen: list[str] = []

    def fake_prepare(formats):
        time.sleep(0.2)  # still running when distill returns: run_all must wait for it
        seen.append(formats)

    monkeypatch.setattr("edgedistill.compress.pipeline.prepare_tools", fake_prepare)
    return seen


@pytest.fixture
def calls(monkeypatch):
    calls: list[str] = []

    def fake_distill(spec_path, out, skip_gate=False):
        calls.append("distill")
        for name in ("student", "data"):
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "weights.bin").write_text("w")
            write_manifest(out / name, kind="checkpoint", format="hf", stage="test")
        res = {"accuracy": 0.9, "macro_f1": 0.9, "params": 1000}
        write_json_atomic(out / "distill.json", {"eval": {"teacher": res, "student": {**res, "agreement_with_teacher": 0.95},
                                                          "undistilled student": {**res, "accuracy": 0.1}}})

    def fake_compress(student, *, calibration, task, out, strict, formats=None, model="student"):
        calls.append("compress" if formats is None else f"compress {Path(student).name} {formats} ({model})")
        art = out / "gguf-q4_k_m"
        art.mkdir(parents=True, exist_ok=True)
        (art / "model.gguf").write_text("g")
        write_manifest(art, kind="artifact", format="gguf", stage="test", model_file="model.gguf")
        rows = [{"name": "gguf-q4_k_m", "format": "gguf", "bits": 4, "path": str(art), "size_mb": 1.0, "accuracy": 0.88,
                 "drop": 0.02, "token_agreement": 0.9, "tokens_per_s": 100.0, "passed": True}]
        write_json_atomic(out / "compress.json", {"artifacts": rows})
        return {"artifacts": rows}

    def fake_bench(spec, spec_path, out, passed, bench_dir, quantized_teacher=None):
        calls.append("bench" if not quantized_teacher else f"bench + {[r['name'] for r in quantized_teacher]}")
        assert [r["name"] for r in passed] == ["gguf-q4_k_m"]  # what compress passed, also when it was skipped
        lat = {"p50": 10.0, "p90": 12.0, "p99": 15.0}
        rows = [{"name": n, "concurrency": 1, "output_tokens_per_s": 50.0, "latency_ms": lat, "cost_per_1k_usd": c}
                for n, c in (("gguf-q4_k_m", 0.001), ("teacher", 0.1), ("cascade", 0.01), ("teacher-gguf-q4_k_m", 0.004))]
        write_json_atomic(bench_dir / "report.json", {"results": rows, "quality": {"cascade": {"accuracy": 0.9, "fallback_rate": 0.1}},
                                                      "cascade": {}})

    monkeypatch.setattr("edgedistill.distill.pipeline.run_distill", fake_distill)
    monkeypatch.setattr("edgedistill.compress.pipeline.run_compress", fake_compress)
    monkeypatch.setattr(run_mod, "serve_and_bench", fake_bench)
    return calls


def test_second_run_skips_everything(spec_path, calls, tmp_path):
    out = tmp_path / "out"
    rep = run_mod.run_all(spec_path, out)
    assert calls == ["distill", "compress", "bench"]
    assert rep["task"] == {"name": "tiny", "type": "classification", "metric": "accuracy", "labels": LABELS}
    assert rep["student"]["accuracy"] == 0.9 and rep["undistilled"]["accuracy"] == 0.1
    a = rep["artifacts"][0]
    assert a["name"] == "gguf-q4_k_m" and a["tokens_per_s"] == 50.0 and a["tokens_per_s_basis"] == "served, concurrency 1"
    assert rep["cascade"]["accuracy"] == 0.9 and rep["cascade"]["fallback_rate"] == 0.1 and rep["cascade"]["cost_per_1k_usd"] == 0.01
    assert json.loads((out / "report.json").read_text())["artifacts"][0]["size_mb"] == 1.0
    assert "| gguf-q4_k_m | 4 |" in (out / "report.md").read_text()

    calls.clear()
    run_mod.run_all(spec_path, out)
    assert calls == []


def test_changed_stage_reruns_with_everything_after_it(spec_path, calls, tmp_path):
    out = tmp_path / "out"
    run_mod.run_all(spec_path, out)
    spec = yaml.safe_load(spec_path.read_text())
    spec["compress"] = {"max_accuracy_drop": 0.05}
    spec_path.write_text(yaml.safe_dump(spec))
    calls.clear()
    run_mod.run_all(spec_path, out)
    assert calls == ["compress", "bench"]  # distill's inputs did not change

    calls.clear()
    (spec_path.parent / "test.jsonl").write_text(json.dumps({"input": "new", "output": LABELS[0]}) + "\n")
    run_mod.run_all(spec_path, out)
    assert calls == ["distill", "compress", "bench"]  # a data file changed: everything reruns


def test_compress_tools_are_prepared_while_distill_runs(spec_path, calls, prepared, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    import edgedistill.compress.pipeline as cp

    fake = cp.run_compress
    ready_at_compress: list[int] = []

    def compress_after_tools(*args, **kwargs):
        ready_at_compress.append(len(prepared))
        return fake(*args, **kwargs)

    monkeypatch.setattr(cp, "run_compress", compress_after_tools)
    run_mod.run_all(spec_path, out)
    spec = run_mod.load_spec(spec_path)
    assert prepared == [spec.compress.formats] and ready_at_compress == [1]  # started with distill, done before compress

    prepared.clear()
    run_mod.run_all(spec_path, out)
    assert prepared == []  # distill skipped: nothing started in the background

    def broken(formats):
        raise RuntimeError("no network")

    monkeypatch.setattr(cp, "prepare_tools", broken)
    calls.clear()
    run_mod.run_all(spec_path, out, force=["distill"])
    assert calls == ["distill", "compress", "bench"]  # a failed preparation does not stop the run
    assert "preparing compress's tools in the background failed (no network)" in capsys.readouterr().err.replace("\n", " ")


def test_damaged_output_reruns_the_stage(spec_path, calls, tmp_path):
    out = tmp_path / "out"
    run_mod.run_all(spec_path, out)
    (out / "artifacts" / "gguf-q4_k_m" / "model.gguf").write_text("tampered")
    calls.clear()
    run_mod.run_all(spec_path, out)
    assert calls == ["compress", "bench"]


def test_interrupted_stage_reruns_and_force(spec_path, calls, tmp_path, monkeypatch):
    import edgedistill.compress.pipeline

    out = tmp_path / "out"
    real = edgedistill.compress.pipeline.run_compress

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("edgedistill.compress.pipeline.run_compress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_all(spec_path, out)
    assert json.loads((out / "run.json").read_text())["stages"]["compress"]["status"] == "running"
    monkeypatch.setattr("edgedistill.compress.pipeline.run_compress", real)
    calls.clear()
    run_mod.run_all(spec_path, out)
    assert calls == ["compress", "bench"]  # distill finished before the interruption: skipped

    calls.clear()
    run_mod.run_all(spec_path, out, force=["compress"])
    assert calls == ["compress", "bench"]


def test_missing_model_is_a_clear_error(spec_path, calls, tmp_path):
    spec = yaml.safe_load(spec_path.read_text())
    spec["student"]["path"] = "nope"
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="nope does not exist"):
        run_mod.run_all(spec_path, tmp_path / "out")


def test_local_teacher_is_also_quantized_as_the_baseline(spec_path, calls, tmp_path):
    """A local HF teacher is compressed to the student's 4-bit GGUF format by the same compress code,
    served beside the others, and reported as quantized_teacher (report.json and report.md)."""
    spec = yaml.safe_load(spec_path.read_text())
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    spec["teacher"] = {"kind": "local", "path": "teacher"}
    spec_path.write_text(yaml.safe_dump(spec))
    rep = run_mod.run_all(spec_path, tmp_path / "run")
    assert calls == ["distill", "compress", "compress teacher gguf:q4_k_m (teacher)", "bench + ['gguf-q4_k_m']"]
    (qt,) = rep["quantized_teacher"]
    assert qt["name"] == "teacher-gguf-q4_k_m" and qt["bits"] == 4 and qt["accuracy"] == 0.88 and qt["drop_vs_teacher"] == 0.02
    assert qt["cost_per_1k_usd"] == 0.004 and qt["params"] == 1000
    assert "teacher-gguf-q4_k_m" in (tmp_path / "run" / "report.md").read_text()
    calls.clear()
    run_mod.run_all(spec_path, tmp_path / "run")  # unchanged: nothing reruns, the baseline's outputs verified too
    assert calls == []


def test_no_baseline_for_an_api_teacher_or_without_a_4bit_gguf(spec_path, tmp_path):
    from edgedistill.spec import load_spec

    assert run_mod.quantized_teacher_format(load_spec(spec_path)) is None  # an API teacher
    spec = yaml.safe_load(spec_path.read_text())
    (tmp_path / "teacher").mkdir()
    spec["teacher"] = {"kind": "local", "path": "teacher"}
    spec["compress"] = {"formats": "gguf:q8_0,onnx:int4"}
    spec_path.write_text(yaml.safe_dump(spec))
    assert run_mod.quantized_teacher_format(load_spec(spec_path)) is None
