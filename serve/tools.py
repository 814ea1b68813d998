"""OpenAI tool calls for a model whose chat template knows no tools: llama.cpp's *generic* format.

llama.cpp's server answers ``tools`` for such templates (``common_chat_params_init_generic`` in
common/chat.cpp, with minja's polyfills in chat-template.hpp) by asking for one JSON object and
constraining the decoding to it. We do the same on every backend, so SmolLM2 (ChatML, no tools)
calls functions, and the shape of every call is guaranteed by the grammar, not hoped for:

- the prompt: the system message gets llama.cpp's two additions, "Respond in JSON format, either
  with `tool_call` (a request to call tools) or with `response` reply to the user's request" and
  "You can call any of the following tools to satisfy the user's requests: <the tools as JSON>",
  plus an example call in the shape asked for;
- the answer, one JSON object: ``{"tool_call": {"name": ..., "arguments": {...}}}`` (one call:
  ``parallel_tool_calls`` false), ``{"tool_calls": [{"name", "arguments"}, ...]}`` (parallel, the
  default) or, with ``tool_choice`` auto, ``{"response": "..."}`` (text; or, with a json_schema
  ``response_format``, an object of that schema);
- the grammar (:func:`answer_schema`): a JSON schema built from the tools, one branch per tool with
  ``name`` a ``const`` and ``arguments`` the tool's ``parameters`` (``anyOf`` over the tools); a
  named ``tool_choice`` keeps that tool's branch only, ``required`` drops the ``response`` branch;
- the history (:func:`render_messages`), as minja renders it for such templates: an assistant
  message with ``tool_calls`` becomes ``{"tool_calls": [{"name", "arguments", "id"}], "content"?}``
  (indented JSON) and a ``tool`` message a user message ``{"tool_response": {"tool"?, "content",
  "tool_call_id"}}``.

Two deliberate differences from llama.cpp: the model writes no call ``id`` (llama.cpp asks for one
of 4+ characters in parallel mode; here the server gives each call ``call_<random>``, as OpenAI
does, and a small model does not spend tokens on it), and the example call has the shape the
grammar asks for (minja's example always shows ``tool_calls``).

A tool call's confidence is per field of the call (its name and each argument; see
``serve.confidence.field_confidence``), the lowest deciding; :func:`openai_paths` names the fields
as the OpenAI message does (``tool_calls.0.arguments.city``).

The prompt, the schema and the history's rendering live in the core (``edgedistill.toolcalls``,
``edgedistill.conversation``), which a tool_call task with ``tools`` shares: its student is trained
on the very prompt this route renders for those tools.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from edgedistill.serve.errors import APIError
from edgedistill.serve.types import ChatCompletionRequest, ChatMessage, NamedToolChoice

from edgedistill import toolcalls
from edgedistill.conversation import Message, render_history


@dataclass
class ToolSpec:
    """The tools of one request, as the model is asked to use them."""

    tools: list[dict[str, Any]]  # the request's tools, as sent (what the prompt lists)
    functions: list[dict[str, Any]]  # each tool's function with its parameters schema filled in
    choice: str  # "auto", "required" or "function" (``forced`` names it)
    parallel: bool
    forced: str | None = None
    response_schema: dict[str, Any] | None = None  # auto: the response's schema (a json_schema response_format)

    def schema(self) -> dict[str, Any]:
        """The JSON schema the answer is decoded under (see the module docstring)."""
        return answer_schema(self)

    def system_prompt(self) -> str:
        return toolcalls.system_prompt(self.tools, self.parallel)


def tool_spec(req: ChatCompletionRequest, response_schema: dict[str, Any] | None = None) -> ToolSpec | None:
    """The request's tools checked (a 400 naming the field), or None when the model is not to call
    any (no tools, or ``tool_choice`` none). ``response_schema``: what a text answer must be instead
    (the request's json_schema ``response_format``)."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise APIError(
                400, "tool_choice: needs tools (send the functions to choose from)", code="invalid_value", param="tool_choice"
            )
        return None
    seen: dict[str, int] = {}
    functions = []
    for i, tool in enumerate(req.tools):
        f = tool.function
        if f.name in seen:
            raise APIError(
                400,
                f"tools.{i}.function.name: {f.name!r} is already the name of tools.{seen[f.name]}; names must be unique",
                code="invalid_value",
                param=f"tools.{i}.function.name",
            )
        seen[f.name] = i
        functions.append({"name": f.name, "parameters": toolcalls.closed(f.parameters)})
    forced = None
    if isinstance(choice, NamedToolChoice):
        forced = choice.function.name
        if forced not in seen:
            raise APIError(
                400,
                f"tool_choice.function.name: no tool is named {forced!r} (tools: {', '.join(seen)})",
                code="invalid_value",
                param="tool_choice.function.name",
            )
        mode = "function"
    else:
        mode = choice or "auto"
    if mode == "none":
        return None
    tools = toolcalls.canonical_tools([t.model_dump(exclude_none=True) for t in req.tools])
    return ToolSpec(tools, functions, mode, req.parallel_tool_calls, forced, response_schema)


