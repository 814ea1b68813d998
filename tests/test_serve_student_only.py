"""Per-request policy: the student-only mode (``X-Edgedistill-Fallback: off``, ``fallback: false`` on
/v1/predict), a per-request threshold (``X-Edgedistill-Threshold``), what /v1/models says about the
cascade, and the token metrics by who answered. Fake numpy model, fake teacher on 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest
from edgedistill.serve.types import ChatCompletion, Completion, ModelList, PredictResponse
from fastapi.testclient import TestClient

from tests.serve_fakes import FakeTeacher
from tests.test_serve_api import MODEL, assert_openai_error, chat_body, classification_task, make_app

OFF = {"X-Edgedistill-Fallback": "off"}


def sample(text: str, name: str, **labels: str) -> float:
    """One Prometheus sample from /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0])) == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def teacher():
    with FakeTeacher() as t:
        yield t


def cascade(teacher: FakeTeacher, threshold: float = 1.0, **kw) -> TestClient:
    return TestClient(make_app(teacher_url=teacher.url, teacher_model="big", threshold=threshold, **kw))


# ---- chat and completions ---------------------------------------------------------------------


def test_fallback_off_serves_the_student_and_never_calls_the_teacher(teacher):
    with cascade(teacher) as c:  # threshold 1: every answer is one for the teacher
        r = c.post("/v1/chat/completions", json=chat_body(temperature=0), headers=OFF)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Hello from the student." and body["model"] == MODEL
        ed = body["edgedistill"]
        assert ed["answered_by"] == "student" and ed["confidence"] > 0.9 and ed["threshold"] == 1.0
        assert ed["fallback"] is False and ed["fallback_reason"] == "low_confidence" and ed["teacher_error"] is None
        assert r.headers["x-answered-by"] == "student"
        ChatCompletion.model_validate(body)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 0}, headers=OFF)
        assert r.json()["choices"][0]["text"] == "Hello from the student."
        assert r.json()["edgedistill"]["answered_by"] == "student" and r.json()["edgedistill"]["fallback"] is False
        Completion.model_validate(r.json())
        assert not teacher.calls
        # without the header: the server's rule, the teacher answers
        on = c.post("/v1/chat/completions", json=chat_body(), headers={"X-Edgedistill-Fallback": "on"}).json()
        assert on["edgedistill"]["answered_by"] == "teacher" and on["edgedistill"]["fallback"] is True
        assert len(teacher.calls) == 1


def test_fallback_off_streams_live(teacher):
    """A held stream waits for the decision; with the fallback off there is none to wait for."""
    with (
        cascade(teacher) as c,
        c.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}), headers=OFF
        ) as r,
    ):
        assert r.status_code == 200 and r.headers["x-answered-by"] == "student"
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    texts = [ch["choices"][0]["delta"].get("content") for ch in chunks if ch["choices"]]
    assert "".join(t or "" for t in texts) == "Hello from the student."
    assert len([t for t in texts if t]) > 5  # token by token, not one held blob
    ed = chunks[-1]["edgedistill"]
    assert ed["answered_by"] == "student" and ed["fallback"] is False and ed["fallback_reason"] == "low_confidence"
    assert not teacher.calls


def test_per_request_threshold(teacher):
    with cascade(teacher, threshold=1.0) as c:
        r = c.post("/v1/chat/completions", json=chat_body(), headers={"X-Edgedistill-Threshold": "0"})
        ed = r.json()["edgedistill"]
        assert ed["answered_by"] == "student" and ed["threshold"] == 0.0 and ed["fallback_reason"] is None and ed["fallback"]
        assert not teacher.calls
        # 0 lets a held stream go live too: nothing can go to the teacher
        with c.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers={"X-Edgedistill-Threshold": "0.0"}
        ) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
        assert len([ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")]) > 5
        assert not teacher.calls
    with cascade(teacher, threshold=0.0) as c:
        ed = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"X-Edgedistill-Threshold": "1"}).json()
        assert ed["edgedistill"]["answered_by"] == "teacher" and ed["edgedistill"]["threshold"] == 1.0
        assert len(teacher.calls) == 1
        # both headers: the reason says what the threshold would do, the teacher is not asked
        ed = c.post("/v1/chat/completions", json=chat_body(), headers={**OFF, "X-Edgedistill-Threshold": "1.0"}).json()
        assert ed["edgedistill"]["answered_by"] == "student" and ed["edgedistill"]["fallback_reason"] == "low_confidence"
        assert len(teacher.calls) == 1


