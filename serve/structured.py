"""Structured output on /v1/chat/completions: what a request's answer is decoded under.

``response_format`` ``json_object`` (any JSON object) or ``json_schema`` (that schema), or the JSON
answer of a tool call (``serve.tools``), each a ``runtimes.constrain.Grammar`` for the served
model's vocabulary. A schema is compiled once: :class:`SchemaCache` (on the ``State``) keeps the
last compiled ones by the schema's canonical JSON; the task's own schema is seeded from the
constraint compiled at start. A schema the engine cannot compile is a 400 naming the field, never
a 500.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from edgedistill.runtimes.constrain import Constraint, Grammar, GrammarError, Vocab
from edgedistill.serve.errors import APIError
from edgedistill.serve.tools import ToolSpec
from edgedistill.serve.types import ChatCompletionRequest

from edgedistill.toolcalls import call_schema

ANY_OBJECT = {"type": "object"}


def canonical(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class SchemaCache:
    """Compiled grammars by canonical schema JSON, the least recently used dropped past ``size``."""

    def __init__(self, vocab: Vocab, size: int = 64):
        self.vocab, self.size = vocab, size
        self._grammars: OrderedDict[str, Constraint] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # how many schemas were compiled (not found here)

    def seed(self, schema: dict[str, Any], constraint: Constraint) -> None:
        with self._lock:
            self._grammars[canonical(schema)] = constraint

    def get(self, schema: dict[str, Any]) -> Constraint:
        """The grammar of ``schema`` (a ``GrammarError`` when the engine cannot compile it)."""
        key = canonical(schema)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = Grammar.json_schema(self.vocab, schema)
        with self._lock:
            self.compiled += 1
            self._grammars[key] = grammar
            while len(self._grammars) > self.size:
                self._grammars.popitem(last=False)
        return grammar


def response_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The schema ``response_format`` asks for (None: text)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return ANY_OBJECT
    return (rf.json_schema.schema_ if rf.json_schema else None) or ANY_OBJECT


def request_constraint(cache: SchemaCache, req: ChatCompletionRequest, spec: ToolSpec | None) -> Constraint | None:
    """What the request's answer is decoded under: the tool-call answer, else the response format."""
    if spec is not None:
        try:
            return cache.get(spec.schema())
        except GrammarError as e:
            param = _culprit(cache, spec)
            raise APIError(400, f"{param}: this server cannot use the schema ({e})", code="invalid_value", param=param) from None
    schema = response_schema(req)
    if schema is None:
        return None
    try:
        return cache.get(schema)
    except GrammarError as e:
        raise APIError(
            400,
            f"response_format.json_schema.schema: this server cannot use the schema ({e})",
            code="invalid_value",
            param="response_format.json_schema.schema",
        ) from None


def _bad_tool(cache: SchemaCache, spec: ToolSpec) -> int | None:
    """Which tool's parameters the engine cannot compile (looked for only once the whole failed)."""
    for i, f in enumerate(spec.functions):
        try:
            cache.get(call_schema(f))
        except GrammarError:
            return i
    return None


def _culprit(cache: SchemaCache, spec: ToolSpec) -> str:
    """The field to name for a tool-call grammar that does not compile."""
    i = _bad_tool(cache, spec)
    if i is not None:
        return f"tools.{i}.function.parameters"
    return "response_format.json_schema.schema" if spec.response_schema is not None else "tools"
