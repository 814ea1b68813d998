"""Structured output and tool calls on the real thing: SmolLM2-135M GGUF behind a real
``edgedistill serve`` process, called with the unchanged openai client. Sampled at temperature
1.0, every answer must still parse and satisfy its schema: the grammar guarantees it, not the model.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from tests.test_serve_llama import MODEL_ID, Server, gguf  # noqa: F401  (gguf: the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.llama]  # minutes on a 2-core box (100 sampled answers)

ANSWER = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["sentiment", "stars"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "enum": ["UTC", "Europe/Paris", "America/New_York"]}},
                "required": ["timezone"],
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client(gguf):  # noqa: F811
    from openai import OpenAI

    with Server(gguf, "--threshold", "0", "--n-slots", "8", "--max-n", "8") as s:
        yield OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)


def test_json_schema_100_sampled_answers_all_satisfy_the_schema(client):
    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": ANSWER, "strict": True}}
    review = [{"role": "user", "content": "Review: the pizza was cold and the waiter rude. Rate it as JSON."}]

    def ask(seed: int):
        return client.chat.completions.create(
            model=MODEL_ID, messages=review, response_format=rf, temperature=1.0, n=8, seed=seed, max_tokens=64
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        answers = [ch for r in pool.map(ask, range(13)) for ch in r.choices][:100]
    wall = time.perf_counter() - t0
    valid = 0
    for ch in answers:
        try:
            jsonschema.validate(json.loads(ch.message.content), ANSWER)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    print(f"\njson_schema: {valid}/{len(answers)} sampled answers valid at temperature 1.0 in {wall:.1f} s")
    assert len(answers) == 100 and valid == 100


def assert_calls(message, names=tuple(PARAMS)):
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def streamed(client, **kw):
    """The openai client's own stream helper assembles the deltas into the final message."""
    with client.beta.chat.completions.stream(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=48, **kw) as s:
        for _ in s:
            pass
        return s.get_final_completion().choices[0]


# one call each (parallel_tool_calls false): in a list, SmolLM2-135M tends to repeat calls until max_tokens
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("choice", ["auto", "required", "get_time", "none"])
def test_tool_calls_satisfy_the_declared_schema(client, choice, stream):
    from openai import LengthFinishReasonError

    tool_choice = {"type": "function", "function": {"name": choice}} if choice == "get_time" else choice
    kw = {"tool_choice": tool_choice, "temperature": 1.0, "seed": 7, "parallel_tool_calls": False}
    try:
        if stream:
            ch = streamed(client, **kw)
        else:
            ch = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=48, **kw).choices[0]
    except LengthFinishReasonError as e:  # the stream helper refuses an answer cut off by max_tokens: text
        ch = e.completion.choices[0]
    if choice == "none" or (choice == "auto" and not ch.message.tool_calls):
        assert ch.message.content and not ch.message.tool_calls and ch.finish_reason in ("stop", "length")
        assert not ch.message.content.startswith('{"response"')  # the text, not the generic format's JSON
        return
    assert ch.finish_reason == "tool_calls", ch
    assert_calls(ch.message, ("get_time",) if choice == "get_time" else tuple(PARAMS))
