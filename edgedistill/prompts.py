"""The task's prompt templates and answer parsing, shared by distill, serve and bench.

One template for the student (what it is trained on and served with) and one for the teacher's
labelling request (which may list the labels or the schema, because an API model has not been
trained on the task). Torch-free: the server applies the same template.
"""

from __future__ import annotations

import json
import re
from typing import Any

Messages = list[dict[str, str]]


def student_messages(spec: Any, text: str) -> Messages:
    """Chat messages the student sees for one input (training adds the assistant turn)."""
    return [{"role": "system", "content": spec.instructions.strip()}, {"role": "user", "content": text}]


def teacher_label_messages(spec: Any, text: str) -> Messages:
    """Chat messages asking the teacher to answer one input."""
    system = spec.instructions.strip()
    if spec.type == "classification" and spec.teacher.list_labels:
        system += "\nAnswer with exactly one label from this list and nothing else: " + ", ".join(spec.labels)
    elif spec.type in ("extraction", "tool_call") and spec.output_schema:
        system += "\nAnswer with one JSON object matching this JSON schema and nothing else:\n" + json.dumps(spec.output_schema)
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def format_answer(spec: Any, output: Any) -> str:
    """The assistant text for a gold/teacher answer (JSON for structured tasks)."""
    if spec.type in ("extraction", "tool_call"):
        return json.dumps(output, ensure_ascii=False, sort_keys=True)
    return str(output).strip()


_JSON_OBJ = re.compile(r"\{.*\}", re.DOTALL)


def parse_answer(spec: Any, text: str) -> tuple[Any, str | None]:
    """Parse a model's answer. Returns (value, error); error is None when the answer is valid.

    Classification: the label, matched exactly after trimming whitespace/quotes/trailing
    punctuation, then case-insensitively. Extraction/tool_call: the first JSON object, checked
    against the schema's required keys and property names. qa/generation: the trimmed text.
    """
    text = (text or "").strip()
    if spec.type == "classification":
        cand = text.splitlines()[0].strip().strip("\"'`").rstrip(".").strip() if text else ""
        if cand in spec.labels:
            return cand, None
        lower = {lab.lower(): lab for lab in spec.labels}
        if cand.lower() in lower:
            return lower[cand.lower()], None
        return cand, "not_a_label"
    if spec.type in ("extraction", "tool_call"):
        m = _JSON_OBJ.search(text)
        if not m:
            return None, "not_json"
        try:
            value = json.loads(m.group(0))
        except json.JSONDecodeError:
            return None, "not_json"
        err = check_schema(value, spec.output_schema or {})
        return value, err
    return text, (None if text else "empty")


def check_schema(value: Any, schema: dict[str, Any]) -> str | None:
    """Validate with jsonschema when installed; the error is a short reason code."""
    try:
        import jsonschema
    except ImportError:  # serve's slim install: keep the cheap structural check
        if not isinstance(value, dict):
            return "schema"
        missing = [k for k in schema.get("required", []) if k not in value]
        return "schema" if missing else None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return "schema"
    return None
