"""Bad input, everywhere a user can send some: every endpoint of the server, the CLI, the task spec.

Each case must be refused with a 4xx (server) or one ``error:`` line and a non-zero exit (CLI,
spec), never a 5xx or a traceback, with a message that names what is wrong and what to do. Cases:
malformed JSON, wrong types, out-of-range values, unknown fields where they matter, empty and
enormous inputs, prompts beyond the context, invalid UTF-8 and lone surrogates, wrong content
types and methods. The count of cases is what ``pytest tests/test_bad_input.py --collect-only -q``
lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from edgedistill.errors import UserError
from edgedistill.spec import load_spec
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_serve_api import MODEL, assert_openai_error, chat_body, classification_task, make_app
from tests.test_spec import base_spec, write

LIMIT = 8192  # max_body_bytes of the app under test
J = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(task=classification_task(), max_body_bytes=LIMIT, threshold=0.0)) as c:
        yield c


def raw(body: bytes | str, ctype: str | None = "application/json") -> dict:
    return {"content": body.encode() if isinstance(body, str) else body, "headers": {"content-type": ctype} if ctype else {}}


def js(body: dict) -> dict:
    return raw(json.dumps(body))


MSG = [{"role": "user", "content": "Hi"}]

# (route, request kwargs, status, code, words the message must hold)
BODY_CASES = {
    # --- not JSON, or not the JSON we take -----------------------------------------------------
    "malformed": ("/v1/chat/completions", raw("{bad json"), 400, "invalid_json", ["not valid JSON"]),
    "truncated": (
        "/v1/chat/completions",
        raw('{"model": "fake-student", "messages": ['),
        400,
        "invalid_json",
        ["not valid JSON"],
    ),
    "trailing comma": (
        "/v1/completions",
        raw('{"model": "fake-student", "prompt": "x",}'),
        400,
        "invalid_json",
        ["not valid JSON"],
    ),
    "single quotes": ("/v1/predict", raw("{'input': 'x'}"), 400, "invalid_json", ["not valid JSON"]),
    "empty body": ("/v1/chat/completions", raw(""), 400, "invalid_json", ["empty", "JSON object"]),
    "whitespace body": ("/v1/predict", raw("  \n "), 400, "invalid_json", ["empty"]),
    "null body": ("/v1/chat/completions", raw("null"), 400, "invalid_json", ["JSON object"]),
    "array body": ("/v1/completions", raw("[1, 2]"), 400, "invalid_json", ["JSON object"]),
    "string body": ("/v1/predict", raw('"where is my card"'), 400, "invalid_json", ["JSON object"]),
    "NaN": (
        "/v1/chat/completions",
        raw('{"model": "fake-student", "messages": [], "temperature": NaN}'),
        400,
        "invalid_json",
        ["NaN"],
    ),
    "Infinity": ("/v1/predict", raw('{"input": "x", "threshold": Infinity}'), 400, "invalid_json", ["Infinity"]),
    "1e999": ("/v1/predict", raw('{"input": "x", "threshold": 1e999}'), 400, "invalid_json", ["out of range"]),
    "4400-digit integer": ("/v1/chat/completions", raw('{"seed": ' + "9" * 4400 + "}"), 400, "invalid_json", ["not valid JSON"]),
    "nested 2000 deep": ("/v1/completions", raw("[" * 2000 + "]" * 2000), 400, "invalid_json", ["nested too deeply"]),
    "invalid UTF-8": ("/v1/predict", raw(b'{"input": "caf\xe9 \xff"}'), 400, "invalid_json", ["not valid JSON"]),
    "lone surrogate (chat)": (
        "/v1/chat/completions",
        raw('{"model": "fake-student", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        400,
        "invalid_json",
        ["surrogate"],
    ),
    "lone surrogate (completions)": (
        "/v1/completions",
        raw('{"model": "fake-student", "prompt": "a\\udfff"}'),
        400,
        "invalid_json",
        ["surrogate"],
    ),
    "lone surrogate (predict)": ("/v1/predict", raw('{"input": "\\udc00x"}'), 400, "invalid_json", ["surrogate"]),
    "lone surrogate in a key": ("/v1/predict", raw('{"input": "x", "\\ud800": 1}'), 400, "invalid_json", ["surrogate"]),
    # --- content type ---------------------------------------------------------------------------
    "text/plain": (
        "/v1/chat/completions",
        raw(json.dumps(chat_body()), "text/plain"),
        415,
        "unsupported_media_type",
        ["application/json"],
    ),
    "no content type": (
        "/v1/completions",
        raw('{"model": "fake-student", "prompt": "x"}', None),
        415,
        "unsupported_media_type",
        ["application/json"],
    ),
    "form encoded": (
        "/v1/predict",
        raw("input=x", "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
        ["application/json"],
    ),
    "multipart": (
        "/v1/predict",
        raw("--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
        415,
        "unsupported_media_type",
        ["application/json"],
    ),
    "json with charset": (
        "/v1/predict",
        raw('{"input": ""}', "application/json; charset=utf-8"),
        400,
        "invalid_value",
        ["input"],
    ),
    # --- wrong types ----------------------------------------------------------------------------
    "model not a string": ("/v1/chat/completions", js({"model": 5, "messages": MSG}), 400, "invalid_value", ["model", "string"]),
    "messages a string": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": "hi"}),
        400,
        "invalid_value",
        ["messages", "list"],
    ),
    "message not an object": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [5]}),
        400,
        "invalid_value",
        ["messages.0"],
    ),
    "role not a string": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": 5, "content": "x"}]}),
        400,
        "invalid_value",
        ["messages.0.role"],
    ),
    "content a number": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
        400,
        "invalid_value",
        ["messages.0.content", "expected str"],
    ),
    "content part text a number": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
        400,
        "invalid_value",
        ["messages.0.content.0.text"],
    ),
    "max_tokens a string": (
        "/v1/chat/completions",
        js(chat_body(max_tokens="5")),
        400,
        "invalid_value",
        ["max_tokens", "integer"],
    ),
    "max_tokens a fraction": (
        "/v1/chat/completions",
        js(chat_body(max_tokens=5.5)),
        400,
        "invalid_value",
        ["max_tokens", "integer"],
    ),
    "max_tokens true": ("/v1/chat/completions", js(chat_body(max_tokens=True)), 400, "invalid_value", ["max_tokens", "integer"]),
    "temperature a string": (
        "/v1/chat/completions",
        js(chat_body(temperature="hot")),
        400,
        "invalid_value",
        ["temperature", "number"],
    ),
    "temperature true": (
        "/v1/chat/completions",
        js(chat_body(temperature=True)),
        400,
        "invalid_value",
        ["temperature", "number"],
    ),
    "top_p a list": ("/v1/chat/completions", js(chat_body(top_p=[1])), 400, "invalid_value", ["top_p"]),
    "n a string": ("/v1/chat/completions", js(chat_body(n="2")), 400, "invalid_value", ["n:", "integer"]),
    "stop a number": ("/v1/chat/completions", js(chat_body(stop=5)), 400, "invalid_value", ["stop", "expected str or list[str]"]),
    "stop list with a number": ("/v1/chat/completions", js(chat_body(stop=["a", 1])), 400, "invalid_value", ["stop.1", "string"]),
    "seed a string": ("/v1/chat/completions", js(chat_body(seed="x")), 400, "invalid_value", ["seed", "integer"]),
    "stream a string": ("/v1/chat/completions", js(chat_body(stream="yes")), 400, "invalid_value", ["stream", "boolean"]),
    "logprobs a string": ("/v1/chat/completions", js(chat_body(logprobs="yes")), 400, "invalid_value", ["logprobs", "boolean"]),
    "stream_options a string": (
        "/v1/chat/completions",
        js(chat_body(stream_options="x")),
        400,
        "invalid_value",
        ["stream_options"],
    ),
    "prompt a number": ("/v1/completions", js({"model": MODEL, "prompt": 3}), 400, "invalid_value", ["prompt", "expected str"]),
    "prompt mixed list": ("/v1/completions", js({"model": MODEL, "prompt": ["a", 1]}), 400, "invalid_value", ["prompt"]),
    "prompt of booleans": ("/v1/completions", js({"model": MODEL, "prompt": [True]}), 400, "invalid_value", ["prompt"]),
    "echo a string": (
        "/v1/completions",
        js({"model": MODEL, "prompt": "x", "echo": "no"}),
        400,
        "invalid_value",
        ["echo", "boolean"],
    ),
    "completion logprobs true": (
        "/v1/completions",
        js({"model": MODEL, "prompt": "x", "logprobs": True}),
        400,
        "invalid_value",
        ["logprobs", "integer"],
    ),
    "input a number": ("/v1/predict", js({"input": 5}), 400, "invalid_value", ["input", "string"]),
    "input a list": ("/v1/predict", js({"input": ["a"]}), 400, "invalid_value", ["input", "string", "chat messages"]),
    "input a bad message": ("/v1/predict", js({"input": [{"role": "user"}]}), 400, "invalid_value", ["input.0", "content"]),
    "threshold a string": ("/v1/predict", js({"input": "x", "threshold": "high"}), 400, "invalid_value", ["threshold", "number"]),
    # --- out of range -----------------------------------------------------------------------------
    "temperature -1": (
        "/v1/chat/completions",
        js(chat_body(temperature=-1)),
        400,
        "invalid_value",
        ["temperature", "greater than or equal to 0"],
    ),
    "temperature 2.5": (
        "/v1/chat/completions",
        js(chat_body(temperature=2.5)),
        400,
        "invalid_value",
        ["temperature", "less than or equal to 2"],
    ),
    "top_p 0": ("/v1/chat/completions", js(chat_body(top_p=0)), 400, "invalid_value", ["top_p", "greater than 0"]),
    "top_p 1.5": ("/v1/chat/completions", js(chat_body(top_p=1.5)), 400, "invalid_value", ["top_p"]),
    "max_tokens 0": (
        "/v1/chat/completions",
        js(chat_body(max_tokens=0)),
        400,
        "invalid_value",
        ["max_tokens", "greater than or equal to 1"],
    ),
    "max_tokens -1": (
        "/v1/completions",
        js({"model": MODEL, "prompt": "x", "max_tokens": -1}),
        400,
        "invalid_value",
        ["max_tokens"],
    ),
    "max_tokens over the server limit": (
        "/v1/chat/completions",
        js(chat_body(max_tokens=10**6)),
        400,
        "invalid_value",
        ["max_tokens", "at most 1024"],
    ),
    "max_completion_tokens over the limit": (
        "/v1/chat/completions",
        js(chat_body(max_completion_tokens=2000)),
        400,
        "invalid_value",
        ["max_tokens", "at most"],
    ),
    "n 0": ("/v1/chat/completions", js(chat_body(n=0)), 400, "invalid_value", ["n:", "greater than or equal to 1"]),
    "n 99": ("/v1/chat/completions", js(chat_body(n=99)), 400, "invalid_value", ["n:", "at most 4"]),
    "n huge": ("/v1/completions", js({"model": MODEL, "prompt": "x", "n": 10**30}), 400, "invalid_value", ["n:", "at most"]),
    "prompts x n over the server": (
        "/v1/completions",
        js({"model": MODEL, "prompt": ["a"] * 8, "n": 4}),
        400,
        "invalid_value",
        ["too many prompts x n"],
    ),
    "top_logprobs 21": (
        "/v1/chat/completions",
        js(chat_body(logprobs=True, top_logprobs=21)),
        400,
        "invalid_value",
        ["top_logprobs"],
    ),
    "top_logprobs without logprobs": (
        "/v1/chat/completions",
        js(chat_body(top_logprobs=2)),
        400,
        "invalid_value",
        ["top_logprobs needs logprobs"],
    ),
    "presence_penalty 3": ("/v1/chat/completions", js(chat_body(presence_penalty=3)), 400, "invalid_value", ["presence_penalty"]),
    "five stop strings": ("/v1/chat/completions", js(chat_body(stop=list("abcde"))), 400, "invalid_value", ["stop", "at most 4"]),
    "empty stop string": ("/v1/chat/completions", js(chat_body(stop="")), 400, "invalid_value", ["stop", "empty"]),
    "completion logprobs 21": (
        "/v1/completions",
        js({"model": MODEL, "prompt": "x", "logprobs": 21}),
        400,
        "invalid_value",
        ["logprobs"],
    ),
    "token id -1": (
        "/v1/completions",
        js({"model": MODEL, "prompt": [-1]}),
        400,
        "invalid_value",
        ["token ids must be in [0, 258)"],
    ),
    "token id past the vocabulary": (
        "/v1/completions",
        js({"model": MODEL, "prompt": [[1, 258]]}),
        400,
        "invalid_value",
        ["token ids"],
    ),
    "token id 2**70": ("/v1/completions", js({"model": MODEL, "prompt": [2**70]}), 400, "invalid_value", ["token ids"]),
    "threshold 1.5": (
        "/v1/predict",
        js({"input": "x", "threshold": 1.5}),
        400,
        "invalid_value",
        ["threshold", "less than or equal to 1"],
    ),
    "threshold -0.1": ("/v1/predict", js({"input": "x", "threshold": -0.1}), 400, "invalid_value", ["threshold"]),
    # --- unknown or missing fields -----------------------------------------------------------------
    "predict: unknown field (typo)": (
        "/v1/predict",
        js({"input": "x", "treshold": 0.5}),
        400,
        "invalid_value",
        ["treshold", "unknown field"],
    ),
    "predict: wrong field name": ("/v1/predict", js({"text": "x"}), 400, "missing_required_parameter", ["input", "required"]),
    "chat: no messages": (
        "/v1/chat/completions",
        js({"model": MODEL}),
        400,
        "missing_required_parameter",
        ["messages", "required"],
    ),
    "chat: no model": ("/v1/chat/completions", js({"messages": MSG}), 400, "missing_required_parameter", ["model", "required"]),
    "completions: no prompt": (
        "/v1/completions",
        js({"model": MODEL}),
        400,
        "missing_required_parameter",
        ["prompt", "required"],
    ),
    "message without role": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"content": "x"}]}),
        400,
        "missing_required_parameter",
        ["messages.0.role"],
    ),
    "user message without content": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": "user"}]}),
        400,
        "invalid_value",
        ["user message needs content"],
    ),
    "unknown role": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        400,
        "invalid_value",
        ["messages.0.role", "'user'"],
    ),
    "unknown model": (
        "/v1/chat/completions",
        js({**chat_body(), "model": "gpt-4o"}),
        404,
        "model_not_found",
        ["gpt-4o", "/v1/models"],
    ),
    "unknown model (completions)": (
        "/v1/completions",
        js({"model": "x", "prompt": "x"}),
        404,
        "model_not_found",
        ["fake-student"],
    ),
    # --- features this server does not have ---------------------------------------------------------
    "tool without its function": (
        "/v1/chat/completions",
        js(chat_body(tools=[{"type": "function"}])),
        400,
        "missing_required_parameter",
        ["tools.0.function"],
    ),
    "legacy functions": (
        "/v1/chat/completions",
        js(chat_body(functions=[{"name": "f"}])),
        400,
        "invalid_value",
        ["functions", "use tools"],
    ),
    "image part": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        400,
        "invalid_value",
        ["image_url", "text parts only"],
    ),
    "unknown response format": (
        "/v1/chat/completions",
        js(chat_body(response_format={"type": "xml"})),
        400,
        "invalid_value",
        ["response_format.type"],
    ),
    "suffix": ("/v1/completions", js({"model": MODEL, "prompt": "x", "suffix": "y"}), 400, "invalid_value", ["suffix"]),
    "best_of 3": ("/v1/completions", js({"model": MODEL, "prompt": "x", "best_of": 3}), 400, "invalid_value", ["best_of"]),
    # --- empty inputs -----------------------------------------------------------------------------
    "no messages at all": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": []}),
        400,
        "invalid_value",
        ["messages", "at least 1"],
    ),
    "empty prompt": ("/v1/completions", js({"model": MODEL, "prompt": ""}), 400, "invalid_value", ["prompt is empty"]),
    "empty prompt list": (
        "/v1/completions",
        js({"model": MODEL, "prompt": []}),
        400,
        "invalid_value",
        ["prompt must not be empty"],
    ),
    "empty token list": ("/v1/completions", js({"model": MODEL, "prompt": [[]]}), 400, "invalid_value", ["prompt is empty"]),
    "empty predict input": ("/v1/predict", js({"input": ""}), 400, "invalid_value", ["input", "at least 1 character"]),
    # --- enormous inputs and prompts beyond the context ----------------------------------------------
    "body over the limit": (
        "/v1/chat/completions",
        js(chat_body("x" * 2 * LIMIT)),
        413,
        "request_too_large",
        [f"over {LIMIT} bytes"],
    ),
    "body over the limit (predict)": (
        "/v1/predict",
        js({"input": "x" * 2 * LIMIT}),
        413,
        "request_too_large",
        ["max_body_bytes"],
    ),
    "prompt beyond the context": (
        "/v1/chat/completions",
        js(chat_body("x" * 400)),
        400,
        "context_length_exceeded",
        ["maximum context length is 256", "reduce"],
    ),
    "prompt + max_tokens beyond the context": (
        "/v1/completions",
        js({"model": MODEL, "prompt": "x" * 100, "max_tokens": 200}),
        400,
        "context_length_exceeded",
        ["256"],
    ),
    "many messages beyond the context": (
        "/v1/chat/completions",
        js({"model": MODEL, "messages": MSG * 60}),
        400,
        "context_length_exceeded",
        ["context length"],
    ),
    "token ids beyond the context": (
        "/v1/completions",
        js({"model": MODEL, "prompt": [5] * 300}),
        400,
        "context_length_exceeded",
        ["context length"],
    ),
    "predict input beyond the context": (
        "/v1/predict",
        js({"input": "y" * 300}),
        400,
        "context_length_exceeded",
        ["context length"],
    ),
}


@pytest.mark.parametrize("name", list(BODY_CASES))
def test_bad_request_body_is_a_4xx_that_says_what_to_fix(client, name):
    route, kwargs, status, code, words = BODY_CASES[name]
    r = client.post(route, **kwargs)
    assert_openai_error(r, status, code)
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, (name, message)


def test_oversized_body_without_content_length_is_413(client):
    """A chunked upload has no Content-Length: the server counts while reading and stops at the limit."""

    def chunks():
        yield b'{"input": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/predict", content=chunks(), headers=J)
    assert_openai_error(r, 413, "request_too_large")


def test_lying_content_length_is_413_before_reading(client):
    r = client.post("/v1/predict", content=b'{"input": "x"}', headers={**J, "content-length": str(10**12)})
    assert r.status_code in (400, 413)  # the test client may refuse the header itself; never a 5xx


@pytest.mark.parametrize(
    "method,route,status",
    [
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("DELETE", "/v1/predict", 405),
        ("POST", "/health", 405),
        ("POST", "/v1/models", 405),
        ("GET", "/v1/embeddings", 404),
        ("GET", "/v1/chat/completions/../../etc/passwd", 404),
        ("GET", "/%00", 404),
    ],
)
def test_wrong_method_or_route(client, method, route, status):
    r = client.request(method, route)
    assert_openai_error(r, status)
    if status == 405:
        assert r.headers["allow"]


def test_unknown_fields_are_ignored_where_openai_clients_send_them(client):
    # OpenAI clients send fields a local server has no use for (user, metadata, store ...)
    r = client.post("/v1/chat/completions", json=chat_body(temperature=0, user="u1", metadata={"a": "b"}, store=False))
    assert r.status_code == 200, r.text


def test_server_stays_healthy_after_every_bad_input(client):
    r = client.post("/v1/predict", json={"input": "what is the rate today"})
    assert r.status_code == 200 and r.json()["edgedistill"]["answered_by"] == "student"
    assert client.get("/ready").json()["status"] == "ready"
    assert "edgedistill_requests_total" in client.get("/metrics").text


# ---- the task spec ------------------------------------------------------------------------------

SPEC_CASES = {
    "not YAML": ("name: [unclosed\n", ["not valid YAML", "line"]),
    "tabs": ("name: t1\n\ttype: classification\n", ["not valid YAML"]),
    "empty file": ("", ["YAML mapping"]),
    "a list": ("- name: t1\n", ["YAML mapping"]),
    "a scalar": ("just words\n", ["YAML mapping"]),
    "python tag": ("name: !!python/object/apply:os.system ['true']\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("name", list(SPEC_CASES))
def test_unreadable_spec(tmp_path, name):
    text, words = SPEC_CASES[name]
    p = tmp_path / "task.yaml"
    p.write_text(text)
    msg = _spec_error(p)
    for w in words:
        assert w in msg, msg


def _spec_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


FIELD_CASES = [
    # wrong types
    ("name", 5, "name", "string"),
    ("labels", "a,b", "labels", "list"),
    ("seeds", "seeds.jsonl", "seeds", ""),
    ("teacher.max_concurrency", "many", "teacher.max_concurrency", "integer"),
    ("generation.temperature", "hot", "generation.temperature", "number"),
    ("validation.self_consistency", "sometimes", "validation.self_consistency", "boolean"),
    ("training.epochs", [1], "training.epochs", "number"),
    # out of range
    ("teacher.max_concurrency", 0, "teacher.max_concurrency", "greater than or equal to 1"),
    ("teacher.timeout_s", -5, "teacher.timeout_s", "greater than 0"),
    ("teacher.gate.min_score", 1.5, "teacher.gate.min_score", "less than or equal to 1"),
    ("generation.top_p", 0, "generation.top_p", "greater than 0"),
    ("generation.per_request", 500, "generation.per_request", "less than or equal to 50"),
    ("validation.near_dup_threshold", 2, "validation.near_dup_threshold", "less than or equal to 1"),
    ("training.learning_rate", 0, "training.learning_rate", "greater than 0"),
    ("name", "../../etc", "name", "pattern"),
    # unknown fields (typos)
    ("temprature", 0.3, "temprature", "unknown field"),
    ("teacher.api_key", "sk-123", "teacher.api_key", "unknown field"),
    ("training.lr", 1e-4, "training.lr", "unknown field"),
    # empty
    ("instructions", "", "instructions", "at least 1 character"),
    ("labels", [], "labels", "at least 2"),
    ("generation.strategies", [], "generation.strategies", "at least 1"),
]


@pytest.mark.parametrize("dotted,value,field,words", FIELD_CASES, ids=[f"{c[0]}={c[1]!r}"[:40] for c in FIELD_CASES])
def test_bad_spec_field(tmp_path, dotted, value, field, words):
    spec = base_spec(tmp_path)
    _set(spec, dotted, value)
    msg = _spec_error(write(tmp_path, spec))
    assert field in msg and words in msg, msg


def test_spec_not_utf8_and_a_folder(tmp_path):
    p = tmp_path / "task.yaml"
    p.write_bytes(b"name: caf\xe9\n")
    assert "UTF-8" in _spec_error(p)
    with pytest.raises(UserError, match="not a file"):
        load_spec(tmp_path)


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    """A "billion laughs" spec loads in milliseconds (PyYAML shares aliased nodes) but anything that
    walks it (validation, the manifest, prompts) would take exponential time and memory."""
    spec = base_spec(tmp_path)
    spec.update(type="extraction", labels=None)
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = yaml.safe_dump({k: v for k, v in spec.items() if k != "labels"})
    text += "output_schema:\n  type: object\n  x-bomb:\n" + "".join(f"    {line}\n" for line in lines)
    p = tmp_path / "task.yaml"
    p.write_text(text)
    assert "repeated YAML aliases" in _spec_error(p)


def test_enormous_but_honest_spec_loads(tmp_path):
    spec = base_spec(tmp_path)
    spec["instructions"] = "Classify the message. " * 20_000  # ~440 kB
    assert len(load_spec(write(tmp_path, spec)).instructions) > 400_000


def test_data_files_with_bad_rows(tmp_path):
    spec = base_spec(tmp_path)
    (tmp_path / "seeds.jsonl").write_text('{"input": "a", "output": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"line 2 is not JSON"):
        load_spec(write(tmp_path, spec)).load_seeds()
    (tmp_path / "seeds.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(UserError, match=r"no 'input' column"):
        load_spec(write(tmp_path, spec)).load_seeds()
    spec["seeds"] = {"path": "seeds.parquet"}
    (tmp_path / "seeds.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"must be .csv or .jsonl"):
        load_spec(write(tmp_path, spec)).load_seeds()


# ---- the CLI (one `error:` line, a non-zero exit, no traceback) -------------------------------


def test_cli_distill_bad_inputs(tmp_path):
    assert_one_line_error(run_cli("distill", str(tmp_path)), "not a file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    assert_one_line_error(run_cli("distill", str(bad)), "not valid YAML")


def test_serve_command_bad_inputs(tmp_path, monkeypatch):
    from edgedistill.serve.cli import serve_command

    monkeypatch.delenv("EDGEDISTILL_TEST_UNSET_VAR", raising=False)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "serve.yaml").write_text("threshhold: 0.5\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    fake = str(tmp_path / "fake.gguf")
    cases = [
        ({"artifact": str(tmp_path / "missing.gguf")}, ["does not exist"]),
        ({"artifact": str(tmp_path / "notes.txt")}, ["not a .gguf"]),
        ({"artifact": fake}, ["bad magic"]),
        ({"artifact": str(tmp_path / "empty")}, ["no manifest.json"]),
        ({"artifact": ""}, ["needs an artifact"]),
        ({"artifact": fake, "threshold": 1.5}, ["threshold", "less than or equal to 1"]),
        ({"artifact": fake, "port": 70000}, ["port", "65535"]),
        ({"artifact": fake, "n_slots": 0}, ["n_slots"]),
        ({"artifact": fake, "config": tmp_path / "serve.yaml"}, ["threshhold"]),
        ({"artifact": fake, "config": tmp_path / "list.yaml"}, ["mapping"]),
        ({"artifact": fake, "config": tmp_path / "nope.yaml"}, ["does not exist"]),
        ({"artifact": fake, "teacher_url": "http://127.0.0.1:9/v1"}, ["teacher_model"]),
        ({"artifact": fake, "api_key_env": "EDGEDISTILL_TEST_UNSET_VAR"}, ["EDGEDISTILL_TEST_UNSET_VAR", "not set"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(UserError) as e:
            serve_command(**kwargs)
        assert "\n" not in str(e.value)
        for w in words:
            assert w in str(e.value), (kwargs, str(e.value))


def test_cli_serve_bad_inputs(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    assert_one_line_error(run_cli("serve", str(tmp_path / "missing.gguf")), "does not exist")
    p = run_cli("serve", str(tmp_path / "fake.gguf"), "--port", "eighty")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "--port" in p.stderr


def test_cli_serve_bad_environment(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"NOPE")
    env = {**os.environ, "EDGEDISTILL_MAX_QUEUE": "lots"}
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "edgedistill.cli", "serve", str(tmp_path / "fake.gguf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert_one_line_error(p, "max_queue", "integer")
