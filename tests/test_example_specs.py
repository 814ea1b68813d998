"""The shipped example specs: every one loads, and the short qa and generation specs (no full demo)
run `edgedistill distill` end to end on a tiny student, taught by a loopback OpenAI-compatible
teacher that answers with the references, gated and scored on their type's metric."""

from __future__ import annotations

import json
import shutil
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from edgedistill.distill.pipeline import run_distill

from edgedistill.spec import load_spec
from tests.serve_fakes import send_json, start_http, stop_http

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class ReferenceTeacher:
    """Answers each input with its reference text; records the max_tokens each request asked for."""

    def __init__(self, answers: dict[str, str]):
        self.max_tokens: list[int] = []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.max_tokens.append(body.get("max_tokens"))
                text = answers.get(body["messages"][-1]["content"], "unknown")
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 20, "completion_tokens": 5}}).encode()
                send_json(self, data)

        self.server, self.url = start_http(H)

    def close(self):
        stop_http(self.server)


@pytest.mark.parametrize("name", ["banking77", "restaurant8k", "qa", "generation"])
def test_every_example_spec_loads(name):
    spec = load_spec(EXAMPLES / name / "task.yaml")
    assert spec.task.output_budget >= 1 and spec.task.metric == spec.task.metrics[0]
    assert 10 <= len(spec.load_seeds()) <= 50


@pytest.mark.parametrize("name, metric, budget", [("qa", "token_f1", 256), ("generation", "chrf", 48)])
def test_text_example_distills_on_its_metric(name, metric, budget, tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    raw = yaml.safe_load((folder / "task.yaml").read_text())
    rows = [json.loads(x) for x in (folder / "test.jsonl").read_text().splitlines()] + raw["seeds"]
    teacher = ReferenceTeacher({r["input"]: r["output"] for r in rows})
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    raw["teacher"]["base_url"] = teacher.url
    raw["student"] = {"path": str(tiny_model_dir)}
    raw["generation"]["num_inputs"] = 0  # seeds only: the loopback teacher writes no new inputs
    raw["training"] = {"method": "full", "epochs": 1, "batch_size": 4, "max_length": 96, "learning_rate": 1e-3}
    (folder / "task.yaml").write_text(yaml.safe_dump(raw))
    try:
        summary = run_distill(folder / "task.yaml", tmp_path / "run")
    finally:
        teacher.close()
    gate = summary["gate"]
    assert gate["metric"] == metric and gate["score"] == pytest.approx(1.0) and gate["passed"]
    results = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["results"]
    assert results["teacher"][metric] == pytest.approx(1.0) and "exact_match" in results["student"]
    assert 0.0 <= results["student"][metric] <= 1.0
    assert set(teacher.max_tokens) == {budget}  # the task's one output budget, in the gate and the labelling