def answer_schema(spec: ToolSpec) -> dict[str, Any]:
    funcs = [f for f in spec.functions if spec.forced is None or f["name"] == spec.forced]
    return toolcalls.answer_schema(funcs, spec.choice, spec.parallel, spec.response_schema)


def message_dict(m: ChatMessage) -> Message:
    """A request's chat message as the core's plain message (``edgedistill.conversation``)."""
    d: Message = {"role": m.role, "content": m.text() if m.content is not None else None}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d


def render_messages(messages: list[ChatMessage], spec: ToolSpec | None) -> list[dict[str, str]]:
    """The messages as role/content strings for any chat template (``conversation.render_history``:
    the history's tool calls and tool answers in the generic format) and, with ``spec``, the tools
    in the system message (``toolcalls.with_tools``), the rendering a tool_call task's student is
    trained on."""
    out = render_history([message_dict(m) for m in messages])
    return toolcalls.with_tools(out, spec.tools, spec.parallel) if spec is not None else out


@dataclass
class ToolAnswer:
    """What the model's JSON says: tool calls (OpenAI's shape, arguments as a JSON string), or text."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None


def parse_answer(text: str, spec: ToolSpec) -> ToolAnswer | None:
    """The generic-format answer ``text`` as OpenAI's message; None when it is not one (cut off by
    max_tokens: the grammar guarantees the shape of a complete answer only)."""
    try:
        data = json.loads(text)
    except ValueError:
        return _cut_response(text)
    if not isinstance(data, dict):
        return None
    calls = data.get("tool_calls") if "tool_calls" in data else [data["tool_call"]] if "tool_call" in data else None
    if calls is not None:
        if not (isinstance(calls, list) and calls and all(isinstance(c, dict) and "name" in c for c in calls)):
            return None
        return ToolAnswer(None, [_openai_call(c) for c in calls])
    if "response" in data:
        r = data["response"]
        return ToolAnswer(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False), None)
    return None


def _cut_response(text: str) -> ToolAnswer | None:
    """A text response cut off by max_tokens (``{"response": "It is su``): the text so far, as
    llama.cpp's parser heals a partial answer; a cut-off tool call stays unparsed."""
    if not text.startswith('{"response": "'):
        return None
    for cut in range(6):  # the end of a cut escape sequence dropped
        try:
            return ToolAnswer(json.loads(text[: len(text) - cut] + '"}')["response"], None)
        except ValueError:
            continue
    return None


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)},
    }


def openai_paths(fields: dict[str, float]) -> dict[str, float]:
    """Field paths of the generic JSON as the OpenAI message names them: ``tool_call.name`` ->
    ``tool_calls.0.name``, ``response`` -> ``content`` (``response.x`` -> ``content.x``)."""
    out = {}
    for path, v in fields.items():
        if path.startswith("tool_call."):
            path = "tool_calls.0." + path.removeprefix("tool_call.")
        elif path == "response" or path.startswith("response."):
            path = "content" + path.removeprefix("response")
        out[path] = v
    return out
