"""The task core: what a task is, how its prompts are rendered, how an answer is parsed and judged.

One typed, torch-free :class:`Task` that every stage uses: the task spec contains it
(``TaskSpec.task``), every artifact's manifest stores it (as the spec's fields, ``"task"``), and
serve and bench load it from there (:meth:`Task.from_manifest`). The rules live here once:

* the student's prompt (what it is trained on and served with) and the teacher's labelling prompt
  (which may list the labels or the schema, because an API model has not been trained on the task);
* the output budget of one answer (:attr:`Task.output_budget`, the same in every stage);
* the assistant text of a gold answer (:meth:`Task.format_answer`) and the parse of a model's
  answer (:meth:`Task.parse_answer`);
* :meth:`Task.is_correct` (an answer against a gold one) and :meth:`Task.same_answer` (two model
  answers, e.g. self-consistency), and the task's metrics (:meth:`Task.score_answers`), of which
  :attr:`Task.metric` is the primary one every gate, comparison, sweep and report uses.

The answer value per type: classification, one of the labels; extraction, a JSON object of the
schema (``{}`` when the input has nothing to extract); tool_call, one call ``{"name": <function>,
"arguments": {...}}`` or "no call" ``{}`` (a null name reads as no call too), under the spec's
output_schema; qa and generation, the text.

An input is a text or a conversation (``edgedistill.conversation``: OpenAI chat messages, earlier
assistant ``tool_calls`` included), whose next answer the model gives; the prompts render either.
A tool_call task with ``tools`` (OpenAI's tools list) is asked and answers exactly as the chat route
asks and parses an OpenAI client that sends those tools (``edgedistill.toolcalls``: llama.cpp's
generic format), so its student answers ``client.chat.completions.create(tools=...)`` with
``message.tool_calls``; its output_schema (the answer value's) is derived from the tools when not given.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgedistill import toolcalls
from edgedistill.budget import derived_budget
from edgedistill.conversation import TaskInput, render_history
from edgedistill.errors import UserError
from edgedistill.intervals import paired_difference, with_intervals
from edgedistill.metrics import CLASSIFICATION, STRUCTURED, answer_correct, primary_metric, task_score, task_scores, type_metrics

TaskType = Literal["classification", "extraction", "qa", "tool_call", "generation"]
Messages = list[dict[str, str]]

TRUNCATED = "truncated"  # the error of an answer that stopped on the length limit (the output budget)
_JSON_OBJ = re.compile(r"\{.*\}", re.DOTALL)


class Task(BaseModel):
    """The fields of a task every stage needs to prompt a model and judge its answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "task"
    type: TaskType
    instructions: str = Field(min_length=1)
    labels: list[str] | None = None
    output_schema: dict[str, Any] | None = None
    list_labels: bool = Field(True, description="The teacher's prompt lists the labels (the spec's teacher.list_labels).")
    show_schema: bool = Field(True, description="The teacher's prompt shows output_schema (the spec's teacher.show_schema).")
    label_max_tokens: int | None = Field(
        None, ge=1, description="The spec's output budget (generation.label_max_tokens); None: derived, see output_budget."
    )
    metric: str = Field("", description="The primary metric (the spec's metric; empty: the type's default, the first of metrics).")
    tools: list[dict[str, Any]] | None = Field(None, description="tool_call: the OpenAI tools the answer calls (the spec's tools).")
    tool_choice: Literal["auto", "required"] = Field(
        "auto", description="tool_call with tools: auto allows \"no call\" ({}, a text response); required: always a call."
    )

    @model_validator(mode="after")
    def _resolve_metric(self) -> Task:
        if self.tools is not None:
            if self.type != "tool_call":
                raise ValueError("tools are for a tool_call task")
            object.__setattr__(self, "tools", toolcalls.canonical_tools(self.tools))
            if not self.output_schema:
                object.__setattr__(self, "output_schema", toolcalls.value_schema(self.tools, self.tool_choice))
        if not self.metric:
            object.__setattr__(self, "metric", primary_metric(self.type))
        elif self.metric not in self.metrics:
            raise ValueError(metric_error(self.type, self.metric))
        return self

    @property
    def output_budget(self) -> int:
        """The most tokens one answer may take, the same in every stage (teacher labelling, the
        teacher gate and evaluation, compress's gate, serve's /v1/predict, the bench): the spec's
        ``generation.label_max_tokens`` when set, else derived from the labels or the schema
        (edgedistill.budget.derived_budget: the longest label's bytes + 2; a structured answer's
        characters with every value at its bound, at most 512; 256 for qa and generation)."""
        if self.label_max_tokens is not None:
            return self.label_max_tokens
        return derived_budget(self.type, self.labels, self.answer_schema() if self.tools else self.output_schema)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The task type's metrics (edgedistill.metrics.TYPE_METRICS), the type's default primary first."""
        return type_metrics(self.type)

    @classmethod
    def from_manifest(cls, d: Any) -> Task:
        """The task of an artifact's manifest (the task spec's fields, as ``compress`` stores them).

        Not ``TaskSpec``: a manifest's task holds paths relative to the machine that built it
        (seeds, test set), which need not exist where the artifact is served."""
        if not isinstance(d, dict):
            raise UserError("the manifest's task must be a mapping (a task spec); rebuild the artifact")
        labels = d.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            raise UserError("the manifest's task labels must be a list of strings; rebuild the artifact")
        try:
            teacher = d.get("teacher") or {}
            gen = d.get("generation") or {}
            task = cls(
                name=str(d.get("name") or "task"),
                type=str(d["type"]),
                instructions=str(d["instructions"]),
                labels=list(d["labels"]) if d.get("labels") else None,
                output_schema=d.get("output_schema"),
                list_labels=bool(teacher.get("list_labels", True)),
                show_schema=bool(teacher.get("show_schema", True)),
                label_max_tokens=None if gen.get("label_max_tokens") is None else int(gen["label_max_tokens"]),
                metric=str(d.get("metric") or ""),
                tools=d.get("tools"),
                tool_choice=str(d.get("tool_choice") or "auto"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the manifest's task is incomplete ({_first_line(e)}); rebuild the artifact") from None
        if task.type == CLASSIFICATION and not task.labels:
            raise UserError("the manifest's classification task has no labels; rebuild the artifact")
        return task

    @property
    def structured(self) -> bool:
        """The answer is a JSON object (extraction, tool_call)."""
        return self.type in STRUCTURED

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema a structured answer is decoded under, with every object's properties in
        sorted order: ``format_answer`` writes keys sorted, and a grammar keeps the schema's order.
        With ``tools``: the generic answer the chat route decodes (``toolcalls.answer_schema``, parallel
        as an OpenAI client asks, one call; "no call" under auto the empty text response), in the
        tools' own order, which ``format_answer`` keeps."""
        if self.tools:
            return toolcalls.answer_schema(
                toolcalls.functions(self.tools), self.tool_choice, parallel=True, response_schema={"const": ""}, max_calls=1
            )
        if not self.structured or not self.output_schema:
            return None
        return _sorted_properties(self.output_schema)

    def response_format(self) -> dict[str, Any] | None:
        """OpenAI's ``response_format`` asking an API teacher for this task's JSON (None: not structured).
        ``strict`` only where OpenAI's strict mode accepts the schema (every property required, no
        additional properties, at every level); otherwise the API follows the schema on a best-effort basis."""
        schema = self.answer_schema()
        if schema is None:
            return None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", self.name)[:64] or "answer"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": _strict_ok(schema)}}

    # --- prompts -------------------------------------------------------------------------------
    def student_messages(self, text: TaskInput) -> Messages:
        """Chat messages the student sees for one input, a text (one user message) or a conversation
        (rendered by ``conversation.render_history``); training adds the assistant turn. With
        ``tools``: what the chat route renders for ``[system: instructions, *conversation]`` and
        those tools (``toolcalls.with_tools``, parallel calls as an OpenAI client asks)."""
        messages = [{"role": "system", "content": self.instructions.strip()}, *_conversation(text)]
        return toolcalls.with_tools(messages, self.tools, parallel=True) if self.tools else messages

    def teacher_messages(self, text: TaskInput) -> Messages:
        """Chat messages asking the teacher to answer one input (with ``tools``: the student's, which
        already list the tools and the answer's shape)."""
        if self.tools:
            return self.student_messages(text)
        system = self.instructions.strip()
        if self.type == CLASSIFICATION and self.list_labels:
            system += "\nAnswer with exactly one label from this list and nothing else: " + ", ".join(self.labels or [])
        elif self.structured and self.output_schema and self.show_schema:
            system += "\nAnswer with one JSON object matching this JSON schema and nothing else:\n" + json.dumps(self.output_schema)
        return [{"role": "system", "content": system}, *_conversation(text)]

    def format_answer(self, output: Any) -> str:
        """The assistant text for a gold/teacher answer (JSON for structured tasks; with ``tools``,
        the generic tool-call JSON, ``toolcalls.call_text``)."""
        if self.tools:
            return toolcalls.call_text(output, self.tools, parallel=True)
        if self.structured:
            return json.dumps(output, ensure_ascii=False, sort_keys=True)
        return str(output).strip()

    def stratified(self, rows: list[Any], limit: int | None) -> list[Any]:
        """The first ``limit`` rows (``Example``s) in round-robin answer order, so a small evaluation
        (the teacher gate, ``--eval-limit``) still sees every label."""
        if not limit or limit >= len(rows):
            return rows
        by_answer: dict[str, list[Any]] = {}
        for r in rows:
            by_answer.setdefault(self.format_answer(r.output), []).append(r)
        out, queues = [], list(by_answer.values())
        while len(out) < limit:
            for q in queues:
                if q and len(out) < limit:
                    out.append(q.pop(0))
        return out

    # --- answers -------------------------------------------------------------------------------
    def parse_answer(self, text: str, finish_reason: str | None = None) -> tuple[Any, str | None]:
        """Parse a model's answer. Returns (value, error); error is None when the answer is valid.

        An answer that stopped on the length limit (``finish_reason`` ``"length"``) is not parsed:
        it is invalid, ``"truncated"`` (a cut label or JSON object may still parse, as the wrong
        answer). Classification: the label, matched exactly after trimming whitespace/quotes/trailing
        punctuation, then case-insensitively. Extraction/tool_call: the first JSON object, checked
        against the schema (with ``tools``, a generic answer read as its call first,
        ``toolcalls.call_value``). qa/generation: the trimmed text.
        """
        if finish_reason == "length":
            return None, TRUNCATED
        text = (text or "").strip()
        if self.type == CLASSIFICATION:
            labels = self.labels or []
            cand = text.splitlines()[0].strip().strip("\"'`").rstrip(".").strip() if text else ""
            if cand in labels:
                return cand, None
            lower = {lab.lower(): lab for lab in labels}
            if cand.lower() in lower:
                return lower[cand.lower()], None
            return cand, "not_a_label"
        if self.structured:
            m = _JSON_OBJ.search(text)
            if not m:
                return None, "not_json"
            try:
                value = json.loads(m.group(0))
            except json.JSONDecodeError:
                return None, "not_json"
            if self.tools:
                value = toolcalls.call_value(value)
            return value, check_schema(value, self.output_schema or {})
        return text, (None if text else "empty")

    def is_correct(self, pred: Any, gold: Any) -> bool:
        """The one rule for "this answer is right", in every stage (edgedistill.metrics.answer_correct).

        ``None`` (no valid answer) is wrong. Classification: the same label. Extraction: the same
        object up to key order, string case and whitespace, ``2 == 2.0``; tool_call: the same
        function and arguments so normalised, or "no call" for "no call" (for both, a gold given as
        JSON text is parsed). qa: the same text after SQuAD's normalisation (case, punctuation,
        articles); generation: the same text after ``normalize_text``."""
        if pred is None:
            return False
        if self.structured and isinstance(gold, str):
            try:
                gold = json.loads(gold)
            except json.JSONDecodeError:
                return False
        return answer_correct(self.type, gold, pred)

    def same_answer(self, a: Any, b: Any) -> bool:
        """Two model answers agree (self-consistency): the correctness rule, with neither missing."""
        return a is not None and b is not None and self.is_correct(a, b)

    def scores(self, golds: list[Any], preds: list[Any]) -> dict[str, Any]:
        """The task type's metrics (edgedistill.metrics.task_scores) over parsed answers, each with
        its 95 % interval ``<metric>_ci`` ([low, high], edgedistill.intervals), and ``n``."""
        return with_intervals(self.type, task_scores(self.type, golds, preds, labels=self.labels), golds, preds, labels=self.labels)

    def compare(self, golds: list[Any], preds_a: list[Any], preds_b: list[Any]) -> dict[str, Any]:
        """Model a minus model b on the same rows, on the primary metric, with its 95 % interval and
        a paired test (edgedistill.intervals.paired_difference: ``diff``, ``diff_ci``, ``p_value``)."""
        return paired_difference(self.type, self.metric, golds, preds_a, preds_b, labels=self.labels)

    def score(self, golds: list[Any], preds: list[Any]) -> float:
        """The task's primary metric (:attr:`metric`) over parsed answers."""
        return task_score(self.type, self.metric, golds, preds, labels=self.labels)

    def score_answers(
        self, golds: list[Any], raw: list[str], finish_reasons: list[str] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Parse raw answers and compute the task's metrics; invalid answers count as wrong, and an
        answer that stopped on the length limit (``finish_reasons``, one per answer) is invalid,
        counted in ``truncated_answers`` too."""
        preds, invalid, truncated = [], 0, 0
        for i, text in enumerate(raw):
            value, err = self.parse_answer(text, finish_reasons[i] if finish_reasons else None)
            invalid += err is not None
            truncated += err == TRUNCATED
            preds.append(None if err else value)
        scores = self.scores(golds, preds)
        scores["invalid_answers"] = invalid
        if finish_reasons is not None:
            scores["truncated_answers"] = truncated
        return preds, scores


def _conversation(text: TaskInput) -> Messages:
    return [{"role": "user", "content": text}] if isinstance(text, str) else render_history(text)


def _sorted_properties(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_sorted_properties(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _sorted_properties(v) for k, v in schema.items() if k != "properties"}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _sorted_properties(schema["properties"][k]) for k in sorted(schema["properties"])}
    return out


def _strict_ok(schema: Any) -> bool:
    """Whether OpenAI's strict structured outputs accept ``schema`` (every object closed, all required)."""
    if isinstance(schema, list):
        return all(_strict_ok(x) for x in schema)
    if not isinstance(schema, dict):
        return True
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required") or []) != set(props):
            return False
    return all(_strict_ok(v) for k, v in schema.items() if isinstance(v, dict | list) and k != "required") and all(
        _strict_ok(v) for v in (schema.get("properties") or {}).values()
    )


def check_schema(value: Any, schema: dict[str, Any]) -> str | None:
    """Validate with jsonschema when installed; the error is a short reason code."""
    try:
        validator = _validator(json.dumps(schema, sort_keys=True))
    except ImportError:  # serve's slim install: keep the cheap structural check
        if not isinstance(value, dict):
            return "schema"
        missing = [k for k in schema.get("required", []) if k not in value]
        return "schema" if missing else None
    return None if validator.is_valid(value) else "schema"


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    """One checked validator per schema: ``jsonschema.validate`` checks the schema itself against
    its metaschema on every call (measured: 45 % of the server's request-handling CPU for
    restaurant8k's answers)."""
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def metric_error(task_type: str, metric: str) -> str:
    """The one-line error for a metric that is not one of the type's."""
    return f"metric {metric!r} is not one of {task_type}'s metrics: {', '.join(type_metrics(task_type))}"


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
