"""One output budget per task (Task.output_budget): derived from the labels or the schema, or the
spec's; the same value reaches every stage; a teacher answer cut off by it is rejected as truncated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgedistill.bench.config import make_config, parse_endpoint
from edgedistill.compress.evaluate import measure
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.pipeline import build_dataset, teacher_gate
from edgedistill.distill.teacher import Teacher
from edgedistill.distill.validate import format_report_table
from fastapi.testclient import TestClient

from edgedistill.spec import TaskSpec, load_spec, spec_from_manifest
from edgedistill.task import Task
from tests.serve_fakes import FakeRunner, FakeTeacher
from tests.test_serve_api import make_app

LABELS = ["card_arrival", "exchange_rate", "top_up_failed"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "size": {"enum": ["small", "large"]},
        "people": {"type": "integer"},
        "where": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    "required": ["name"],
}
# the longest answer of SCHEMA: every value at its bound (maxLength, the longest member, 12
# characters for a number, 48 for a string without maxLength)
LONGEST = {"name": "n" * 20, "size": "small", "people": -12345678901, "where": {"city": "c" * 48}}


def test_derived_budget_per_type():
    cls = Task(type="classification", instructions="x", labels=LABELS)
    assert cls.output_budget == len("top_up_failed") + 2
    # a label is counted in bytes: a token holds at least one byte, not one character
    assert Task(type="classification", instructions="x", labels=["ok", "café"]).output_budget == len("café".encode()) + 2
    ext = Task(type="extraction", instructions="x", output_schema=SCHEMA)
    assert ext.output_budget == len(ext.format_answer(LONGEST)) + 2 == 146
    arr = {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
    assert Task(type="extraction", instructions="x", output_schema=arr).output_budget == len('{"flags": [false, false, false]}') + 2
    tool = {"anyOf": [SCHEMA, {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5}}}]}
    assert Task(type="tool_call", instructions="x", output_schema=tool).output_budget == 146  # the larger alternative
    huge = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 10_000}}}
    assert Task(type="extraction", instructions="x", output_schema=huge).output_budget == 512
    assert Task(type="qa", instructions="x").output_budget == Task(type="generation", instructions="x").output_budget == 256


def _spec_dict(tmp_path: Path, **over) -> dict:
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"input": f"test question number {i} about a card", "output": LABELS[i % 3]}) + "\n" for i in range(6)))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": t}) + "\n" for t in POOL))
    return {
        "name": "tiny",
        "type": "classification",
        "instructions": "Classify the banking message.",
        "labels": LABELS,
        "seeds": [{"input": f"seed message {i} on {lab}", "output": lab} for i in range(4) for lab in LABELS],
        "test_set": {"path": str(test)},
        "pool": {"path": str(pool), "output_field": None},
        "teacher": {"kind": "local", "path": "x"},
        "student": {"path": "x"},
        "generation": {"num_inputs": 0},
        **over,
    }


POOL = ["my card never arrived at home", "what rate do you give for yen", "the top up did not work again", "a long long ramble"]


def test_explicit_budget_wins_and_survives_the_manifest(tmp_path):
    derived = TaskSpec.model_validate(_spec_dict(tmp_path))
    assert derived.generation.label_max_tokens is None and derived.task.output_budget == 15
    explicit = TaskSpec.model_validate(_spec_dict(tmp_path, generation={"num_inputs": 0, "label_max_tokens": 5}))
    assert explicit.task.output_budget == 5
    for spec in (derived, explicit):  # an artifact's manifest stores spec_dict(): serve and bench read it back
        assert Task.from_manifest(spec.spec_dict()).output_budget == spec.task.output_budget
        assert spec_from_manifest({"task": spec.spec_dict()}, tmp_path).task.output_budget == spec.task.output_budget
    # a spec file without the field keeps working, and derives
    (tmp_path / "task.json").write_text(json.dumps(_spec_dict(tmp_path)))
    assert load_spec(tmp_path / "task.json").task.output_budget == 15


class ScriptTeacher(Teacher):
    """A teacher answering each input's keyword label; an input with "long" stops on the length limit."""

    kind = "script"

    def __init__(self, cache: ResponseCache, truncate: str = "long"):
        super().__init__("script", cache)
        self.truncate = truncate
        self.requests = []

    def _identity(self):
        return {"model": "script"}

    async def _run_uncached(self, todo, emit):
        for key, req in todo:
            self.requests.append(req)
            user = req.messages[-1]["content"]
            label = next((lab for w, lab in (("card", LABELS[0]), ("rate", LABELS[1]), ("top", LABELS[2])) if w in user), LABELS[0])
            cut = self.truncate in user
            emit(key, {"text": label, "prompt_tokens": 9, "completion_tokens": req.max_tokens if cut else 3,
                       "finish_reason": "length" if cut else "stop", "cost_usd": 0.0})