def test_without_a_teacher_the_reason_is_still_given():
    with TestClient(make_app(threshold=1.0)) as c:
        ed = c.post("/v1/chat/completions", json=chat_body()).json()["edgedistill"]
    assert ed["answered_by"] == "student" and ed["fallback"] is False and ed["fallback_reason"] == "low_confidence"


@pytest.mark.parametrize(
    "headers, words",
    [
        ({"X-Edgedistill-Threshold": "1.5"}, ["X-Edgedistill-Threshold", "0 to 1"]),
        ({"X-Edgedistill-Threshold": "-0.1"}, ["X-Edgedistill-Threshold"]),
        ({"X-Edgedistill-Threshold": "high"}, ["X-Edgedistill-Threshold", "'high'"]),
        ({"X-Edgedistill-Threshold": ""}, ["X-Edgedistill-Threshold"]),
        ({"X-Edgedistill-Threshold": "nan"}, ["X-Edgedistill-Threshold"]),
        ({"X-Edgedistill-Threshold": "1e-3"}, ["X-Edgedistill-Threshold"]),
        ({"X-Edgedistill-Fallback": "no"}, ["X-Edgedistill-Fallback", "on or off"]),
        ({"X-Edgedistill-Fallback": "false"}, ["X-Edgedistill-Fallback"]),
        ({"X-Edgedistill-Fallback": ""}, ["X-Edgedistill-Fallback"]),
        ({"X-Edgedistill-Treshold": "0"}, ["unknown header", "typo"]),
        ([("X-Edgedistill-Fallback", "off"), ("X-Edgedistill-Fallback", "on")], ["twice"]),
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/predict"])
def test_invalid_policy_headers_are_400(teacher, headers, words, route):
    body = {
        "/v1/chat/completions": chat_body(),
        "/v1/completions": {"model": MODEL, "prompt": "x"},
        "/v1/predict": {"input": "x"},
    }
    with cascade(teacher, task=classification_task()) as c:
        r = c.post(route, json=body[route], headers=headers)
    assert_openai_error(r, 400, "invalid_value")
    err = r.json()["error"]
    assert all(w in err["message"] for w in words), err
    assert err["param"].lower().startswith("x-edgedistill-")
    assert not teacher.calls


def test_openai_client_unmodified_and_with_headers(teacher):
    from openai import OpenAI

    with cascade(teacher) as c:
        plain = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)
        r = plain.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
        assert r.model_extra["edgedistill"]["answered_by"] == "teacher"
        r = plain.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], extra_headers=OFF)
        assert r.model_extra["edgedistill"]["answered_by"] == "student"
        student = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, default_headers=OFF, max_retries=0)
        stream = student.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, temperature=0
        )
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello from the student."
        assert chunks[-1].model_extra["edgedistill"]["answered_by"] == "student"
        assert student.completions.create(model=MODEL, prompt="x").model_extra["edgedistill"]["answered_by"] == "student"
    assert len(teacher.calls) == 1


# ---- /v1/predict ------------------------------------------------------------------------------


def predict_app(teacher: FakeTeacher, script, threshold: float = 0.0) -> TestClient:
    # free decoding (--no-constrain): an answer that is no label is possible, as is a JSON answer
    # cut off by the budget under a constraint; the label constraint itself is tested in test_serve_structured
    return TestClient(
        make_app(
            script=script, task=classification_task(), teacher_url=teacher.url, teacher_model="big", threshold=threshold,
            constrain=False,
        )
    )


def test_predict_fallback_false_never_calls_the_teacher():
    with FakeTeacher(reply="card_linking") as teacher, predict_app(teacher, lambda p: ("no idea", 20.0)) as c:
        # threshold 0 alone still sends an invalid answer to the teacher, and shows the student's answer
        r = c.post("/v1/predict", json={"input": "hm", "threshold": 0.0})
        body = r.json()
        assert body["answered_by"] == "teacher" and body["output"] == "card_linking" and body["error"] is None
        assert body["edgedistill"]["fallback_reason"] == "not_a_label" and body["edgedistill"]["student_output"] == "no idea"
        assert len(teacher.calls) == 1
        PredictResponse.model_validate(body)
        # fallback: false -- no teacher call at all
        body = c.post("/v1/predict", json={"input": "hm", "fallback": False}).json()
        assert body["answered_by"] == "student" and body["error"] == "not_a_label"
        assert body["confidence"] == 0.0 and body["edgedistill"]["fallback"] is False
        assert body["edgedistill"]["fallback_reason"] == "not_a_label" and body["edgedistill"]["student_output"] == "no idea"
        PredictResponse.model_validate(body)
        # the header does the same; the body field wins over it
        body = c.post("/v1/predict", json={"input": "hm"}, headers=OFF).json()
        assert body["answered_by"] == "student" and body["error"] == "not_a_label"
        assert len(teacher.calls) == 1
        body = c.post("/v1/predict", json={"input": "hm", "fallback": True}, headers=OFF).json()
        assert body["answered_by"] == "teacher" and len(teacher.calls) == 2
        for bad in ({"input": "hm", "fallback": "no"}, {"input": "hm", "fallback": 0}, {"input": "hm", "falback": False}):
            assert_openai_error(c.post("/v1/predict", json=bad), 400)
        assert len(teacher.calls) == 2


