"""Tool calling as a task, and conversation inputs: inputs read, checked and rendered once for every
stage; a tool_call task's tools -> its answer schema and constraint; the student's prompt is the
chat route's for an OpenAI client sending those tools; /v1/predict takes a conversation."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from edgedistill.runtimes.constrain import for_task
from fastapi.testclient import TestClient

from edgedistill.conversation import InputError, check_input, input_text, last_user_text, read_input
from edgedistill.errors import UserError
from edgedistill.spec import Example, load_spec
from edgedistill.task import Task
from tests.serve_fakes import FakeRunner
from tests.test_serve_api import MODEL, make_app

PARAMS = {
    "type": "object",
    "properties": {k: {"type": "string", "maxLength": 12} for k in ("date", "people", "time")},
}
TOOLS = [
    {"type": "function", "function": {"name": "book_table", "description": "Book a table.", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "no_details", "description": "Nothing to book."}},
]
INSTRUCTIONS = "Call book_table with the booking details of the customer's last message."
CONVERSATION = [
    {"role": "user", "content": "a table on friday please"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "book_table", "arguments": '{"date": "friday"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "missing: people"},
    {"role": "assistant", "content": "How many people will be joining you?"},
    {"role": "user", "content": "4 of us"},
]
CALL = {"name": "book_table", "arguments": {"people": "4"}}


def task(choice: str = "auto") -> Task:
    return Task(name="booking", type="tool_call", instructions=INSTRUCTIONS, tools=TOOLS, tool_choice=choice)


# --- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "input.0.role: 'system' is not one of"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "input.1: the last message is the assistant's"),
        ([{"role": "tool", "content": "x"}], "input.0: a tool message needs tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "input.0.tool_calls: only an assistant message"),
        ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}, {"role": "user", "content": "x"}],
         "input.0.tool_calls.0.id"),
        ([{"role": "user", "content": ["x"]}], "input.0.content: must be a string"),
        ([], "non-empty list"),
        ("  ", "input is empty"),
    ],
)
def test_a_bad_input_is_one_line_naming_the_message(value, message):
    with pytest.raises(InputError) as e:
        check_input(value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_input_is_a_text_or_a_conversation_with_one_canonical_text():
    assert check_input(CONVERSATION) == CONVERSATION and check_input("hello") == "hello"
    text = input_text(CONVERSATION)
    assert text.splitlines() == [
        "user: a table on friday please",
        'assistant: book_table({"date": "friday"})',
        "tool: missing: people",
        "assistant: How many people will be joining you?",
        "user: 4 of us",
    ]
    assert last_user_text(CONVERSATION) == "4 of us" and input_text("hi") == last_user_text("hi") == "hi"
    # a CSV cell holding the conversation is its JSON text; a text that merely starts with "[" stays text
    assert read_input(json.dumps(CONVERSATION), csv=True) == CONVERSATION
    assert read_input("[sic] table for two", csv=True) == "[sic] table for two"
    assert read_input(json.dumps(CONVERSATION)) == json.dumps(CONVERSATION)  # JSONL: a list is a list already


def test_seeds_test_set_and_pool_read_conversations_from_jsonl_and_csv(tmp_path):
    rows = [{"text": CONVERSATION if i % 2 else f"table for {i}", "call": CALL} for i in range(12)]
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import csv

    with (tmp_path / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["text", "call"])
        w.writeheader()
        w.writerows({"text": json.dumps(r["text"]) if isinstance(r["text"], list) else r["text"], "call": json.dumps(r["call"])} for r in rows)
    spec_yaml = f"""