def test_truncated_teacher_label_is_rejected_and_reported(tmp_path):
    spec = TaskSpec.model_validate(_spec_dict(tmp_path))
    teacher = ScriptTeacher(ResponseCache(tmp_path / "c.sqlite"))
    kept, report = build_dataset(spec, teacher, spec.load_seeds(), spec.load_test_set(), teacher.cache, tmp_path / "data")
    assert {r.max_tokens for r in teacher.requests} == {spec.task.output_budget}  # the labelling requests
    assert report["rejected"]["truncated"] == 1 and report["rejected"]["parse"] == 0
    assert report["by_source"]["pool"]["rejected"]["truncated"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "data" / "rejects.jsonl").read_text().splitlines()]
    # the cut answer reads as a label ("card_arrival"), yet it is not trained on
    assert [(r["input"], r["reject_reason"], r["raw_output"]) for r in rejects] == [("a long long ramble", "truncated", LABELS[0])]
    assert "a long long ramble" not in {r["input"] for r in kept}
    assert "truncated" in format_report_table(report)


def test_truncated_teacher_answer_is_invalid_in_the_gate(tmp_path):
    spec = TaskSpec.model_validate(_spec_dict(tmp_path, teacher={"kind": "local", "path": "x", "gate": {"min_score": 0.5}}))
    teacher = ScriptTeacher(ResponseCache(tmp_path / "c.sqlite"), truncate="number 0 ")
    gate = teacher_gate(spec, teacher, spec.load_test_set(), tmp_path, skip_gate=True)
    assert {r.max_tokens for r in teacher.requests} == {spec.task.output_budget}
    assert gate["scores"]["truncated_answers"] == 1 and gate["scores"]["invalid_answers"] >= 1


class RecordingRuntime:
    def __init__(self):
        self.budgets = []

    def generate(self, prompt, max_tokens, constraint=None, ignore_eos=False):
        self.budgets.append(max_tokens)
        return [1, 2]


class Tok:
    all_special_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return LABELS[0]


def test_compress_gate_answers_within_the_budget(tmp_path):
    spec = TaskSpec.model_validate(_spec_dict(tmp_path))
    rt = RecordingRuntime()
    measure(rt, Tok(), spec, [[5, 6], [7]], [LABELS[0], LABELS[1]], [[5]], None, None, 4)
    assert rt.budgets[:2] == [spec.task.output_budget] * 2  # the test-set answers (then agreement and speed probes)


@pytest.mark.parametrize("task", [
    Task(type="generation", instructions="Say it.", label_max_tokens=7),
    Task(type="extraction", instructions="Extract.", output_schema={"type": "object", "properties": {"a": {"type": "integer"}}}),
])
def test_predict_decodes_within_the_task_budget(task, monkeypatch):
    from edgedistill.serve import cascade

    asked: list[int] = []
    real_run = cascade.run

    async def recording_run(st, request, prompts, params):
        asked.extend(p.max_tokens for p in params)  # the GenParams the engine gets
        return await real_run(st, request, prompts, params)

    monkeypatch.setattr(cascade, "run", recording_run)
    runner = FakeRunner(lambda p: ("x" * 300, 20.0), ctx_per_slot=512)  # a student that would ramble on
    with FakeTeacher(reply="ok") as teacher, TestClient(
        make_app(runner=runner, task=task, teacher_url=teacher.url, teacher_model="big", default_max_tokens=200)
    ) as c:
        body = c.post("/v1/predict", json={"input": "go", "threshold": 1.0}).json()
        assert teacher.calls and teacher.calls[0]["max_tokens"] == task.output_budget  # the fallback's budget
    assert asked == [task.output_budget], body  # not default_max_tokens
    if task.type == "generation":  # unconstrained: the student stops on the budget
        assert body["edgedistill"]["student_output"] == "x" * task.output_budget


def test_predict_budget_is_clipped_to_the_context():
    task = Task(type="generation", instructions="Say it.", label_max_tokens=400)
    runner = FakeRunner(lambda p: ("x" * 500, 20.0), ctx_per_slot=128)
    with TestClient(make_app(runner=runner, task=task)) as c:
        body = c.post("/v1/predict", json={"input": "go", "fallback": False}).json()
    prompt = len(runner.tokenize(runner.render_chat(task.student_messages("go")), special=True, add_bos=True))
    assert body["edgedistill"]["student_output"] == "x" * (128 - prompt), body


def test_bench_default_max_tokens_is_the_budget(tmp_path):
    spec = _spec_dict(tmp_path, generation={"num_inputs": 0, "label_max_tokens": 9})
    (tmp_path / "task.json").write_text(json.dumps(spec))
    cfg = make_config([parse_endpoint("a=http://127.0.0.1:1/v1")], out=tmp_path / "o", task=tmp_path / "task.json", concurrency=[1])
    assert cfg.max_tokens == 9 == cfg.spec.task.output_budget
    spec["generation"] = {"num_inputs": 0}
    (tmp_path / "task.json").write_text(json.dumps(spec))
    cfg = make_config([parse_endpoint("a=http://127.0.0.1:1/v1")], out=tmp_path / "o", task=tmp_path / "task.json", concurrency=[1])
    assert cfg.max_tokens == cfg.spec.task.output_budget == 15
