"""Task spec validation: a bad spec fails with one line naming the file, the field and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError
from edgedistill.spec import TaskSpec, load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def base_spec(tmp_path: Path) -> dict:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"input": f"query number {i}", "output": "a" if i % 2 else "b"}) + "\n" for i in range(12)))
    test = tmp_path / "test.csv"
    test.write_text("text,label\nhello there,a\ngood bye,b\nsomething else,zzz\n")
    return {
        "name": "t1",
        "type": "classification",
        "instructions": "Classify.",
        "labels": ["a", "b"],
        "seeds": {"path": "seeds.jsonl"},
        "test_set": {"path": "test.csv", "input_field": "text", "output_field": "label"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        "student": {"path": "student"},
    }


def write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_soft_labels_from_an_api_teacher_load(tmp_path):
    raw = base_spec(tmp_path)
    raw["training"] = {"logit_kd": {"enabled": True, "source": "api_logprobs", "top_logprobs": 5}}
    kd = load_spec(write(tmp_path, raw)).training.logit_kd
    assert (kd.source, kd.top_logprobs) == ("api_logprobs", 5)
    raw["teacher"] = {"kind": "local", "path": "teacher"}
    (tmp_path / "teacher").mkdir()
    assert "needs an API teacher" in one_line_error(write(tmp_path, raw))


def test_valid_spec_loads_and_resolves_relative_paths(tmp_path):
    spec = load_spec(write(tmp_path, base_spec(tmp_path)))
    assert len(spec.load_seeds()) == 12
    test = spec.load_test_set()
    # the row whose label is not in the task's label set is skipped
    assert [r.output for r in test] == ["a", "b"]
    assert spec.resolve("x.csv") == tmp_path / "x.csv"


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda s: s.update(type="sorting"), "type", "classification"),
        (lambda s: s.pop("labels"), "labels", "at least 2"),
        (lambda s: s["teacher"].pop("base_url"), "teacher", "base_url"),
        (lambda s: s["teacher"].update(max_concurrency=0), "teacher.max_concurrency", "greater than or equal"),
        (lambda s: s.update(temprature=0.3), "temprature", "unknown field"),
        (lambda s: s.update(seeds=[{"input": "x", "output": "a"}] * 3), "seeds", "10-50"),
        (lambda s: s["generation"].update(strategies=["rhyme"]) if "generation" in s else s.update(generation={"strategies": ["rhyme"]}), "generation.strategies", "rhyme"),
        (lambda s: s.update(training={"logit_kd": {"enabled": True}}), "(top level)", "local teacher"),
        (lambda s: s.update(training={"logit_kd": {"enabled": True}}), "(top level)", "source: api_logprobs"),
        (lambda s: s.update(training={"logit_kd": {"enabled": True, "source": "api_logprobs", "top_logprobs": 21}}), "top_logprobs", "20"),
        (
            lambda s: s.update(type="qa", labels=None, training={"logit_kd": {"enabled": True, "source": "api_logprobs"}}),
            "(top level)",
            "classification task",
        ),
    ],
)
def test_bad_spec_names_file_field_and_problem(tmp_path, change, field, words):
    raw = base_spec(tmp_path)
    change(raw)
    msg = one_line_error(write(tmp_path, raw))
    assert str(tmp_path / "task.yaml") in msg
    assert field in msg
    assert words in msg


def test_missing_spec_file_and_bad_yaml(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    assert "not valid YAML" in one_line_error(p)
    p.write_text("- just a list\n")
    assert "mapping" in one_line_error(p)


def test_missing_data_file_is_one_line(tmp_path):
    raw = base_spec(tmp_path)
    raw["test_set"]["path"] = "missing.csv"
    spec = load_spec(write(tmp_path, raw))
    with pytest.raises(UserError, match=r"test_set: file .*missing.csv does not exist"):
        spec.load_test_set()


def test_missing_column_is_one_line(tmp_path):
    raw = base_spec(tmp_path)
    raw["test_set"]["input_field"] = "question"
    spec = load_spec(write(tmp_path, raw))
    with pytest.raises(UserError, match="no 'question' column"):
        spec.load_test_set()


def test_pypi_path_unknown_package():
    with pytest.raises(UserError, match="not installed"):
        resolve_path("pypi:no_such_package_xyz/model.gguf", Path("."))


def test_env_vars_in_paths(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    raw = base_spec(tmp_path)
    moved = tmp_path / "elsewhere" / "test.csv"
    (tmp_path / "test.csv").rename(moved)
    raw["test_set"]["path"] = "${MY_DATA:-elsewhere}/test.csv"
    spec = load_spec(write(tmp_path, raw))
    monkeypatch.delenv("MY_DATA", raising=False)
    assert spec.resolve(spec.test_set.path) == tmp_path / "elsewhere/test.csv"  # the default, relative to the spec
    n = len(spec.load_test_set())
    monkeypatch.setenv("MY_DATA", str(tmp_path / "elsewhere"))
    assert spec.resolve(spec.test_set.path) == moved and len(spec.load_test_set()) == n
    monkeypatch.setenv("MY_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="does not exist"):
        spec.load_test_set()
    with pytest.raises(UserError, match=r"uses \$\{UNSET_XYZ\}, which is not set"):
        resolve_path("${UNSET_XYZ}/x.csv", tmp_path)


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    spec = load_spec(path)
    assert isinstance(spec, TaskSpec)
    assert path.read_text().startswith("# Run:")  # each example is headed by the command that runs it
    assert len(spec.load_seeds()) >= 10


def test_task_spec_reference_is_generated_from_the_model():
    from edgedistill.specdoc import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "task-spec.md"
    assert doc.read_text(encoding="utf-8") == render(), "docs/task-spec.md is stale: python -m edgedistill.specdoc > docs/task-spec.md"
    from edgedistill.spec import TaskSpec

    for name in TaskSpec.model_fields:
        if name != "base_dir":
            assert f"| `{name}` |" in doc.read_text()
