"""`edgedistill distill` end to end on a tool_call task with OpenAI tools and conversation inputs:
a tiny student, taught by an OpenAI-compatible teacher on loopback that answers in the chat route's
generic tool-call JSON (what the task asks it for)."""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler

import pytest
import yaml
from edgedistill.distill.pipeline import run_distill

from edgedistill.task import Task
from tests.serve_fakes import send_json, start_http, stop_http

TOOLS = [
    {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {"people": {"type": "string", "maxLength": 3}}}}},
    {"type": "function", "function": {"name": "none"}},
]
ASKED = {"role": "assistant", "content": "How many?"}


def answer(user: str) -> dict:
    m = re.search(r"\d+", user)
    return {"name": "book", "arguments": {"people": m.group(0)}} if m else {"name": "none", "arguments": {}}


def conv(text: str) -> list[dict]:
    return [ASKED, {"role": "user", "content": text}]


class ToolTeacher:
    """Calls ``book`` with the last user message's number, ``none`` without one; records what it was sent."""

    def __init__(self):
        self.bodies: list[dict] = []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
                text = Task(name="t", type="tool_call", instructions="x", tools=TOOLS, tool_choice="required").format_answer(answer(user))
                data = json.dumps({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 10},
                }).encode()
                send_json(self, data)

        self.server, self.url = start_http(H)

    def close(self):
        stop_http(self.server)


@pytest.fixture
def teacher():
    t = ToolTeacher()
    yield t
    t.close()


def test_distill_a_tools_task_with_conversation_inputs(tmp_path, teacher, tiny_model_dir):
    test = [conv("we are 4 of us"), "table for 7 tonight", conv("not sure yet"), "hello there"]
    asked = ["we will be 3 on friday", "just 2 of us tonight", "a birthday party of 12", "maybe nine guests"]
    pool = [conv(x) for x in asked] + ["book me a table for 5", "is there space for 8 at noon", "do you open late", "what is on the menu"]
    pool += [conv("just 2 of us tonight"), test[0]]  # a duplicate of a pool row, and a test input
    with (tmp_path / "test.jsonl").open("w") as f:
        f.writelines(json.dumps({"input": x, "output": answer(x if isinstance(x, str) else x[-1]["content"])}) + "\n" for x in test)
    with (tmp_path / "pool.jsonl").open("w") as f:
        f.writelines(json.dumps({"input": x}) + "\n" for x in pool)
    seeds = [{"input": conv(f"seed {i}") if i % 2 else f"book for {i}", "output": answer(f"{i}")} for i in range(10)]
    spec = {
        "name": "tools", "type": "tool_call", "instructions": "Book.", "tools": TOOLS, "tool_choice": "required",
        "seeds": seeds,
        "test_set": {"path": "test.jsonl"},
        "pool": {"path": "pool.jsonl", "output_field": None},
        "teacher": {"kind": "openai", "base_url": teacher.url, "model": "tools", "gate": {"min_score": 0.9}},
        "student": {"path": str(tiny_model_dir)},
        "generation": {"num_inputs": 0},
        "training": {"method": "full", "epochs": 1, "batch_size": 4, "max_length": 512, "learning_rate": 1e-3},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    summary = run_distill(tmp_path / "task.yaml", out)

    assert summary["gate"]["passed"] and summary["gate"]["score"] == 1.0  # exact_match over texts and conversations
    rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    rejects = {json.dumps(r["input"]): r["reject_reason"] for r in map(json.loads, (out / "data" / "rejects.jsonl").read_text().splitlines())}
    assert rejects == {json.dumps(conv("just 2 of us tonight")): "exact_duplicate", json.dumps(test[0]): "contaminated"}
    rows += [json.loads(x) for x in (out / "data" / "calibration.jsonl").read_text().splitlines()]  # the held-out split too
    assert sum(isinstance(r["input"], list) for r in rows) == 5 + 4  # the seeds' and the pool's conversations, kept as such
    assert {r["output"]["name"] for r in rows} == {"book", "none"}
    # the teacher was asked with the task's prompt: the tools in the system message, the conversation after it
    sent = next(b for b in teacher.bodies if b["messages"][-1]["content"] == "a birthday party of 12")
    task = Task.from_manifest(json.loads((out / "student" / "manifest.json").read_text())["task"])
    assert sent["messages"] == task.teacher_messages(conv("a birthday party of 12"))
    assert '"name": "book"' in sent["messages"][0]["content"] and sent["messages"][1] == ASKED
    results = json.loads((out / "eval" / "eval.json").read_text())["results"]
    assert results["teacher"]["exact_match"] == 1.0 and results["teacher"]["n"] == 4
    for name in ("student", "undistilled student"):  # decoded under the task's constraint: every answer a call
        assert results[name]["decoded_as"] == "constraint" and results[name]["invalid_answers"] == 0
        assert {"exact_match", "name_accuracy", "argument_f1"} <= set(results[name])
