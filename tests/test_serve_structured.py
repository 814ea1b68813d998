"""/v1/predict under the task's constraint: a label or a schema-valid object whatever the model
prefers, and a JSON answer's confidence per field (the weakest decides)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.confidence import field_confidence, json_leaf_spans
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings
from fastapi.testclient import TestClient

from edgedistill.task import Task
from tests.serve_fakes import ASSISTANT, EOS, N_VOCAB, FakeRunner

MODEL = "student"
LABELS = ["card_arrival", "card_linking", "exchange_rate"]
SCHEMA = {
    "type": "object",
    "properties": {"time": {"type": "string"}, "people": {"type": "string"}},
    "required": ["people", "time"],
    "additionalProperties": False,
}


def make_app(runner, task, **overrides):
    s = Settings.load(artifact="unused.gguf", model_alias=MODEL, **{"n_threads": 1, **overrides})
    art = Artifact(name=MODEL, format="gguf", model_path=Path("unused.gguf"), task=task, calibration={})
    return create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=art)


def test_constrained_classification_answers_a_label_whatever_the_model_prefers():
    task = Task(name="intents", type="classification", instructions="Classify.", labels=LABELS)
    with TestClient(make_app(FakeRunner(lambda p: ("no idea", 20.0)), task)) as c:
        body = c.post("/v1/predict", json={"input": "hm", "fallback": False}).json()
    assert body["error"] is None and body["output"] in LABELS, body
    assert body["edgedistill"]["constrained"] is True
    # the model put no mass on any label: the constrained distribution is flat over them
    assert body["confidence"] < 0.6


class FieldRunner(FakeRunner):
    """A byte model that writes ``reply`` and is sure of every byte except those inside the value of
    ``unsure`` (peak 2 there: it would as soon write any other byte)."""

    def __init__(self, reply: str, unsure: str):
        super().__init__(lambda p: (reply, 20.0))
        self.reply, self.unsure = reply.encode(), unsure

    def _logits(self, history):
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        done = history[history.index(ASSISTANT) + 1 :] if ASSISTANT in history else []
        a, b = json_leaf_spans(self.reply.decode())[self.unsure]
        i = len(done)
        nxt = self.reply[i] + 1 if i < len(self.reply) else EOS
        logits[nxt] = 2.0 if a < i < b - 1 else 20.0  # the value's characters, not its quotes
        return logits


def test_per_field_confidence_picks_the_weakest_field():
    task = Task(name="booking", type="extraction", instructions="Extract.", output_schema=SCHEMA)
    reply = '{"people": "4", "time": "7pm"}'  # keys sorted, json.dumps spacing: the constraint's spelling
    with TestClient(make_app(FieldRunner(reply, "time"), task, default_max_tokens=64)) as c:
        body = c.post("/v1/predict", json={"input": "table for 4 at 7pm", "fallback": False}).json()
    assert body["error"] is None and body["output"] == {"people": "4", "time": "7pm"}, body
    fields = body["edgedistill"]["fields"]
    assert set(fields) == {"people", "time"}
    assert fields["people"] > 0.99 and fields["time"] < 0.5
    assert body["confidence"] == min(fields.values())


def test_constrained_extraction_is_schema_valid_whatever_the_model_prefers():
    import jsonschema

    # bounded strings: a model that wants none of the allowed bytes would otherwise write one string
    # until the budget ends (a constrained answer parses when it is complete, not when it is cut off)
    schema = {**SCHEMA, "properties": {k: {"type": "string", "maxLength": 6} for k in SCHEMA["properties"]}}
    task = Task(name="booking", type="extraction", instructions="Extract.", output_schema=schema)
    with TestClient(make_app(FakeRunner(lambda p: ("sure! people=4", 20.0)), task, default_max_tokens=64)) as c:
        body = c.post("/v1/predict", json={"input": "x", "fallback": False}).json()
    assert body["error"] is None, body
    jsonschema.validate(body["output"], schema)


def test_field_confidence_leaves_forced_tokens_out():
    text = '{"a": "xy"}'
    pieces = [b""] + [bytes([b]) for b in range(256)]
    toks = [b + 1 for b in text.encode()] + [0]
    probs = [1.0] * len(toks)
    probs[text.index("x") + 0] = 0.3  # the model hesitated on the value's first character
    forced = [True] * len(toks)
    forced[text.index("x")] = False
    fc = field_confidence(text, toks, pieces, probs, forced, 0.1)
    assert fc is not None and fc.fields["a"] == 0.3 and fc.structure == 1.0 and fc.lowest == 0.3
    assert field_confidence("plain text", toks, pieces, probs, forced, 0.1) is None
    assert json.loads(text)  # the fixture is valid JSON


def _unsure_booking_runner():
    return FieldRunner('{"people": "4", "time": "7pm"}', "time")


def test_teacher_is_asked_in_shape_and_without_it_once_refused(caplog):
    from tests.serve_fakes import FakeTeacher

    task = Task(name="booking", type="extraction", instructions="Extract.", output_schema=SCHEMA)
    answer = '{"people": "4", "time": "8pm"}'
    with FakeTeacher(reply=answer) as teacher:
        app = make_app(_unsure_booking_runner(), task, default_max_tokens=64, teacher_url=teacher.url, teacher_model="big")
        with TestClient(app) as c:
            body = c.post("/v1/predict", json={"input": "table for 4 at 8pm"}).json()
        assert body["answered_by"] == "teacher" and body["output"] == {"people": "4", "time": "8pm"}, body
        rf = teacher.calls[0]["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["people", "time"]
        assert rf["json_schema"]["strict"] is True  # closed object, everything required: OpenAI's strict mode takes it
    with FakeTeacher(reply=answer, refuse_response_format=True) as teacher:
        app = make_app(_unsure_booking_runner(), task, default_max_tokens=64, teacher_url=teacher.url, teacher_model="big")
        with TestClient(app) as c, caplog.at_level("WARNING", logger="edgedistill.serve"):
            first = c.post("/v1/predict", json={"input": "table for 4 at 8pm"}).json()
            second = c.post("/v1/predict", json={"input": "table for 4 at 8pm"}).json()
        assert first["answered_by"] == second["answered_by"] == "teacher", first
        assert first["edgedistill"]["teacher_error"] is None
        # asked with it once, refused, then by prompt alone; said once in the log
        assert ["response_format" in call for call in teacher.calls] == [True, False, False]
        assert sum("refused response_format" in r.message for r in caplog.records) == 1
