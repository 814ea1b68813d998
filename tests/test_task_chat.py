"""One confidence on every route that answers the task: chat in the task's format (its system
prompt; for a JSON task its response_format) gives /v1/predict's answer and confidence for the
same input, streamed or not, and its cascade asks the teacher as /v1/predict asks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings
from fastapi.testclient import TestClient

from edgedistill.task import Task
from tests.serve_fakes import FakeRunner, FakeTeacher
from tests.test_serve_structured import SCHEMA, FieldRunner

MODEL = "student"
LABELS = ["card_arrival", "card_linking", "exchange_rate"]
# different temperatures per kind: a route that scores a label as generation gets another number
CALIBRATION = {"classification": {"temperature": 1.7}, "generation": {"temperature": 0.6}}
CLASSIFY = Task(name="intents", type="classification", instructions="Classify the banking query.", labels=LABELS)
EXTRACT = Task(name="booking", type="extraction", instructions="Extract the booking.", output_schema=SCHEMA)


def make_app(runner, task, **overrides):
    s = Settings.load(artifact="unused.gguf", model_alias=MODEL, **{"n_threads": 1, **overrides})
    art = Artifact(name=MODEL, format="gguf", model_path=Path("unused.gguf"), task=task, calibration=CALIBRATION)
    return create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=art)


def unsure_label_runner() -> FakeRunner:
    """Prefers card_linking, but not by much (peak 3): the label set's scores are far from 1."""
    return FakeRunner(lambda p: ("card_linking", 3.0))


def task_chat_body(task: Task, text: str, **kw) -> dict:
    """What the bench sends: the student's messages, greedy, and the task's response_format for a JSON task."""
    body = {"model": MODEL, "messages": task.student_messages(text), "temperature": 0, "max_tokens": 256, **kw}
    if task.structured:
        body["response_format"] = task.response_format()
    return body


def streamed(c: TestClient, body: dict, headers: dict) -> tuple[str, dict]:
    text, info = "", None
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            info = obj.get("edgedistill") or info
            for ch in obj["choices"]:
                text += (ch.get("delta") or {}).get("content") or ""
    return text, info


@pytest.mark.parametrize(
    ("task", "runner", "text"),
    [
        (CLASSIFY, unsure_label_runner, "I linked my card, did it work?"),
        (EXTRACT, lambda: FieldRunner('{"people": "4", "time": "7pm"}', "time"), "table for 4 at 7pm"),
    ],
    ids=["classification", "extraction"],
)
def test_chat_in_the_task_format_gives_predicts_answer_and_confidence(task, runner, text):
    off = {"X-Edgedistill-Fallback": "off"}
    with TestClient(make_app(runner(), task)) as c:
        pred = c.post("/v1/predict", json={"input": text, "fallback": False}).json()
        chat = c.post("/v1/chat/completions", json=task_chat_body(task, text), headers=off).json()
        s_text, s_info = streamed(c, task_chat_body(task, text), off)
    assert pred["error"] is None, pred
    conf = pred["confidence"]
    assert 0 < conf < 0.95, pred  # a real score, not a certainty
    value, err = task.parse_answer(chat["choices"][0]["message"]["content"])
    assert err is None and value == pred["output"], chat
    assert abs(chat["edgedistill"]["confidence"] - conf) <= 1e-6, (chat["edgedistill"], pred["edgedistill"])
    assert chat["edgedistill"]["fields"] == pred["edgedistill"]["fields"]
    # streamed live (no teacher waits for the decision): the same answer, the confidence in the last chunk
    assert task.parse_answer(s_text) == (pred["output"], None)
    assert abs(s_info["confidence"] - conf) <= 1e-6


def test_plain_chat_is_left_as_it_was():
    """Another system prompt, or a response format a classification does not have: plain chat."""
    with TestClient(make_app(unsure_label_runner(), CLASSIFY)) as c:
        pred = c.post("/v1/predict", json={"input": "hm", "fallback": False}).json()
        other = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hm"}]}
        plain = c.post("/v1/chat/completions", json={**other, "temperature": 0}).json()
    # plain chat scores the text as generation (the generation temperature), not over the label set
    assert abs(plain["edgedistill"]["confidence"] - pred["confidence"]) > 1e-3


def test_the_cascade_in_chat_asks_the_teacher_as_predict_does():
    with FakeTeacher(reply="exchange_rate") as teacher:
        app = make_app(unsure_label_runner(), CLASSIFY, teacher_url=teacher.url, teacher_model="big", threshold=0.9)
        with TestClient(app) as c:
            pred = c.post("/v1/predict", json={"input": "rate?"}).json()
            chat = c.post("/v1/chat/completions", json=task_chat_body(CLASSIFY, "rate?")).json()
        assert pred["answered_by"] == chat["edgedistill"]["answered_by"] == "teacher"
        assert CLASSIFY.parse_answer(chat["choices"][0]["message"]["content"]) == (pred["output"], None) == ("exchange_rate", None)
        # both asked with the teacher's prompt (the labels listed), not the student's
        assert teacher.calls[0]["messages"] == teacher.calls[1]["messages"] == CLASSIFY.teacher_messages("rate?")
