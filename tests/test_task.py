"""The task core (edgedistill.task): one Task from a spec or a manifest, one correctness rule."""

from __future__ import annotations

import json

import pytest

from edgedistill.errors import UserError
from edgedistill.spec import load_spec
from edgedistill.task import Task
from tests.test_spec import base_spec, write

SCHEMA = {"type": "object", "properties": {"people": {"type": "integer"}, "time": {"type": "string"}}, "required": ["people"]}


def test_spec_and_manifest_give_the_same_task(tmp_path):
    raw = base_spec(tmp_path)
    raw["teacher"]["list_labels"] = False
    raw["generation"] = {"label_max_tokens": 7}
    spec = load_spec(write(tmp_path, raw))
    task = spec.task
    assert (task.type, task.labels, task.list_labels, task.label_max_tokens) == ("classification", ["a", "b"], False, 7)
    # what compress writes into a manifest is the spec's JSON dump
    assert Task.from_manifest(spec.model_dump(mode="json")) == task
    assert task.student_messages("hi") == [{"role": "system", "content": "Classify."}, {"role": "user", "content": "hi"}]
    assert task.teacher_messages("hi")[0]["content"] == "Classify."  # list_labels off
    assert "a, b" in task.model_copy(update={"list_labels": True}).teacher_messages("hi")[0]["content"]


def test_show_schema_off_gives_the_teacher_the_students_prompt(tmp_path):
    """A teacher fine-tuned on the task's own prompt (teacher.show_schema: false) is asked with that
    prompt, in distill and in serve's fallback (the manifest carries the setting)."""
    raw = base_spec(tmp_path)
    raw.pop("labels")
    raw.update(type="extraction", instructions="Extract.", output_schema=SCHEMA)
    shown = load_spec(write(tmp_path, raw)).task
    assert "JSON schema" in shown.teacher_messages("hi")[0]["content"]
    raw["teacher"]["show_schema"] = False
    spec = load_spec(write(tmp_path, raw))
    task = spec.task
    assert task.teacher_messages("hi") == task.student_messages("hi") == [
        {"role": "system", "content": "Extract."}, {"role": "user", "content": "hi"}
    ]
    assert Task.from_manifest(spec.model_dump(mode="json")) == task
    assert task.response_format()["json_schema"]["schema"]["properties"].keys() == SCHEMA["properties"].keys()  # an API still gets it


@pytest.mark.parametrize(
    "bad, words",
    [
        ([], "mapping"),
        ({"type": "classification"}, "incomplete"),
        ({"type": "classification", "instructions": "x"}, "no labels"),
        ({"type": "classification", "instructions": "x", "labels": [1, 2]}, "list of strings"),
        ({"type": "sorting", "instructions": "x"}, "incomplete"),
    ],
)
def test_a_broken_manifest_task_is_one_line(bad, words):
    with pytest.raises(UserError) as e:
        Task.from_manifest(bad)
    assert words in str(e.value) and "\n" not in str(e.value) and "rebuild the artifact" in str(e.value)


def test_is_correct_per_type():
    cls = Task(type="classification", instructions="x", labels=["card_arrival", "lost_card"])
    assert cls.is_correct("card_arrival", "card_arrival") and not cls.is_correct("lost_card", "card_arrival")
    assert not cls.is_correct(None, "card_arrival")
    ext = Task(type="extraction", instructions="x", output_schema=SCHEMA)
    assert ext.is_correct({"time": "7 PM", "people": 2.0}, {"people": 2, "time": "7 pm"})  # key order, case, 2 == 2.0
    assert ext.is_correct({"people": 2}, json.dumps({"people": 2}))  # a gold given as JSON text
    assert not ext.is_correct({"people": 3}, {"people": 2}) and not ext.is_correct({"people": 2}, "{not json")
    qa = Task(type="qa", instructions="x")
    assert qa.is_correct("  Paris! ", "paris") and not qa.is_correct("Lyon", "paris")


def test_same_answer_needs_two_answers():
    ext = Task(type="extraction", instructions="x", output_schema=SCHEMA)
    assert ext.same_answer({"people": 2}, {"people": 2.0})
    assert not ext.same_answer(None, None) and not ext.same_answer({"people": 2}, None)


