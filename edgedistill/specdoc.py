"""Generate the task-spec reference (docs/task-spec.md) from the pydantic models themselves, so the
docs cannot drift from what `load_spec` accepts (a test checks the committed file is current).

    python -m edgedistill.specdoc > docs/task-spec.md
"""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from edgedistill.spec import TaskSpec

HEADER = """# Task spec reference

Generated from `edgedistill/spec.py` by `python -m edgedistill.specdoc` (a test fails when this file
is out of date). A task spec is one YAML file; unknown keys are refused (typos are errors). Relative
paths start at the spec's folder; a path may use environment variables, `${NAME}` or
`${NAME:-default}` (the demo's data is `${EDGEDISTILL_DATA:-../../../shared/data}/...`);
`pypi:<package>/<file>` names a file inside an installed Python package. See `examples/banking77/task.yaml` for a complete one.
"""


def _type(ann: Any) -> str:
    s = str(ann).replace("typing.", "").replace("pathlib._local.", "").replace("pathlib.", "").replace("edgedistill.spec.", "")
    return s.replace("<class '", "").replace("'>", "").replace("NoneType", "null")


def _models(ann: Any) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models(a)]


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        return "(see below)" if _models(field.annotation) else f"`{field.default_factory()!r}`"
    return f"`{json.dumps(field.default)}`" if not hasattr(field.default, "model_dump") else "(see below)"


def render() -> str:
    out = [HEADER]
    seen: set[type] = set()
    queue: list[tuple[str, type[BaseModel]]] = [("(top level)", TaskSpec)]
    while queue:
        path, model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        out.append(f"\n## `{path}`\n")
        doc = (model.__doc__ or "").strip()
        if doc and model is not TaskSpec:
            out.append(doc.splitlines()[0] + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | {_type(field.annotation).replace('|', 'or')} | {_default(field)} | {desc} |")
            for sub in _models(field.annotation):
                key = f"{path}.{name}" if path != "(top level)" else name
                in_list = any(typing.get_origin(a) is list and sub in typing.get_args(a) for a in (field.annotation, *typing.get_args(field.annotation)))
                queue.append((f"{key}[] (inline list item)" if in_list else key, sub))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
