"""`edgedistill serve RUN`: a run folder serves the artifact RUN/serving.json points at (after a
promotion), else RUN/report.json's cascade artifact; anything else broken is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgedistill.serve.artifact import load_artifact, run_artifact

from edgedistill.errors import UserError
from edgedistill.manifest import write_manifest
from tests.test_cli import assert_one_line_error, run_cli

TASK = {"name": "intents", "type": "classification", "instructions": "Classify.", "labels": ["a", "b"]}


def gguf_artifact(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    write_manifest(folder, kind="artifact", format="gguf", stage="test", task=TASK, model_file="model.gguf", name=name)
    return folder


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    gguf_artifact(run / "artifacts" / "gguf-q8_0", "q8")
    gguf_artifact(run / "artifacts" / "gguf-q4_k_m", "q4")
    report = {"cascade": {"artifact": "gguf-q4_k_m"},
              "artifacts": [{"name": "gguf-q8_0", "path": "elsewhere/gguf-q8_0"}, {"name": "gguf-q4_k_m", "path": "elsewhere/q4"}]}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_a_run_folder_serves_its_cascade_artifact_then_the_promoted_one(tmp_path):
    run = make_run(tmp_path)
    art, source = run_artifact(run)
    assert art == run / "artifacts" / "gguf-q4_k_m" and source.endswith("report.json (cascade artifact)")
    assert load_artifact(run).name == "q4"
    promoted = gguf_artifact(run / "retrain-1" / "artifacts" / "gguf-q4_k_m", "q4-retrained")
    (run / "serving.json").write_text(json.dumps({"artifact": str(promoted), "from": str(art)}))
    assert run_artifact(run) == (promoted, str(run / "serving.json"))
    assert load_artifact(run).name == "q4-retrained"


def test_an_artifact_folder_or_a_plain_folder_is_not_a_run(tmp_path):
    run = make_run(tmp_path)
    assert run_artifact(run / "artifacts" / "gguf-q8_0") is None  # has its own manifest
    assert run_artifact(tmp_path) is None  # neither serving.json nor report.json
    assert load_artifact(run / "artifacts" / "gguf-q8_0").name == "q8"


@pytest.mark.parametrize(
    ("breakage", "words"),
    [
        ({"serving.json": {"artifact": "/nowhere/gguf"}}, ["serving.json points at", "does not exist"]),
        ({"serving.json": "not json"}, ["serving.json is not readable JSON"]),
        ({"report.json": {"artifacts": []}}, ["names no cascade artifact"]),
        ({"report.json": {"cascade": {"artifact": "onnx-int4"}}}, ["cascade artifact onnx-int4 is not in"]),
    ],
)
def test_a_broken_run_folder_is_a_one_line_error(tmp_path, breakage, words):
    run = make_run(tmp_path)
    for name, content in breakage.items():
        (run / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError) as e:
        run_artifact(run)
    assert all(w in str(e.value) for w in words)
    assert_one_line_error(run_cli("serve", str(run), "--port", "0"), *words)


def test_serve_help_says_a_run_folder_is_accepted():
    p = run_cli("serve", "--help")
    assert p.returncode == 0 and "serving.json" in p.stdout and "run" in p.stdout
