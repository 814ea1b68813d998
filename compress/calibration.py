"""The task's own calibration data: rows of the distillation set (teacher-labelled, never the test
set), rendered exactly as the student sees them in training and serving (chat template + answer).

``--calibration`` takes a dataset folder made by ``edgedistill distill`` (``data/`` with
``train.jsonl`` and a manifest) or any CSV/JSONL file with ``input`` and ``output`` columns.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.runtimes.hf import render_chat

from edgedistill.datafiles import read_rows
from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest, sha256_json
from edgedistill.spec import TaskSpec

CHOICE_ROWS = 100  # rows on which a build chooses between its candidates (``choice_rows``)
MIN_CHOICE_ROWS = 20  # fewer left outside the quantizers' sample: no choice (the build's default)


def input_key(value: Any) -> str:
    """An input (text or conversation) as a comparable string."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass
class Calibration:
    rows: list[dict[str, Any]]  # {"input", "output"}: the quantizers' sample
    path: Path
    data_hash: str  # of the rows actually used
    rest: list[dict[str, Any]] = field(default_factory=list)  # the file's other rows (same shuffle)

    def choice_rows(self, exclude: set[str] = frozenset(), n: int = CHOICE_ROWS) -> list[dict[str, Any]]:
        """The rows a build that chooses between candidates (GGUF: with or without the importance
        matrix) scores them on: up to ``n`` of the file's rows outside the quantizers' sample (rows the
        student was trained on: the choice is between two quantizations of the same weights), none
        whose input is in ``exclude`` (the calibration split's). Never the calibration split, whose
        rows fit the cascade's thresholds: a build picked for scoring best on them would make its
        thresholds look better than they are. Fewer than ``MIN_CHOICE_ROWS``: none (no choice)."""
        rows = [r for r in self.rest if input_key(r["input"]) not in exclude][:n]
        return rows if len(rows) >= MIN_CHOICE_ROWS else []

    def texts(self, spec: TaskSpec, tokenizer: Any) -> list[str]:
        """Prompt + answer, as the student was trained on it (what quantizers should see)."""
        return [render_chat(tokenizer, spec.task.student_messages(r["input"]), spec.task.format_answer(r["output"])) for r in self.rows]

    def prompts(self, spec: TaskSpec, tokenizer: Any, n: int) -> list[list[int]]:
        """Token ids of the first n prompts (no answer): the inputs of the token-agreement check."""
        return [prompt_ids(tokenizer, spec.task.student_messages(r["input"])) for r in self.rows[:n]]


def load_calibration(path: Path, samples: int, seed: int = 0) -> Calibration:
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST).exists() or not (path / "train.jsonl").exists():
            raise UserError(f"--calibration {path}: a folder must be a dataset made by `edgedistill distill` (data/ with train.jsonl)")
        read_manifest(path, verify=True)
        file = path / "train.jsonl"
    elif path.is_file():
        file = path
    else:
        raise UserError(f"--calibration {path} does not exist; pass the distill run's data/ folder or a CSV/JSONL with input,output")
    rows = [{"input": r["input"] if isinstance(r["input"], list) else str(r["input"]), "output": r["output"]} for r in read_rows(file, "--calibration", ["input", "output"], None)]
    if not rows:
        raise UserError(f"--calibration {file} has no rows")
    random.Random(seed).shuffle(rows)
    return Calibration(rows=rows[:samples], path=file, data_hash=sha256_json(rows[:samples]), rest=rows[samples:])


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids; the rendered template already holds any special tokens it needs."""
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])