name: booking
type: tool_call
instructions: {INSTRUCTIONS}
tools: {json.dumps(TOOLS)}
tool_choice: required
seeds: {{path: seeds.jsonl, input_field: text, output_field: call}}
test_set: {{path: test.csv, input_field: text, output_field: call}}
pool: {{path: seeds.jsonl, input_field: text, output_field: null}}
teacher: {{kind: local, path: unused}}
student: {{path: unused}}
"""
    (tmp_path / "task.yaml").write_text(spec_yaml)
    spec = load_spec(tmp_path / "task.yaml")
    seeds, test, pool = spec.load_seeds(), spec.load_test_set(), spec.load_pool()
    assert seeds[1].input == test[1].input == pool[1] == CONVERSATION
    assert seeds[0].input == test[0].input == pool[0] == "table for 0"
    assert test[1].output == CALL
    # the output schema comes from the tools; required: "no call" is not an answer
    assert spec.output_schema == spec.task.output_schema
    assert Task.from_manifest(spec.spec_dict()) == spec.task  # what an artifact's manifest carries to serve
    jsonschema.validate(CALL, spec.output_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({}, spec.output_schema)
    rows[3]["text"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"seeds: .*seeds.jsonl row 4: input.1: the last message is the assistant's"):
        spec.load_seeds()
    with pytest.raises(ValueError, match="input.0.role"):
        Example(input=[{"role": "system", "content": "x"}], output={})


def test_tools_are_checked_in_the_spec(tmp_path):
    base = "name: t\ninstructions: x\nseeds: []\ntest_set: {path: t.jsonl}\nteacher: {kind: local, path: u}\nstudent: {path: u}\n"
    for extra, message in [
        ("type: extraction\ntools: " + json.dumps(TOOLS), "tools are for a tool_call task"),
        ("type: tool_call\ntools: " + json.dumps([TOOLS[0], TOOLS[0]]), "tools.1.function.name: 'book_table' is declared twice"),
        ("type: tool_call\ntools: [{type: function, function: {name: 'bad name'}}]", "tools.0.function.name"),
        ("type: tool_call", "a tool_call task needs output_schema (a JSON schema) or tools"),
    ]:
        (tmp_path / "task.yaml").write_text(base + extra)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_spec(tmp_path / "task.yaml")


def test_validation_dedups_and_decontaminates_conversations_by_their_canonical_text():
    from edgedistill.distill.validate import validate_rows

    from edgedistill.spec import TaskSpec

    spec = TaskSpec(
        name="booking", type="tool_call", instructions=INSTRUCTIONS, tools=TOOLS,
        seeds=[Example(input=f"seed {i} table", output=CALL) for i in range(10)],
        test_set={"path": "unused.jsonl"}, teacher={"kind": "local", "path": "u"}, student={"path": "u"},
    )
    asked = [{"role": "assistant", "content": "How many people will be joining you?"}, {"role": "user", "content": "4 of us"}]
    other = [{"role": "assistant", "content": "What time would you like?"}, {"role": "user", "content": "4 of us"}]
    test_conv = [{"role": "assistant", "content": "Which date?"}, {"role": "user", "content": "the twenty first of march at noon please"}]
    rows = [
        {"id": "a", "input": asked, "output": CALL, "raw_output": spec.task.format_answer(CALL), "source": "pool"},
        {"id": "b", "input": other, "output": CALL, "raw_output": spec.task.format_answer(CALL), "source": "pool"},
        {"id": "c", "input": list(asked), "output": CALL, "raw_output": spec.task.format_answer(CALL), "source": "pool"},
        {"id": "d", "input": test_conv, "output": CALL, "raw_output": spec.task.format_answer(CALL), "source": "pool"},
    ]
    kept, rejected, _ = validate_rows(spec, rows, [Example(input=test_conv, output=CALL)])
    assert [r["id"] for r in kept] == ["a", "b"]  # the same last turn after another question is another input
    assert {r["id"]: r["reject_reason"] for r in rejected} == {"c": "exact_duplicate", "d": "contaminated"}


def test_contamination_compares_what_the_customer_said_not_the_systems_fixed_question():
    """restaurant8k's booking system asks the same 8-word question in a quarter of its test inputs: checked
    on the canonical text, every training conversation after that question was "contaminated" (273 of 273
    in the demo's pool), and the student never saw one. Only the user's and the tools' turns count; a
    conversation identical to a test one, or whose answer shares the n-gram, is still caught."""
    from edgedistill.distill.validate import validate_rows

    from edgedistill.conversation import said_texts
    from edgedistill.spec import TaskSpec

    spec = TaskSpec(
        name="booking", type="tool_call", instructions=INSTRUCTIONS, tools=TOOLS,
        seeds=[Example(input=f"seed {i} table", output=CALL) for i in range(10)],
        test_set={"path": "unused.jsonl"}, teacher={"kind": "local", "path": "u"}, student={"path": "u"},
    )  # fmt: skip
    q = {"role": "assistant", "content": "How many people will be joining you for dinner?"}  # 9 words, as in restaurant8k
    test = [[q, {"role": "user", "content": "there will be four adults and two small children with us"}],
            [q, {"role": "user", "content": "just me"}]]  # fmt: skip
    rows = [
        ("fresh", [q, {"role": "user", "content": "we are a party of six"}]),
        ("same", [dict(m) for m in test[1]]),
        ("shares", [q, {"role": "user", "content": "four adults and two small children with us and a dog"}]),
        ("text", "there will be four adults and two small children with us tonight"),
    ]
    rows = [{"id": i, "input": x, "output": CALL, "raw_output": spec.task.format_answer(CALL), "source": "pool"} for i, x in rows]
    kept, rejected, _ = validate_rows(spec, rows, [Example(input=t, output=CALL) for t in test])
    assert [r["id"] for r in kept] == ["fresh"]
    assert {r["id"]: r["reject_reason"] for r in rejected} == {"same": "contaminated", "shares": "contaminated", "text": "contaminated"}
    assert said_texts(test[0]) == [test[0][1]["content"]] and said_texts("hi") == ["hi"]


def test_generation_shows_a_conversation_seed_by_its_last_user_turn():
    from edgedistill.distill.generate import generation_requests

    from edgedistill.spec import TaskSpec

    seeds = [Example(input=[{"role": "assistant", "content": "How many?"}, {"role": "user", "content": f"we are {i}"}], output=CALL)
             for i in range(10)]
    spec = TaskSpec(
        name="booking", type="tool_call", instructions=INSTRUCTIONS, tools=TOOLS, seeds=seeds,
        test_set={"path": "unused.jsonl"}, teacher={"kind": "local", "path": "u"}, student={"path": "u"},
        generation={"num_inputs": 5, "shots": 3},
    )
    (req, _), = generation_requests(spec, seeds)
    shots = [line for line in req.messages[1]["content"].splitlines() if line.startswith("- ")]
    assert len(shots) == 3 and all(s.startswith("- we are ") for s in shots)


# --- tools -> schema -> constraint -------------------------------------------------------------------


def test_answer_text_round_trips_and_parses_what_the_chat_route_parses():
    t = task()
    text = t.format_answer({"name": "book_table", "arguments": {"time": "7pm", "people": "4"}})
    # the generic format, keys in the tools' order (what the grammar admits), parallel as OpenAI clients ask
    assert text == '{"tool_calls": [{"name": "book_table", "arguments": {"people": "4", "time": "7pm"}}]}'
    assert t.parse_answer(text) == ({"name": "book_table", "arguments": {"people": "4", "time": "7pm"}}, None)
    assert t.format_answer({}) == '{"response": ""}' and t.parse_answer('{"response": "hello"}') == ({}, None)
    assert t.parse_answer('{"tool_call": {"name": "no_details", "arguments": {}}}') == ({"name": "no_details", "arguments": {}}, None)
    assert t.parse_answer('{"tool_calls": [{"name": "cancel", "arguments": {}}]}')[1] == "schema"  # not a tool
    assert task("required").parse_answer('{"response": ""}') == ({}, "schema")  # required: "no call" is wrong
    assert t.is_correct(t.parse_answer(text)[0], {"name": "book_table", "arguments": {"people": "4", "time": "7PM"}})


def _walk(matcher, ids) -> bool:
    for tok in ids:
        if not matcher.allowed()[tok]:
            return False
        matcher.advance(tok)
    return True


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_constraint_admits_a_call_and_no_call_only_when_allowed(choice):
    runner = FakeRunner()  # a byte vocabulary
    t = task(choice)
    constraint = for_task(t, runner)

    def admits(text: str) -> bool:
        m = constraint.start()
        ok = _walk(m, runner.tokenize(text, special=False, add_bos=False))
        return ok and bool(np.asarray(m.allowed())[list(runner.eog_tokens)].any())

    assert admits(t.format_answer(CALL))
    assert admits(t.format_answer({"name": "no_details", "arguments": {}}))
    assert admits(t.format_answer({})) is (choice == "auto")
    assert not admits('{"tool_calls": [{"name": "cancel", "arguments": {}}]}')
    assert not admits('{"tool_calls": [{"name": "no_details", "arguments": {"x": "1"}}]}')  # no arguments declared
    two = '{"tool_calls": [{"name": "no_details", "arguments": {}}, {"name": "no_details", "arguments": {}}]}'
    assert not admits(two)  # a task's answer is one call
    assert len(runner.tokenize(t.format_answer({"name": "book_table", "arguments": dict.fromkeys(("date", "people", "time"), "x" * 12)}),
                               special=False, add_bos=False)) <= t.output_budget


# --- serve: the chat route's prompt, /v1/predict with a conversation ---------------------------------


def _recording_app(reply: str):
    prompts: list[str] = []

    def script(prompt):  # asked once per decoded token: the distinct prompts, in order
        if prompt not in prompts:
            prompts.append(prompt)
        return reply, 20.0

    runner = FakeRunner(script, ctx_per_slot=4096, n_batch=512)
    return make_app(runner=runner, task=task(), default_max_tokens=200), prompts, runner


def test_the_chat_route_with_the_tasks_tools_renders_the_students_prompt():
    app, prompts, runner = _recording_app(task().format_answer(CALL))
    with TestClient(app) as c:
        body = {"model": MODEL, "messages": [{"role": "system", "content": INSTRUCTIONS}, *CONVERSATION], "tools": TOOLS, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        r2 = c.post("/v1/predict", json={"input": CONVERSATION, "fallback": False})
    student_prompt = runner.render_chat(task().student_messages(CONVERSATION)).removesuffix("<|assistant|>")
    assert prompts == [student_prompt]  # chat (OpenAI's tools request) and /v1/predict: one prompt
    assert '"id": "call_1"' in student_prompt and "tool_response" in student_prompt  # the history's call and its answer
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [CALL["arguments"]]
    assert message["tool_calls"][0]["function"]["name"] == "book_table"
    out = r2.json()
    assert r2.status_code == 200 and out["output"] == CALL and out["error"] is None, out


def test_predict_takes_a_text_and_refuses_a_bad_conversation_naming_it():
    app, prompts, runner = _recording_app(task().format_answer({"name": "no_details", "arguments": {}}))
    with TestClient(app) as c:
        ok = c.post("/v1/predict", json={"input": "hello", "fallback": False})
        bad = c.post("/v1/predict", json={"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
        system = c.post("/v1/predict", json={"input": [{"role": "system", "content": "you are"}, {"role": "user", "content": "x"}]})
    assert ok.json()["output"] == {"name": "no_details", "arguments": {}}
    assert prompts == [runner.render_chat(task().student_messages("hello")).removesuffix("<|assistant|>")]
    for r, message in ((bad, "input.1: the last message is the assistant's"), (system, "input.0.role")):
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "input" and message in err["message"], r.text


# --- a tiny random student: conversations in, calls out ------------------------------------------------


def test_a_tiny_student_answers_texts_and_conversations_with_valid_calls(tiny_model_dir):
    from edgedistill.distill.evaluate import answer_requests
    from edgedistill.distill.teacher_local import LocalHFTeacher

    small = [
        {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {"people": {"type": "string", "maxLength": 4}}}}},
        {"type": "function", "function": {"name": "none"}},
    ]
    t = Task(name="b", type="tool_call", instructions="Book.", tools=small, tool_choice="required")
    inputs = ["table for 4", [{"role": "assistant", "content": "How many?"}, {"role": "user", "content": "4"}], "hello"]
    student = LocalHFTeacher(tiny_model_dir, cache=None, batch_size=3)  # as distill's evaluation opens it
    texts = [r.text for r in student.run_chat_many(answer_requests(t, inputs, t.student_messages))]
    values = [t.parse_answer(x) for x in texts]
    assert all(err is None for _, err in values), texts  # under the task's constraint: a call of one of the tools
    assert {v["name"] for v, _ in values} <= {"book", "none"}
