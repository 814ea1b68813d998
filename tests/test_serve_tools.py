"""Structured output and tool calls on /v1/chat/completions with the fake byte model (fast):
response_format, tools in llama.cpp's generic format with every tool_choice, streamed tool-call
deltas, the 400s naming the field, penalties and logit_bias, the teacher's tool calls."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import jsonschema
import pytest
from edgedistill.serve.fallback import _well_formed
from fastapi.testclient import TestClient

from edgedistill.toolcalls import RESPOND_IN_JSON, TOOLS_INTRO
from tests.serve_fakes import FakeRunner, LocalHTTPServer
from tests.test_serve_api import MODEL, chat_body, make_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]},
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": CLOCK["function"]["parameters"]}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"mood": {"type": "string", "enum": ["good", "bad"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["mood", "score"],
    "additionalProperties": False,
}


def app_for(reply: str | None = None, peak: float = 20.0, script=None, **overrides):
    script = script or (lambda prompt: (reply, peak))
    runner = FakeRunner(script, ctx_per_slot=4096, n_batch=512)
    return make_app(runner=runner, **{"default_max_tokens": 200, **overrides})


def post(c, **kw):
    r = c.post("/v1/chat/completions", json=chat_body(**{"temperature": 0, **kw}))
    assert r.status_code == 200, r.text
    return r.json()


def assert_valid_calls(message, names=SCHEMAS):
    assert message["content"] is None and message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


# ---- response_format -------------------------------------------------------------------------------


def test_json_object_answer_is_an_object():
    with TestClient(app_for('{"answer": 42}')) as c:
        body = post(c, response_format={"type": "json_object"}, max_tokens=40)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert json.loads(choice["message"]["content"]) == {"answer": 42}
    assert set(body["edgedistill"]["fields"]) == {"answer"}


def test_json_schema_answer_validates_and_has_per_field_confidence():
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": ANSWER_SCHEMA, "strict": True}}
    with TestClient(app_for('{"mood": "bad", "score": 3}')) as c:
        body = post(c, response_format=rf)
        sampled = post(c, response_format=rf, temperature=1.0, n=4, seed=1)  # a model that says it, or noise
    assert json.loads(body["choices"][0]["message"]["content"]) == {"mood": "bad", "score": 3}
    info = body["edgedistill"]
    assert set(info["fields"]) == {"mood", "score"} and info["confidence"] == min(info["fields"].values())
    for ch in sampled["choices"]:
        jsonschema.validate(json.loads(ch["message"]["content"]), ANSWER_SCHEMA)


def test_a_schema_compiled_once_serves_every_request():
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": ANSWER_SCHEMA}}
    app = app_for('{"mood": "good", "score": 1}')
    with TestClient(app) as c:
        for _ in range(3):
            post(c, response_format=rf)
        post(
            c,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "same", "schema": json.loads(json.dumps(ANSWER_SCHEMA, sort_keys=True))},
            },
        )
    assert app.state.st.schemas.compiled == 1  # one schema (key order aside): compiled once


def test_json_schema_streams_as_content():
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": ANSWER_SCHEMA}}
    with TestClient(app_for('{"mood": "good", "score": 7}')) as c:
        r = c.post("/v1/chat/completions", json=chat_body(temperature=0, response_format=rf, stream=True))
    chunks = sse_chunks(r)
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert json.loads(text) == {"mood": "good", "score": 7}
    assert set(chunks[-1]["edgedistill"]["fields"]) == {"mood", "score"}


# ---- tools -----------------------------------------------------------------------------------------


def test_auto_tool_call_and_the_prompt_it_was_asked_with():
    prompts = []

    def script(prompt):
        prompts.append(prompt)
        return '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}', 20.0

    with TestClient(app_for(script=script)) as c:
        body = post(c, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert_valid_calls(choice["message"])
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert RESPOND_IN_JSON in prompts[0] and TOOLS_INTRO in prompts[0] and '"get_time"' in prompts[0]
    fields = body["edgedistill"]["fields"]
    assert set(fields) == {"tool_calls.0.name", "tool_calls.0.arguments.city"}
    assert body["edgedistill"]["confidence"] <= min(fields.values()) + 1e-6


def test_auto_may_answer_text():
    with TestClient(app_for('{"response": "It is sunny."}')) as c:
        body = post(c, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."} and choice["finish_reason"] == "stop"
    assert "content" in body["edgedistill"]["fields"]


def test_required_calls_a_tool_even_when_the_model_would_rather_talk():
    with TestClient(app_for('{"response": "Hello there."}')) as c:
        # one call: a model with no preference at all would go on adding calls to a list
        body = post(c, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert_valid_calls(body["choices"][0]["message"])


def test_a_named_function_is_the_one_called():
    with TestClient(app_for('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')) as c:
        choice = {"type": "function", "function": {"name": "get_time"}}
        body = post(c, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_tokens=120)
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time"] * len(calls)
    assert_valid_calls(body["choices"][0]["message"])


def test_none_is_plain_text_without_tools_in_the_prompt():
    prompts = []

    def script(prompt):
        prompts.append(prompt)
        return "Just text.", 20.0

    with TestClient(app_for(script=script)) as c:
        body = post(c, tools=TOOLS, tool_choice="none")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Just text."}
    assert TOOLS_INTRO not in prompts[0] and RESPOND_IN_JSON not in prompts[0]
    assert body["edgedistill"]["fields"] is None


def test_parallel_calls_and_parallel_false():
    two = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]}'
    with TestClient(app_for(two)) as c:
        parallel = post(c, tools=TOOLS)
        single = post(c, tools=TOOLS, parallel_tool_calls=False, max_tokens=120)
    calls = parallel["choices"][0]["message"]["tool_calls"]
    assert [x["function"]["name"] for x in calls] == ["get_weather", "get_time"]
    assert len({x["id"] for x in calls}) == 2
    assert {"tool_calls.0.arguments.city", "tool_calls.1.arguments.tz"} <= set(parallel["edgedistill"]["fields"])
    assert len(single["choices"][0]["message"]["tool_calls"]) == 1
    assert_valid_calls(single["choices"][0]["message"])


def sse_chunks(r) -> list[dict]:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_tool_calls_assemble_like_openais():
    two = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]}'
    with TestClient(app_for(two)) as c:
        r = c.post("/v1/chat/completions", json=chat_body(temperature=0, tools=TOOLS, stream=True))
    chunks = [ch for ch in sse_chunks(r) if ch["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in ch["choices"][0]["delta"].get("tool_calls") or []:
            if "id" in d:
                assert d["type"] == "function" and d["function"]["arguments"] == ""
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            else:
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"} and json.loads(calls[1]["arguments"]) == {"tz": "UTC"}


def test_history_with_tool_calls_and_tool_answers_is_rendered_generically():
    prompts = []

    def script(prompt):
        prompts.append(prompt)
        return '{"response": "It is 12C in Rome."}', 20.0

    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
    ]
    with TestClient(app_for(script=script)) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": history, "tools": TOOLS, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "It is 12C in Rome."
    p = prompts[0]
    assert '"tool_calls": [' in p and '"id": "call_1"' in p and '"city": "Rome"' in p
    assert 'user: {\n  "tool_response": {\n    "content": "12C",\n    "tool_call_id": "call_1"' in p


# ---- the 400s --------------------------------------------------------------------------------------


def bad_tool(**function):
    return [WEATHER, {"type": "function", "function": function}]


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": bad_tool(parameters={"type": "object"})}, "tools.1.function.name"),
        ({"tools": bad_tool(name="has space")}, "tools.1.function.name"),
        ({"tools": bad_tool(name="x", parameters={"type": "string"})}, "tools.1.function.parameters"),
        ({"tools": bad_tool(name="get_weather")}, "tools.1.function.name"),
        (
            {"tools": bad_tool(name="x", parameters={"type": "object", "properties": {"a": {"$ref": "#/nope"}}})},
            "tools.1.function.parameters",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": ANSWER_SCHEMA}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
            "response_format.json_schema.schema",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities.1"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"store": True}, "store"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ],
)
def test_bad_tools_formats_and_refused_parameters_are_400_naming_the_field(extra, param):
    with TestClient(app_for("x")) as c:
        r = c.post("/v1/chat/completions", json=chat_body(**extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert err["message"].startswith(param), err


def test_harmless_metadata_is_accepted():
    with TestClient(app_for("ok")) as c:
        body = post(
            c,
            user="u1",
            metadata={"k": "v"},
            store=False,
            safety_identifier="h",
            prompt_cache_key="p",
            service_tier="auto",
            modalities=["text"],
        )
    assert body["choices"][0]["message"]["content"] == "ok"


# ---- penalties and logit_bias ----------------------------------------------------------------------


def token(ch: str) -> str:
    return str(ord(ch) + 1)  # the fake model's token id of a byte


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_forces_and_bans_and_penalties_change_the_output(route):
    def gen(reply: str, peak: float, **kw) -> str:
        with TestClient(app_for(reply, peak)) as c:
            body = {"model": MODEL, "temperature": 0, "max_tokens": 6, **kw}
            body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"})
            r = c.post(route, json=body)
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            return ch["message"]["content"] if "chat" in route else ch["text"]

    assert gen("Hello", 20.0) == "Hello"
    assert gen("Hello", 20.0, logit_bias={token("Z"): 100}) == "ZZZZZZ"
    assert not gen("Hello", 20.0, logit_bias={token("H"): -100}).startswith("H")
    # the fake model wants "aaaa" at logit 3 (every other token 0; greedy picks token 0, end, on a tie)
    assert gen("aaaa", 3.0) == "aaaa"
    assert gen("aaaa", 3.0, frequency_penalty=2.0) == "aa"  # 3 - 2*2 < 0 after two
    assert gen("aaaa", 1.5, presence_penalty=2.0) == "a"  # 1.5 - 2 < 0 after one


# ---- the teacher -----------------------------------------------------------------------------------


class ToolTeacher(LocalHTTPServer):
    """A teacher that answers every chat request with a get_time call and records the bodies."""

    def __init__(self):
        self.calls: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.calls.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                call = {"id": "call_t1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                data = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "t",
                        "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.bind(Handler)


def test_an_unsure_student_hands_the_same_tools_to_the_teacher():
    unsure = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}'
    with ToolTeacher() as t, TestClient(app_for(unsure, 1.0, teacher_url=t.base_url, teacher_model="t", threshold=0.9)) as c:
        body = post(c, tools=TOOLS, tool_choice="required")
    assert body["edgedistill"]["answered_by"] == "teacher", body["edgedistill"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
    assert t.calls[0]["tools"] == TOOLS and t.calls[0]["tool_choice"] == "required"


def test_a_teacher_tool_call_is_well_formed_and_garbage_is_not():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ok = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    assert _well_formed(ok, chat=True)
    for bad in ({"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}, {"type": "function"}, "x"):
        assert not _well_formed({"choices": [{"message": {"content": None, "tool_calls": [bad]}}]}, chat=True)
    assert not _well_formed({"choices": [{"message": {"content": None}}]}, chat=True)


def test_a_text_response_cut_off_by_max_tokens_is_the_text_so_far():
    with TestClient(app_for('{"response": "It is sunny in Rome today."}')) as c:
        body = post(c, tools=TOOLS, max_tokens=20)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is "} and choice["finish_reason"] == "length"


def test_auto_with_a_json_schema_answers_text_of_that_schema():
    rf = {"type": "json_schema", "json_schema": {"name": "mood", "schema": ANSWER_SCHEMA}}
    with TestClient(app_for('{"response": {"mood": "good", "score": 1}}')) as c:
        body = post(c, tools=TOOLS, response_format=rf)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) == {"mood": "good", "score": 1}
    assert set(body["edgedistill"]["fields"]) == {"content.mood", "content.score"}
