"""OpenAI tools in llama.cpp's *generic* tool-call format: the prompt, the answer's schema and text.

llama.cpp's server answers ``tools`` for a chat template that knows none
(``common_chat_params_init_generic`` in common/chat.cpp) by listing the tools in the system message
and asking for one JSON object, ``{"tool_calls": [{"name", "arguments"}]}`` (parallel calls, the
default), ``{"tool_call": {...}}`` (``parallel_tool_calls`` false) or ``{"response": "..."}`` (text,
with ``tool_choice`` auto). The rules live here once, torch- and serve-free, for the two users that
must agree token for token:

* the chat route (``serve.tools``), for any request's tools;
* a tool_call task with ``tools`` (``edgedistill.task.Task``), whose student is trained and
  evaluated on the prompt the chat route renders for an OpenAI client sending those tools (no
  ``tool_choice``, no ``parallel_tool_calls``: auto and parallel), and answers in the text that
  route parses into ``message.tool_calls``.

The task's answer value is one call ``{"name", "arguments"}`` or "no call" ``{}`` (a text
response); :func:`call_text` writes it as the generic JSON, :func:`call_value` reads it back.
"""

from __future__ import annotations

import json
import re
from typing import Any

RESPOND_IN_JSON = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to the user's request"
)
TOOLS_INTRO = "You can call any of the following tools to satisfy the user's requests: "
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_CALL_SCHEMA = {"type": "object", "maxProperties": 0}  # the answer value "no call": {}
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


def canonical_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools as the prompt lists them: ``{"type", "function": {"name", "description"?,
    "parameters"?, "strict"?}}`` in that key order, unset fields left out (how the chat route dumps
    a request's tools). Raises ValueError (one line) for a tool OpenAI would refuse."""
    out, seen = [], set()
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of OpenAI tools ({type: function, function: {name, parameters}})")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type", "function") != "function":
            raise ValueError(f"tools.{i}: an OpenAI tool is {{type: function, function: {{name, description, parameters}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise ValueError(f"tools.{i}.function.name: {name!r} is not a function name (a-z, A-Z, 0-9, _ and -, at most 64)")
        if name in seen:
            raise ValueError(f"tools.{i}.function.name: {name!r} is declared twice; names must be unique")
        seen.add(name)
        params = f.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise ValueError(f"tools.{i}.function.parameters: must be a JSON schema of type object")
        unknown = set(f) - set(_FUNCTION_KEYS)
        if unknown:
            raise ValueError(f"tools.{i}.function: unknown field {min(unknown)!r}")
        out.append({"type": "function", "function": {k: f[k] for k in _FUNCTION_KEYS if f.get(k) is not None}})
    return out


def closed(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function's arguments schema: no arguments when none is given; declared properties only
    unless the schema says otherwise (``additionalProperties`` absent: false, as OpenAI's strict mode)."""
    if parameters is None:
        return NO_ARGUMENTS
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tool's ``{"name", "parameters"}``, parameters closed (:func:`closed`)."""
    return [{"name": t["function"]["name"], "parameters": closed(t["function"].get("parameters"))} for t in tools]


def system_prompt(tools: list[dict[str, Any]], parallel: bool) -> str:
    """What the system message gets: the format, the tools (as JSON) and an example call."""
    example_call = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
    example = {"tool_calls": [example_call]} if parallel else {"tool_call": example_call}
    return (
        f"{RESPOND_IN_JSON}\n\n{TOOLS_INTRO}{json.dumps(tools, indent=2, ensure_ascii=False)}"
        f"\n\nExample tool call syntax:\n\n{json.dumps(example, indent=2)}\n\n"
    )


def with_tools(messages: list[dict[str, str]], tools: list[dict[str, Any]], parallel: bool) -> list[dict[str, str]]:
    """Rendered messages with the tools added to the system message (a system message first when none)."""
    out = list(messages)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system_prompt(tools, parallel)}
    else:
        out.insert(0, {"role": "system", "content": system_prompt(tools, parallel)})
    return out


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """One call of ``function``: its name (a constant) and arguments of its parameters schema."""
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "const": function["name"]}, "arguments": function["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def answer_schema(
    funcs: list[dict[str, Any]], choice: str, parallel: bool, response_schema: dict[str, Any] | None = None,
    max_calls: int | None = None,
) -> dict[str, Any]:
    """The JSON schema the generic answer is decoded under: one branch per function (``anyOf``);
    ``choice`` "auto" adds the ``response`` branch (text, or ``response_schema``); ``max_calls``
    bounds a parallel answer's calls."""
    calls = [call_schema(f) for f in funcs]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel:
        call: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
        if max_calls is not None:
            call["maxItems"] = max_calls
        answer = _object("tool_calls", call)
    else:
        answer = _object("tool_call", one)
    if choice != "auto":
        return answer
    return {"anyOf": [answer, _object("response", response_schema or {"type": "string"})]}


def _object(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def value_schema(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """A tool_call task's answer value (its output_schema when the spec gives none): one call
    ``{"name": <const>, "arguments": <parameters>}`` of any tool, or (``choice`` auto) "no call" ``{}``."""
    calls = [call_schema(f) for f in functions(tools)]
    if choice == "auto":
        calls.append(NO_CALL_SCHEMA)
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def call_text(value: Any, tools: list[dict[str, Any]], parallel: bool = True) -> str:
    """The generic JSON of an answer value, spelled as the grammar admits it (keys in the schema's
    order, ``json.dumps`` separators): a call ``{"tool_calls": [{"name", "arguments"}]}`` (or
    ``{"tool_call": ...}``), "no call" ``{"response": ""}``."""
    if not isinstance(value, dict) or not value.get("name"):
        return json.dumps({"response": ""})
    params = {f["name"]: f["parameters"] for f in functions(tools)}.get(value["name"], {})
    call = {"name": value["name"], "arguments": ordered(value.get("arguments") or {}, params)}
    return json.dumps({"tool_calls": [call]} if parallel else {"tool_call": call}, ensure_ascii=False)


def ordered(value: Any, schema: Any) -> Any:
    """An object's keys in its schema's ``properties`` order (others after, sorted), recursively."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(value, dict) or not isinstance(props, dict):
        return value
    keys = [k for k in props if k in value] + sorted(k for k in value if k not in props)
    return {k: ordered(value[k], props.get(k)) for k in keys}


def call_value(data: Any) -> Any:
    """The answer value of a generic answer object: its first call ``{"name", "arguments"}``; "no
    call" ``{}`` for a text ``response``; any other object as it is (the value written directly)."""
    if not isinstance(data, dict):
        return data
    if "tool_calls" in data or "tool_call" in data:
        calls = data.get("tool_calls") if "tool_calls" in data else [data["tool_call"]]
        if isinstance(calls, list) and calls and isinstance(calls[0], dict):
            first = calls[0]
            return {"name": first.get("name"), "arguments": first.get("arguments", {})}
        return data
    if set(data) == {"response"}:
        return {}
    return data
