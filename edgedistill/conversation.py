"""A task input: one text, or a conversation whose next answer the model gives.

A conversation is a list of OpenAI chat messages (``user``, ``assistant``, ``tool``): an assistant
message may carry ``tool_calls`` (OpenAI's shape, ``arguments`` a JSON string or an object), a tool
message answers one by ``tool_call_id``; the last message is the user's or a tool's (what the model
answers next). The task's instructions are the system message, so an input holds none. A text is
the same as a conversation of one user message.

The rules of an input live here once, for seeds, test sets, pools, ``/v1/predict`` and chat:

* :func:`check_input` -- the shape, with a one-line error naming the message and field;
* :func:`read_input` -- a data file's value (a CSV cell holding a conversation is its JSON text);
* :func:`input_text` -- one canonical text of an input, for dedup, lengths and identity;
* :func:`said_texts` -- what the user and the tools said, message by message: what contamination
  compares (the assistant's turns are the deployed system's own words);
* :func:`last_user_text` -- the last user turn (what input generation varies);
* :func:`render_history` -- the conversation as role/content strings for any chat template, its
  tool calls and tool answers in llama.cpp's generic format (as minja renders them), the one
  rendering the training prompt and the chat route share.
"""

from __future__ import annotations

import json
from typing import Any

Message = dict[str, Any]
TaskInput = str | list[Message]

ROLES = ("user", "assistant", "tool")


class InputError(ValueError):
    """An input that is neither a text nor a conversation (the message is one line)."""


def check_input(value: Any) -> TaskInput:
    """``value`` as a task input (a non-empty text, or a conversation of OpenAI chat messages), or
    :class:`InputError` naming what is wrong."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError("input is empty; give a text or a list of chat messages")
        return value
    if not isinstance(value, list) or not value:
        raise InputError(f"input must be a text or a non-empty list of chat messages, not {type(value).__name__}")
    out = [_check_message(i, m) for i, m in enumerate(value)]
    if out[-1]["role"] == "assistant":
        raise InputError(f"input.{len(out) - 1}: the last message is the assistant's; end with the user's (or a tool's) message")
    return out


def _check_message(i: int, m: Any) -> Message:
    where = f"input.{i}"
    if not isinstance(m, dict):
        raise InputError(f"{where}: a chat message is an object with role and content, not {type(m).__name__}")
    role = m.get("role")
    if role not in ROLES:
        hint = "; the task's instructions are the system message" if role in ("system", "developer") else ""
        raise InputError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}{hint}")
    unknown = set(m) - {"role", "content", "name", "tool_calls", "tool_call_id"}
    if unknown:
        raise InputError(f"{where}: unknown field {min(unknown)!r}")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise InputError(f"{where}.content: must be a string (text parts are not supported in an input)")
    if content is None and role != "assistant":
        raise InputError(f"{where}: a {role} message needs content")
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise InputError(f"{where}.tool_calls: only an assistant message has tool_calls")
        if not isinstance(calls, list):
            raise InputError(f"{where}.tool_calls: must be a list of calls")
        for j, c in enumerate(calls):
            _check_call(f"{where}.tool_calls.{j}", c)
    if role == "assistant" and content is None and not calls:
        raise InputError(f"{where}: an assistant message needs content or tool_calls")
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise InputError(f"{where}: a tool message needs tool_call_id (the id of the call it answers)")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise InputError(f"{where}.name: must be a string")
    return dict(m)


def _check_call(where: str, c: Any) -> None:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        raise InputError(f"{where}: a tool call is {{id, type: function, function: {{name, arguments}}}}")
    if c.get("type", "function") != "function":
        raise InputError(f"{where}.type: only function calls")
    if not isinstance(c.get("id"), str):
        raise InputError(f"{where}.id: a call needs its id (a string; a tool message answers it)")
    f = c["function"]
    if not isinstance(f.get("name"), str) or not f["name"]:
        raise InputError(f"{where}.function.name: must be a non-empty string")
    if not isinstance(f.get("arguments", "{}"), str | dict):
        raise InputError(f"{where}.function.arguments: must be a JSON string or an object")


def read_input(value: Any, csv: bool = False) -> TaskInput:
    """A data file's input value as a task input. In a CSV every cell is text, so a cell holding a
    JSON list is read as the conversation it spells; in JSONL a conversation is a list already."""
    if csv and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return check_input(parsed)
    if isinstance(value, list):
        return check_input(value)
    return check_input(str(value) if value is not None else "")


def input_text(value: TaskInput) -> str:
    """The one canonical text of an input: a text itself; a conversation one line per message,
    ``role: content`` (an assistant's calls as ``name(arguments JSON)``)."""
    if isinstance(value, str):
        return value
    lines = []
    for m in value:
        parts = [m.get("content") or ""] if m.get("content") else []
        for c in m.get("tool_calls") or []:
            parts.append(f"{c['function']['name']}({_json_text(_arguments(c['function'].get('arguments', {})))})")
        lines.append(f"{m['role']}: " + " ".join(parts))
    return "\n".join(lines)


def said_texts(value: TaskInput) -> list[str]:
    """What the other side said, one text per message: a text itself; for a conversation, each user
    and tool message's content. The assistant's turns are left out: they are the deployed system's own
    words (restaurant8k's "How many people will be joining you?" opens a quarter of its test inputs), as
    the system prompt is, and a test-set check on them rejects every conversation that asks the same
    question, whatever the customer answered."""
    if isinstance(value, str):
        return [value]
    return [m.get("content") or "" for m in value if m["role"] in ("user", "tool") and m.get("content")]


def last_user_text(value: TaskInput) -> str:
    """The last user message's text (a text input itself)."""
    if isinstance(value, str):
        return value
    for m in reversed(value):
        if m["role"] == "user":
            return m.get("content") or ""
    return input_text(value)


def render_history(messages: list[Message]) -> list[dict[str, str]]:
    """Messages as role/content strings for any chat template (minja's rendering for a template
    without tools): an assistant message with ``tool_calls`` becomes ``{"tool_calls": [{"name",
    "arguments", "id"}], "content"?}`` (indented JSON), a ``tool`` message a user message
    ``{"tool_response": {"tool"?, "content", "tool_call_id"}}``; a developer message is a system one."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = ("system" if m["role"] == "developer" else m["role"]), m.get("content") or ""
        if m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments", {})), "id": c.get("id")}
                for c in m["tool_calls"]
            ]
            obj: dict[str, Any] = {"tool_calls": calls}
            if content:
                obj["content"] = content
            content = json.dumps(obj, indent=2, ensure_ascii=False)
        elif m["role"] == "tool":
            response: dict[str, Any] = {}
            if m.get("name") is not None:
                response["tool"] = m["name"]
            response["content"] = content
            response["tool_call_id"] = m.get("tool_call_id")
            role, content = "user", json.dumps({"tool_response": response}, indent=2, ensure_ascii=False)
        out.append({"role": role, "content": content})
    return out


def _arguments(args: Any) -> Any:
    """A call's arguments as a value: a JSON string parsed (minja keeps one it cannot parse as the string)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _json_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