def test_predict_low_confidence_with_fallback_off_and_threshold_header():
    with FakeTeacher(reply="card_linking") as teacher, predict_app(teacher, lambda p: ("card_arrival", 0.5), threshold=0.9) as c:
        body = c.post("/v1/predict", json={"input": "where is my card", "fallback": False}).json()
        assert body["answered_by"] == "student" and body["output"] == "card_arrival" and body["confidence"] < 0.9
        assert body["edgedistill"]["fallback_reason"] == "low_confidence" and body["edgedistill"]["threshold"] == 0.9
        body = c.post("/v1/predict", json={"input": "where is my card"}, headers={"X-Edgedistill-Threshold": "0.1"}).json()
        assert body["answered_by"] == "student" and body["edgedistill"]["threshold"] == 0.1
        assert body["edgedistill"]["fallback_reason"] is None
        assert not teacher.calls
        body = c.post("/v1/predict", json={"input": "x", "threshold": 0.95}, headers={"X-Edgedistill-Threshold": "0.1"}).json()
        assert body["answered_by"] == "teacher" and body["edgedistill"]["threshold"] == 0.95  # the body wins
        assert body["edgedistill"]["student_output"] == "card_arrival" and body["output"] == "card_linking"


# ---- /v1/models and metrics -------------------------------------------------------------------


def test_models_say_threshold_and_teacher(teacher):
    with cascade(teacher, threshold=0.7, task=classification_task()) as c:
        data = c.get("/v1/models").json()
    ModelList.model_validate(data)
    ed = data["data"][0]["edgedistill"]
    assert ed == {"format": "gguf", "backend": ed["backend"], "task": "classification", "threshold": 0.7, "threshold_source": "threshold", "teacher": True}
    with TestClient(make_app(threshold=0.9)) as c:
        ed = c.get("/v1/models").json()["data"][0]["edgedistill"]
    assert ed["teacher"] is False and ed["threshold"] == 0.9 and ed["task"] is None


def test_tokens_are_counted_for_who_answered(teacher):
    """The teacher's answer counts its own usage (FakeTeacher: 3 prompt, 4 completion) as teacher
    tokens; the student's work on that request counts as student work, not as a student answer."""
    with cascade(teacher, task=classification_task(), constrain=False) as c:  # free decoding: no label possible
        c.post("/v1/chat/completions", json=chat_body())  # the teacher answers
        text = c.get("/metrics").text
        assert sample(text, "edgedistill_tokens_total", answered_by="teacher", kind="completion") == 4
        assert sample(text, "edgedistill_tokens_total", answered_by="teacher", kind="prompt") == 3
        assert sample(text, "edgedistill_tokens_total", answered_by="student", kind="completion") == 0
        student_done = sample(text, "edgedistill_student_tokens_total", kind="completion")
        assert student_done == len("Hello from the student.") + 1
        r = c.post("/v1/chat/completions", json=chat_body(), headers=OFF).json()  # the student answers
        text = c.get("/metrics").text
        assert (
            sample(text, "edgedistill_tokens_total", answered_by="student", kind="completion") == r["usage"]["completion_tokens"]
        )
        assert sample(text, "edgedistill_student_tokens_total", kind="completion") == 2 * student_done
        assert sample(text, "edgedistill_answered_total", answered_by="teacher") == 1
        assert sample(text, "edgedistill_answered_total", answered_by="student") == 1
        c.post("/v1/predict", json={"input": "x"})  # "Hello from ..." is not a label: the teacher answers, with usage
        text = c.get("/metrics").text
        assert sample(text, "edgedistill_tokens_total", answered_by="teacher", kind="completion") == 8
        assert sample(text, "edgedistill_fallbacks_total", reason="not_a_label", outcome="teacher") == 1