def test_parse_and_score_answers():
    cls = Task(type="classification", instructions="x", labels=["card_arrival", "lost_card"])
    assert cls.parse_answer(' "Card_Arrival" \nmore') == ("card_arrival", None)
    assert cls.parse_answer("nope") == ("nope", "not_a_label")
    preds, scores = cls.score_answers(["card_arrival", "lost_card", "lost_card"], ["card_arrival", "lost_card", "what"])
    assert preds == ["card_arrival", "lost_card", None] and scores["invalid_answers"] == 1
    assert scores["accuracy"] == pytest.approx(2 / 3) and scores["n"] == 3
    ext = Task(type="extraction", instructions="x", output_schema=SCHEMA)
    assert ext.parse_answer('sure: {"people": 4}') == ({"people": 4}, None)
    assert ext.parse_answer('{"time": "now"}')[1] == "schema" and ext.parse_answer("{oops")[1] == "not_json"
    assert ext.format_answer({"time": "x", "people": 1}) == '{"people": 1, "time": "x"}'


def test_stratified_sees_every_label_first():
    from edgedistill.spec import Example

    cls = Task(type="classification", instructions="x", labels=["a", "b", "c"])
    rows = [Example(input=f"q{i}", output=lab) for i, lab in enumerate("aaaabbc")]
    assert [r.output for r in cls.stratified(rows, 4)] == ["a", "b", "c", "a"]
    assert cls.stratified(rows, None) == rows and cls.stratified(rows, 99) == rows


def test_the_task_metric_is_the_types_primary_unless_the_spec_chooses_another(tmp_path):
    from tests.test_spec import one_line_error

    defaults = {t: Task(type=t, instructions="x", labels=["a", "b"]).metric
                for t in ("classification", "extraction", "tool_call", "qa", "generation")}
    assert defaults == {"classification": "accuracy", "extraction": "slot_f1", "tool_call": "exact_match",
                        "qa": "token_f1", "generation": "chrf"}
    assert Task(type="qa", instructions="x").metrics == ("token_f1", "exact_match")
    raw = base_spec(tmp_path)
    raw["metric"] = "macro_f1"
    spec = load_spec(write(tmp_path, raw))
    assert spec.task.metric == "macro_f1"
    assert Task.from_manifest(spec.model_dump(mode="json")).metric == "macro_f1"  # the artifact keeps the choice
    raw["metric"] = "slot_f1"  # not a classification metric
    msg = one_line_error(write(tmp_path, raw))
    assert "metric 'slot_f1' is not one of classification's metrics: accuracy, macro_f1" in msg
    with pytest.raises(ValueError, match="not one of qa's metrics"):
        Task(type="qa", instructions="x", metric="chrf")


def test_score_is_the_primary_metric_over_the_answers():
    ext = Task(type="extraction", instructions="x", output_schema=SCHEMA)
    golds, preds = [{"people": 2, "time": "7pm"}, {"people": 4}], [{"people": 2, "time": "8pm"}, {"people": 4}]
    assert ext.score(golds, preds) == pytest.approx(2 / 3)  # slot F1: 2 of 3 gold, 2 of 3 predicted
    assert ext.model_copy(update={"metric": "exact_match"}).score(golds, preds) == 0.5


def test_tool_call_is_correct_and_same_answer():
    tc = Task(type="tool_call", instructions="x", output_schema={"type": "object"})
    call = {"name": "book_table", "arguments": {"people": 2}}
    assert tc.is_correct({"name": "Book_Table", "arguments": {"people": 2.0}}, call)
    assert tc.is_correct({"name": None}, {}) and tc.same_answer({}, {"name": None, "arguments": {}})  # "no call" twice
    assert not tc.is_correct({}, call) and not tc.is_correct({"name": "book_table", "arguments": {"people": 3}}, call)
    assert tc.is_correct(call, json.dumps(call))  # a gold given as JSON text
    qa = Task(type="qa", instructions="x")
    assert qa.same_answer("The Eiffel Tower.", "eiffel tower")  # SQuAD's normalisation drops the article
