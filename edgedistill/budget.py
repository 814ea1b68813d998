"""A task's output budget: the most tokens one answer may take, derived without a tokenizer.

:attr:`edgedistill.task.Task.output_budget` is the one value every stage decodes an answer with
(teacher labelling, evaluation, compress's gate, serve's ``/v1/predict``, the bench). The spec may
set it (``generation.label_max_tokens``); otherwise :func:`derived_budget` gives a safe upper bound,
counting on a token holding at least one character (one byte for the labels and enum members,
which are known strings, so a label of non-ASCII characters split into byte tokens still fits):

* classification: the longest label's UTF-8 bytes + :data:`SLACK` (end of sequence and slack);
* extraction / tool_call: the characters of the answer as ``Task.format_answer`` writes it (keys,
  quotes, ``", "`` and ``": "`` separators) with every value at its bound -- a string ``maxLength``
  (else :data:`STRING_CHARS`) + 2 quotes, an enum or const its longest member, integer/number
  :data:`NUMBER_CHARS`, boolean 5, null 4, an array ``maxItems`` (else :data:`ARRAY_ITEMS`) items,
  an object its properties (recursively), ``anyOf``/``oneOf``/a list of types the largest
  alternative -- + :data:`SLACK`, capped at :data:`MAX_STRUCTURED`;
* qa / generation: :data:`TEXT_BUDGET`.
"""

from __future__ import annotations

import json
from typing import Any

SLACK = 2
STRING_CHARS = 48
NUMBER_CHARS = 12
ARRAY_ITEMS = 4
MAX_STRUCTURED = 512
TEXT_BUDGET = 256
_SCALAR = {"integer": NUMBER_CHARS, "number": NUMBER_CHARS, "boolean": 5, "null": 4}
_MAX_DEPTH = 16  # a deeper (or recursive) schema is over the cap anyway


def derived_budget(task_type: str, labels: list[str] | None, schema: dict[str, Any] | None) -> int:
    """The output budget of a task whose spec does not set one (the rule in the module docstring)."""
    if task_type == "classification":
        return max((len(lab.encode("utf-8")) for lab in labels or []), default=1) + SLACK
    if task_type in ("extraction", "tool_call"):
        return min(value_chars(schema or {}) + SLACK, MAX_STRUCTURED)
    return TEXT_BUDGET


def value_chars(schema: Any, depth: int = 0) -> int:
    """An upper bound on the characters of one JSON value of ``schema``, written as
    ``json.dumps(..., ensure_ascii=False)`` writes it (capped: past :data:`MAX_STRUCTURED` the
    exact size no longer matters)."""
    if depth > _MAX_DEPTH or not isinstance(schema, dict):
        return MAX_STRUCTURED
    if "const" in schema:
        return _json_len(schema["const"])
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return max(_json_len(v) for v in schema["enum"])
    alternatives = [s for key in ("anyOf", "oneOf") for s in schema.get(key) or []]
    if alternatives:
        return max(value_chars(s, depth + 1) for s in alternatives)
    kind = schema.get("type")
    if isinstance(kind, list):
        return max((value_chars({**schema, "type": k}, depth + 1) for k in kind), default=MAX_STRUCTURED)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if not isinstance(props, dict) or not props:
            return 2 if schema.get("additionalProperties") is False else MAX_STRUCTURED
        members = [_json_len(k) + 2 + value_chars(v, depth + 1) for k, v in props.items()]  # "key": value
        return min(2 + sum(members) + 2 * (len(members) - 1), MAX_STRUCTURED)
    if kind == "array":
        n = schema.get("maxItems", ARRAY_ITEMS)
        item = value_chars(schema.get("items", {}), depth + 1)
        return min(2 + n * item + 2 * max(n - 1, 0), MAX_STRUCTURED)
    if kind == "string":
        return 2 + int(schema.get("maxLength", STRING_CHARS))
    if kind in _SCALAR:
        return _SCALAR[kind]
    return MAX_STRUCTURED  # no type: any value


def _json_len(v: Any) -> int:
    return len(json.dumps(v, ensure_ascii=False).encode("utf-8"))
